# SPDX-License-Identifier: GPL-2.0-only
"""Verification: run patching scenarios under many seeded schedules and
check every CPU's observed behaviour with an oracle.

A schedule boots the workload on N vCPUs with the fine-grained scheduler
(slices of 1-8 instructions, frequent stale-line refills), lets them run to
a random point, then runs a patcher task -- the INT3 batch protocol, the
protocol with one step removed (a *mutation*), or a *naive* writer that
stores the new bytes straight over running code -- while they keep running.
The oracle then checks:

* ``oops``   -- no CPU took an unhandled trap or fault;
* ``mixed``  -- every execution of a site behaved as the old or the new
  instruction (the workload counts which variant ran; see workload.S);
* ``stale``  -- after the patcher returns, every CPU runs the new code;
* ``hang``   -- every CPU keeps completing loop iterations;
* ``error``  -- the patcher itself did not fail.

Every schedule is decided by six values and nothing else -- scenario,
strategy, mutation, CPUs, fetch-view line size and seed -- carried together
as a :class:`Replay`, so that a violation's replay runs the very same
schedule.  After each schedule the sites are read back and an INT3 of ours
left in the text is counted (``int3_left``).

:func:`verify` streams: seeds are drawn lazily and only a bounded number of
chunks is in flight in the process pool, so memory stays flat however many
schedules are asked for.  Results are absorbed in order, so the report is
the same whatever ``jobs`` is.  Should anything interrupt it (a
KeyboardInterrupt, a signal handler that raises), it stops dispatching,
lets the schedules in flight finish (workers ignore SIGINT/SIGTERM and
check a stop flag between schedules), absorbs what completed, marks the
report ``interrupted`` and re-raises; pass ``report=`` to keep that
partial report.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import shlex
import signal
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .._core import MUTATIONS, TextPoke
from .._errors import MachineError, TextPokeError
from .._core._machine import Task
from ._machine import FINE, SchedPolicy
from ._teeth import install_teeth
from ._report import format_oops, format_timeline, oops_report, timeline
from ..images._workload import variant_name   # shared with live
from ._workload import Site, Workload, boot_workload

__all__ = ["Scenario", "SCENARIOS", "STRATEGIES", "Replay", "Violation", "ScheduleResult",
           "VerifyReport", "check_arguments", "run_schedule", "verify", "stray_int3s",
           "variant_name", "oops_report", "format_oops", "timeline", "format_timeline"]

STRATEGIES = ("int3", "naive")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    batches: tuple[tuple[str, ...], ...]
    shuffle: bool = False
    probe: bool = False
    #: the two sites of ``sim._teeth`` are installed (the loop calls them)
    teeth: bool = False


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("nop2-jmp8", "NOP2 -> JMP8 (a jump label, short form)", (("nop2_jmp8",),)),
    Scenario("nop5-jmp32", "NOP5 -> JMP32 (a jump label)", (("nop5_jmp32",),)),
    Scenario("call", "CALL retarget (a static call site)", (("call",),)),
    Scenario("ret-jmp32", "RET; INT3x4 -> JMP32 (a static-call trampoline)", (("ret_jmp",),)),
    Scenario("jcc32", "Jcc.d32 retarget, a length-6 entry", (("jcc32",),)),
    Scenario("xline", "NOP5->JMP32 and Jcc.d32 sites that cross a 64-byte line",
             (("xline_nop5", "xline_jcc32"),)),
    Scenario("multi", "all seven sites in one batch, added in random order",
             (("nop2_jmp8", "nop5_jmp32", "call", "ret_jmp", "jcc32", "xline_nop5",
               "xline_jcc32"),), shuffle=True),
    Scenario("int3-entry", "a probe's INT3 installed as a batch entry (nothing "
             "to write after it, so no final sync), then a second batch while the "
             "probe fires", (("probe",), ("nop5_jmp32", "call")), probe=True),
    Scenario("call-xline", "CALL retarget, all four displacement bytes differ, across "
             "a line (E8 d0 | d1 d2 d3)", (("xline_call",),), teeth=True),
    Scenario("jcc32-xline", "Jcc.d32 retarget, all four displacement bytes differ, across "
             "a line (0F 84 d0 | d1 d2 d3)", (("xline_jcc32w",),), teeth=True),
)}


@dataclass(frozen=True, slots=True)
class Replay:
    """Everything that shapes one schedule: run it again with these and the
    same thing happens, event for event."""

    scenario: str
    seed: int
    strategy: str = "int3"
    mutation: str | None = None
    cpus: int = 3
    line_size: int = 64

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "strategy": self.strategy, "mutation": self.mutation,
                "cpus": self.cpus, "line_size": self.line_size, "seed": self.seed}

    def argv(self) -> list[str]:
        """The command line that replays this schedule."""
        a = ["textpoke", "verify", "--scenario", self.scenario, "--strategy", self.strategy]
        if self.mutation:
            a += ["--mutation", self.mutation]
        return a + ["--cpus", str(self.cpus), "--line-size", str(self.line_size),
                    "--replay", str(self.seed)]

    def command(self) -> str:
        return shlex.join(self.argv())

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`run_schedule` after scenario and seed."""
        return {"strategy": self.strategy, "mutation": self.mutation, "ncpus": self.cpus,
                "line_size": self.line_size}


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str          # oops | mixed | stale | hang | error
    scenario: str
    seed: int
    detail: str
    replay: Replay | None = None

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "scenario": self.scenario, "seed": self.seed,
             "detail": self.detail}
        if self.replay is not None:
            d["replay"] = self.replay.as_dict()
            d["replay_command"] = self.replay.command()
        return d


@dataclass(slots=True)
class ScheduleResult:
    scenario: str
    seed: int
    violations: list[Violation]
    steps: int
    int3_emulated: int
    syncs: int
    #: per site, times each variant ran (named as in ``VARIANTS``), all CPUs
    behaviours: dict[str, dict[str, int]] = field(default_factory=dict)
    replay: Replay | None = None
    #: one report per oops (``sim._report.oops_report``: RIP as symbol+off/size,
    #: CR2, registers, Code: bytes)
    oopses: list[dict] = field(default_factory=list)
    #: sites whose first byte is an INT3 of ours once the schedule is over
    int3_left: int = 0
    #: the schedule's timeline when run with ``trace=True`` (``sim._report.timeline``)
    timeline: list[dict] | None = None

    def as_dict(self) -> dict:
        d = {"params": self.replay.as_dict() if self.replay else None,
             "replay_command": self.replay.command() if self.replay else None,
             "steps": self.steps, "int3_emulated": self.int3_emulated, "syncs": self.syncs,
             "int3_left": self.int3_left,
             "violations": [v.as_dict() for v in self.violations],
             "behaviours": self.behaviours, "oopses": self.oopses}
        if self.timeline is not None:
            d["timeline"] = self.timeline
        return d


def stray_int3s(w: Workload) -> list[str]:
    """Names of the workload's sites whose first byte reads INT3 although
    neither their old nor their new bytes start with one: an INT3 of the
    protocol left behind.  Read back from the text, not assumed."""
    return [s.name for s in w.sites
            if s.old[:1] != b"\xcc" and s.new[:1] != b"\xcc"
            and w.sim.text_read(s.addr, 1) == b"\xcc"]


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


def _patcher(core: TextPoke, w: Workload, scn: Scenario, strategy: str,
             rng: random.Random) -> Task:
    for batch in scn.batches:
        sites = [w.by_name[n] for n in batch]
        if scn.shuffle:
            rng.shuffle(sites)
        if strategy == "int3":
            for s in sites:
                yield from core.smp_text_poke_batch_add_task(s.addr, s.new)
            yield from core.smp_text_poke_batch_finish_task()
        else:
            # naive: store the new bytes over the live code, then serialise
            for s in sites:
                yield from core._poke(s.addr, s.new, "poke")
            yield from core._sync()


def check_arguments(scenarios: list[str], strategy: str, mutation: str | None) -> None:
    """ValueError, with a message for people, for any name verify does not know."""
    for s in scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (use {', '.join(STRATEGIES)})")
    if mutation is not None and mutation not in MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r} (use {', '.join(MUTATIONS)})")
    if strategy == "naive" and mutation:
        raise ValueError("mutations remove steps of the int3 protocol; they do not apply to naive")


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


# ----------------------------------------------------------------- verify
@dataclass(slots=True)
class VerifyReport:
    scenarios: list[str] = field(default_factory=list)
    strategy: str = "int3"
    mutation: str | None = None
    cpus: int = 3
    line_size: int = 64
    #: schedules asked for, per scenario, and the base seed they derive from
    schedules_per_scenario: int = 0
    seed: int = 0
    schedules: int = 0
    violating_schedules: int = 0
    violations_by_kind: dict[str, int] = field(default_factory=dict)
    by_scenario: dict[str, dict[str, int]] = field(default_factory=dict)
    first: Violation | None = None
    int3_emulated: int = 0
    syncs: int = 0
    int3_left: int = 0
    interrupted: bool = False

    @property
    def planned(self) -> int:
        return self.schedules_per_scenario * len(self.scenarios)

    def params(self) -> dict:
        return {"scenarios": self.scenarios, "strategy": self.strategy,
                "mutation": self.mutation, "cpus": self.cpus, "line_size": self.line_size,
                "schedules": self.schedules_per_scenario, "seed": self.seed}

    def as_dict(self) -> dict:
        return {
            "params": self.params(), "base_seed": self.seed,
            "interrupted": self.interrupted, "int3_left": self.int3_left,
            "planned": self.planned, "schedules": self.schedules,
            "violations": self.violating_schedules,
            "violations_by_kind": self.violations_by_kind, "by_scenario": self.by_scenario,
            "int3_emulated": self.int3_emulated, "syncs": self.syncs,
            "first_violation": self.first.as_dict() if self.first else None,
        }


def schedule_seeds(seed: int, n: int) -> Iterator[int]:
    """Seeds for n schedules: deterministic from the base seed, drawn lazily."""
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.getrandbits(32)


_STOP: Any = None      # a worker's view of the parent's stop flag


def _worker_init(stop: Any) -> None:
    # The parent decides when to stop (a Ctrl-C reaches the whole process
    # group): workers finish the schedule in hand and return what they did.
    global _STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _STOP = stop


_Done = tuple[str, int, list[Violation], int, int, int]


def _run_chunk(args: tuple) -> list[_Done]:
    items, kw = args
    out = []
    for name, sd in items:
        if _STOP is not None and _STOP.is_set():
            break
        r = run_schedule(name, sd, **kw)
        out.append((name, sd, r.violations, r.int3_emulated, r.syncs, r.int3_left))
    return out


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def verify(scenarios: list[str], schedules: int, *, seed: int = 0, strategy: str = "int3",
           mutation: str | None = None, ncpus: int = 3, line_size: int = 64,
           stop_at_first: bool = False, jobs: int = 1,
           progress: Callable[[int, int], None] | None = None,
           report: VerifyReport | None = None, chunk: int = 25,
           reuse: bool = True) -> VerifyReport:
    """Run *schedules* seeded schedules of each scenario (in *jobs*
    processes).  The report is the same whatever *jobs* is.  *report*, when
    given, is filled in place (so an interrupted caller keeps what ran)."""
    check_arguments(scenarios, strategy, mutation)
    if schedules < 0 or jobs < 1 or chunk < 1:
        raise ValueError("schedules must be >= 0, jobs and chunk >= 1")
    rep = report if report is not None else VerifyReport()
    rep.scenarios, rep.strategy, rep.mutation = list(scenarios), strategy, mutation
    rep.cpus, rep.line_size, rep.schedules_per_scenario, rep.seed = ncpus, line_size, schedules, seed
    for name in scenarios:
        rep.by_scenario.setdefault(name, {"schedules": 0, "violations": 0})
    total = rep.planned
    items = ((name, sd) for name in scenarios for sd in schedule_seeds(seed, schedules))
    kw = dict(strategy=strategy, mutation=mutation, ncpus=ncpus, line_size=line_size,
              reuse=reuse)

    def absorb(results: list[_Done]) -> bool:
        for name, _sd, violations, emulated, syncs, left in results:
            stats = rep.by_scenario[name]
            rep.schedules += 1
            stats["schedules"] += 1
            rep.int3_emulated += emulated
            rep.syncs += syncs
            rep.int3_left += left
            if violations:
                rep.violating_schedules += 1
                stats["violations"] += 1
                k = violations[0].kind
                rep.violations_by_kind[k] = rep.violations_by_kind.get(k, 0) + 1
                if rep.first is None:
                    rep.first = violations[0]
        if progress:
            progress(rep.schedules, total)
        return stop_at_first and rep.first is not None

    if jobs <= 1 or total <= chunk:
        try:
            for name, sd in items:
                s = None
                try:
                    s = _Schedule(name, sd, **kw)
                    r = s.run()
                except BaseException:
                    if s is not None:        # the schedule in hand: read its text back
                        rep.int3_left += s.int3_left()
                    raise
                finally:
                    if s is not None:
                        s.close()
                if absorb([(name, sd, r.violations, r.int3_emulated, r.syncs, r.int3_left)]):
                    break
        except BaseException as e:
            if not isinstance(e, Exception):
                rep.interrupted = True
            raise
        finally:
            release_pool()
        return rep

    import concurrent.futures as cf
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(stop,))
    chunks = _chunks(items, chunk)
    pending: deque[cf.Future] = deque()

    def fill() -> None:
        # A bounded number of chunks in flight: memory stays flat.
        while len(pending) < 2 * jobs:
            c = next(chunks, None)
            if c is None:
                return
            pending.append(ex.submit(_run_chunk, (c, kw)))

    try:
        fill()
        while pending:
            if absorb(pending.popleft().result()):   # in order: "first" is deterministic
                break
            fill()
    except BaseException as e:
        if not isinstance(e, Exception):
            rep.interrupted = True
        stop.set()
        for f in pending:
            f.cancel()
        # Take in what was running: workers return after the schedule in hand.
        for f in pending:
            if not f.cancelled():
                try:
                    absorb(f.result())
                except Exception:
                    break
        raise
    finally:
        stop.set()
        ex.shutdown(wait=True, cancel_futures=True)
    return rep
