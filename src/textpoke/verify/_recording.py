# SPDX-License-Identifier: GPL-2.0-only
"""A recording of one traced run (:class:`Recording`): a schedule replayed
with the machine's trace on and every site watched (:func:`record_schedule`),
a machine that ran traced such as the demo's (:func:`record_machine`,
:func:`watch`, :func:`demo_recording`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["Recording", "record_schedule", "record_machine", "watch", "demo_recording",
           "TRACE_CAP"]


@dataclass(slots=True)
class Recording:
    """What one traced run left: its timeline entries (``sim._report.timeline``
    form, plus ``exec`` entries), the sites, CPUs and the oracle's verdict."""

    title: str
    cpus: list[int]
    sites: list[dict]               # name, addr, len, old, new (hex), touched
    entries: list[dict]
    steps: int
    violations: list[dict] = field(default_factory=list)   # kind, detail
    params: dict = field(default_factory=dict)
    replay_command: str | None = None

    def as_dict(self) -> dict:
        return {"title": self.title, "cpus": self.cpus, "sites": self.sites,
                "steps": self.steps, "violations": self.violations, "params": self.params,
                "replay_command": self.replay_command, "entries": self.entries}


def _site_rows(w: Any, touched: Iterable[str]) -> list[dict]:
    touched = set(touched)
    return [{"name": s.name, "addr": s.addr, "len": s.length, "old": s.old.hex(),
             "new": s.new.hex(), "touched": s.name in touched} for s in w.sites]


def record_schedule(scenario: str, seed: int, *, strategy: str = "int3",
                    mutation: str | None = None, ncpus: int = 3,
                    line_size: int = 64) -> Recording:
    """Replay one schedule, traced and watched, and return its recording."""
    from ..sim._scenarios import SCENARIOS
    from ..sim._schedule import _Schedule
    with _Schedule(scenario, seed, strategy=strategy, mutation=mutation, ncpus=ncpus,
                   line_size=line_size, trace=True) as s:
        s.w.watch_sites()
        r = s.run()
        touched = {n for b in SCENARIOS[scenario].batches for n in b}
        sites = _site_rows(s.w, touched)
        cpus = list(s.w.sim.cpus)
    what = strategy + (f" minus {mutation}" if mutation else "")
    title = (f"{scenario}, {what}, seed {seed}, {ncpus} vCPUs, line size {line_size}: "
             + (", ".join(sorted({v.kind for v in r.violations})) + " violation"
                if r.violations else "no violation"))
    return Recording(title, cpus, sites, r.timeline or [], r.steps,
                     [{"kind": v.kind, "detail": v.detail} for v in r.violations],
                     r.replay.as_dict() if r.replay else {},
                     r.replay.command() if r.replay else None)


def record_machine(title: str, w: Any, core: Any, touched: Iterable[str], *,
                   violations: list[dict] | None = None, params: dict | None = None) -> Recording:
    """A recording of a workload whose machine ran with its trace on (for
    example the demo's): its timeline merged with the core's event log."""
    import heapq
    import types
    from ..sim._report import timeline
    sim = w.sim
    # site executions are most of a long trace: written here directly (the
    # generic timeline symbolizes every entry), merged in by step
    trace = sim.trace or []
    execs = [{"step": ev[1], "cpu": ev[2], "what": "exec", "addr": ev[3],
              "detail": f"ran {ev[3]:#x}: {bytes(ev[4]).hex(' ')}"}
             for ev in trace if ev[0] == "exec"]
    rest = timeline(types.SimpleNamespace(trace=[ev for ev in trace if ev[0] != "exec"]),
                    core, w.image)
    entries = list(heapq.merge(rest, execs, key=lambda e: e["step"] if e["step"] is not None
                               else -1))
    return Recording(title, list(sim.cpus), _site_rows(w, touched), entries, sim.steps,
                     violations or [], params or {})


#: trace entries a long run keeps for its picture (about 150 toggles of the
#: demo on 4 vCPUs; some 100 MB); later ones are counted, not kept
TRACE_CAP = 200_000


class _CappedTrace(list):
    """The machine's trace list, keeping the first *cap* entries."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.dropped = cap, 0

    def append(self, ev: Any) -> None:
        if len(self) < self.cap:
            super().append(ev)
        else:
            self.dropped += 1


def watch(w: Any, cap: int = TRACE_CAP) -> None:
    """Turn a running workload's trace on from now, with every site watched
    (``demo --timeline``: after boot-time patching, before the toggles),
    keeping the first *cap* entries."""
    if w.sim.trace is None:
        w.sim.trace = _CappedTrace(cap)
    w.watch_sites()


def demo_recording(d: Any) -> Recording:
    """The recording of a :class:`~textpoke.sim._demo.Demo` that ran watched."""
    sim = d.w.sim
    violations = [{"kind": "oops", "detail": str(o)} for o in sim.oopses]
    dropped = getattr(sim.trace, "dropped", 0)
    rec = record_machine(
        f"demo: {sim.ncpus} vCPUs, {d.toggles_done} toggle(s) of every site, seed {d.seed}, "
        f"line size {sim.line_size}", d.w, d.core, [s.name for s in d.sites],
        violations=violations, params={"cpus": sim.ncpus, "seed": d.seed,
                                       "toggles": d.toggles_done, "line_size": sim.line_size,
                                       "trace_entries_dropped": dropped})
    if dropped and sim.trace:
        last = sim.trace[-1][1]          # keep the core's events of the traced part only
        rec.entries = [e for e in rec.entries if e["step"] is None or e["step"] <= last]
        rec.steps = last
        rec.title += f" (first {last:,} steps traced)"
    return rec
