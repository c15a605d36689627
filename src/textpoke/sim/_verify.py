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

This module is the campaign (seeds, chunks, the process pool, the
report); the scenarios and the records of a schedule are in
:mod:`._scenarios`, one schedule's machine, patcher and oracle in
:mod:`._schedule`.  Their names are re-exported here, where callers have
always found them.
"""

from __future__ import annotations

import itertools
import random
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ..images._workload import variant_name   # shared with live
from ._report import format_oops, format_timeline, oops_report, timeline
from ._scenarios import (SCENARIOS, STRATEGIES, Replay, Scenario, ScheduleResult, Violation,
                         check_arguments, stray_int3s)
from ._schedule import _Schedule, release_pool, run_schedule

__all__ = ["Scenario", "SCENARIOS", "STRATEGIES", "Replay", "Violation", "ScheduleResult",
           "VerifyReport", "check_arguments", "run_schedule", "verify", "stray_int3s",
           "variant_name", "oops_report", "format_oops", "timeline", "format_timeline",
           "schedule_seeds", "release_pool"]


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
