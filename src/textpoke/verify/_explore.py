# SPDX-License-Identifier: GPL-2.0-only
"""Systematic exploration: every interleaving of a small configuration,
within a stated bound, on the real sim machine and the real core.

Where ``verify`` samples seeded schedules, this enumerates them.  The
machine is the sim's (Unicorn vCPUs with private fetch views, the
workload, the core's batch protocol and trap handler, the scenario's
patcher); only the scheduler is replaced by the explorer, which at every
point tries each *action* enabled there:

``p``        the patcher takes one step (one byte stored -- writes are
             byte-granular, as under ``verify`` --, a sync sent, a wait
             passed, a batch entry queued);
``xN``       CPU N runs to its next site and executes it: the bytes its
             own view holds there are old, new, or an INT3 of the protocol
             (a trap), else it fetched a torn instruction (a violation);
``tN``       CPU N's trap handler takes one step (the IRET serialises);
``iN``       CPU N takes the sync IPI sent to it (sync_core);
``rN@L``     one stale line L of CPU N's view is refilled (an eviction).

Partial-order reduction: what a CPU runs between two sites touches no
line the patcher writes and nothing another CPU reads (each CPU has its
own stack and per-CPU record), so it commutes with every other action and
is folded into ``xN``; only site executions, refills, IPIs, handler steps
and patcher steps interleave.  State hashing: two paths reaching the same
state -- the patcher's progress, each CPU's registers (the iteration
counter reduced to its parity, which decides the Jcc; the record counters,
which only grow, left out), state, pending IPIs and handler progress, the
bytes of every site line in memory and in every view, the stale lines, the
core's references, and the budgets left -- are explored once.  The search
is breadth first, so the first violation found is a shortest one (fewest
actions), and its path replays with ``textpoke verify --exhaustive ...
--path P``.

The bound (:class:`Bound`): CPUs, line size, ``execs`` site executions per
CPU along a path, ``refills`` evictions along a path.  Syncs and IPI
deliveries are unbounded (each sync sends one IPI per CPU; the IPI may be
taken at any point after), as are patcher and handler steps (finite).  The
patcher starts with every CPU at the top of the workload loop; a batch's
entries are queued in every order (each permutation is a first choice).

The world -- the machine, the actions, the state hash, the bound -- is
:mod:`._world`; this module is the search (breadth first, the frontier
and the state file, progress) and the replay of a path.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..sim._scenarios import SCENARIOS, check_arguments
from ._world import Bound, Violation, _Machines, _World, parse_bound, parse_path

__all__ = ["Bound", "ExploreResult", "explore", "replay_path", "parse_bound", "parse_path"]


@dataclass(slots=True)
class ExploreResult:
    scenario: str
    strategy: str
    mutation: str | None
    bound: Bound
    states: int = 0
    edges: int = 0
    interleavings: int = 0
    depth: int = 0
    seconds: float = 0.0
    complete: bool = False
    violation: dict | None = None
    path: list[str] | None = None
    orders: int = 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bound"] = asdict(self.bound) | {"covers": self.bound.describe()}
        if self.path is not None:
            d["replay_command"] = self.replay_command()
        return d

    def replay_command(self) -> str:
        import shlex
        a = ["textpoke", "verify", "--exhaustive", "--scenario", self.scenario,
             "--strategy", self.strategy]
        if self.mutation:
            a += ["--mutation", self.mutation]
        b = self.bound
        a += ["--bound", f"cpus={b.cpus},execs={b.execs},refills={b.refills},line={b.line_size}",
              "--path", " ".join(self.path or [])]
        return shlex.join(a)


def _root(path: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The first choice of a path: queueing order and each CPU's first site."""
    if not path or not path[0].startswith("o"):
        return (), ()
    o, _, st = path[0][1:].partition(":")
    return (tuple(int(x) for x in o.split(".") if x), tuple(int(x) for x in st.split(".") if x))


def _site_list(scenario: str) -> list[str]:
    scn = SCENARIOS[scenario]
    names = {n for b in scn.batches for n in b} | ({"probe"} if scn.probe else set())
    return sorted(names)


def _orders(scenario: str) -> list[tuple[int, ...]]:
    """Every queueing order of the scenario's first batch of several entries."""
    n = max(len(b) for b in SCENARIOS[scenario].batches)
    return [()] if n < 2 else list(itertools.permutations(range(n)))


def _walk(m: _Machines, res: ExploreResult, path: tuple[str, ...]) -> tuple[_World, Violation | None]:
    order, starts = _root(path)
    world = m.world(res.scenario, res.strategy, res.mutation, res.bound, order, starts)
    try:
        for a in path:
            if a.startswith("o"):
                continue
            world.apply(a)
    except Violation as v:
        return world, v
    return world, None


def explore(scenario: str, *, strategy: str = "int3", mutation: str | None = None,
            bound: Bound = Bound(), state_file: str | os.PathLike | None = None,
            progress: Callable[[dict], None] | None = None,
            stop_at_first: bool = True, max_states: int = 2_000_000) -> ExploreResult:
    """Breadth-first over every interleaving of *scenario* within *bound*.
    With *state_file*, progress is saved after every level and a run
    resumes from it (same scenario, strategy, mutation and bound)."""
    check_arguments([scenario], strategy, mutation)
    scn = SCENARIOS[scenario]
    if sum(len(b) for b in scn.batches) > 3:
        raise ValueError(f"{scenario}: exhaustive exploration takes 1-3 sites "
                         f"({sum(len(b) for b in scn.batches)} here)")
    res = ExploreResult(scenario, strategy, mutation, bound)
    orders = _orders(scenario)
    res.orders = len(orders)
    ident = {"scenario": scenario, "strategy": strategy, "mutation": mutation,
             "bound": asdict(bound)}
    # the frontier: path -> number of interleavings reaching it
    frontier: dict[tuple[str, ...], int] = {}
    seen: set[bytes] = set()
    known: dict[tuple[str, ...], list[str]] = {}    # enabled actions, found as each state was
    t0 = time.perf_counter()
    elapsed0 = 0.0
    if state_file is not None and Path(state_file).exists():
        st = json.loads(Path(state_file).read_text())
        if st.get("ident") != ident:
            raise ValueError(f"{state_file} belongs to another exploration: {st.get('ident')}")
        frontier = {tuple(p): n for p, n in st["frontier"]}
        seen = {bytes.fromhex(k) for k in st["seen"]}
        for k in ("states", "edges", "interleavings", "depth"):
            setattr(res, k, st[k])
        elapsed0 = st.get("seconds", 0.0)
        if st.get("result") is not None:
            done = st["result"]
            res.complete, res.violation, res.path = done["complete"], done["violation"], done["path"]
            res.seconds = elapsed0
            return res
    m = _Machines(bound)
    try:
        if not frontier and res.depth == 0:
            nsites = len(_site_list(scenario))
            for o in orders:
                for st in itertools.product(range(nsites), repeat=bound.cpus):
                    frontier[(f"o{'.'.join(map(str, o))}:{'.'.join(map(str, st))}",)] = 1
            res.states = len(frontier)
        while frontier:
            nxt: dict[tuple[str, ...], int] = {}
            keys: dict[bytes, tuple[str, ...]] = {}
            for path, count in frontier.items():
                acts = known.pop(path, None)
                if acts is None:          # the root, or a resumed frontier
                    world, v = _walk(m, res, path)
                    try:
                        acts = world.enabled() if v is None else []
                    finally:
                        world.close()
                if not acts:
                    res.interleavings += count
                    continue
                for a in acts:
                    child = path + (a,)
                    world, v = _walk(m, res, child)
                    try:
                        acts_after = world.enabled() if v is None else []
                        if v is None and not acts_after:
                            try:
                                world.final_check()
                            except Violation as fv:
                                v = fv
                        k = world.key() if v is None else None
                    finally:
                        world.close()
                    res.edges += 1
                    if v is None:
                        child_acts = acts_after
                    if v is not None:
                        if res.violation is None:
                            res.violation = {"kind": v.kind, "detail": v.detail}
                            res.path = [p for p in child]
                        res.interleavings += count
                        continue
                    if k in keys:
                        nxt[keys[k]] += count
                        continue
                    if k in seen:
                        continue        # reached at an earlier depth: explored there
                    seen.add(k)
                    keys[k] = child
                    nxt[child] = count
                    known[child] = child_acts
                    res.states += 1
                if res.states > max_states:
                    raise RuntimeError(f"more than {max_states} states: lower the bound")
            res.depth += 1
            frontier = nxt
            res.seconds = elapsed0 + time.perf_counter() - t0
            if progress:
                progress({"depth": res.depth, "states": res.states, "frontier": len(frontier),
                          "interleavings": res.interleavings, "seconds": res.seconds})
            if res.violation is not None and stop_at_first:
                break
            if state_file is not None:
                _save(state_file, ident, res, frontier, seen, None)
        res.complete = not frontier
        res.seconds = elapsed0 + time.perf_counter() - t0
        if state_file is not None:
            _save(state_file, ident, res, frontier, seen,
                  {"complete": res.complete, "violation": res.violation, "path": res.path})
        return res
    finally:
        m.close()


def _save(path, ident, res, frontier, seen, result) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"ident": ident, "states": res.states, "edges": res.edges,
                               "interleavings": res.interleavings, "depth": res.depth,
                               "seconds": res.seconds,
                               "frontier": [[list(p), n] for p, n in frontier.items()],
                               "seen": [k.hex() for k in seen], "result": result}))
    os.replace(tmp, path)


def replay_path(scenario: str, path: tuple[str, ...], *, strategy: str = "int3",
                mutation: str | None = None, bound: Bound = Bound()) -> dict:
    """Run one path of actions; return what happened, step by step, and the
    violation it ends in (None if clean)."""
    check_arguments([scenario], strategy, mutation)
    m = _Machines(bound)
    try:
        steps: list[str] = []
        order, starts = _root(path)
        world = m.world(scenario, strategy, mutation, bound, order, starts)
        v = None
        try:
            for a in path:
                if a.startswith("o"):
                    steps.append(f"{a}: batch entries queued in order {order or '(one)'}, "
                                 f"CPUs start at sites {starts}")
                    continue
                if a not in world.enabled():
                    raise ValueError(f"action {a!r} is not enabled at step {len(steps)} "
                                     f"(enabled: {' '.join(world.enabled())})")
                world.apply(a)
                steps.append(a)
            if not world.enabled():
                world.final_check()
        except Violation as e:
            v = {"kind": e.kind, "detail": e.detail}
            steps.append(a)
        finally:
            world.close()
        return {"scenario": scenario, "strategy": strategy, "mutation": mutation,
                "bound": asdict(bound), "steps": steps, "violation": v}
    finally:
        m.close()
