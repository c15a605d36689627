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

The machine is split by concern: :mod:`._vcpu` (one vCPU's engine and
registers), :mod:`._fetchview` (the per-CPU views of text and the writes
that make them stale), :mod:`._sched` (policies and the seeded scheduler),
:mod:`._traps` (oopses, the trap chain, ``call()``); this module holds
:class:`SimMachine` itself: construction, memory, CPUs and lifetime.
"""

from __future__ import annotations

import ctypes

from unicorn.x86_const import UC_X86_REG_GS_BASE

from .._core._insn import insn_decode_kernel
from .._core._machine import PAGE_SIZE, Capability, Machine, Task, TextRange, WaitUntil
from .._errors import BadAddressError, MachineClosedError, MachineError
from ._fetchview import _FetchViews
from ._snapshot import SimSnapshot, _Snapshots
from ._policy import COARSE, FINE, FREE, WRITE_GRANULARITIES, SchedPolicy
from ._rng import CountingRandom
from ._sched import _Scheduler, _SimTask
from ._traps import CODE_EPILOGUE, CODE_PROLOGUE, Oops, _Traps
from ._vcpu import DEAD, IDLE, OFFLINE, RUN, TRAP, VCpu, _close_quietly, _Region

# The names this module always had stay importable from here.
__all__ = ["SimMachine", "SchedPolicy", "Oops", "VCpu", "FINE", "COARSE", "FREE",
           "TRACE_EVENTS", "WRITE_GRANULARITIES", "CODE_PROLOGUE", "CODE_EPILOGUE",
           "RUN", "TRAP", "IDLE", "DEAD", "OFFLINE", "SimSnapshot"]


#: where map_data() places a region when no address is asked for
_DATA_AUTO_BASE = 0x1000_0000


def _round_up(n: int, a: int = PAGE_SIZE) -> int:
    return (n + a - 1) // a * a


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


class SimMachine(_FetchViews, _Scheduler, _Traps, _Snapshots, Machine):
    """An emulated SMP x86-64 machine.

    Memory is described as (start, bytes, kind) regions: kind "text" (core
    kernel text, read+exec), "module" (executable, not core: execmem for
    JIT/detours), "rodata" or "data".  Per-CPU stacks are added here.
    """

    name = "sim"
    capabilities = frozenset({Capability.CALL, Capability.SCRATCH, Capability.EXECMEM,
                              Capability.HOTPLUG, Capability.DATA, Capability.PERCPU,
                              Capability.QUIESCE})

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
        self.rng = CountingRandom(seed)
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
        #: where a poke stored an INT3 as its first byte (fast-forward waits
        #: while one is still there)
        self._int3_pokes: set[int] = set()

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

    # ------------------------------------------------------------ capabilities
    def map_data(self, size: int, name: str, addr: int | None = None) -> int:
        """``Capability.DATA``: :meth:`add_data_region`, at *addr* or at the
        first free page from 256 MiB up; the same *name* at the same place
        again returns the region that is there."""
        self._check_open()
        if size < 1:
            raise ValueError(f"data region {name}: size {size} < 1")
        size = _round_up(size)
        if addr is None:
            addr = _DATA_AUTO_BASE
            for r in sorted(self._text + self._data, key=lambda r: r.start):
                if addr < r.start + r.size and r.start < addr + size:
                    addr = _round_up(r.start + r.size)
        else:
            for r in self._data:
                if r.name == name and r.start == addr and size <= r.size:
                    return addr
        self.add_data_region(addr, size, name)
        return addr

    def set_percpu_base(self, cpu: int, addr: int) -> None:
        """``Capability.PERCPU``: *cpu*'s GS base (``this_cpu_ptr`` reads %gs:0)."""
        self._vcpu(cpu)._engine().reg_write(UC_X86_REG_GS_BASE, addr)

    def quiesce(self, ranges, why: str = "") -> Task:
        """``Capability.QUIESCE``: wait until every present CPU has been seen
        (idle, dead, or running with RIP outside every range) while not in
        a trap handler."""
        ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        seen: set[int] = set()

        def pred() -> bool:
            for c in self._online:
                if c.id in seen or c.state == TRAP:
                    continue
                if c.state != RUN:
                    seen.add(c.id)
                    continue
                rip = c.reg("rip")
                if not any(lo <= rip < hi for lo, hi in ranges):
                    seen.add(c.id)
            return all(c.id in seen for c in self._online)

        yield WaitUntil(pred, f"every CPU out of the text ({why})" if why
                        else "every CPU out of the text")

    def scratch(self, size: int = 8) -> int:
        """Bytes at the bottom of cpu0's stack, far below anything a short
        call() uses: the boot self-tests scribble there."""
        if not 1 <= size <= self.stack_size // 2:
            raise ValueError(f"scratch size {size} not in 1..{self.stack_size // 2}")
        return self.stack_base + 64

    def disasm_at(self, addr: int) -> str:
        return insn_decode_kernel(self.text_read(addr, 15), addr).text
