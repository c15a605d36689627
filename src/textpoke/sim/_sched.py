# SPDX-License-Identifier: GPL-2.0-only
"""The sim machine's seeded scheduler: tasks, one decision at a time (a
CPU slice, a task turn, a trap-handler step, an IPI taken, or a stale
line refilled), runs of decisions made at once on a quiet machine
(fast-forward), and the sync IPI.  Its policy is in :mod:`._policy`, its
random generator in :mod:`._rng`."""

from __future__ import annotations

import random
from typing import Any, Callable

from unicorn import UcError

from .._core._emulate import PtRegs
from .._core._machine import Task, WaitUntil
from .._core._signals import uninterruptible
from .._errors import MachineError
from ._policy import COARSE, FINE, FREE, WRITE_GRANULARITIES, SchedPolicy
from ._rng import CountingRandom, _below, _c_getrandbits, _c_random
from ._ucfast import fast_cpu
from ._vcpu import _GPRS, _REG_NAMES, DEAD, RUN, TRAP, VCpu, _fault_kind

_RIP, _RSP, _RFLAGS = _REG_NAMES["rip"], _REG_NAMES["rsp"], _REG_NAMES["rflags"]
_ACTIVE = (RUN, TRAP)
#: what a trap handler's PtRegs holds, read in one go
_TRAP_REGS = (_RIP, _RSP, _RFLAGS) + tuple(r for _n, r in _GPRS)
_GPR_NAMES = tuple(n for n, _r in _GPRS)

# (the policy and the generator keep being importable from here)
__all__ = ["SchedPolicy", "FINE", "COARSE", "FREE", "WRITE_GRANULARITIES", "CountingRandom"]


class _SimTask:
    __slots__ = ("gen", "wait", "done", "result", "exc", "name")

    def __init__(self, gen: Task, name: str) -> None:
        self.gen, self.name = gen, name
        self.wait: WaitUntil | None = None
        self.done = False
        self.result: Any = None
        self.exc: BaseException | None = None


class _Scheduler:
    """SimMachine's scheduling half (a mixin: it works on the machine's
    CPUs, tasks, rng and policy)."""

    rng: random.Random
    policy: SchedPolicy

    def sync_each_cpu(self) -> Task:
        self._check_open()
        self.ipi_broadcasts += 1
        pending = set()
        lat = self.policy.ipi_latency
        for c in self._online:
            if c.state == DEAD:
                continue   # an oopsed CPU is stopped; it fetches nothing more
            pending.add(c.id)
            due = self.steps + (self.rng.randint(0, lat) if lat else 0)
            # An unplugged CPU acks on its way out: it never blocks the wait.
            # One plugged in meanwhile is not waited for: it came up refilled.
            c.ipis.append((due, lambda cid=c.id: pending.discard(cid)))
            if self.trace is not None:
                self.trace.append(("ipi-send", self.steps, c.id, due))
        yield WaitUntil(lambda: not pending, "every CPU to take the sync IPI")

    def run_task(self, task: Task) -> Any:
        # The caller's CPU takes the task's first turn at once: up to
        # task_burst steps, as any task turn, stopping early at a wait that
        # does not hold yet.  Only then do the others get turns (a call that
        # never yields, like queueing a batch entry, costs no scheduling at
        # all; under FINE the turn is one step, as before).
        self._check_open()
        burst = self.policy.task_burst
        try:
            item = next(task)
            taken = 1
            while taken < burst and not (isinstance(item, WaitUntil) and not item.predicate()):
                item = next(task)
                taken += 1
        except StopIteration as stop:
            return stop.value
        t = self.spawn(task, "run_task")
        if isinstance(item, WaitUntil) and not item.predicate():
            t.wait = item
        try:
            while not t.done:
                if not self.step():
                    raise MachineError("run_task: the task vanished without finishing")
        except BaseException:
            # Let go of the task (protocol: never resumed by us again); the
            # caller decides whether to recover or close it.
            if t in self._tasks:
                self._tasks.remove(t)
            raise
        if t.exc is not None:
            raise t.exc
        return t.result


    def abandon_tasks(self) -> None:
        """Stop scheduling every spawned task (they are not closed: their
        owners decide); see ``Machine.abandon_tasks``."""
        self._tasks.clear()

    def spawn(self, task: Task, name: str = "task") -> _SimTask:
        self._check_open()
        t = _SimTask(task, name)
        self._tasks.append(t)
        return t


    def _cpu_turn(self, c: VCpu) -> None:
        if c.state == TRAP:
            self._trap_step(c)
            return
        if c.ipis and (c.state != RUN or any(due <= self.steps for due, _ in c.ipis)):
            # Delivered IPIs are taken at an instruction boundary, never
            # inside a trap handler; taking one serialises (sync_core).
            self._serialise(c)
            keep = []
            acked = 0
            for due, ack in c.ipis:
                if due <= self.steps or c.state != RUN:
                    ack()
                    acked += 1
                    c.ipis_taken += 1
                else:
                    keep.append((due, ack))
            c.ipis = keep
            if self.trace is not None:
                self.trace.append(("ipi", self.steps, c.id, acked))
            return
        if c.state != RUN:
            return
        p = self.policy
        fast = fast_cpu(c)
        c.pending_intr = None
        if p.until_preempt and self.preempt_addr is not None:
            # Run to the guest's preemption point; when sitting on it, take
            # one instruction first (emu_start would stop at once).
            until, count = ((self.preempt_addr, 0) if fast.rip() != self.preempt_addr
                            else (0, 1))
        else:
            until = 0
            # randint(min, max), drawn the same way (same rng stream)
            count = (p.slice_min if p.slice_min == p.slice_max
                     else p.slice_min + _below(self.rng, p.slice_max - p.slice_min + 1))
        c.slices += 1
        try:
            with c.stop_region:
                fast.run_here(until, count)
        except UcError as e:
            self._oops(c, _fault_kind(e), str(e))
            return
        if c.pending_intr is None:
            c.instructions += count     # 0 for a run-to-preemption slice: not counted
            return
        self._interrupted(c, fast)

    def _interrupted(self, c: VCpu, fast: Any) -> None:
        """*c* stopped on an interrupt: an INT3 enters the trap chain (one
        step per turn from now on), anything else is an oops."""
        intno = c.pending_intr
        c.pending_intr = None
        if intno != 3:
            self._oops(c, f"trap {intno}")
            return
        c.traps += 1
        vals = fast.read_many(_TRAP_REGS)        # one call for the lot
        regs = PtRegs(ip=vals[0], sp=vals[1], flags=vals[2], mem=self._mem, cpu=c.id,
                      gprs=dict(zip(_GPR_NAMES, vals[3:])))
        c.trap_regs = regs
        c.trap_task = self._run_trap_chain(regs)
        c.state = TRAP
        if self.trace is not None:
            self.trace.append(("int3", self.steps, c.id, regs.ip - 1))


    def _task_turn(self, t: _SimTask) -> None:
        burst = self.policy.task_burst
        for _ in range(burst):
            if t.wait is not None:
                if not t.wait.predicate():
                    return
                t.wait = None
            try:
                item = next(t.gen)
            except StopIteration as stop:
                t.done, t.result = True, stop.value
                self._tasks.remove(t)
                return
            except Exception as e:  # surfaced by run_task / the caller
                t.done, t.exc = True, e
                if t in self._tasks:
                    self._tasks.remove(t)
                return
            except BaseException:
                # KeyboardInterrupt / the CLI's Terminated raised while the
                # task's own code ran: it belongs to whoever drives the
                # machine, not to the task -- stored, nobody might look.
                t.done = True
                if t in self._tasks:
                    self._tasks.remove(t)
                raise
            if isinstance(item, WaitUntil):
                t.wait = item
                if not item.predicate():
                    return
                t.wait = None

    # ------------------------------------------------------------ scheduler
    def step(self) -> bool:
        """One scheduling decision; False when nothing at all can run (every
        CPU stopped or dead and no task left).

        A decision is atomic with respect to interrupts delivered with
        ``deliver_interrupt``: one that arrives mid-decision (in a Unicorn
        hook, or between a CPU stopping on an INT3 and entering its trap
        state) is raised when the decision is complete, so the machine is
        never left half-way through one."""
        with _DECISION:
            return self._step()

    def _step(self) -> bool:
        if self._closed:
            self._check_open()
        self.steps += 1
        rng = self.rng
        p = self.policy
        online = self._online
        if p.refresh_prob:
            rng.words += 2
            if _c_random(rng) < p.refresh_prob:
                stale_cpus = [c for c in online if c.stale and c.state != DEAD]
                if stale_cpus:
                    c = stale_cpus[_below(rng, len(stale_cpus))]
                    lines = sorted(c.stale)
                    line = lines[_below(rng, len(lines))]
                    c.stale.discard(line)
                    self._refill(c, line, "evict")
                    return True
        cands: list[Any] = [c for c in online if c.state in _ACTIVE or c.ipis]
        if self._tasks:
            tasks = [t for t in self._tasks if t.wait is None or t.wait.predicate()]
        else:
            tasks = []
        if not cands and not tasks:
            if self._tasks:
                raise MachineError("deadlock: every task waits and no CPU can run "
                                   f"({', '.join(t.wait.reason for t in self._tasks if t.wait)})")
            return False
        nc = len(cands)
        k = _below(rng, nc + len(tasks))         # randrange(n), the same draw
        if k >= nc:
            self._task_turn(tasks[k - nc])
            return True
        c = cands[k]
        if c.state != RUN or p.until_preempt:
            self._cpu_turn(c)
            return True
        if c.ipis:
            steps = self.steps
            for due, _ack in c.ipis:
                if due <= steps:            # one is delivered: taken now
                    self._cpu_turn(c)
                    return True
        # _cpu_turn's slice of a running CPU, inline (most decisions are one)
        c.pending_intr = None
        smin = p.slice_min
        count = smin if smin == p.slice_max else smin + _below(rng, p.slice_max - smin + 1)
        c.slices += 1
        fast = c.fast
        try:
            with c.stop_region:
                fast.run_here(0, count)
        except UcError as e:
            self._oops(c, _fault_kind(e), str(e))
            return True
        if c.pending_intr is None:
            c.instructions += count
        else:
            self._interrupted(c, fast)
        return True

    def run(self, steps: int) -> None:
        """Up to *steps* scheduling decisions (fewer if nothing can run)."""
        self._check_open()
        if not self.fast_forward:
            for _ in range(steps):
                if not self.step():
                    return
            return
        end = self.steps + steps
        slow_until = 0
        while self.steps < end:
            if self.steps >= slow_until and not self._tasks:
                n = self._burstable()
                if n:
                    k = min(end - self.steps, _BURST_MAX)
                    if self._burst(k) is None:      # rolled back: those k one by one
                        slow_until = self.steps + k * _BACKOFF
                    continue
                slow_until = self.steps + 1
            if not self.step():
                return

    def run_until(self, pred: Callable[[], bool], max_steps: int = 10_000_000, *,
                  monotone: bool = False) -> bool:
        """Step until *pred* holds (True) or *max_steps* decisions were made
        or nothing can run (then *pred*'s value).

        *monotone* says that *pred*, once true, stays true: on a machine
        with ``fast_forward`` it is then checked after a run of decisions
        made at once, and where it turned true inside one, that run is
        rolled back and made again one decision at a time -- the same
        decisions, stopping at the same step."""
        self._check_open()
        if not (monotone and self.fast_forward):
            for _ in range(max_steps):
                if pred():
                    return True
                if not self.step():
                    break
            return pred()
        end = self.steps + max_steps
        slow_until = 0
        while self.steps < end:
            if pred():
                return True
            # (a task in flight: never quiet, no need to ask)
            if self.steps >= slow_until and not self._tasks:
                if self._burstable():
                    k = min(end - self.steps, _BURST_WINDOW)
                    done = self._burst(k, keep=True)
                    if done is None:
                        slow_until = self.steps + k * _BACKOFF
                    elif pred():
                        # it turned true somewhere in there: find where
                        self._burst_rollback(done)
                        slow_until = self.steps + k
                    continue
                slow_until = self.steps + 1
            if not self.step():
                break
        return pred()

    # ------------------------------------------------------- fast-forward
    #: Guest CPUs that share no writable memory with each other (each
    #: writes only its own records and stack) may run several of their
    #: slices in one go: see :meth:`_burst`.  Off unless the owner of the
    #: machine says so (``verify`` does: its workload is such a guest).
    fast_forward: bool = False

    def _burstable(self) -> int:
        """How many CPUs would run in a burst now (0: not now).  A burst
        needs a quiet machine: fast-forward on, no task, no trap handler in
        flight, no IPI pending, no stale line in any live CPU's view, no
        INT3 of a poke in the text, count-mode slices, no code hooks of
        anybody's (a traced run that records executions goes one by one)."""
        if self._tasks or self.policy.until_preempt or getattr(self.rng, "_seed0", None) is None:
            return 0
        n = 0
        for c in self._online:
            st = c.state
            if st == TRAP or c.ipis or (c.stale and st != DEAD) or len(c._hooks) != 2:
                return 0
            if st == RUN:
                n += 1
        if n and self._int3_pokes:
            for addr in self._int3_pokes:
                if self.text_read(addr, 1) == b"\xcc":
                    return 0
        return n

    def _burst(self, k: int, *, keep: bool = False) -> Any:
        """Make the next *k* decisions of a quiet machine at once.

        On a quiet machine (see :meth:`_burstable`) every decision is a
        slice of one running CPU -- the random draws are the very ones
        ``step`` makes, they depend on nothing the guest does -- until a
        CPU traps or faults.  So the draws are made first, each CPU's
        slices are added up, and each CPU runs its sum in one
        ``emu_start``: as its slices would have, since the CPUs share no
        writable memory and their views do not change in between.  A CPU
        that stops early (INT3, fault) means the decisions after that point
        were not the ones made: everything is put back as it was (data
        memory, registers, counters, steps, the random generator) and None
        is returned, for the caller to make those decisions one by one.
        An exception (an interrupt delivered meanwhile) also puts
        everything back, then propagates.  Otherwise the burst stands; with
        *keep* its undo record is returned for :meth:`_burst_rollback`."""
        rng = self.rng
        runs = [c for c in self._online if c.state == RUN]
        n = len(runs)
        w0, s0 = rng.words, self.steps
        saved: list[VCpu] = []          # CPUs whose registers were saved (and may have run)
        undo = (w0, s0, [r.mv.tobytes() for r in self._data if r.writable], runs,
                [(c.slices, c.instructions) for c in runs], saved)
        ok = True
        current: list[Any] = [None]

        def stop() -> None:
            if current[0] is not None:
                current[0].emu_stop()
        debt: list[int] = []
        try:
            # An interrupt delivered from here on (while drawing, or while a
            # CPU runs) is raised once everything is put back.
            with uninterruptible(stop):
                debt, nsl, words = _draw_slices(rng, self.policy, n, k)
                rng.words = w0 + words
                self.steps = s0 + k
                for c, count, sl in zip(runs, debt, nsl):
                    if not count:
                        continue
                    ctx = c.ctx_buf
                    if ctx is None:
                        ctx = c.ctx_buf = c.uc.context_save()
                    else:
                        c.uc.context_update(ctx)
                    saved.append(c)
                    fast = fast_cpu(c)
                    c.pending_intr = None
                    current[0] = c.uc
                    try:
                        fast.run_here(0, count)
                    except UcError:
                        ok = False
                        break
                    finally:
                        current[0] = None
                    if c.pending_intr is not None:
                        ok = False
                        break
                    c.slices += sl
                    c.instructions += count
        except BaseException:
            self._burst_rollback(undo)
            raise
        if not ok:
            self._burst_rollback(undo)
            return None
        return undo if keep else True

    def _burst_rollback(self, undo: tuple) -> None:
        """Put back what :meth:`_burst` changed."""
        w0, s0, mem, runs, counters, saved = undo
        for r, b in zip((r for r in self._data if r.writable), mem):
            r.mv[:] = b
        for c in saved:
            c.uc.context_restore(c.ctx_buf)
        for c, (sl, ins) in zip(runs, counters):
            c.pending_intr = None
            c.fault = None
            c.slices, c.instructions = sl, ins
        if not self.rng.rewind(w0):
            raise MachineError("fast-forward: the scheduler's random generator cannot go back")
        self.steps = s0


def _draw_slices(rng: CountingRandom, p: SchedPolicy, n: int, k: int) -> tuple[list[int], list[int], int]:
    """The draws of *k* decisions of a quiet machine with *n* running CPUs,
    as ``_step`` makes them: the refresh draw (no stale line: never a
    refill), the CPU, its slice.  Instructions and slices per CPU, and the
    words drawn (not yet added to ``rng.words``)."""
    debt = [0] * n
    nsl = [0] * n
    words = 0
    kb = n.bit_length()
    smin = p.slice_min
    span = p.slice_max - smin + 1
    sb = span.bit_length()
    refresh = bool(p.refresh_prob)
    for _ in range(k):
        if refresh:
            _c_random(rng)
            words += 2
        r = _c_getrandbits(rng, kb)
        words += 1
        while r >= n:
            r = _c_getrandbits(rng, kb)
            words += 1
        if span > 1:
            x = _c_getrandbits(rng, sb)
            words += 1
            while x >= span:
                x = _c_getrandbits(rng, sb)
                words += 1
            debt[r] += smin + x
        else:
            debt[r] += smin
        nsl[r] += 1
    return debt, nsl, words


#: decisions made at once by run() on a quiet machine, and between two
#: looks at a monotone predicate in run_until()
_BURST_MAX = 4096
_BURST_WINDOW = 16
#: after a burst rolled back (a CPU trapped), this many times its length
#: goes one decision at a time before the next try
_BACKOFF = 4


def _no_stop() -> None:
    """Nothing to cut short outside emu_start: the decision just ends."""


_DECISION = uninterruptible(_no_stop)
