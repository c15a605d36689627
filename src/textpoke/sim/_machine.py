# SPDX-License-Identifier: GPL-2.0-only
"""The sim machine: N x86-64 vCPUs on Unicorn sharing one memory.

* Text is mapped read+exec into every vCPU through a *private view* of each
  64-byte line (the line size is a parameter; 1 models a byte-granular
  front end).  A write to text lands in physical memory and makes that line
  stale in every view.  A stale line is refreshed when the scheduler says so
  (eviction/refill at an adversarial moment) and all lines are refreshed
  when the CPU serialises: sync_core from an IPI, or IRET from a trap.  So a
  CPU may execute old bytes long after a write, or an instruction made of
  an old line and a new one -- the hazards of cross-modifying code.
* Data is coherent: one buffer mapped into every vCPU.
* The scheduler is seeded: the same seed gives the same run, event for event.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass
from typing import Any, Callable

from unicorn import (UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_EXEC, UC_PROT_READ,
                     UC_PROT_WRITE, Uc, UcError)
from unicorn import x86_const as X

from .._core._emulate import PtRegs
from .._errors import BadAddressError, MachineError
from .._core._insn import insn_decode_kernel
from .._core._machine import PAGE_SIZE, Capability, Machine, Task, TextRange, WaitUntil, drive

__all__ = ["SimMachine", "SchedPolicy", "Oops", "VCpu", "FINE", "COARSE", "FREE"]

def _round_up(n: int, a: int = PAGE_SIZE) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class SchedPolicy:
    """How the scheduler interleaves vCPUs, tasks and line refreshes.

    ``slice_min/max``: guest instructions per vCPU slice (count mode), or,
    with ``until_preempt``, run until the guest's preemption point.
    ``refresh_prob``: chance per decision that one stale line of one vCPU's
    view is refilled.  ``task_burst``: steps a task may take per turn.
    ``ipi_latency``: an IPI is delivered up to this many scheduler decisions
    after it is sent (drawn per IPI); the CPU takes it at its first
    instruction boundary after delivery.
    """

    slice_min: int = 1
    slice_max: int = 8
    refresh_prob: float = 0.25
    task_burst: int = 1
    until_preempt: bool = False
    ipi_latency: int = 0
    cpu_weight: float = 1.0


FINE = SchedPolicy(ipi_latency=48)
COARSE = SchedPolicy(slice_min=20, slice_max=400, refresh_prob=0.2, task_burst=16, ipi_latency=4)
FREE = SchedPolicy(slice_min=1, slice_max=1, refresh_prob=0.0, task_burst=1 << 30, until_preempt=True)


@dataclass(frozen=True, slots=True)
class Oops:
    """An unhandled trap or fault: the CPU stopped, as a kernel oops."""

    cpu: int
    kind: str
    rip: int
    bytes_at_rip: bytes
    regs: dict[str, int]
    step: int
    detail: str = ""

    def as_dict(self) -> dict:
        return {"cpu": self.cpu, "kind": self.kind, "rip": self.rip,
                "bytes": self.bytes_at_rip.hex(), "regs": self.regs, "step": self.step,
                "detail": self.detail}

    def __str__(self) -> str:
        return (f"oops on cpu{self.cpu}: {self.kind} at {self.rip:#x} "
                f"[{self.bytes_at_rip.hex(' ')}] {self.detail}".rstrip())


RUN, TRAP, IDLE, DEAD = "run", "trap", "idle", "dead"

_REG_NAMES = {
    "rax": X.UC_X86_REG_RAX, "rbx": X.UC_X86_REG_RBX, "rcx": X.UC_X86_REG_RCX,
    "rdx": X.UC_X86_REG_RDX, "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI,
    "rbp": X.UC_X86_REG_RBP, "rsp": X.UC_X86_REG_RSP, "r8": X.UC_X86_REG_R8,
    "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
    "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14,
    "r15": X.UC_X86_REG_R15, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_EFLAGS,
}


class _SharedMemory:
    """The machine's coherent data view (``PtRegs.mem``)."""

    def __init__(self, sim: "SimMachine") -> None:
        self._sim = sim

    def read(self, addr: int, size: int) -> bytes:
        return self._sim.mem_read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._sim.mem_write(addr, data)


class _Region:
    __slots__ = ("start", "size", "buf", "name", "writable", "exec", "core")

    def __init__(self, start: int, size: int, name: str, writable: bool, exec_: bool, core: bool) -> None:
        self.start, self.size, self.name = start, size, name
        self.writable, self.exec, self.core = writable, exec_, core
        self.buf = (ctypes.c_ubyte * size)()


class VCpu:
    """One virtual CPU: a Unicorn instance with its own view of text."""

    def __init__(self, sim: "SimMachine", cpu_id: int) -> None:
        self.id = cpu_id
        self.sim = sim
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.state = IDLE
        self.views: list[Any] = []
        self.stale: set[tuple[int, int]] = set()
        self.ipis: list[tuple[int, Callable[[], None]]] = []
        self.trap_task: Task | None = None
        self.trap_regs: PtRegs | None = None
        self.pending_intr: int | None = None
        self.instructions = 0
        self.slices = 0
        self.traps = 0
        self.ipis_taken = 0
        self.refreshes = 0
        for r in sim._text:
            view = (ctypes.c_ubyte * r.size)()
            ctypes.memmove(view, r.buf, r.size)
            self.views.append(view)
            self.uc.mem_map_ptr(r.start, r.size, UC_PROT_READ | UC_PROT_EXEC, view)
        for r in sim._data:
            prot = UC_PROT_READ | (UC_PROT_WRITE if r.writable else 0)
            self.uc.mem_map_ptr(r.start, r.size, prot, r.buf)
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def _on_intr(self, uc: Uc, intno: int, _user: object) -> None:
        self.pending_intr = intno
        uc.emu_stop()

    def reg(self, name: str) -> int:
        return self.uc.reg_read(_REG_NAMES[name])

    def set_reg(self, name: str, value: int) -> None:
        self.uc.reg_write(_REG_NAMES[name], value)

    def regs_dict(self) -> dict[str, int]:
        return {n: self.uc.reg_read(r) for n, r in _REG_NAMES.items()}


class _SimTask:
    __slots__ = ("gen", "wait", "done", "result", "exc", "name")

    def __init__(self, gen: Task, name: str) -> None:
        self.gen, self.name = gen, name
        self.wait: WaitUntil | None = None
        self.done = False
        self.result: Any = None
        self.exc: BaseException | None = None


class SimMachine(Machine):
    """An emulated SMP x86-64 machine.

    Memory is described as (start, bytes, kind) regions: kind "text" (core
    kernel text, read+exec), "module" (executable, not core: execmem for
    JIT/detours), "rodata" or "data".  Per-CPU stacks are added here.
    """

    name = "sim"
    capabilities = frozenset({Capability.CALL, Capability.SCRATCH, Capability.EXECMEM})

    def __init__(self, regions: list[tuple[int, bytes | int, str, str]], *, ncpus: int = 4,
                 seed: int = 0, line_size: int = 64, policy: SchedPolicy = COARSE,
                 stack_base: int = 0x0700_0000, stack_size: int = 0x4000) -> None:
        super().__init__()
        if ncpus < 1:
            raise ValueError("need at least one CPU")
        if line_size < 1 or (line_size & (line_size - 1)):
            raise ValueError("line_size must be a power of two")
        self.ncpus = ncpus
        self.seed = seed
        self.line_size = line_size
        self.policy = policy
        self.rng = random.Random(seed)
        self._text: list[_Region] = []
        self._data: list[_Region] = []
        for start, content, kind, name in regions:
            size = _round_up(content if isinstance(content, int) else max(1, len(content)))
            if kind in ("text", "module"):
                r = _Region(start, size, name, False, True, kind == "text")
                if not isinstance(content, int):
                    ctypes.memmove(r.buf, bytes(content), len(content))
                    # Fill the tail of the last page with INT3, like the kernel pads text.
                    ctypes.memset(ctypes.addressof(r.buf) + len(content), 0xCC, size - len(content))
                else:
                    ctypes.memset(r.buf, 0xCC, size)
                self._text.append(r)
            elif kind in ("data", "rodata"):
                r = _Region(start, size, name, kind == "data", False, False)
                if not isinstance(content, int):
                    ctypes.memmove(r.buf, bytes(content), len(content))
                self._data.append(r)
            else:
                raise ValueError(f"unknown region kind {kind!r}")
        if not self._text or not self._text[0].core:
            raise ValueError("the first region must be core kernel text")
        self.stack_base, self.stack_size = stack_base, stack_size
        self._data.append(_Region(stack_base, _round_up(stack_size * ncpus), "stacks", True, False, False))
        self._ranges = [TextRange(r.start, r.start + r.size, r.name, r.core) for r in self._text]
        self._last_text = (0, self._text[0])
        self._mem = _SharedMemory(self)
        self.vcpus = [VCpu(self, i) for i in range(ncpus)]
        self._tasks: list[_SimTask] = []
        self.steps = 0
        self.oopses: list[Oops] = []
        self.smp_started = False
        self.preempt_addr: int | None = None
        self.ipi_broadcasts = 0
        self.trace: list[tuple] | None = None

    # ---------------------------------------------------------------- Machine
    @property
    def cpus(self) -> list[int]:
        return list(range(self.ncpus))

    @property
    def text_ranges(self) -> list[TextRange]:
        return self._ranges

    @property
    def mem(self) -> _SharedMemory:
        return self._mem

    def now(self) -> float:
        return float(self.steps)

    def _text_loc(self, addr: int, size: int) -> tuple[int, _Region]:
        i, r = self._last_text
        if r.start <= addr and addr + size <= r.start + r.size:
            return i, r
        for i, r in enumerate(self._text):
            if r.start <= addr and addr + size <= r.start + r.size:
                self._last_text = (i, r)
                return i, r
        raise BadAddressError(f"[{addr:#x}, +{size}) is not mapped text")

    def text_read(self, addr: int, size: int) -> bytes:
        _, r = self._text_loc(addr, size)
        off = addr - r.start
        return bytes(r.buf[off:off + size])

    def text_poke_write(self, addr: int, data: bytes) -> Task:
        # The alias mapping (text_poke_mm) reaches the same physical bytes
        # the CPUs fetch from; memcpy stores one byte after another, and any
        # of them may be seen before the next.
        idx, r = self._text_loc(addr, len(data))
        off = addr - r.start
        ls = self.line_size
        stale_sets = [c.stale for c in self.vcpus]
        for i, b in enumerate(data):
            r.buf[off + i] = b
            line = (idx, (off + i) // ls)
            for st in stale_sets:
                st.add(line)
            if self.trace is not None:
                self.trace.append(("w", self.steps, addr + i, b))
            yield

    def text_write_early(self, addr: int, data: bytes) -> None:
        if self.smp_started:
            raise MachineError("text_poke_early() after secondary CPUs started running; "
                               "use the SMP batch")
        idx, r = self._text_loc(addr, len(data))
        off = addr - r.start
        ctypes.memmove(ctypes.addressof(r.buf) + off, bytes(data), len(data))
        for c in self.vcpus:   # nothing runs yet: views follow at once
            ctypes.memmove(ctypes.addressof(c.views[idx]) + off, bytes(data), len(data))
            c.uc.ctl_remove_cache(addr, addr + len(data))

    def sync_each_cpu(self) -> Task:
        self.ipi_broadcasts += 1
        pending = set()
        for c in self.vcpus:
            if c.state == DEAD:
                continue   # an oopsed CPU is stopped; it fetches nothing more
            pending.add(c.id)
            lat = self.policy.ipi_latency
            due = self.steps + (self.rng.randint(0, lat) if lat else 0)
            c.ipis.append((due, lambda cid=c.id: pending.discard(cid)))
        yield WaitUntil(lambda: not pending, "every CPU to take the sync IPI")

    def run_task(self, task: Task) -> Any:
        # The caller's CPU runs the task until its first observable step;
        # only then do the others get turns (a call that never yields, like
        # queueing a batch entry, costs no scheduling at all).
        try:
            item = next(task)
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

    # ------------------------------------------------------------ memory
    def _data_loc(self, addr: int, size: int) -> _Region:
        for r in self._data:
            if r.start <= addr and addr + size <= r.start + r.size:
                return r
        raise BadAddressError(f"[{addr:#x}, +{size}) is not mapped data")

    def mem_read(self, addr: int, size: int) -> bytes:
        r = self._data_loc(addr, size)
        off = addr - r.start
        return bytes(r.buf[off:off + size])

    def mem_write(self, addr: int, data: bytes) -> None:
        r = self._data_loc(addr, len(data))
        ctypes.memmove(ctypes.addressof(r.buf) + addr - r.start, bytes(data), len(data))

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.mem_read(addr, 8), "little")

    def view_read(self, cpu: int, addr: int, size: int) -> bytes:
        """What *cpu* would fetch at addr now (its possibly stale view)."""
        idx, r = self._text_loc(addr, size)
        off = addr - r.start
        return bytes(self.vcpus[cpu].views[idx][off:off + size])

    # ------------------------------------------------------------ CPUs
    def start_cpu(self, cpu: int, rip: int, regs: dict[str, int] | None = None) -> None:
        """Point a CPU at guest code; it runs when the scheduler gives it turns."""
        c = self.vcpus[cpu]
        c.set_reg("rsp", self.stack_base + (cpu + 1) * self.stack_size - 64)
        for k, v in (regs or {}).items():
            c.set_reg(k, v)
        c.set_reg("rip", rip)
        c.state = RUN
        self.smp_started = True

    def stop_cpu(self, cpu: int) -> None:
        c = self.vcpus[cpu]
        if c.state == RUN:
            c.state = IDLE

    def spawn(self, task: Task, name: str = "task") -> _SimTask:
        t = _SimTask(task, name)
        self._tasks.append(t)
        return t

    def _oops(self, c: VCpu, kind: str, detail: str = "") -> None:
        rip = c.reg("rip")
        try:
            raw = self.view_read(c.id, rip, 8)
        except BadAddressError:
            raw = b""
        o = Oops(c.id, kind, rip, raw, c.regs_dict(), self.steps, detail)
        self.oopses.append(o)
        c.state = DEAD
        for _due, ack in c.ipis:   # a stopped CPU fetches nothing more: count it as synced
            ack()
        c.ipis.clear()
        c.trap_task = None
        if self.trace is not None:
            self.trace.append(("oops", self.steps, c.id, kind, rip))

    def _serialise(self, c: VCpu) -> None:
        """sync_core / IRET: every stale line of this CPU's view is refilled."""
        if c.stale:
            for line in sorted(c.stale):
                self._refill(c, line)
            c.stale.clear()

    def _refill(self, c: VCpu, line: tuple[int, int]) -> None:
        idx, ln = line
        r = self._text[idx]
        off = ln * self.line_size
        n = min(self.line_size, r.size - off)
        ctypes.memmove(ctypes.addressof(c.views[idx]) + off, ctypes.addressof(r.buf) + off, n)
        c.uc.ctl_remove_cache(r.start + off, r.start + off + n)
        c.refreshes += 1

    def _cpu_turn(self, c: VCpu) -> None:
        if c.state == TRAP:
            self._trap_step(c)
            return
        if c.ipis and (c.state != RUN or any(due <= self.steps for due, _ in c.ipis)):
            # Delivered IPIs are taken at an instruction boundary, never
            # inside a trap handler; taking one serialises (sync_core).
            self._serialise(c)
            keep = []
            for due, ack in c.ipis:
                if due <= self.steps or c.state != RUN:
                    ack()
                    c.ipis_taken += 1
                else:
                    keep.append((due, ack))
            c.ipis = keep
            if self.trace is not None:
                self.trace.append(("ipi", self.steps, c.id))
            return
        if c.state != RUN:
            return
        p = self.policy
        rip = c.reg("rip")
        c.pending_intr = None
        if p.until_preempt and self.preempt_addr is not None:
            # Run to the guest's preemption point; when sitting on it, take
            # one instruction first (emu_start would stop at once).
            until, count = (self.preempt_addr, 0) if rip != self.preempt_addr else (0, 1)
        else:
            until = 0
            count = p.slice_min if p.slice_min == p.slice_max else self.rng.randint(p.slice_min, p.slice_max)
        c.slices += 1
        try:
            c.uc.emu_start(rip, until, count=count)
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
        regs = PtRegs(ip=c.reg("rip"), sp=c.reg("rsp"), flags=c.reg("rflags"),
                      mem=self._mem, cpu=c.id)
        c.trap_regs = regs
        c.trap_task = self._run_trap_chain(regs)
        c.state = TRAP
        if self.trace is not None:
            self.trace.append(("int3", self.steps, c.id, regs.ip - 1))

    def _run_trap_chain(self, regs: PtRegs) -> Task:
        for handler in self.trap_handlers:
            handled = yield from handler(regs)
            if handled:
                return True
        return False

    def _trap_step(self, c: VCpu) -> None:
        try:
            item = next(c.trap_task)
            if isinstance(item, WaitUntil):
                raise MachineError("a trap handler may not sleep")
            return
        except StopIteration as stop:
            handled = stop.value
        c.trap_task = None
        if not handled:
            c.state = RUN
            c.set_reg("rip", c.trap_regs.ip - 1)
            self._oops(c, "int3", "unhandled INT3")
            return
        r = c.trap_regs
        c.set_reg("rip", r.ip)
        c.set_reg("rsp", r.sp)
        c.set_reg("rflags", r.flags)
        c.state = RUN
        self._serialise(c)     # IRET serialises

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
            except BaseException as e:  # surfaced by run_task / the caller
                t.done, t.exc = True, e
                self._tasks.remove(t)
                return
            if isinstance(item, WaitUntil):
                t.wait = item
                if not item.predicate():
                    return
                t.wait = None

    # ------------------------------------------------------------ scheduler
    def step(self) -> bool:
        """One scheduling decision; False when nothing at all can run (every
        CPU stopped or dead and no task left)."""
        self.steps += 1
        rng = self.rng
        p = self.policy
        if p.refresh_prob and rng.random() < p.refresh_prob:
            stale_cpus = [c for c in self.vcpus if c.stale and c.state != DEAD]
            if stale_cpus:
                c = stale_cpus[rng.randrange(len(stale_cpus))]
                lines = sorted(c.stale)
                line = lines[rng.randrange(len(lines))]
                c.stale.discard(line)
                self._refill(c, line)
                return True
        cands: list[Any] = [c for c in self.vcpus if c.state in (RUN, TRAP) or c.ipis]
        tasks = [t for t in self._tasks if t.wait is None or t.wait.predicate()]
        if not cands and not tasks:
            if self._tasks:
                raise MachineError("deadlock: every task waits and no CPU can run "
                                   f"({', '.join(t.wait.reason for t in self._tasks if t.wait)})")
            return False
        n = len(cands) + len(tasks)
        k = rng.randrange(n)
        if k < len(cands):
            self._cpu_turn(cands[k])
        else:
            self._task_turn(tasks[k - len(cands)])
        return True

    def run(self, steps: int) -> None:
        """Up to *steps* scheduling decisions (fewer if nothing can run)."""
        for _ in range(steps):
            if not self.step():
                return

    def run_until(self, pred: Callable[[], bool], max_steps: int = 10_000_000) -> bool:
        for _ in range(max_steps):
            if pred():
                return True
            if not self.step():
                break
        return pred()

    def call(self, addr: int, *args: int, cpu: int = 0, max_insns: int = 1_000_000) -> int:
        """Run the guest function at *addr* to completion on *cpu* and return
        %rax -- for boot-time use, outside the scheduler (nothing else runs).
        Arguments go in rdi, rsi, rdx, rcx, r8, r9.  INT3 traps go through
        the trap chain as usual; an unhandled trap raises MachineError."""
        c = self.vcpus[cpu]
        if c.state == DEAD:
            raise MachineError(f"cpu{cpu} is dead")
        saved = c.regs_dict()
        sentinel = self._ranges[0].end - 1   # INT3 padding: stopping there is enough
        sp = self.stack_base + (cpu + 1) * self.stack_size - 256
        sp -= 8
        self.mem_write(sp, sentinel.to_bytes(8, "little"))
        for name, val in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            c.set_reg(name, val & ((1 << 64) - 1))
        c.set_reg("rsp", sp)
        rip = addr
        budget = max_insns
        try:
            while True:
                c.pending_intr = None
                try:
                    c.uc.emu_start(rip, sentinel, count=budget)
                except UcError as e:
                    raise MachineError(f"{_fault_kind(e)} at {c.reg('rip'):#x} while calling "
                                       f"{addr:#x}: {e}") from None
                rip = c.reg("rip")
                if rip == sentinel:
                    return c.reg("rax")
                if c.pending_intr is None:
                    raise MachineError(f"call to {addr:#x} did not return within {max_insns} instructions")
                if c.pending_intr != 3:
                    raise MachineError(f"trap {c.pending_intr} at {rip:#x} while calling {addr:#x}")
                regs = PtRegs(ip=rip, sp=c.reg("rsp"), flags=c.reg("rflags"), mem=self._mem, cpu=cpu)
                handled = drive(self._run_trap_chain(regs))
                if not handled:
                    raise MachineError(f"unhandled INT3 at {rip - 1:#x} while calling {addr:#x}")
                c.set_reg("rsp", regs.sp)
                c.set_reg("rflags", regs.flags)
                rip = regs.ip
                self._serialise(c)
        finally:
            rax = c.reg("rax")
            for name, val in saved.items():
                c.set_reg(name, val)
            c.set_reg("rax", rax)

    def scratch(self, size: int = 8) -> int:
        """Bytes at the bottom of cpu0's stack, far below anything a short
        call() uses: the boot self-tests scribble there."""
        if not 1 <= size <= self.stack_size // 2:
            raise ValueError(f"scratch size {size} not in 1..{self.stack_size // 2}")
        return self.stack_base + 64

    def disasm_at(self, addr: int) -> str:
        return insn_decode_kernel(self.text_read(addr, 15), addr).text


def _fault_kind(e: UcError) -> str:
    s = str(e)
    if "INSN_INVALID" in s:
        return "#UD"
    if "WRITE_PROT" in s:
        return "#PF write to read-only text"
    if "FETCH" in s:
        return "#PF instruction fetch"
    if "UNMAPPED" in s or "PROT" in s:
        return "#PF"
    return "fault"
