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
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .._jump_label._keys import StaticKeys
from .._static_call._calls import StaticCalls
from ..kernel import Kernel
from ..selftests import SelfTestResult
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


# ---------------------------------------------------------------- self-tests
#: lib/test_static_keys.c (with its "base" module): (key, initial state, probe)
_TK_CASES = [
    ("tk_old_true_key", True, "tk_old_true_key_static_key_true"),
    ("tk_old_false_key", False, "tk_old_false_key_static_key_false"),
    ("tk_true_key", True, "tk_true_key_static_branch_likely"),
    ("tk_true_key", True, "tk_true_key_static_branch_unlikely"),
    ("tk_false_key", False, "tk_false_key_static_branch_likely"),
    ("tk_false_key", False, "tk_false_key_static_branch_unlikely"),
    ("tk_base_old_true_key", True, "tk_base_old_true_key_static_key_true"),
    ("tk_base_inv_old_true_key", False, "tk_base_inv_old_true_key_static_key_true"),
    ("tk_base_old_false_key", False, "tk_base_old_false_key_static_key_false"),
    ("tk_base_inv_old_false_key", True, "tk_base_inv_old_false_key_static_key_false"),
    ("tk_base_true_key", True, "tk_base_true_key_static_branch_likely"),
    ("tk_base_true_key", True, "tk_base_true_key_static_branch_unlikely"),
    ("tk_base_inv_true_key", False, "tk_base_inv_true_key_static_branch_likely"),
    ("tk_base_inv_true_key", False, "tk_base_inv_true_key_static_branch_unlikely"),
    ("tk_base_false_key", False, "tk_base_false_key_static_branch_likely"),
    ("tk_base_false_key", False, "tk_base_false_key_static_branch_unlikely"),
    ("tk_base_inv_false_key", True, "tk_base_inv_false_key_static_branch_likely"),
    ("tk_base_inv_false_key", True, "tk_base_inv_false_key_static_branch_unlikely"),
]
_TK_INVERTED_BY_BASE = ("tk_base_inv_old_true_key", "tk_base_inv_old_false_key",
                        "tk_base_inv_true_key", "tk_base_inv_false_key")


def _switch(cm: ClientMachine, slots: dict[int, tuple[int, int]], action: Callable[[], None],
            mixed: dict[int, tuple[int, int]] | None = None) -> dict:
    """Widen each slot to (old, new) -- or to the range *mixed* gives it,
    for a probe that passes several sites updated one after the other --
    act, then expect new everywhere."""
    for i, (old, new) in slots.items():
        cm.allow(i, [old, new], rng=(mixed or {}).get(i))
    action()
    return cm.expect({i: new for i, (_old, new) in slots.items()})


def static_keys_selftest(cm: ClientMachine) -> SelfTestResult:
    """``lib/test_static_keys.c`` on the running CPUs, plus inc/dec counting."""
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    r = SelfTestResult("static_keys")
    keys = cm.keys
    slots = {}
    for key, _init, probe in _TK_CASES:
        slots[probe] = cm.add_probe(probe, allow=[1 if keys.static_key_enabled(key) else 0])
    if not cm.started:
        cm.start()

    def want() -> dict[int, int]:
        return {slots[p]: int(keys.static_key_enabled(k)) for k, _i, p in _TK_CASES}

    def invert(key: str) -> None:
        on = not keys.static_key_enabled(key)
        before = want()
        for k, _i, p in _TK_CASES:
            if k == key:
                cm.widen(slots[p], before[slots[p]], int(on))
        (keys.static_key_enable if on else keys.static_key_disable)(key)
        wrong = cm.expect(want())
        r.case(f"invert {key} -> {int(on)}", not wrong and keys.static_key_enabled(key) == on,
               wrong={cm.probes[i].name if i >= 0 else "passes": v for i, v in wrong.items()})

    for key in _TK_INVERTED_BY_BASE:          # what the base module's init does
        invert(key)

    def verify(inverted: bool, label: str) -> None:
        wrong = cm.expect(want())
        for key, init, probe in _TK_CASES:
            state = keys.static_key_enabled(key)
            r.case(f"{label}: {probe}", state == (not init if inverted else init)
                   and slots[probe] not in wrong, state=state, last=cm.last(slots[probe]))

    def invert_keys() -> None:
        prev = None
        for key, _init, _p in _TK_CASES:
            if key != prev:
                invert(key)
                prev = key

    verify(False, "initial")
    invert_keys()
    verify(True, "inverted")
    invert_keys()
    verify(False, "restored")

    # reference counting: only 0 <-> 1 patches
    k = "tk_false_key"
    both = [slots[p] for key, _init, p in _TK_CASES if key == k]
    i = both[0]
    for step, count, state in (("inc", 1, 1), ("inc", 2, 1), ("dec", 1, 1), ("dec", 0, 0)):
        b0 = cm.core.stats.batches
        before = cm.last(i)[0]
        for j in both:
            cm.widen(j, before, state)
        getattr(keys, f"static_branch_{step}")(k)
        wrong = cm.expect({j: state for j in both})
        patched = cm.core.stats.batches - b0
        r.case(f"static_branch_{step}({k}) -> count {count}",
               not wrong and keys.static_key_count(k) == count
               and patched == (1 if before != state else 0),
               count=keys.static_key_count(k), batches=patched)
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r


def many_key_flip(cm: ClientMachine, n: int = 1000, flips: int = 2) -> SelfTestResult:
    """Switch key jl_key_many_<n> while every CPU runs its n sites."""
    r = SelfTestResult(f"many_{n}")
    key, probe = f"jl_key_many_{n}", f"jl_many_{n}"
    i = cm.add_probe(probe, allow=[n if cm.keys.static_key_enabled(key) else 0])
    if not cm.started:
        cm.start()
    cm.wait_passes(1)
    for _ in range(flips):
        on = not cm.keys.static_key_enabled(key)
        s0, b0 = cm.core.stats.syncs, cm.core.stats.batches
        cm.allow(i, [0, n], rng=(0, n))       # mid-update: any mix of old and new sites
        (cm.keys.static_key_enable if on else cm.keys.static_key_disable)(key)
        syncs, batches = cm.core.stats.syncs - s0, cm.core.stats.batches - b0
        wrong = cm.expect({i: n if on else 0})
        want_batches = -(-n // 256)
        r.case(f"{key} -> {int(on)}", not wrong and batches == want_batches
               and syncs <= 3 * batches, entries=len(cm.keys.key(key).sites), batches=batches,
               syncs=syncs, last=cm.last(i))
        r.syncs += syncs
        r.batches += batches
    r.oopses = cm.oopses
    r.bad = cm.bad()
    return r


def static_call_selftest(cm: ClientMachine) -> SelfTestResult:
    """``static_call_selftest`` (func_a, func_b, func_a: 3, 4, 3) on the
    running CPUs, and every site kind of the image switched both ways."""
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    r = SelfTestResult("static_call")
    calls = cm.calls
    fa, fb = cm.sym("sc_func_a"), cm.sym("sc_func_b")
    funcs = {fa: lambda x: x + 1, fb: lambda x: x + 2,
             cm.sym("sc_double"): lambda x: 2 * x, cm.sym("sc_square"): lambda x: x * x,
             cm.sym("__static_call_return0"): lambda x: 0}
    # (probe, arg, value for the call's function f -- None is NULL)
    specs = {
        "sc_selftest_tail": ("sc_selftest", 2, lambda f: funcs[f](2)),
        "sc_selftest_call": ("sc_selftest", 2, lambda f: funcs[f](2) + 1000),
        "sc_call_op": ("sc_op", 5, lambda f: funcs[f](5) + 1),
        "sc_tail_op": ("sc_op", 6, lambda f: funcs[f](6)),
        "sc_call_op_twice": ("sc_op", 3, lambda f: funcs[f](3) + funcs[f](4)),
        "sc_jcc_op": ("sc_cond", 4, lambda f: funcs[f](4) if f else 0),
        "sc_run_hook": ("sc_hook", 7, lambda f: 107 if f else 7),
        "sc_run_hook_tail": ("sc_hook", 8, lambda f: 108 if f else 8),
        "sc_call_ret0": ("sc_ret0", 9, lambda f: funcs[f](9) + 5),
    }
    slots = {}
    for probe, (call, arg, val) in specs.items():
        slots[probe] = cm.add_probe(probe, arg=arg, allow=[val(calls.static_call_query(call))])
    if not cm.started:
        cm.start()
    cm.wait_passes(1)

    def update(call: str, func: str | None, label: str) -> bool:
        f = calls.resolve(func)
        cur = calls.static_call_query(call)
        sl = {slots[p]: (spec[2](cur), spec[2](f)) for p, spec in specs.items() if spec[0] == call}
        mixed = {}
        if call == "sc_op":     # two sites in one function: one may be new, the other old
            a, b = funcs[cur], funcs[f]
            combos = [a(3) + b(4), b(3) + a(4), a(3) + a(4), b(3) + b(4)]
            mixed[slots["sc_call_op_twice"]] = (min(combos), max(combos))
        wrong = _switch(cm, sl, lambda: calls.static_call_update(call, f), mixed)
        return r.case(label, not wrong, wrong={cm.probes[i].name if i >= 0 else "passes": v
                                              for i, v in wrong.items()})

    # the kernel's table: NULL means "no update" there
    for func, val, expect in ((None, 2, 3), ("sc_func_b", 2, 4), ("sc_func_a", 2, 3)):
        if func:
            update("sc_selftest", func, f"static_call_update(sc_selftest, {func})")
        last = cm.last(slots["sc_selftest_tail"])
        r.case(f"static_call(sc_selftest)({val}) == {expect}", all(v == expect for v in last),
               last=last)
    # every site kind, both ways
    for call, func in (("sc_op", "sc_square"), ("sc_op", "sc_double"),
                       ("sc_cond", "sc_square"), ("sc_cond", None), ("sc_cond", "sc_double"),
                       ("sc_hook", "sc_hook_fn"), ("sc_hook", None),
                       ("sc_ret0", "sc_square"), ("sc_ret0", "__static_call_return0")):
        update(call, func, f"static_call_update({call}, {func or 'NULL'})")
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r


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
