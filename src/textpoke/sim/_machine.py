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
* CPUs can be hot-plugged (``add_cpu``/``remove_cpu``); ids are never reused,
  so ``cpus`` may be non-contiguous.  ``vcpus[id]`` keeps every vCPU ever
  created (an unplugged one is ``"offline"`` and holds no engine).
* ``close()`` releases the Unicorn engines at once (their hooks make
  reference cycles that would otherwise wait for the cycle collector).
* With ``trace=True`` the machine records a timeline in :attr:`trace`:
  tuples ``(what, step, cpu, *detail)`` -- see :data:`TRACE_EVENTS` and
  :mod:`textpoke.sim._report`.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass
from typing import Any, Callable

from unicorn import (UC_ARCH_X86, UC_HOOK_INTR, UC_HOOK_MEM_INVALID, UC_MEM_FETCH_PROT,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT, UC_MEM_READ_UNMAPPED,
                     UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_PROT_EXEC,
                     UC_PROT_READ, UC_PROT_WRITE, Uc, UcError)
from unicorn import x86_const as X

from .._core._emulate import PtRegs
from .._errors import BadAddressError, MachineClosedError, MachineError
from .._core._insn import insn_decode_kernel
from .._core._signals import uninterruptible
from .._core._machine import PAGE_SIZE, Capability, Machine, Task, TextRange, WaitUntil, drive

__all__ = ["SimMachine", "SchedPolicy", "Oops", "VCpu", "FINE", "COARSE", "FREE",
           "TRACE_EVENTS"]

def _round_up(n: int, a: int = PAGE_SIZE) -> int:
    return (n + a - 1) // a * a


#: How ``text_poke_write`` lets others observe a write: ``"byte"`` stores
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

#: Bytes of this CPU's view kept around RIP in an oops, as the kernel's
#: ``show_opcodes`` prints them: 42 before RIP, the byte at RIP, 21 after.
CODE_PROLOGUE, CODE_EPILOGUE = 42, 21


@dataclass(frozen=True, slots=True)
class Oops:
    """An unhandled trap or fault: the CPU stopped, as a kernel oops.

    ``addr`` is the faulting data address of a page fault (None otherwise)
    and ``access`` what was tried there (``"write"``, ``"read"``,
    ``"fetch"``, with ``"-unmapped"`` or ``"-prot"``).  ``code`` holds the
    bytes this CPU's view had around RIP -- what it executed -- starting at
    ``code_start``."""

    cpu: int
    kind: str
    rip: int
    bytes_at_rip: bytes
    regs: dict[str, int]
    step: int
    detail: str = ""
    addr: int | None = None
    access: str = ""
    code: bytes = b""
    code_start: int = 0

    def as_dict(self) -> dict:
        return {"cpu": self.cpu, "kind": self.kind, "rip": self.rip,
                "bytes": self.bytes_at_rip.hex(), "regs": self.regs, "step": self.step,
                "detail": self.detail, "addr": self.addr, "access": self.access,
                "code": self.code.hex(), "code_start": self.code_start}

    def __str__(self) -> str:
        at = f" (address {self.addr:#x})" if self.addr is not None else ""
        return (f"oops on cpu{self.cpu}: {self.kind} at {self.rip:#x}{at} "
                f"[{self.bytes_at_rip.hex(' ')}] {self.detail}".rstrip())


RUN, TRAP, IDLE, DEAD, OFFLINE = "run", "trap", "idle", "dead", "offline"

#: What :attr:`SimMachine.trace` records, as ``(what, step, cpu, *detail)``;
#: ``cpu`` is None for the patcher's writes (the patcher is no vCPU).
TRACE_EVENTS = {
    "write": "(addr, data): bytes stored through the alias mapping",
    "ipi-send": "(due,): a sync IPI sent to cpu, delivered at step >= due",
    "ipi": "(acked,): cpu took its delivered IPIs (sync_core)",
    "refill": "(line_addr, size, why): a stale line of cpu's view refilled; "
              "why is 'evict' (the scheduler) or 'sync' (serialisation)",
    "int3": "(addr,): cpu trapped on the INT3 at addr",
    "iret": "(handler, new_rip): the named handler handled it; cpu resumes at new_rip",
    "unhandled": "(addr,): no handler claimed the INT3 at addr",
    "oops": "(kind, rip): cpu stopped",
    "cpu-up": "(): cpu was hot-plugged in",
    "cpu-down": "(): cpu was unplugged",
}

_REG_NAMES = {
    "rax": X.UC_X86_REG_RAX, "rbx": X.UC_X86_REG_RBX, "rcx": X.UC_X86_REG_RCX,
    "rdx": X.UC_X86_REG_RDX, "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI,
    "rbp": X.UC_X86_REG_RBP, "rsp": X.UC_X86_REG_RSP, "r8": X.UC_X86_REG_R8,
    "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
    "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14,
    "r15": X.UC_X86_REG_R15, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_EFLAGS,
}

_ACCESS = {
    UC_MEM_READ_UNMAPPED: "read-unmapped", UC_MEM_WRITE_UNMAPPED: "write-unmapped",
    UC_MEM_FETCH_UNMAPPED: "fetch-unmapped", UC_MEM_READ_PROT: "read-prot",
    UC_MEM_WRITE_PROT: "write-prot", UC_MEM_FETCH_PROT: "fetch-prot",
}


class _SharedMemory:
    """The machine's coherent data view (``PtRegs.mem``)."""

    def __init__(self, sim: "SimMachine") -> None:
        self._sim: "SimMachine | None" = sim

    def _machine(self) -> "SimMachine":
        if self._sim is None:
            raise MachineClosedError("the sim machine is closed")
        return self._sim

    def read(self, addr: int, size: int) -> bytes:
        return self._machine().mem_read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._machine().mem_write(addr, data)


class _Region:
    __slots__ = ("start", "size", "buf", "mv", "name", "writable", "exec", "core")

    def __init__(self, start: int, size: int, name: str, writable: bool, exec_: bool, core: bool) -> None:
        self.start, self.size, self.name = start, size, name
        self.writable, self.exec, self.core = writable, exec_, core
        self.buf = (ctypes.c_ubyte * size)()
        self.mv = memoryview(self.buf).cast("B")   # cheap slices and stores

    def release(self) -> None:
        self.mv.release()
        self.buf = self.mv = None


class VCpu:
    """One virtual CPU: a Unicorn instance with its own view of text."""

    def __init__(self, sim: "SimMachine", cpu_id: int) -> None:
        self.id = cpu_id
        self.uc: Uc | None = Uc(UC_ARCH_X86, UC_MODE_64)
        self.state = IDLE
        self.views: list[Any] = []
        self.stale: set[tuple[int, int]] = set()
        self.ipis: list[tuple[int, Callable[[], None]]] = []
        self.trap_task: Task | None = None
        self.trap_regs: PtRegs | None = None
        self.pending_intr: int | None = None
        self.fault: tuple[int, int] | None = None   # (access, address) of the last bad access
        self.instructions = 0
        self.slices = 0
        self.traps = 0
        self.ipis_taken = 0
        self.refreshes = 0
        for r in sim._text:
            view = (ctypes.c_ubyte * r.size)()
            ctypes.memmove(view, r.buf, r.size)     # a new CPU comes up fully refilled
            self.views.append(view)
            self.uc.mem_map_ptr(r.start, r.size, UC_PROT_READ | UC_PROT_EXEC, view)
        for r in sim._data:
            self.map_data(r)
        # The binding's hook wrappers reference the Uc (and these bound
        # methods the VCpu): a cycle that release() breaks with hook_del.
        self._hooks = [self.uc.hook_add(UC_HOOK_INTR, self._on_intr),
                       self.uc.hook_add(UC_HOOK_MEM_INVALID, self._on_bad_access)]

    def map_data(self, r: _Region) -> None:
        prot = UC_PROT_READ | (UC_PROT_WRITE if r.writable else 0)
        self.uc.mem_map_ptr(r.start, r.size, prot, r.buf)

    def _on_intr(self, uc: Uc, intno: int, _user: object) -> None:
        self.pending_intr = intno
        uc.emu_stop()

    def _on_bad_access(self, uc: Uc, access: int, address: int, size: int, value: int,
                       _user: object) -> bool:
        self.fault = (access, address)
        return False       # not fixed up: Unicorn reports the fault

    def release(self) -> None:
        """Stop for good: drop the engine (at once, not at the next cycle
        collection), the view and anything in flight."""
        uc, self.uc = self.uc, None
        if uc is not None:
            _free_engine(uc, self._hooks)
            self._hooks = []
        del uc
        self.views = []
        self.stale = set()
        self.ipis = []
        task, self.trap_task, self.trap_regs = self.trap_task, None, None
        if task is not None:
            _close_quietly(task)
        self.state = OFFLINE

    def _engine(self) -> Uc:
        if self.uc is None:
            raise MachineError(f"cpu{self.id} is offline")
        return self.uc

    def reg(self, name: str) -> int:
        return self._engine().reg_read(_REG_NAMES[name])

    def set_reg(self, name: str, value: int) -> None:
        self._engine().reg_write(_REG_NAMES[name], value)

    def regs_dict(self) -> dict[str, int]:
        uc = self._engine()
        return {n: uc.reg_read(r) for n, r in _REG_NAMES.items()}


#: The general registers a trap handler sees in ``PtRegs.gprs`` (everything
#: but rip, rsp and rflags, which are ``ip``, ``sp`` and ``flags``); what the
#: handler leaves there is written back on IRET.
_GPRS = tuple((n, r) for n, r in _REG_NAMES.items() if n not in ("rip", "rsp", "rflags"))


def _read_gprs(uc: Uc) -> dict[str, int]:
    return {n: uc.reg_read(r) for n, r in _GPRS}


def _write_gprs(uc: Uc, gprs: dict[str, int]) -> None:
    for n, r in _GPRS:
        v = gprs.get(n)
        if v is not None:
            uc.reg_write(r, v & 0xFFFF_FFFF_FFFF_FFFF)


def _free_engine(uc: Uc, hooks: list[int]) -> None:
    """Free a Unicorn instance now rather than at the next cycle collection.

    Two cycles keep it alive: each hook's wrapper closes over the Uc, and
    the ctypes function pointer the binding keeps for it (made with
    ``ctypes.cast``) holds itself in its ``_objects``.  ``hook_del`` drops
    the binding's reference; clearing ``_objects`` breaks the second
    cycle; and the engine (the bulk of the memory: QEMU's translation
    buffers) is closed at once through the finalizer the binding registers
    for it, whatever still refers to the Python object."""
    callbacks = getattr(uc, "_callbacks", {})
    for h in hooks:
        fptr = callbacks.get(h)
        uc.hook_del(h)
        objs = getattr(fptr, "_objects", None)
        if isinstance(objs, dict):
            objs.clear()
    finalizer = getattr(uc, "_Uc__finalizer", None)   # unicorn >= 2.1's weakref.finalize
    if finalizer is not None:
        finalizer()


def _close_quietly(gen: Task) -> None:
    """Close a generator the machine holds as it goes away; its clean-up may
    well fail on a machine that is closing, and nobody is left to tell."""
    try:
        gen.close()
    except Exception:
        pass


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
    capabilities = frozenset({Capability.CALL, Capability.SCRATCH, Capability.EXECMEM,
                              Capability.HOTPLUG})

    def __init__(self, regions: list[tuple[int, bytes | int, str, str]], *, ncpus: int = 4,
                 seed: int = 0, line_size: int = 64, policy: SchedPolicy = COARSE,
                 stack_base: int = 0x0700_0000, stack_size: int = 0x4000,
                 trace: bool = False) -> None:
        super().__init__()
        if ncpus < 1:
            raise ValueError("need at least one CPU")
        if line_size < 1 or (line_size & (line_size - 1)):
            raise ValueError("line_size must be a power of two")
        if stack_size < PAGE_SIZE or stack_size % PAGE_SIZE:
            raise ValueError("stack_size must be a multiple of the page size")
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
        #: every vCPU ever created, indexed by id (unplugged ones are offline)
        self.vcpus: list[VCpu] = []
        self._online: list[VCpu] = []     # present CPUs, in id order
        self.trace: list[tuple] | None = [] if trace else None
        for _ in range(ncpus):
            self._plug(VCpu(self, len(self.vcpus)))
        self._tasks: list[_SimTask] = []
        self.steps = 0
        self.oopses: list[Oops] = []
        self.smp_started = False
        self.preempt_addr: int | None = None
        self.ipi_broadcasts = 0

    def _plug(self, c: VCpu) -> None:
        self.vcpus.append(c)
        self._online.append(c)

    # ---------------------------------------------------------------- Machine
    @property
    def cpus(self) -> list[int]:
        return [c.id for c in self._online]

    @property
    def ncpus(self) -> int:
        """How many CPUs are present now."""
        return len(self._online)

    @property
    def text_ranges(self) -> list[TextRange]:
        return self._ranges

    @property
    def mem(self) -> _SharedMemory:
        return self._mem

    def now(self) -> float:
        return float(self.steps)

    def _text_loc(self, addr: int, size: int) -> tuple[int, _Region]:
        if self._closed:
            self._check_open()
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
        return r.mv[off:off + size].tobytes()

    def text_poke_write(self, addr: int, data: bytes) -> Task:
        # The alias mapping (text_poke_mm) reaches the same physical bytes
        # the CPUs fetch from.  Range errors and a closed machine are
        # reported here, before the caller holds a task.
        self._check_open()
        data = bytes(data)
        idx, r = self._text_loc(addr, len(data))
        if self.policy.write_granularity == "byte":
            return self._write_bytes(idx, r, addr, data)
        return self._write_poke(idx, r, addr, data)

    def _write_bytes(self, idx: int, r: _Region, addr: int, data: bytes) -> Task:
        # memcpy stores one byte after another, and any of them may be seen
        # before the next.
        off = addr - r.start
        ls = self.line_size
        mv = r.mv
        for i, b in enumerate(data):
            self._check_open()
            mv[off + i] = b
            line = (idx, (off + i) // ls)
            for c in self._online:
                c.stale.add(line)
            if self.trace is not None:
                self.trace.append(("write", self.steps, None, addr + i, bytes((b,))))
            yield

    def text_poke_write_many(self, writes) -> Task:
        # Byte granularity: exactly the interleavings of one write after
        # another.  Poke granularity: pokes_per_step pokes per step.
        self._check_open()
        if self.policy.write_granularity == "byte":
            for addr, data in writes:
                yield from self.text_poke_write(addr, data)
            return
        per_step = self.policy.pokes_per_step
        online = self._online
        ls = self.line_size
        trace = self.trace
        n_in_step = 0
        for addr, data in writes:
            idx, r = self._text_loc(addr, len(data))
            off = addr - r.start
            n = len(data)
            r.mv[off:off + n] = data
            first, last = off // ls, (off + n - 1) // ls
            if first == last:
                line = (idx, first)
                for c in online:
                    c.stale.add(line)
            else:
                lines = [(idx, ln) for ln in range(first, last + 1)]
                for c in online:
                    c.stale.update(lines)
            if trace is not None:
                trace.append(("write", self.steps, None, addr, bytes(data)))
            n_in_step += 1
            if n_in_step >= per_step:
                n_in_step = 0
                yield
                self._check_open()
        if n_in_step:
            yield

    def _write_poke(self, idx: int, r: _Region, addr: int, data: bytes) -> Task:
        # One store of the whole poke; every line it touched goes stale in
        # every view (exactly those lines), then others may look.
        off = addr - r.start
        n = len(data)
        if n:
            r.mv[off:off + n] = data
            ls = self.line_size
            lines = [(idx, ln) for ln in range(off // ls, (off + n - 1) // ls + 1)]
            for c in self._online:
                c.stale.update(lines)
            if self.trace is not None:
                self.trace.append(("write", self.steps, None, addr, data))
        yield

    def text_write_early(self, addr: int, data: bytes) -> None:
        if self.smp_started:
            raise MachineError("text_poke_early() after secondary CPUs started running; "
                               "use the SMP batch")
        data = bytes(data)
        idx, r = self._text_loc(addr, len(data))
        off = addr - r.start
        r.mv[off:off + len(data)] = data
        for c in self._online:   # nothing runs yet: views follow at once
            ctypes.memmove(ctypes.addressof(c.views[idx]) + off, data, len(data))
            c.uc.ctl_remove_cache(addr, addr + len(data))

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

    # ------------------------------------------------------------ lifetime
    def _release(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            _close_quietly(t.gen)
        for c in self.vcpus:
            c.release()
        self._online = []
        for r in self._text + self._data:
            r.release()
        self._text, self._data = [], []
        self._mem._sim = None      # no sim <-> memory cycle left behind
        self._last_text = (0, _Region(0, 0, "closed", False, False, False))
        # trace and oopses stay readable: reports are written after the run.

    # ------------------------------------------------------------ memory
    def _data_loc(self, addr: int, size: int) -> _Region:
        if self._closed:
            self._check_open()
        for r in self._data:
            if r.start <= addr and addr + size <= r.start + r.size:
                return r
        raise BadAddressError(f"[{addr:#x}, +{size}) is not mapped data")

    def mem_read(self, addr: int, size: int) -> bytes:
        r = self._data_loc(addr, size)
        off = addr - r.start
        return r.mv[off:off + size].tobytes()

    def mem_write(self, addr: int, data: bytes) -> None:
        r = self._data_loc(addr, len(data))
        off = addr - r.start
        r.mv[off:off + len(data)] = bytes(data)

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.mem_read(addr, 8), "little")

    def add_data_region(self, start: int, size: int, name: str, *, writable: bool = True) -> None:
        """Map *size* bytes of zeroed, coherent data at *start* into every
        vCPU, present and future (per-CPU data of a hot-plugged CPU)."""
        self._check_open()
        size = _round_up(size)
        for r in self._text + self._data:
            if start < r.start + r.size and r.start < start + size:
                raise MachineError(f"data region {name} [{start:#x}, {start + size:#x}) overlaps "
                                   f"{r.name} [{r.start:#x}, {r.start + r.size:#x})")
        r = _Region(start, size, name, writable, False, False)
        self._data.append(r)
        for c in self._online:
            c.map_data(r)

    def view_read(self, cpu: int, addr: int, size: int) -> bytes:
        """What *cpu* would fetch at addr now (its possibly stale view)."""
        idx, r = self._text_loc(addr, size)
        off = addr - r.start
        view = self._vcpu(cpu).views[idx]
        return ctypes.string_at(ctypes.addressof(view) + off, size)

    # ------------------------------------------------------------ CPUs
    def _vcpu(self, cpu: int) -> VCpu:
        """The present vCPU *cpu*, or MachineError."""
        self._check_open()
        if not 0 <= cpu < len(self.vcpus):
            raise MachineError(f"no cpu{cpu} on this machine (present: {self.cpus})")
        c = self.vcpus[cpu]
        if c.state == OFFLINE:
            raise MachineError(f"cpu{cpu} is offline (present: {self.cpus})")
        return c

    def _stack_top(self, cpu: int) -> int:
        return self.stack_base + (cpu + 1) * self.stack_size

    def start_cpu(self, cpu: int, rip: int, regs: dict[str, int] | None = None) -> None:
        """Point a CPU at guest code; it runs when the scheduler gives it turns."""
        c = self._vcpu(cpu)
        c.set_reg("rsp", self._stack_top(cpu) - 64)
        for k, v in (regs or {}).items():
            c.set_reg(k, v)
        c.set_reg("rip", rip)
        c.state = RUN
        self.smp_started = True

    def stop_cpu(self, cpu: int) -> None:
        c = self._vcpu(cpu)
        if c.state == RUN:
            c.state = IDLE

    def add_cpu(self) -> int:
        """Hot-plug a CPU (``Capability.HOTPLUG``) and return its id, never
        one used before.  It comes up idle, with every line of its view
        filled from memory (so it is serialised: a sync in flight need not
        wait for it), and listeners hear of it before it can run anything;
        ``start_cpu`` sets it going."""
        self._check_open()
        cpu = len(self.vcpus)
        lo, hi = self._stack_top(cpu) - self.stack_size, self._stack_top(cpu)
        if not any(r.start <= lo and hi <= r.start + r.size for r in self._data):
            self.add_data_region(lo, self.stack_size, f"stack{cpu}")
        self._plug(VCpu(self, cpu))
        if self.trace is not None:
            self.trace.append(("cpu-up", self.steps, cpu))
        self._cpus_changed("add", cpu)
        return cpu

    def remove_cpu(self, cpu: int, *, max_handler_steps: int = 1_000_000) -> None:
        """Unplug *cpu* (``Capability.HOTPLUG``).

        A CPU inside a trap handler is not cut off mid-handler: the handler
        runs to its end first, right here (it may not sleep, so it finishes;
        an unhandled trap is an oops as usual), and its IRET is taken.  Then
        the CPU stops at that instruction boundary, acknowledges every IPI
        sent to it (a vanished CPU never blocks a sync), gives up its engine,
        and the listeners hear of it.  The last present CPU cannot go."""
        c = self._vcpu(cpu)
        if len(self._online) == 1:
            raise MachineError(f"cpu{cpu} is the last CPU present; it cannot be unplugged")
        spins = 0
        while c.state == TRAP:
            self._trap_step(c)
            spins += 1
            if spins > max_handler_steps:
                raise MachineError(f"cpu{cpu}'s trap handler did not finish in "
                                   f"{max_handler_steps} steps; not unplugged")
        for _due, ack in c.ipis:
            ack()
        c.ipis.clear()
        self._online.remove(c)
        c.release()
        if self.trace is not None:
            self.trace.append(("cpu-down", self.steps, cpu))
        self._cpus_changed("remove", cpu)

    def abandon_tasks(self) -> None:
        """Stop scheduling every spawned task (they are not closed: their
        owners decide); see ``Machine.abandon_tasks``."""
        self._tasks.clear()

    def spawn(self, task: Task, name: str = "task") -> _SimTask:
        self._check_open()
        t = _SimTask(task, name)
        self._tasks.append(t)
        return t

    def _oops(self, c: VCpu, kind: str, detail: str = "", rip: int | None = None) -> None:
        if rip is None:
            rip = c.reg("rip")
        addr = access = None
        if c.fault is not None:
            acc, addr = c.fault
            access = _ACCESS.get(acc, str(acc))
            c.fault = None
        raw, code, code_start = b"", b"", rip
        for i, r in enumerate(self._text):
            if r.start <= rip < r.start + r.size:
                view = c.views[i]
                raw = bytes(view[rip - r.start: min(r.size, rip - r.start + 8)])
                code_start = max(r.start, rip - CODE_PROLOGUE)
                code_end = min(r.start + r.size, rip + CODE_EPILOGUE + 1)
                code = bytes(view[code_start - r.start: code_end - r.start])
                break
        o = Oops(c.id, kind, rip, raw, c.regs_dict(), self.steps, detail,
                 addr, access or "", code, code_start)
        self.oopses.append(o)
        c.state = DEAD
        for _due, ack in c.ipis:   # a stopped CPU fetches nothing more: count it as synced
            ack()
        c.ipis.clear()
        c.trap_task = None
        if self.trace is not None:
            self.trace.append(("oops", self.steps, c.id, kind, rip))

    def _serialise(self, c: VCpu) -> None:
        """sync_core / IRET: every stale line of this CPU's view is refilled
        (adjacent stale lines as one run: one copy, one cache flush)."""
        if c.stale:
            lines = sorted(c.stale)
            c.stale.clear()
            idx, first = lines[0]
            n = 1
            for li, ln in lines[1:]:
                if li == idx and ln == first + n:
                    n += 1
                    continue
                self._refill_run(c, idx, first, n, "sync")
                idx, first, n = li, ln, 1
            self._refill_run(c, idx, first, n, "sync")

    def _refill(self, c: VCpu, line: tuple[int, int], why: str) -> None:
        self._refill_run(c, line[0], line[1], 1, why)

    def _refill_run(self, c: VCpu, idx: int, first: int, nlines: int, why: str) -> None:
        r = self._text[idx]
        off = first * self.line_size
        n = min(nlines * self.line_size, r.size - off)
        ctypes.memmove(ctypes.addressof(c.views[idx]) + off, ctypes.addressof(r.buf) + off, n)
        c.uc.ctl_remove_cache(r.start + off, r.start + off + n)
        c.refreshes += nlines
        if self.trace is not None:
            self.trace.append(("refill", self.steps, c.id, r.start + off, n, why))

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
        uc = c.uc
        rip = uc.reg_read(X.UC_X86_REG_RIP)
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
            with uninterruptible(uc.emu_stop):
                uc.emu_start(rip, until, count=count)
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
                      mem=self._mem, cpu=c.id, gprs=_read_gprs(c.uc))
        c.trap_regs = regs
        c.trap_task = self._run_trap_chain(regs)
        c.state = TRAP
        if self.trace is not None:
            self.trace.append(("int3", self.steps, c.id, regs.ip - 1))

    def _run_trap_chain(self, regs: PtRegs) -> Task:
        for handler in self.trap_handlers:
            handled = yield from handler(regs)
            if handled:
                return handler
        return None

    def _handler_name(self, handler: Any) -> str:
        for h in self._trap_handles:
            if h.handler is handler:
                return h.name
        return getattr(handler, "__qualname__", repr(handler))

    def _trap_step(self, c: VCpu) -> None:
        try:
            item = next(c.trap_task)
            if isinstance(item, WaitUntil):
                raise MachineError("a trap handler may not sleep")
            return
        except StopIteration as stop:
            handler = stop.value
        c.trap_task = None
        r = c.trap_regs
        if handler is None:
            if self.trace is not None:
                self.trace.append(("unhandled", self.steps, c.id, r.ip - 1))
            c.state = RUN
            c.set_reg("rip", r.ip - 1)
            self._oops(c, "int3", "unhandled INT3", rip=r.ip - 1)
            return
        c.set_reg("rip", r.ip)
        c.set_reg("rsp", r.sp)
        c.set_reg("rflags", r.flags)
        _write_gprs(c.uc, r.gprs)
        c.state = RUN
        if self.trace is not None:
            self.trace.append(("iret", self.steps, c.id, self._handler_name(handler), r.ip))
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
                if t in self._tasks:
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
        k = rng.randrange(n)
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

    def call(self, addr: int, *args: int, cpu: int = 0, max_insns: int = 1_000_000) -> int:
        """Run the guest function at *addr* to completion on *cpu* and return
        %rax -- for boot-time use, outside the scheduler (nothing else runs).
        Arguments go in rdi, rsi, rdx, rcx, r8, r9.  INT3 traps go through
        the trap chain as usual; an unhandled trap raises MachineError."""
        c = self._vcpu(cpu)
        if c.state == DEAD:
            raise MachineError(f"cpu{cpu} is dead")
        saved = c.regs_dict()
        sentinel = self._ranges[0].end - 1   # INT3 padding: stopping there is enough
        sp = self._stack_top(cpu) - 256
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
                    with uninterruptible(c.uc.emu_stop):
                        c.uc.emu_start(rip, sentinel, count=budget)
                except UcError as e:
                    where = ""
                    if c.fault is not None:
                        where = f" ({_ACCESS.get(c.fault[0], '?')} at {c.fault[1]:#x})"
                        c.fault = None
                    raise MachineError(f"{_fault_kind(e)}{where} at {c.reg('rip'):#x} while calling "
                                       f"{addr:#x}: {e}") from None
                rip = c.reg("rip")
                if rip == sentinel:
                    return c.reg("rax")
                if c.pending_intr is None:
                    raise MachineError(f"call to {addr:#x} did not return within {max_insns} instructions")
                if c.pending_intr != 3:
                    raise MachineError(f"trap {c.pending_intr} at {rip:#x} while calling {addr:#x}")
                regs = PtRegs(ip=rip, sp=c.reg("rsp"), flags=c.reg("rflags"), mem=self._mem, cpu=cpu,
                              gprs=_read_gprs(c.uc))
                handled = drive(self._run_trap_chain(regs))
                if handled is None:
                    raise MachineError(f"unhandled INT3 at {rip - 1:#x} while calling {addr:#x}")
                c.set_reg("rsp", regs.sp)
                c.set_reg("rflags", regs.flags)
                _write_gprs(c.uc, regs.gprs)
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


def _no_stop() -> None:
    """Nothing to cut short outside emu_start: the decision just ends."""


_DECISION = uninterruptible(_no_stop)


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
