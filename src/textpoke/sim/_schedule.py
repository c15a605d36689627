# SPDX-License-Identifier: GPL-2.0-only
"""One schedule: a booted (or pooled and restored) workload, the patcher
task -- the INT3 batch protocol, a mutation of it, or naive writes --
run under the seeded scheduler while the CPUs keep running, and the
oracle over what every CPU did (see :mod:`textpoke.sim._verify`)."""

from __future__ import annotations

import ctypes
import random
import struct
from typing import Any, Callable

from .._core import TextPoke
from .._core._machine import Task
from .._errors import MachineError, TextPokeError
from ..images._workload import variant_name   # shared with live
from ._machine import FINE, SchedPolicy
from ._report import oops_report, timeline
from ._scenarios import (SCENARIOS, Replay, Scenario, ScheduleResult, Violation,
                         check_arguments, stray_int3s)
from ._teeth import install_teeth
from ._workload import Site, Workload, boot_workload

__all__ = ["run_schedule", "release_pool", "FAST_FORWARD", "FLUSH_EVERY"]


# -------------------------------------------------------------- schedules
def _probe_handler(site: Site, hits: dict[int, int]) -> Callable:
    def handler(regs) -> Task:
        if regs.ip - 1 != site.addr:
            return False
        yield
        regs.ip = site.addr + 5          # step over the NOP5 the probe sits on
        hits[regs.cpu] = hits.get(regs.cpu, 0) + 1
        return True
    return handler


def poke_batch_task(core: TextPoke, sites: list[Site], strategy: str) -> Task:
    """One batch of the scenario as the patcher task writes it: through the
    INT3 protocol, or (``naive``) the new bytes stored over the live code,
    then a serialise.  ``verify``'s explorer drives the same task."""
    if strategy == "int3":
        for s in sites:
            yield from core.smp_text_poke_batch_add_task(s.addr, s.new)
        yield from core.smp_text_poke_batch_finish_task()
    else:
        for s in sites:
            yield from core._poke(s.addr, s.new, "poke")
        yield from core._sync()


def _patcher(core: TextPoke, w: Workload, scn: Scenario, strategy: str,
             rng: random.Random) -> Task:
    for batch in scn.batches:
        sites = [w.by_name[n] for n in batch]
        if scn.shuffle:
            rng.shuffle(sites)
        yield from poke_batch_task(core, sites, strategy)


class _Schedule:
    """One schedule's machine, core and oracle.  A context manager: the
    machine (and its Unicorn instances) is released on exit."""

    def __init__(self, scenario: str, seed: int, *, strategy: str = "int3",
                 mutation: str | None = None, ncpus: int = 3, line_size: int = 64,
                 policy: SchedPolicy = FINE, max_steps: int = 200_000, trace: bool = False,
                 reuse: bool = False) -> None:
        check_arguments([scenario], strategy, mutation)
        self.replay = Replay(scenario, seed, strategy, mutation, ncpus, line_size)
        self.scn = SCENARIOS[scenario]
        self.policy, self.max_steps, self.trace = policy, max_steps, trace
        self.finished = False
        self.pool_key = (ncpus, line_size, policy) if reuse else None
        if reuse:
            self.w = _pooled_workload(self.pool_key, seed, trace)
        else:
            self.w = boot_workload(ncpus=ncpus, seed=seed, line_size=line_size, policy=policy,
                                   trace=trace)
        # The workload's CPUs share no writable memory (each counts in its
        # own record, on its own stack): a quiet stretch may run at once.
        self.w.sim.fast_forward = FAST_FORWARD
        try:
            self.core = TextPoke(self.w.sim, mutations=(mutation,) if mutation else ())
        except BaseException:
            self._drop()
            raise

    def __enter__(self) -> "_Schedule":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.core.close()
        finally:
            if self.pool_key is None or not self.finished:
                self._drop()

    def _drop(self) -> None:
        # A pooled machine that did not finish its schedule cleanly is not
        # trusted again: it goes, and the next schedule boots a new one.
        if self.pool_key is not None and _POOL.get(self.pool_key, (None,))[0] is self.w:
            del _POOL[self.pool_key]
        self.w.close()

    def int3_left(self) -> int:
        """Finish/roll back what the core holds, then count stray INT3s."""
        self.core.close()
        return len(stray_int3s(self.w))

    def run(self) -> ScheduleResult:
        scn, w, core, seed, max_steps = self.scn, self.w, self.core, self.replay.seed, self.max_steps
        scenario = scn.name
        sim = w.sim
        rng = random.Random(seed ^ 0x5EED)
        hits: dict[int, int] = {}
        probe = w.by_name["probe"]
        if scn.teeth:
            install_teeth(w)
        if scn.probe:
            sim.register_trap_handler(_probe_handler(probe, hits))
        w.start()
        v: list[Violation] = []

        def violate(kind: str, detail: str) -> None:
            v.append(Violation(kind, scenario, seed, detail, self.replay))

        sim.run(rng.randrange(20, 300))
        touched = {n for b in scn.batches for n in b}
        counts = _Counts(w)
        before = counts.snapshot()
        core.text_mutex.acquire()
        try:
            task = sim.spawn(_patcher(core, w, scn, self.replay.strategy, rng), "patcher")
            try:
                sim.run_until(lambda: task.done or bool(sim.oopses), max_steps, monotone=True)
                if not task.done and not sim.oopses:
                    violate("hang", f"patcher not done after {max_steps} steps")
                elif task.exc is not None:
                    violate("error", f"{type(task.exc).__name__}: {task.exc}")
            except TextPokeError as e:   # e.g. deadlock: every task waits
                violate("error", f"{type(e).__name__}: {e}")
        finally:
            core.text_mutex.release()

        if not v and not sim.oopses:
            # Let every CPU finish the iteration it was in when the patcher
            # returned (it may still record a variant it ran before), then
            # require two more complete iterations of new code.
            sim.run_until(counts.iterations_pred(1), max_steps, monotone=True)
            mid = counts.snapshot()
            it0 = {c: w.iterations(c) for c in sim.cpus}
            hits0 = dict(hits)
            ok = sim.run_until(counts.iterations_pred(2), max_steps, monotone=True)
            if not ok and not sim.oopses:
                slow = [c for c in sim.cpus if w.iterations(c) < it0[c] + 2]
                violate("hang", f"cpu(s) {slow} made no progress after the batch")
            elif not sim.oopses:
                for c in sim.cpus:
                    for s in w.sites:
                        if s.name not in touched or s.kind == "nop5-int3":
                            continue
                        after = counts.now(c, s)
                        delta = [a - b for a, b in zip(after, mid[(c, s.name)])]
                        wrong = {i: n for i, n in enumerate(delta) if n and i not in (2, 3)}
                        if wrong or not (delta[2] or delta[3]):
                            violate("stale", f"cpu{c} at {s.name} after the batch ran "
                                    f"{_fmt(delta)} instead of the new code")
                            break
                    if scn.probe and hits.get(c, 0) <= hits0.get(c, 0):
                        violate("stale", f"cpu{c} did not hit the installed probe after the batch")
        for o in sim.oopses:
            violate("oops", str(o))
        behaviours: dict[str, dict[str, int]] = {}
        for s in w.sites:
            tot = [0] * 8
            for c in sim.cpus:
                now = counts.now(c, s)
                b0 = before[(c, s.name)]
                for i in range(8):
                    tot[i] += now[i] - b0[i]
            behaviours[s.name] = {variant_name(i): n for i, n in enumerate(tot) if n}
            bad = {i: n for i, n in enumerate(tot) if n and i not in s.allowed}
            if bad:
                violate("mixed", f"{s.name} behaved as neither old nor new: {_fmt(tot)}")
        # Report the first violation by the time it happened: oops/mixed before stale.
        order = {"oops": 0, "mixed": 1, "error": 2, "hang": 3, "stale": 4}
        v.sort(key=lambda x: order[x.kind])
        oopses = [oops_report(o, w.image) for o in sim.oopses]
        tl = timeline(sim, core, w.image) if self.trace else None
        res = ScheduleResult(scenario, seed, v, sim.steps, core.stats.int3_emulated,
                             core.stats.syncs, behaviours, self.replay, oopses,
                             self.int3_left(), tl)
        self.finished = True
        return res


#: let quiet stretches of a schedule run at once (see SimMachine.run);
#: off, every decision is made one by one -- the same schedule, slower
FAST_FORWARD = True

#: booted machines kept for reuse, per (cpus, line size, policy): the
#: workload, its snapshot taken right after boot, and its own sites
_POOL: dict[tuple, tuple[Workload, Any, tuple[Site, ...]]] = {}
_USES: dict[tuple, int] = {}
#: a pooled machine's translation buffers are emptied every this many
#: schedules: Unicorn keeps the space of dropped translations until its
#: buffer is full, ~130 KB a schedule here (memory stays under ~60 MB)
FLUSH_EVERY = 64


def _pooled_workload(key: tuple, seed: int, trace: bool) -> Workload:
    """A booted workload for *key*, restored to its state right after boot
    as if booted with *seed*: the same schedule as on a new machine."""
    got = _POOL.get(key)
    if got is None:
        ncpus, line_size, policy = key
        w = boot_workload(ncpus=ncpus, seed=seed, line_size=line_size, policy=policy,
                          trace=trace)
        _POOL[key] = (w, w.sim.snapshot(), tuple(w.sites))
        return w
    w, snap, sites = got
    _USES[key] = uses = _USES.get(key, 0) + 1
    try:
        w.sim.restore(snap, seed=seed, trace=trace, flush_translations=uses % FLUSH_EVERY == 0)
    except MachineError:        # it changed shape (hooks, CPUs, regions): boot anew
        del _POOL[key]
        w.close()
        return _pooled_workload(key, seed, trace)
    w.sites = list(sites)
    w.by_name = {s.name: s for s in sites}
    return w


def release_pool() -> None:
    """Close every machine kept for reuse."""
    while _POOL:
        _key, (w, _snap, _sites) = _POOL.popitem()
        w.close()


def run_schedule(scenario: str, seed: int, *, strategy: str = "int3", mutation: str | None = None,
                 ncpus: int = 3, line_size: int = 64, policy: SchedPolicy = FINE,
                 max_steps: int = 200_000, trace: bool = False,
                 reuse: bool = False) -> ScheduleResult:
    """Run one seeded schedule of *scenario* and return what the oracle
    found.  With *trace*, the result carries the schedule's timeline.  The
    schedule's machine is released before this returns."""
    with _Schedule(scenario, seed, strategy=strategy, mutation=mutation, ncpus=ncpus,
                   line_size=line_size, policy=policy, max_steps=max_steps, trace=trace,
                   reuse=reuse) as s:
        return s.run()


class _Counts:
    """The workload's per-CPU records, read straight from the data region:
    iterations (what the oracle's waits look at after every decision) and
    each site's variant counts (as ``Workload.iterations``/``counts``)."""

    def __init__(self, w: Workload) -> None:
        self.w, self.sim = w, w.sim
        self.cpus = list(w.sim.cpus)
        self.vcpus = [w.sim.vcpus[c] for c in self.cpus]
        self.n = 1 + max(s.index for s in w.sites) + 1       # 64-byte rows: header, sites
        self._rec = _RECORD.get(self.n) or _RECORD.setdefault(
            self.n, struct.Struct(f"<{8 * self.n}Q"))
        self.iters = []
        for c in self.cpus:
            r = self.sim._data_loc(w.percpu(c), 64 * self.n)
            self.iters.append(ctypes.c_uint64.from_buffer(r.buf, w.percpu(c) - r.start))
        self._now: dict[int, tuple[int, ...]] | None = None

    def _read(self) -> dict[int, tuple[int, ...]]:
        sim, w = self.sim, self.w
        return {c: self._rec.unpack(sim.mem_read(w.percpu(c), 64 * self.n)) for c in self.cpus}

    def snapshot(self) -> dict[tuple[int, str], list[int]]:
        recs = self._read()
        return {(c, s.name): list(recs[c][8 + 8 * s.index: 16 + 8 * s.index])
                for c in self.cpus for s in self.w.sites}

    def now(self, c: int, s: Site) -> list[int]:
        """A site's counts now (the records are read once: call after the run)."""
        if self._now is None:
            self._now = self._read()
        return list(self._now[c][8 + 8 * s.index: 16 + 8 * s.index])

    def iterations_pred(self, more: int) -> Callable[[], bool]:
        """True once an oops happened or every live CPU has completed *more*
        iterations beyond those it had now (monotone)."""
        sim = self.sim
        want = [(ctr, ctr.value + more, v) for ctr, v in zip(self.iters, self.vcpus)]

        def pred() -> bool:
            if sim.oopses:
                return True
            for ctr, target, v in want:
                if ctr.value < target and v.state != "dead":
                    return False
            return True
        return pred


_RECORD: dict[int, struct.Struct] = {}


def _fmt(counts: list[int]) -> str:
    return ", ".join(f"{variant_name(i)}={n}" for i, n in enumerate(counts) if n) or "nothing"
