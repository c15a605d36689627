# SPDX-License-Identifier: GPL-2.0-only
"""The switching clients at work on running vCPUs.

:class:`ClientMachine` boots the bundled kernel image (boot-time patching
as ``make demo`` does), sets every vCPU running the image's
``client_loop`` -- which calls a table of probe functions over and over and
checks every result against what the host currently accepts -- and gives
the host :class:`StaticKeys` and :class:`StaticCalls` for the image.

:meth:`ClientMachine.expect` is the oracle: it narrows what each probe may
return to the values given, waits until every CPU has made two more full
rounds, and checks each CPU's last result.  Around an update the host
first *widens* (old or new value allowed), patches, then expects the new
value: any other value seen at any time by any CPU is counted by the guest
("bad") and reported.

:func:`static_keys_selftest` and :func:`static_call_selftest` are the
kernel's ``lib/test_static_keys.c`` and ``static_call_selftest`` redone on
the running CPUs; :func:`clients_demo_lines` is what ``make demo`` prints
at its end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from .._jump_label._keys import StaticKeys
from .._static_call._calls import StaticCalls
from ..kernel import Kernel
from ..selftests import SelfTestResult, many_key_flip, static_call_selftest, static_keys_selftest
from ..images import load_bundled
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import read_tables
from ._machine import COARSE, SchedPolicy
from ._workload import boot_workload

__all__ = ["ClientMachine", "Probe", "SelfTestResult", "static_keys_selftest",
           "static_call_selftest", "many_key_flip", "clients_demo_lines", "CLIENT_SLOTS"]

CLIENT_SLOTS = 64
CLIENT_CPUS = 8
_HDR = 128
_SLOT = 128
_REC = _HDR + CLIENT_SLOTS * _SLOT
# slot fields (8 bytes each)
_FN, _ARG, _A0, _A1, _LO, _HI, _LAST, _CALLS, _BAD, _BADVAL = range(10)


def _s64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


@dataclass(slots=True)
class Probe:
    """A guest function ``int fn(long)`` every CPU calls, and its argument."""

    name: str
    addr: int
    arg: int = 0


class ClientMachine:
    """The kernel image booted on *cpus* vCPUs with the client loop on each:
    a sim harness around a :class:`~textpoke.kernel.Kernel` (``.kernel``;
    its clients are ``cm.kernel.keys``, ``.calls``, ``.kprobes``,
    ``.modules`` ...).  A context manager; :meth:`close` frees the kernel,
    its core and the machine."""

    def __init__(self, *, cpus: int = 4, seed: int = 0, line_size: int = 64,
                 policy: SchedPolicy = COARSE, features: tuple[str, ...] | None = None,
                 rethunk: bool = False) -> None:
        if not 1 <= cpus <= CLIENT_CPUS:
            raise ValueError(f"cpus must be 1..{CLIENT_CPUS} (the image has {CLIENT_CPUS} "
                             "client records)")
        self.image = load_bundled(KERNEL_IMAGE)
        self.tables = read_tables(self.image)
        self.w = boot_workload(ncpus=cpus, seed=seed, line_size=line_size, policy=policy,
                               image=self.image)
        self.sim = self.w.sim
        self.kernel: Kernel | None = None
        try:
            self.kernel = Kernel.start(self.sim, self.image, tables=self.tables,
                                       features=features, rethunk=rethunk)
            self.kernel.keys, self.kernel.calls      # read the tables before the CPUs run
        except BaseException:
            self.close()
            raise
        self.recs = self.image.sym("client_recs")
        self.probes: list[Probe] = []
        self.started = False

    # the kernel's parts under the names the harness always used
    @property
    def core(self):
        return self.kernel.core

    @property
    def boot(self):
        return self.kernel.boot

    @property
    def keys(self) -> StaticKeys:
        return self.kernel.keys

    @property
    def calls(self) -> StaticCalls:
        return self.kernel.calls

    def __enter__(self) -> "ClientMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.kernel is not None:
                self.kernel.close()
        finally:
            self.w.close()

    # ------------------------------------------------------------ probes
    def sym(self, name: str) -> int:
        return self.image.sym(name)

    def _slot(self, cpu: int, i: int, f: int) -> int:
        return self.recs + cpu * _REC + _HDR + i * _SLOT + 8 * f

    def _w(self, addr: int, v: int) -> None:
        self.sim.mem_write(addr, struct.pack("<q", _s64(v)))

    def _r(self, addr: int) -> int:
        return _s64(self.sim.read_u64(addr))

    def add_probe(self, name: str, addr: int | None = None, arg: int = 0,
                  allow: Iterable[int] = ()) -> int:
        """Add a probe to every CPU's table; return its slot."""
        i = len(self.probes)
        if i >= CLIENT_SLOTS:
            raise ValueError(f"at most {CLIENT_SLOTS} probes")
        p = Probe(name, self.sym(name) if addr is None else addr, arg)
        self.probes.append(p)
        for cpu in self.sim.cpus:
            self.allow(i, allow, cpus=[cpu])
            self._w(self._slot(cpu, i, _ARG), arg)
            self._w(self._slot(cpu, i, _FN), p.addr)
        for cpu in self.sim.cpus:
            self._w(self.recs + cpu * _REC + 8, len(self.probes))
        return i

    def slot_of(self, name: str) -> int:
        return next(i for i, p in enumerate(self.probes) if p.name == name)

    def enable_probe(self, i: int, addr: int) -> None:
        for cpu in self.sim.cpus:
            self._w(self._slot(cpu, i, _FN), addr)

    def disable_probe(self, i: int) -> None:
        for cpu in self.sim.cpus:
            self._w(self._slot(cpu, i, _FN), 0)

    def allow(self, i: int, values: Iterable[int], rng: tuple[int, int] | None = None,
              cpus: Iterable[int] | None = None) -> None:
        """What probe *i* may return from now on: one of *values* (at most
        two) or a value in *rng* (inclusive)."""
        vals = list(values)[:2] or [0x7FFF_FFFF_0000]
        a0, a1 = vals[0], vals[-1]
        lo, hi = rng if rng else (1, 0)
        for cpu in (self.sim.cpus if cpus is None else cpus):
            for f, v in ((_A0, a0), (_A1, a1), (_LO, lo), (_HI, hi)):
                self._w(self._slot(cpu, i, f), v)

    def start(self) -> None:
        for cpu in self.sim.cpus:
            self.sim.start_cpu(cpu, self.sym("client_loop"), {"rdi": self.recs + cpu * _REC})
        self.started = True

    def passes(self, cpu: int) -> int:
        return self.sim.read_u64(self.recs + cpu * _REC)

    def live_cpus(self) -> list[int]:
        dead = {o.cpu for o in self.sim.oopses}
        return [c for c in self.sim.cpus if c not in dead]

    def wait_passes(self, n: int = 2, max_steps: int = 2_000_000) -> bool:
        """Run until every live CPU has completed *n* more rounds."""
        cpus = self.live_cpus()
        goal = {c: self.passes(c) + n for c in cpus}
        return self.sim.run_until(lambda: all(self.passes(c) >= goal[c] for c in cpus
                                              if c in self.live_cpus()), max_steps)

    def last(self, i: int) -> list[int]:
        return [self._r(self._slot(c, i, _LAST)) for c in self.sim.cpus]

    def calls_made(self, i: int) -> int:
        return sum(self._r(self._slot(c, i, _CALLS)) for c in self.sim.cpus)

    def bad(self) -> list[dict]:
        out = []
        for c in self.sim.cpus:
            for i, p in enumerate(self.probes):
                n = self._r(self._slot(c, i, _BAD))
                if n:
                    out.append({"cpu": c, "probe": p.name, "count": n,
                                "value": self._r(self._slot(c, i, _BADVAL))})
        return out

    def expect(self, want: dict[int, int]) -> dict[int, list[int]]:
        """After an update: let every call in flight finish (one round),
        narrow probe i to want[i], let every CPU make two more rounds and
        return {i: last values} for the probes whose CPUs disagree
        (key -1: a CPU that made no progress)."""
        ok = self.wait_passes(1)
        for i, v in want.items():
            self.allow(i, [v])
        ok = self.wait_passes(2) and ok
        wrong = {i: self.last(i) for i, v in want.items() if any(x != v for x in self.last(i))}
        if not ok:
            wrong[-1] = [self.passes(c) for c in self.sim.cpus]
        return wrong

    def widen(self, i: int, old: int, new: int) -> None:
        self.allow(i, [old, new])

    @property
    def oopses(self) -> int:
        return len(self.sim.oopses)


def clients_demo_lines(*, cpus: int = 4, seed: int = 0) -> list[str]:
    """The few lines ``make demo`` ends with: each client at work."""
    lines = []
    with ClientMachine(cpus=cpus, seed=seed) as cm:
        r = static_keys_selftest(cm)
        lines.append(f"static keys: lib/test_static_keys.c on {cpus} running vCPUs: "
                     f"{sum(c['passed'] for c in r.cases)}/{len(r.cases)} checks passed, "
                     f"{r.batches} batches, {r.syncs} syncs, {r.oopses} oopses")
        m = many_key_flip(cm, 1000, flips=2)
        c = m.cases[-1]
        lines.append(f"static keys: a key of {c['entries']} sites switched twice while the CPUs "
                     f"run them: {m.batches} batches, {m.syncs} syncs, "
                     f"{'ok' if m.passed else 'FAILED'}, {m.oopses} oopses")
    with ClientMachine(cpus=cpus, seed=seed) as cm:
        r = static_call_selftest(cm)
        lines.append(f"static calls: static_call_selftest and every site kind on {cpus} "
                     f"running vCPUs: {sum(c['passed'] for c in r.cases)}/{len(r.cases)} "
                     f"checks passed, {r.syncs} syncs, {r.oopses} oopses")
    return lines
