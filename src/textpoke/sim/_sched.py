# SPDX-License-Identifier: GPL-2.0-only
"""The sim machine's seeded scheduler: policies, tasks, one decision at a
time (a CPU slice, a task turn, a trap-handler step, an IPI taken, or a
stale line refilled), and the sync IPI."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from unicorn import UcError

from .._core._emulate import PtRegs
from .._core._machine import Task, WaitUntil
from .._core._signals import uninterruptible
from .._errors import MachineError
from ._ucfast import fast_cpu, read_gprs
from ._vcpu import _GPRS, _REG_NAMES, DEAD, RUN, TRAP, VCpu, _fault_kind

_RIP, _RSP, _RFLAGS = _REG_NAMES["rip"], _REG_NAMES["rsp"], _REG_NAMES["rflags"]

__all__ = ["SchedPolicy", "FINE", "COARSE", "FREE", "WRITE_GRANULARITIES"]


#: one byte and yields (every byte-granular interleaving is reachable: the
#: verification default); ``"poke"`` stores the whole write with one memmove,
#: marks the lines it touched stale, and yields once (throughput).
WRITE_GRANULARITIES = ("byte", "poke")


@dataclass(frozen=True, slots=True)
class SchedPolicy:
    """How the scheduler interleaves vCPUs, tasks and line refreshes.

    ``slice_min/max``: guest instructions per vCPU slice (count mode), or,
    with ``until_preempt``, run until the guest's preemption point.
    ``refresh_prob``: chance per decision that one stale line of one vCPU's
    view is refilled.  ``task_burst``: steps a task may take per turn.
    ``ipi_latency``: an IPI is delivered up to this many scheduler decisions
    after it is sent (drawn per IPI); the CPU takes it at its first
    instruction boundary after delivery.  ``write_granularity``: see
    :data:`WRITE_GRANULARITIES`.  ``pokes_per_step``: with "poke"
    granularity, how many pokes of one ``text_poke_write_many`` are stored
    in one scheduler step (others look between steps, not between those
    pokes: a batch phase's independent sites, written while the patcher
    keeps its turn).
    """

    slice_min: int = 1
    slice_max: int = 8
    refresh_prob: float = 0.25
    task_burst: int = 1
    until_preempt: bool = False
    ipi_latency: int = 0
    cpu_weight: float = 1.0
    write_granularity: str = "byte"
    pokes_per_step: int = 1

    def __post_init__(self) -> None:
        if self.pokes_per_step < 1:
            raise ValueError(f"pokes_per_step must be >= 1, not {self.pokes_per_step}")
        if self.write_granularity not in WRITE_GRANULARITIES:
            raise ValueError(f"write_granularity must be one of {WRITE_GRANULARITIES}, "
                             f"not {self.write_granularity!r}")


FINE = SchedPolicy(ipi_latency=48)
COARSE = SchedPolicy(slice_min=20, slice_max=400, refresh_prob=0.2, task_burst=16, ipi_latency=4,
                     write_granularity="poke")
FREE = SchedPolicy(slice_min=1, slice_max=1, refresh_prob=0.0, task_burst=1 << 30, until_preempt=True,
                   write_granularity="poke")


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
        rip = fast.rip()
        c.pending_intr = None
        if p.until_preempt and self.preempt_addr is not None:
            # Run to the guest's preemption point; when sitting on it, take
            # one instruction first (emu_start would stop at once).
            until, count = (self.preempt_addr, 0) if rip != self.preempt_addr else (0, 1)
        else:
            until = 0
            # randint(min, max), drawn the same way (same rng stream)
            count = (p.slice_min if p.slice_min == p.slice_max
                     else p.slice_min + self.rng._randbelow(p.slice_max - p.slice_min + 1))
        c.slices += 1
        try:
            with uninterruptible(c.uc.emu_stop):
                fast.run(rip, until, count)
        except UcError as e:
            self._oops(c, _fault_kind(e), str(e))
            return
        if c.pending_intr is None:
            c.instructions += count     # 0 for a run-to-preemption slice: not counted
            return
        intno = c.pending_intr
        c.pending_intr = None
        if intno != 3:
            self._oops(c, f"trap {intno}")
            return
        c.traps += 1
        read = fast.read
        regs = PtRegs(ip=read(_RIP), sp=read(_RSP), flags=read(_RFLAGS),
                      mem=self._mem, cpu=c.id, gprs=read_gprs(c, _GPRS))
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
        if p.refresh_prob and rng.random() < p.refresh_prob:
            stale_cpus = [c for c in online if c.stale and c.state != DEAD]
            if stale_cpus:
                c = stale_cpus[rng.randrange(len(stale_cpus))]
                lines = sorted(c.stale)
                line = lines[rng.randrange(len(lines))]
                c.stale.discard(line)
                self._refill(c, line, "evict")
                return True
        cands: list[Any] = [c for c in online if c.state in (RUN, TRAP) or c.ipis]
        tasks = [t for t in self._tasks if t.wait is None or t.wait.predicate()]
        if not cands and not tasks:
            if self._tasks:
                raise MachineError("deadlock: every task waits and no CPU can run "
                                   f"({', '.join(t.wait.reason for t in self._tasks if t.wait)})")
            return False
        n = len(cands) + len(tasks)
        k = rng._randbelow(n)         # randrange(n), the same draw
        if k < len(cands):
            self._cpu_turn(cands[k])
        else:
            self._task_turn(tasks[k - len(cands)])
        return True

    def run(self, steps: int) -> None:
        """Up to *steps* scheduling decisions (fewer if nothing can run)."""
        self._check_open()
        for _ in range(steps):
            if not self.step():
                return

    def run_until(self, pred: Callable[[], bool], max_steps: int = 10_000_000) -> bool:
        self._check_open()
        for _ in range(max_steps):
            if pred():
                return True
            if not self.step():
                break
        return pred()


def _no_stop() -> None:
    """Nothing to cut short outside emu_start: the decision just ends."""


_DECISION = uninterruptible(_no_stop)
