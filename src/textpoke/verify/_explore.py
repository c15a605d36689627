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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from unicorn import UC_HOOK_CODE, UcError

from .._core import TextPoke
from .._core._emulate import PtRegs
from .._core._machine import Task, WaitUntil
from .._errors import TextPokeError
from ..sim._machine import SchedPolicy
from ..sim._teeth import _sites as teeth_sites
from ..sim._teeth import install_teeth
from ..sim._ucfast import fast_cpu, read_gprs
from ..sim._vcpu import _GPRS, _REG_NAMES, DEAD, RUN, TRAP, _fault_kind
from ..sim._scenarios import SCENARIOS, check_arguments
from ..sim._schedule import _probe_handler
from ..sim._workload import Workload, boot_workload

__all__ = ["Bound", "ExploreResult", "explore", "replay_path", "parse_bound", "parse_path"]

#: how far a CPU may run looking for its next site before it counts as lost
_RUN_LIMIT = 20_000
_POLICY = SchedPolicy(slice_min=1, slice_max=1, refresh_prob=0.0, ipi_latency=0)


@dataclass(frozen=True, slots=True)
class Bound:
    cpus: int = 2
    execs: int = 1
    refills: int = 1
    line_size: int = 64

    def describe(self) -> str:
        return (f"{self.cpus} CPUs, line size {self.line_size}, up to {self.execs} site "
                f"executions per CPU and {self.refills} evictions per path; syncs, IPI "
                f"deliveries, patcher and handler steps unbounded; every queueing order")


def parse_bound(text: str | None, *, cpus: int | None = None,
                line_size: int | None = None) -> Bound:
    """``"cpus=2,execs=3,refills=1,line=64"`` (any subset) -> Bound."""
    kw: dict[str, int] = {}
    if cpus is not None:
        kw["cpus"] = cpus
    if line_size is not None:
        kw["line_size"] = line_size
    for part in filter(None, (text or "").split(",")):
        k, _, v = part.partition("=")
        k = {"line": "line_size", "line-size": "line_size"}.get(k.strip(), k.strip())
        if k not in ("cpus", "execs", "refills", "line_size") or not v.strip().isdigit():
            raise ValueError(f"bad --bound item {part!r} (use cpus=N,execs=N,refills=N,line=N)")
        kw[k] = int(v)
    b = Bound(**kw)
    if not 1 <= b.cpus <= 4 or not 1 <= b.execs <= 8 or not 0 <= b.refills <= 6:
        raise ValueError("--bound: cpus 1..4, execs 1..8, refills 0..6")
    if b.line_size < 1 or b.line_size & (b.line_size - 1) or b.line_size > 4096:
        raise ValueError("--bound: line must be a power of two up to 4096")
    return b


def parse_path(text: str) -> tuple[str, ...]:
    return tuple(a for a in text.replace(",", " ").split() if a)


class Violation(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class _World:
    """One machine, patcher and CPUs driven action by action."""

    def __init__(self, w: Workload, scenario: str, strategy: str, mutation: str | None,
                 bound: Bound, order: tuple[int, ...], targets: dict[int, int | None],
                 starts: tuple[int, ...] = ()) -> None:
        self.w, self.sim, self.bound = w, w.sim, bound
        self.targets = targets
        self.order = order
        scn = SCENARIOS[scenario]
        self.scn = scn
        if scn.teeth:
            install_teeth(w)
        names = [n for b in scn.batches for n in b]
        if scn.probe:
            names.append("probe")
        self.sites = sorted({w.by_name[n] for n in names}, key=lambda s: s.index)
        self.patched = [w.by_name[n] for b in scn.batches for n in b]
        self.core = TextPoke(self.sim, mutations=(mutation,) if mutation else ())
        self.hits: dict[int, int] = {}
        if scn.probe:
            self.sim.register_trap_handler(_probe_handler(w.by_name["probe"], self.hits))
        w.start()
        self.next_site = dict.fromkeys(self.sim.cpus, 0)   # index into self.sites
        for cpu, k in zip(self.sim.cpus, starts):
            # Before the patcher starts, the CPU runs to its first site
            # (through old code only).
            self.next_site[cpu] = k
            if k:
                self._run_to(cpu, self.sites[k])
        self.core.text_mutex.acquire()
        self.gen = _patcher(self.core, w, scn, strategy, order)
        self.wait: WaitUntil | None = None
        self.done = False
        self.psteps = 0
        self.execs = dict.fromkeys(self.sim.cpus, 0)
        self.trap_steps = dict.fromkeys(self.sim.cpus, 0)
        self.refills = 0
        self.depth = 0
        self.lines = sorted({(i, ln) for s in self.sites
                             for i, r in enumerate(self.sim._text)
                             if r.start <= s.addr < r.start + r.size
                             for ln in range((s.addr - r.start) // bound.line_size,
                                             (s.addr + s.length - 1 - r.start) // bound.line_size + 1)})

    # -- what can happen next -------------------------------------------------
    def enabled(self) -> list[str]:
        acts = []
        if not self.done and (self.wait is None or self.wait.predicate()):
            acts.append("p")
        for cpu in self.sim.cpus:
            c = self.sim.vcpus[cpu]
            if c.state == TRAP:
                acts.append(f"t{cpu}")
                continue
            if c.state == DEAD:
                continue
            if c.ipis:
                acts.append(f"i{cpu}")
            if c.state == RUN and self.execs[cpu] < self.bound.execs:
                acts.append(f"x{cpu}")
            if self.refills < self.bound.refills:
                for idx, ln in sorted(c.stale):
                    acts.append(f"r{cpu}@{idx}.{ln}")
        return acts

    def apply(self, a: str) -> None:
        sim = self.sim
        sim.steps += 1
        self.depth += 1
        if a == "p":
            self._patcher_step()
        elif a[0] == "x":
            self._exec_site(int(a[1:]))
        elif a[0] == "t":
            cpu = int(a[1:])
            c = sim.vcpus[cpu]
            self.trap_steps[cpu] += 1
            sim._trap_step(c)
            if c.state != TRAP:
                self.trap_steps[cpu] = 0
        elif a[0] == "i":
            c = sim.vcpus[int(a[1:])]
            sim._serialise(c)
            for _due, ack in c.ipis:
                ack()
            c.ipis = []
        elif a[0] == "r":
            cpu, _, line = a[1:].partition("@")
            idx, ln = (int(x) for x in line.split("."))
            c = sim.vcpus[int(cpu)]
            c.stale.discard((idx, ln))
            sim._refill(c, (idx, ln), "evict")
            self.refills += 1
        else:
            raise ValueError(f"unknown action {a!r}")
        if sim.oopses:
            o = sim.oopses[0]
            raise Violation("oops", str(o))

    def _patcher_step(self) -> None:
        self.wait = None
        self.psteps += 1
        try:
            item = next(self.gen)
        except StopIteration:
            self.done = True
            self.core.text_mutex.release()
            return
        except TextPokeError as e:
            raise Violation("error", f"{type(e).__name__}: {e}") from None
        if isinstance(item, WaitUntil):
            self.wait = item

    def _exec_site(self, cpu: int) -> None:
        sim = self.sim
        c = sim.vcpus[cpu]
        fast = fast_cpu(c)
        self.execs[cpu] += 1
        site = self.sites[self.next_site[cpu]]
        if not self._run_to(cpu, site):
            return
        seen = sim.view_read(cpu, site.addr, site.length)
        if seen not in (site.old, site.new) and seen[0] != 0xCC:
            raise Violation("mixed", f"cpu{cpu} fetched {seen.hex(' ')} at {site.name}: "
                            f"neither old ({site.old.hex(' ')}) nor new ({site.new.hex(' ')})")
        self.next_site[cpu] = (self.next_site[cpu] + 1) % len(self.sites)
        c.pending_intr = None
        try:
            fast.run(site.addr, 0, 1)
        except UcError as e:
            sim._oops(c, _fault_kind(e), str(e))
            return
        if c.pending_intr is None:
            return
        intno, c.pending_intr = c.pending_intr, None
        if intno != 3:
            sim._oops(c, f"trap {intno}")
            return
        read = fast.read
        regs = PtRegs(ip=read(_REG_NAMES["rip"]), sp=read(_REG_NAMES["rsp"]),
                      flags=read(_REG_NAMES["rflags"]), mem=sim._mem, cpu=cpu,
                      gprs=read_gprs(c, _GPRS))
        c.trap_regs = regs
        c.trap_task = sim._run_trap_chain(regs)
        c.state = TRAP

    def _run_to(self, cpu: int, site) -> bool:
        """Run *cpu* to *site*: a code hook there stops it before it executes
        it (exact, unlike emu_start's "until", which cached translations may
        run past).  False if it oopsed on the way."""
        sim = self.sim
        c = sim.vcpus[cpu]
        fast = fast_cpu(c)
        rip = fast.rip()
        if rip == site.addr:
            return True
        c.pending_intr = None
        self.targets[cpu] = site.addr
        try:
            fast.run(rip, 0, _RUN_LIMIT)
        except UcError as e:
            sim._oops(c, _fault_kind(e), str(e))
            return False
        finally:
            self.targets[cpu] = None
        if c.pending_intr is not None or fast.rip() != site.addr:
            raise Violation("lost", f"cpu{cpu} did not reach {site.name} (at {fast.rip():#x})")
        return True

    # -- the end of a path ----------------------------------------------------
    def final_check(self) -> None:
        """At a leaf with the patcher done: every live CPU's view holds the
        new bytes at every patched site (it was serialised after the last
        write), and no INT3 of ours is left in the text."""
        if not self.done:
            return
        for s in self.patched:
            if s.kind == "nop5-int3":
                continue
            mem = self.sim.text_read(s.addr, s.length)
            if mem != s.new:
                raise Violation("int3-left" if mem[:1] == b"\xcc" else "error",
                                f"{s.name} holds {mem.hex(' ')} after the batch")
            for cpu in self.sim.cpus:
                if self.sim.vcpus[cpu].state == DEAD:
                    continue
                v = self.sim.view_read(cpu, s.addr, s.length)
                if v != s.new:
                    raise Violation("stale", f"cpu{cpu} still fetches {v.hex(' ')} at "
                                    f"{s.name} after the batch returned")

    def key(self) -> bytes:
        sim = self.sim
        h = hashlib.blake2b(digest_size=16)
        core = self.core
        inflight = getattr(core, "_inflight", None)
        h.update(repr((self.depth, self.psteps, self.done, self.refills, self.order,
                       sorted(core.text_poke_array_refs.items()),
                       [(t.rel_addr, t.len, bytes(t.text)) for t in core.text_poke_array.vec],
                       getattr(inflight, "phase", None))).encode())
        for i, ln in self.lines:
            r = sim._text[i]
            off = ln * self.bound.line_size
            h.update(r.mv[off:off + self.bound.line_size].tobytes())
        for cpu in sim.cpus:
            c = sim.vcpus[cpu]
            fast = fast_cpu(c)
            regs = [fast.read(r) for _n, r in sorted(_REG_NAMES.items())
                    if _n not in ("r12",)]
            regs.append(fast.read(_REG_NAMES["r12"]) & 1)
            tr = c.trap_regs
            h.update(repr((cpu, c.state, regs, len(c.ipis), sorted(c.stale), self.execs[cpu],
                           self.next_site[cpu], self.trap_steps[cpu],
                           (tr.ip, tr.sp) if tr is not None and c.state == TRAP else None)
                          ).encode())
            for i, ln in self.lines:
                off = sim._text[i].start + ln * self.bound.line_size
                h.update(sim.view_read(cpu, off, self.bound.line_size))
        return h.digest()

    def close(self) -> None:
        """Let go of the patcher and the core.  The machine is restored
        before its next use, so the core's recovery (finishing or rolling
        back the batch, which would run the scheduler) is cut short: the
        machine reads as closed while they go."""
        sim = self.sim
        sim._closed = True
        try:
            for closing in (self.gen.close, self._unlock, self.core.close):
                try:
                    closing()
                except Exception:
                    pass
        finally:
            sim._closed = False

    def _unlock(self) -> None:
        while self.core.text_mutex.held():
            self.core.text_mutex._release()


def _patcher(core: TextPoke, w: Workload, scn, strategy: str, order: tuple[int, ...]) -> Task:
    """The scenario's patcher (as ``verify``'s), with the first batch of
    several entries queued in *order*."""
    ordered = False
    for batch in scn.batches:
        sites = [w.by_name[n] for n in batch]
        if len(sites) > 1 and not ordered and order:
            sites = [sites[i] for i in order]
            ordered = True
        if strategy == "int3":
            for s in sites:
                yield from core.smp_text_poke_batch_add_task(s.addr, s.new)
            yield from core.smp_text_poke_batch_finish_task()
        else:
            for s in sites:
                yield from core._poke(s.addr, s.new, "poke")
            yield from core._sync()


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


class _Machines:
    """One booted machine per bound, restored for each replay."""

    def __init__(self, bound: Bound) -> None:
        self.w = boot_workload(ncpus=bound.cpus, seed=0, line_size=bound.line_size,
                               policy=_POLICY)
        sim = self.w.sim
        self.targets: dict[int, int | None] = dict.fromkeys(sim.cpus)
        # A code hook at every site (installed before anything is
        # translated): the CPU the explorer runs stops at its target site.
        addrs = sorted({s.addr for s in self.w.sites} | {t[3] for t in teeth_sites()})
        for cpu in sim.cpus:
            c = sim.vcpus[cpu]

            def stop_at(uc, addr, _size, _user, cpu=cpu, targets=self.targets):
                if targets[cpu] == addr:
                    uc.emu_stop()
            for a in addrs:
                c._hooks.append(c.uc.hook_add(UC_HOOK_CODE, stop_at, begin=a, end=a))
        self.snap = sim.snapshot()
        self.sites = tuple(self.w.sites)

    def world(self, scenario, strategy, mutation, bound, order, starts=()) -> _World:
        self.w.sim.restore(self.snap, seed=0)
        self.w.sites = list(self.sites)
        self.w.by_name = {s.name: s for s in self.sites}
        return _World(self.w, scenario, strategy, mutation, bound, order, self.targets, starts)

    def close(self) -> None:
        self.w.close()


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
