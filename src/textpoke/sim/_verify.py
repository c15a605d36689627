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
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .._core import MUTATIONS, TextPoke
from .._errors import TextPokeError
from .._core._machine import Task
from ._machine import FINE, SchedPolicy
from ._workload import VARIANTS, Site, Workload, boot_workload

__all__ = ["Scenario", "SCENARIOS", "STRATEGIES", "Violation", "ScheduleResult",
           "VerifyReport", "check_arguments", "run_schedule", "verify"]

STRATEGIES = ("int3", "naive")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    batches: tuple[tuple[str, ...], ...]
    shuffle: bool = False
    probe: bool = False


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
)}


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str          # oops | mixed | stale | hang | error
    scenario: str
    seed: int
    detail: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "scenario": self.scenario, "seed": self.seed,
                "detail": self.detail}


@dataclass(slots=True)
class ScheduleResult:
    scenario: str
    seed: int
    violations: list[Violation]
    steps: int
    int3_emulated: int
    syncs: int
    behaviours: dict[str, dict[str, int]] = field(default_factory=dict)


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


def run_schedule(scenario: str, seed: int, *, strategy: str = "int3", mutation: str | None = None,
                 ncpus: int = 3, line_size: int = 64, policy: SchedPolicy = FINE,
                 max_steps: int = 200_000) -> ScheduleResult:
    """Run one seeded schedule of *scenario* and return what the oracle found."""
    check_arguments([scenario], strategy, mutation)
    scn = SCENARIOS[scenario]
    w = boot_workload(ncpus=ncpus, seed=seed, line_size=line_size, policy=policy)
    sim = w.sim
    core = TextPoke(sim, mutations=(mutation,) if mutation else ())
    rng = random.Random(seed ^ 0x5EED)
    hits: dict[int, int] = {}
    probe = w.by_name["probe"]
    if scn.probe:
        sim.register_trap_handler(_probe_handler(probe, hits))
    w.start()
    v: list[Violation] = []

    def violate(kind: str, detail: str) -> None:
        v.append(Violation(kind, scenario, seed, detail))

    sim.run(rng.randrange(20, 300))
    touched = {n for b in scn.batches for n in b}
    before = {(c, s.name): w.counts(c, s) for c in sim.cpus for s in w.sites}
    core.text_mutex.acquire()
    try:
        task = sim.spawn(_patcher(core, w, scn, strategy, rng), "patcher")
        try:
            sim.run_until(lambda: task.done or bool(sim.oopses), max_steps)
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
        it_done = {c: w.iterations(c) for c in sim.cpus}
        sim.run_until(lambda: bool(sim.oopses) or all(
            w.iterations(c) >= it_done[c] + 1 for c in sim.cpus if sim.vcpus[c].state != "dead"),
            max_steps)
        mid = {(c, s.name): w.counts(c, s) for c in sim.cpus for s in w.sites}
        it0 = {c: w.iterations(c) for c in sim.cpus}
        hits0 = dict(hits)
        ok = sim.run_until(lambda: bool(sim.oopses) or all(
            w.iterations(c) >= it0[c] + 2 for c in sim.cpus if sim.vcpus[c].state != "dead"),
            max_steps)
        if not ok and not sim.oopses:
            slow = [c for c in sim.cpus if w.iterations(c) < it0[c] + 2]
            violate("hang", f"cpu(s) {slow} made no progress after the batch")
        elif not sim.oopses:
            for c in sim.cpus:
                for s in w.sites:
                    if s.name not in touched or s.kind == "nop5-int3":
                        continue
                    after = w.counts(c, s)
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
            now = w.counts(c, s)
            b0 = before[(c, s.name)]
            for i in range(8):
                tot[i] += now[i] - b0[i]
        behaviours[s.name] = {str(i): n for i, n in enumerate(tot) if n}
        bad = {i: n for i, n in enumerate(tot) if n and i not in s.allowed}
        if bad:
            violate("mixed", f"{s.name} behaved as neither old nor new: {_fmt(tot)}")
    # Report the first violation by the time it happened: oops/mixed before stale.
    order = {"oops": 0, "mixed": 1, "error": 2, "hang": 3, "stale": 4}
    v.sort(key=lambda x: order[x.kind])
    return ScheduleResult(scenario, seed, v, sim.steps, core.stats.int3_emulated,
                          core.stats.syncs, behaviours)


def _fmt(counts: list[int]) -> str:
    return ", ".join(f"{VARIANTS[i]}={n}" for i, n in enumerate(counts) if n) or "nothing"


@dataclass(slots=True)
class VerifyReport:
    scenarios: list[str]
    strategy: str
    mutation: str | None
    schedules: int = 0
    violating_schedules: int = 0
    violations_by_kind: dict[str, int] = field(default_factory=dict)
    by_scenario: dict[str, dict[str, int]] = field(default_factory=dict)
    first: Violation | None = None
    int3_emulated: int = 0
    syncs: int = 0

    def as_dict(self) -> dict:
        return {
            "scenarios": self.scenarios, "strategy": self.strategy, "mutation": self.mutation,
            "schedules": self.schedules, "violations": self.violating_schedules,
            "violations_by_kind": self.violations_by_kind, "by_scenario": self.by_scenario,
            "int3_emulated": self.int3_emulated, "syncs": self.syncs,
            "first_violation": self.first.as_dict() if self.first else None,
            "seed": self.first.seed if self.first else None,
            "kind": self.first.kind if self.first else None,
        }


def schedule_seeds(seed: int, n: int) -> Iterator[int]:
    """Seeds for n schedules: deterministic from the base seed."""
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.getrandbits(32)


def _run_chunk(args: tuple) -> list[tuple[str, int, list[Violation], int, int]]:
    items, kw = args
    out = []
    for name, sd in items:
        r = run_schedule(name, sd, **kw)
        out.append((name, sd, r.violations, r.int3_emulated, r.syncs))
    return out


def verify(scenarios: list[str], schedules: int, *, seed: int = 0, strategy: str = "int3",
           mutation: str | None = None, ncpus: int = 3, line_size: int = 64,
           stop_at_first: bool = False, jobs: int = 1,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Run *schedules* seeded schedules of each scenario (in *jobs*
    processes).  The report is the same whatever *jobs* is."""
    check_arguments(scenarios, strategy, mutation)
    rep = VerifyReport(list(scenarios), strategy, mutation)
    items = [(name, sd) for name in scenarios for sd in schedule_seeds(seed, schedules)]
    kw = dict(strategy=strategy, mutation=mutation, ncpus=ncpus, line_size=line_size)
    chunk = 25
    chunks = [(items[i:i + chunk], kw) for i in range(0, len(items), chunk)]

    def absorb(results: list) -> bool:
        for name, _sd, violations, emulated, syncs in results:
            stats = rep.by_scenario.setdefault(name, {"schedules": 0, "violations": 0})
            rep.schedules += 1
            stats["schedules"] += 1
            rep.int3_emulated += emulated
            rep.syncs += syncs
            if violations:
                rep.violating_schedules += 1
                stats["violations"] += 1
                k = violations[0].kind
                rep.violations_by_kind[k] = rep.violations_by_kind.get(k, 0) + 1
                if rep.first is None:
                    rep.first = violations[0]
        if progress:
            progress(rep.schedules, len(items))
        return stop_at_first and rep.first is not None

    for name in scenarios:
        rep.by_scenario.setdefault(name, {"schedules": 0, "violations": 0})
    if jobs <= 1 or len(chunks) == 1:
        for c in chunks:
            if absorb(_run_chunk(c)):
                break
        return rep
    import concurrent.futures as cf
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as ex:
        for results in ex.map(_run_chunk, chunks):   # in order: "first" is deterministic
            if absorb(results):
                ex.shutdown(wait=False, cancel_futures=True)
                break
    return rep
