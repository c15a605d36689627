# SPDX-License-Identifier: GPL-2.0-only
"""What a client self-test needs from the machine it runs on.

A self-test acts through a :class:`~textpoke.kernel.Kernel` (its clients,
and the machine's protocol and capabilities) while every CPU runs a *probe
loop*: a guest loop that calls a table of functions ``long fn(long)`` over
and over and counts every result the host does not currently accept.  The
rig is whatever provides that loop on a machine -- on the sim,
:class:`textpoke.sim._clients_demo.ClientMachine` (the bundled image's
``client_loop`` on each vCPU); on a live process,
:class:`textpoke.live._rig.LiveClientRig` (the same image loaded into a
process, the same loop in its threads).  The self-tests in this package use nothing else: no backend
is imported."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Protocol

__all__ = ["ClientRig", "Probe", "ProbeLoopRig", "KernelRig", "CLIENT_SLOTS", "CLIENT_CPUS", "CLIENT_REC"]

#: the image's client_loop records (images/kernel/clients.c): a header of
#: 128 bytes (passes, nslots), then 64 slots of 128 bytes
CLIENT_SLOTS = 64
CLIENT_CPUS = 8
_HDR = 128
_SLOT = 128
CLIENT_REC = _HDR + CLIENT_SLOTS * _SLOT
# slot fields (8 bytes each)
_FN, _ARG, _A0, _A1, _LO, _HI, _LAST, _CALLS, _BAD, _BADVAL = range(10)


@dataclass(slots=True)
class Probe:
    """A guest function ``int fn(long)`` every CPU calls, and its argument."""

    name: str
    addr: int
    arg: int = 0


class ClientRig(Protocol):
    #: the booted kernel: ``kernel.core``, ``kernel.machine``, the clients
    kernel: object
    started: bool
    probes: list

    @property
    def core(self): ...
    @property
    def keys(self): ...
    @property
    def calls(self): ...
    @property
    def oopses(self) -> int: ...

    def sym(self, name: str) -> int: ...

    def add_probe(self, name: str, addr: int | None = None, arg: int = 0,
                  allow: Iterable[int] = ()) -> int:
        """Add a function to every CPU's table; return its slot."""

    def enable_probe(self, i: int, addr: int) -> None:
        """Call *addr* from slot *i* again (after :meth:`disable_probe`)."""

    def disable_probe(self, i: int) -> None: ...

    def allow(self, i: int, values: Iterable[int], rng: tuple[int, int] | None = None,
              cpus: Iterable[int] | None = None) -> None:
        """What slot *i* may return from now on."""

    def widen(self, i: int, old: int, new: int) -> None:
        """Slot *i* may return *old* or *new* (around an update)."""

    def start(self) -> None: ...

    def wait_passes(self, n: int = 2, max_steps: int = 2_000_000) -> bool:
        """Let every live CPU complete *n* more rounds of the loop."""

    def expect(self, want: dict[int, int]) -> dict[int, list[int]]:
        """Narrow each slot to one value, let every CPU run two rounds,
        return the CPUs' last values that differ (empty: all right)."""

    def bad(self) -> list[dict]:
        """Every result the guest counted as not accepted when it came."""


def _s64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


class KernelRig:
    """The lifetime every backend's rig shares: a context manager whose
    :meth:`close` stops the kernel (``kernel``, its clients and core) first
    and then, whatever that raised, frees the rest (:meth:`_free`: the
    machine, a process); :meth:`_closing_on_error` wraps the rig's set-up
    so that whatever fails while it is built frees what was made."""

    kernel: Any = None
    #: the kernel's image (its symbols)
    image: Any = None

    def sym(self, name: str) -> int:
        return self.image.sym(name)

    def _free(self) -> None:
        """Free what the rig holds besides the kernel."""
        raise NotImplementedError

    @contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.kernel is not None:
                self.kernel.close()
        finally:
            self._free()


def _kernel_part(name: str, doc: str) -> property:
    """A read-only attribute of the rig that is the rig's kernel's *name*."""
    return property(lambda self: getattr(self.kernel, name), doc=doc)


class ProbeLoopRig:
    """The host's half of the image's ``client_loop`` records, the same on
    every machine: probes, what each may return, the oracle
    (:meth:`expect`).  A backend's rig gives the records' address
    (``recs``), the machine's data memory (``mem``), the CPUs that run the
    loop (:meth:`loop_cpus`, each using the record of its number) and a way
    to let them run until a predicate holds (:meth:`_run_until`)."""

    recs: int
    probes: list
    started: bool
    kernel: Any

    # --- the booted kernel's parts (the ClientRig protocol) -------------------
    core = _kernel_part("core", "the kernel's text-patching core")
    boot = _kernel_part("boot", "what the kernel's boot-time passes did")
    keys = _kernel_part("keys", "the kernel's static keys")
    calls = _kernel_part("calls", "the kernel's static calls")

    # --- what a backend gives -------------------------------------------------
    @property
    def mem(self):
        raise NotImplementedError

    def loop_cpus(self) -> list[int]:
        """The record numbers of the CPUs running (or about to run) the loop."""
        raise NotImplementedError

    def live_cpus(self) -> list[int]:
        """Those of :meth:`loop_cpus` still running (not stopped by an oops)."""
        return self.loop_cpus()

    def _run_until(self, pred: Callable[[], bool], max_steps: int) -> bool:
        raise NotImplementedError

    def sym(self, name: str) -> int:
        """(:class:`KernelRig`'s, over the rig's image.)"""
        raise NotImplementedError

    # --- the records ------------------------------------------------------------
    def _slot(self, cpu: int, i: int, f: int) -> int:
        return self.recs + cpu * CLIENT_REC + _HDR + i * _SLOT + 8 * f

    def _w(self, addr: int, v: int) -> None:
        self.mem.write(addr, struct.pack("<q", _s64(v)))

    def _r(self, addr: int) -> int:
        return struct.unpack("<q", self.mem.read(addr, 8))[0]

    def add_probe(self, name: str, addr: int | None = None, arg: int = 0,
                  allow: Iterable[int] = ()) -> int:
        """Add a probe to every CPU's table; return its slot."""
        i = len(self.probes)
        if i >= CLIENT_SLOTS:
            raise ValueError(f"at most {CLIENT_SLOTS} probes")
        p = Probe(name, self.sym(name) if addr is None else addr, arg)
        self.probes.append(p)
        for cpu in self.loop_cpus():
            self.allow(i, allow, cpus=[cpu])
            self._w(self._slot(cpu, i, _ARG), arg)
            self._w(self._slot(cpu, i, _FN), p.addr)
        for cpu in self.loop_cpus():
            self._w(self.recs + cpu * CLIENT_REC + 8, len(self.probes))
        return i

    def slot_of(self, name: str) -> int:
        return next(i for i, p in enumerate(self.probes) if p.name == name)

    def enable_probe(self, i: int, addr: int) -> None:
        for cpu in self.loop_cpus():
            self._w(self._slot(cpu, i, _FN), addr)

    def disable_probe(self, i: int) -> None:
        for cpu in self.loop_cpus():
            self._w(self._slot(cpu, i, _FN), 0)

    def allow(self, i: int, values: Iterable[int], rng: tuple[int, int] | None = None,
              cpus: Iterable[int] | None = None) -> None:
        """What probe *i* may return from now on: one of *values* (at most
        two) or a value in *rng* (inclusive)."""
        vals = list(values)[:2] or [0x7FFF_FFFF_0000]
        a0, a1 = vals[0], vals[-1]
        lo, hi = rng if rng else (1, 0)
        for cpu in (self.loop_cpus() if cpus is None else cpus):
            for f, v in ((_A0, a0), (_A1, a1), (_LO, lo), (_HI, hi)):
                self._w(self._slot(cpu, i, f), v)

    def widen(self, i: int, old: int, new: int) -> None:
        self.allow(i, [old, new])

    def passes(self, cpu: int) -> int:
        return self._r(self.recs + cpu * CLIENT_REC)

    def wait_passes(self, n: int = 2, max_steps: int = 2_000_000) -> bool:
        """Run until every live CPU has completed *n* more rounds."""
        cpus = self.live_cpus()
        goal = {c: self.passes(c) + n for c in cpus}
        return self._run_until(lambda: all(self.passes(c) >= goal[c] for c in cpus
                                           if c in self.live_cpus()), max_steps)

    def last(self, i: int) -> list[int]:
        return [self._r(self._slot(c, i, _LAST)) for c in self.loop_cpus()]

    def calls_made(self, i: int) -> int:
        return sum(self._r(self._slot(c, i, _CALLS)) for c in self.loop_cpus())

    def bad(self) -> list[dict]:
        out = []
        for c in self.loop_cpus():
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
            wrong[-1] = [self.passes(c) for c in self.loop_cpus()]
        return wrong
