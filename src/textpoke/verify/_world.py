# SPDX-License-Identifier: GPL-2.0-only
"""The explorer's world: one booted machine (restored for each path), its
patcher and CPUs driven action by action -- ``p``, ``xN``, ``tN``, ``iN``,
``rN@L`` (see :mod:`._explore`) --, the actions enabled in a state, the
state's hash, and the bound (:class:`Bound`) they honour."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
from ..sim._scenarios import SCENARIOS
from ..sim._schedule import _probe_handler, poke_batch_task
from ..sim._workload import Workload, boot_workload

__all__ = ["Bound", "parse_bound", "parse_path", "Violation"]

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
        yield from poke_batch_task(core, sites, strategy)


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
