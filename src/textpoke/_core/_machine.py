# SPDX-License-Identifier: GPL-2.0-only
"""The machine protocol: what the core needs from a machine, and no more.

The core states *what* to write and *when* to synchronise; a machine knows
*where* bytes go and how its CPUs are serialised.  Operations that another
CPU could observe half-way are generators ("tasks"): they yield at every
such step so that a scheduling machine (sim) can interleave them with guest
code, while a synchronous machine simply runs them to the end.

A task yields either ``None`` (a step happened; others may run now) or a
:class:`WaitUntil` (do not resume me before the predicate holds).


A machine has a lifetime (``with SimMachine(...) as m:``; :meth:`Machine.close`
releases what it holds and is idempotent), an INT3 trap chain ordered by
explicit priorities, a set of CPUs that may change while it runs (threads
of a live process come and go; CPUs are hot-plugged on sim), and optional
*capabilities* declared once in :attr:`Machine.capabilities`.
"""

from __future__ import annotations

import abc
import enum
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from ._emulate import DataMemory, PtRegs
from .._errors import BadAddressError, MachineClosedError, MachineError, NotSupportedError

__all__ = ["WaitUntil", "Task", "TrapHandler", "TrapPriority", "TrapHandle", "TextRange",
           "Capability", "Machine", "StillCpus", "PAGE_SIZE", "drive"]

PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class WaitUntil:
    predicate: Callable[[], bool]
    reason: str


Task = Generator["WaitUntil | None", None, Any]
#: A trap handler gets the registers of the trapping CPU and returns (as
#: the generator's value) True when it handled the trap.
TrapHandler = Callable[[PtRegs], Task]


@dataclass(frozen=True, slots=True)
class TextRange:
    """A range of executable memory: kernel core text, or module/execmem text."""

    start: int
    end: int
    name: str
    core: bool = True

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end


class TrapPriority(enum.IntEnum):
    """Order of the INT3 chain, as in the kernel's ``do_int3``: the
    text-poke handler first, then kprobes, then the die notifiers."""

    TEXT_POKE = 0
    KPROBES = 100
    NOTIFIER = 200


@dataclass(eq=False, slots=True)
class TrapHandle:
    """A registration on a machine's trap chain; ``unregister()`` (or
    leaving its ``with`` block) takes the handler off again.  Idempotent."""

    machine: "Machine"
    handler: TrapHandler
    priority: int
    name: str
    seq: int
    active: bool = True

    def unregister(self) -> None:
        if self.active:
            self.active = False
            self.machine._remove_trap_handle(self)

    def __enter__(self) -> "TrapHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


class Capability(enum.Enum):
    """What a backend may offer beyond the protocol, declared once in
    :attr:`Machine.capabilities` instead of being probed for."""

    #: ``machine.call(addr, *args, cpu=0) -> int``: run a guest function to
    #: completion (boot-time self-tests).
    CALL = "call"
    #: ``machine.scratch(size) -> int``: the address of *size* bytes of data
    #: the caller may scribble on (self-tests).
    SCRATCH = "scratch"
    #: non-core executable ranges in :attr:`Machine.text_ranges` that the
    #: caller may fill with code (execmem: trampolines, JIT, detours);
    #: ``machine.execmem_range(size, name) -> TextRange`` gives one (a
    #: backend with none until asked, live, maps it then).
    EXECMEM = "execmem"
    #: ``machine.add_cpu()`` / ``machine.remove_cpu(cpu)`` (hotplug).
    HOTPLUG = "hotplug"
    #: ``machine.map_data(size, name, addr=None) -> int``: map zeroed data
    #: memory the guest can read and write (ring buffers, module data),
    #: reached from the host through :attr:`Machine.mem`.
    DATA = "data"
    #: ``machine.set_percpu_base(cpu, addr)``: what *cpu*'s per-CPU
    #: accesses (``%gs``-relative, ``this_cpu_ptr``) are based on.
    PERCPU = "percpu"
    #: ``machine.quiesce(ranges, why) -> Task``: wait until every CPU has
    #: been seen outside every ``(start, end)`` range and not inside a trap
    #: handler (``synchronize_rcu_tasks``).  Without it a client can only
    #: sync every CPU, which does not show where a CPU is.
    QUIESCE = "quiesce"
    #: the CPUs run the kernel's supervisor-only instructions as the kernel
    #: has them (CLAC/STAC under SMAP), or -- a machine whose CPUs never run,
    #: offline -- the text must hold what the kernel writes.  Without it
    #: (live: threads in user mode; the sim: Unicorn has no SMAP) a client
    #: writes the forms its CPUs can run (NOP3 for CLAC).
    SUPERVISOR = "supervisor"


#: A CPU-set listener gets ``("add" | "remove", cpu)``.
CpuListener = Callable[[str, int], None]


class Machine(abc.ABC):
    """Base class of the machines textpoke can patch.

    Backends implement the abstract members; the trap chain, the CPU-set
    listeners, the lifetime and the capability checks live here."""

    name: str = "machine"
    #: The optional capabilities this backend offers (see :class:`Capability`).
    capabilities: frozenset[Capability] = frozenset()
    #: Whether text may lie anywhere in the address space.  The kernel keeps a
    #: batch entry's address as an s32 offset from ``_stext`` (all kernel text
    #: is within 2 GiB of it); a process's shared libraries are not, so a
    #: backend like live sets this and the core keeps the offset unbounded.
    wide_text: bool = False
    #: Entries a batch may hold before it is flushed; None: the kernel's
    #: TEXT_POKE_ARRAY_MAX (one page of 16-byte entries, 256).  The page is a
    #: kernel constraint; a machine whose syncs are costly and that has no
    #: such constraint (live: each sync interrupts every thread) may declare
    #: more, so that N sites cost 3 syncs instead of 3 per 256.
    text_poke_array_max: int | None = None

    def __init__(self) -> None:
        self._trap_handles: list[TrapHandle] = []
        self._trap_chain: tuple[TrapHandler, ...] = ()
        self._trap_order: tuple[TrapHandle, ...] = ()
        self._trap_seq = itertools.count()
        self._cpu_listeners: list[CpuListener] = []
        self._closed = False
        self.owner: Any = None        # the TextPoke attached to this machine, if any

    # --- what the core asks -------------------------------------------------
    @property
    @abc.abstractmethod
    def cpus(self) -> list[int]:
        """Ids of the CPUs present now, whose references and syncs the core
        manages.  The set may change: see :meth:`subscribe_cpus`."""

    @property
    @abc.abstractmethod
    def text_ranges(self) -> list[TextRange]:
        """Executable ranges, the first being core kernel text (``_stext``)."""

    @property
    @abc.abstractmethod
    def mem(self) -> DataMemory:
        """Coherent data access (for stacks touched by emulation)."""

    @abc.abstractmethod
    def text_read(self, addr: int, size: int) -> bytes:
        """Read text as data: the bytes memory holds now."""

    @abc.abstractmethod
    def text_poke_write(self, addr: int, data: bytes) -> Task:
        """Write *data* through the alias mapping (``text_poke_mm``).  The
        range is already checked to be mapped text spanning at most two
        pages."""

    def text_poke_write_many(self, writes: "Sequence[tuple[int, bytes]]") -> Task:
        """Write several pokes in order, each checked like one of
        :meth:`text_poke_write` (the core uses it for the independent sites
        of one batch phase).  A backend may let other CPUs look between
        groups of pokes rather than after each one, and may batch the
        writes themselves (one pwrite per contiguous run on live)."""
        for addr, data in writes:
            yield from self.text_poke_write(addr, data)

    @abc.abstractmethod
    def text_write_early(self, addr: int, data: bytes) -> None:
        """Direct write used before other CPUs run (``text_poke_early``)."""

    @abc.abstractmethod
    def sync_each_cpu(self) -> Task:
        """Serialise every CPU (IPI + sync_core); returns when all have.  A
        CPU that vanishes meanwhile counts as synced; one that appears is
        serialised by coming up."""

    @abc.abstractmethod
    def run_task(self, task: Task) -> Any:
        """Drive *task* to completion (servicing CPUs meanwhile) and return
        its value.  Whatever escapes (an error of the task, or a
        KeyboardInterrupt while CPUs were serviced), the machine lets go of
        *task* before it propagates: the task is never resumed by the
        machine again, and the caller may close it or drive another."""

    def abandon_tasks(self) -> None:
        """Stop driving every task the machine holds (a scheduler's spawned
        tasks).  ``TextPoke.close()`` calls it before recovering a batch
        whose task was interrupted, so that nothing else writes meanwhile.
        Machines that only run tasks inside :meth:`run_task` hold none."""

    def now(self) -> float:
        """Timestamp for events (machine-defined units)."""
        return time.monotonic()

    # --- optional capabilities ----------------------------------------------
    def has(self, cap: Capability) -> bool:
        return cap in self.capabilities

    def require(self, cap: Capability, what: str = "") -> None:
        """NotSupportedError unless this backend offers *cap*."""
        if cap not in self.capabilities:
            raise NotSupportedError(
                f"the {self.name} machine cannot {_CAP_VERB[cap]}" + (f" ({what})" if what else ""))

    def call(self, addr: int, *args: int, cpu: int = 0) -> int:
        """Run the guest function at *addr*; return %rax (``Capability.CALL``)."""
        self.require(Capability.CALL)
        raise NotImplementedError

    def scratch(self, size: int = 8) -> int:
        """Address of *size* bytes of data to scribble on (``Capability.SCRATCH``)."""
        self.require(Capability.SCRATCH)
        raise NotImplementedError

    def execmem_range(self, size: int = 64 << 10, name: str = "execmem") -> TextRange:
        """A non-core text range of at least *size* bytes that the caller may
        fill with code (``Capability.EXECMEM``).  By default the first
        non-core range of :attr:`text_ranges` (the sim's module text); a
        backend that maps executable memory on demand overrides it."""
        self.require(Capability.EXECMEM, name)
        rng = next((r for r in self.text_ranges if not r.core), None)
        if rng is None:
            raise NotSupportedError(f"the {self.name} machine has no non-core text range")
        return rng

    def map_data(self, size: int, name: str, addr: int | None = None) -> int:
        """Map *size* bytes of zeroed guest data memory called *name*, at
        *addr* if given, and return its address (``Capability.DATA``).
        Mapping the same *name* again at the same place returns it as it
        is (several clients may share one region)."""
        self.require(Capability.DATA, name)
        raise NotImplementedError

    def set_percpu_base(self, cpu: int, addr: int) -> None:
        """Base *cpu*'s per-CPU accesses at *addr* (``Capability.PERCPU``)."""
        self.require(Capability.PERCPU)
        raise NotImplementedError

    def quiesce(self, ranges: "Sequence[tuple[int, int]]", why: str = "") -> Task:
        """A task that returns once every CPU has been seen outside every
        ``[start, end)`` of *ranges* and not in a trap handler
        (``Capability.QUIESCE``)."""
        self.require(Capability.QUIESCE, why)
        raise NotImplementedError

    def add_cpu(self) -> int:
        """Bring up a new CPU and return its id (``Capability.HOTPLUG``).
        Ids are never reused; CPU-set listeners hear ``"add"`` before the
        CPU can run anything."""
        self.require(Capability.HOTPLUG)
        raise NotImplementedError

    def remove_cpu(self, cpu: int) -> None:
        """Take *cpu* away (``Capability.HOTPLUG``): a trap handler it is in
        finishes first; it counts as synced from then on; listeners hear
        ``"remove"`` once it runs nothing more.  The last CPU cannot go."""
        self.require(Capability.HOTPLUG)
        raise NotImplementedError

    # --- lifetime -----------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release what the machine holds.  The attached TextPoke is closed
        first, so that nothing pending outlives the machine.  Idempotent."""
        if self._closed:
            return
        owner = self.owner
        try:
            if owner is not None:
                owner.close()
        finally:
            self._closed = True
            self._trap_handles.clear()
            self._trap_chain = ()
            self._trap_order = ()
            self._cpu_listeners.clear()
            self._release()

    def _release(self) -> None:
        """Backend hook: free engines, files, mappings."""

    def _check_open(self) -> None:
        if self._closed:
            raise MachineClosedError(f"the {self.name} machine is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers shared by every machine -------------------------------------
    @property
    def stext(self) -> int:
        return self.text_ranges[0].start

    def text_range_of(self, addr: int, size: int = 1) -> TextRange:
        """The text range holding all of [addr, addr+size), or BadAddressError."""
        if size < 1:
            raise BadAddressError(f"empty range at {addr:#x}")
        for r in self.text_ranges:
            if addr in r and addr + size <= r.end:
                return r
        raise BadAddressError(
            f"[{addr:#x}, {addr + size:#x}) is not inside mapped text "
            f"({', '.join(f'{r.name} {r.start:#x}-{r.end:#x}' for r in self.text_ranges)})")

    def is_text(self, addr: int, size: int = 1) -> bool:
        try:
            self.text_range_of(addr, size)
        except BadAddressError:
            return False
        return True

    # --- the INT3 trap chain ------------------------------------------------
    def register_trap_handler(self, handler: TrapHandler, *,
                              priority: int = TrapPriority.NOTIFIER,
                              name: str | None = None) -> TrapHandle:
        """Add *handler* to the INT3 chain.  Lower priorities run first;
        equal priorities in registration order.  Returns a handle whose
        ``unregister()`` takes it off again."""
        self._check_open()
        h = TrapHandle(self, handler, int(priority),
                       name or getattr(handler, "__qualname__", repr(handler)), next(self._trap_seq))
        self._trap_handles.append(h)
        self._rebuild_chain()
        return h

    def unregister_trap_handler(self, handler: "TrapHandler | TrapHandle") -> None:
        """Take a handler (or a handle) off the chain; ValueError if absent."""
        for h in self._trap_handles:
            if h is handler or h.handler is handler:
                h.unregister()
                return
        raise ValueError(f"{handler!r} is not on the {self.name} machine's trap chain")

    def _remove_trap_handle(self, h: TrapHandle) -> None:
        if h in self._trap_handles:
            self._trap_handles.remove(h)
            self._rebuild_chain()

    def _rebuild_chain(self) -> None:
        self._trap_order = tuple(sorted(self._trap_handles, key=lambda h: (h.priority, h.seq)))
        self._trap_chain = tuple(h.handler for h in self._trap_order)

    def walk_trap_chain(self, regs: PtRegs | None,
                        regs_for: "Callable[[TrapHandle], PtRegs] | None" = None) -> Task:
        """Offer one INT3 to the chain, in order, until a handler claims it
        (the kernel's ``do_int3``); return that handler's :class:`TrapHandle`
        (None: nobody claimed it).  Every backend walks the chain through
        here.  *regs_for(handle)*, if given, builds the registers each
        handler sees instead of *regs* (live gives the text-poke handler a
        copy whose writes are kept aside when it parks the thread)."""
        for h in self._trap_order:
            if (yield from h.handler(regs if regs_for is None else regs_for(h))):
                return h
        return None

    @property
    def trap_handlers(self) -> tuple[TrapHandler, ...]:
        """The chain, in the order the handlers are tried."""
        return self._trap_chain

    # --- the set of CPUs ----------------------------------------------------
    def subscribe_cpus(self, fn: CpuListener) -> None:
        """Call ``fn("add", cpu)`` / ``fn("remove", cpu)`` as CPUs come and go."""
        self._cpu_listeners.append(fn)

    def unsubscribe_cpus(self, fn: CpuListener) -> None:
        if fn in self._cpu_listeners:
            self._cpu_listeners.remove(fn)

    def _cpus_changed(self, event: str, cpu: int) -> None:
        """Backends call this when a CPU appears (before it runs anything)
        or has vanished (after it stopped running anything)."""
        for fn in tuple(self._cpu_listeners):
            fn(event, cpu)


_CAP_VERB = {
    Capability.CALL: "run guest functions",
    Capability.SCRATCH: "lend scratch data memory",
    Capability.EXECMEM: "provide executable memory",
    Capability.HOTPLUG: "add or remove CPUs",
    Capability.DATA: "map guest data memory",
    Capability.PERCPU: "set a CPU's per-CPU base",
    Capability.QUIESCE: "show where its CPUs are (quiescence)",
    Capability.SUPERVISOR: "run supervisor-only instructions (CLAC/STAC)",
}


def drive(task: Task, service: Callable[[], None] | None = None, *, max_spins: int = 10_000_000) -> Any:
    """Run a task synchronously.  On a wait, call *service* until the
    predicate holds (a machine without concurrent CPUs passes None and every
    wait must already be satisfied)."""
    try:
        item = next(task)
        while True:
            if isinstance(item, WaitUntil):
                spins = 0
                while not item.predicate():
                    if service is None:
                        raise MachineError(f"task waits for {item.reason!r}, which nothing can satisfy")
                    service()
                    spins += 1
                    if spins > max_spins:
                        raise MachineError(f"gave up waiting for {item.reason!r}")
            item = task.send(None)
    except StopIteration as stop:
        return stop.value


class StillCpus:
    """What a machine whose CPUs never run does (a memory machine, an
    offline kernel image): a sync is counted and returns at once, a task
    is driven to its end right here, and an early write goes straight into
    the buffer that holds the address (``_text_span(addr, size)`` -> the
    buffer and the offset, given by the machine).  Its CPUs, text ranges
    and data memory are the lists and object the machine keeps in
    ``_cpus``, ``_ranges`` and ``_mem``."""

    syncs: int
    _cpus: list[int]
    _ranges: list[TextRange]
    _mem: Any

    @property
    def cpus(self) -> list[int]:
        return self._cpus

    @property
    def text_ranges(self) -> list[TextRange]:
        return self._ranges

    @property
    def mem(self) -> Any:
        return self._mem

    def _text_span(self, addr: int, size: int) -> tuple[bytearray, int]:
        raise NotImplementedError

    @staticmethod
    def _span_in(bufs: Sequence[tuple[int, bytearray]], addr: int,
                 size: int) -> tuple[bytearray, int]:
        """The buffer of *bufs* (start address, bytes) that holds all of
        [addr, addr+size), and the offset there; BadAddressError if none."""
        for start, buf in bufs:
            off = addr - start
            if 0 <= off and off + size <= len(buf):
                return buf, off
        raise BadAddressError(f"[{addr:#x}, +{size}) is not mapped text")

    def text_write_early(self, addr: int, data: bytes) -> None:
        buf, off = self._text_span(addr, len(data))
        buf[off:off + len(data)] = data

    def sync_each_cpu(self) -> Task:
        self.syncs += 1
        return
        yield       # a task with nothing to wait for: no CPU runs

    def run_task(self, task: Task) -> Any:
        self._check_open()  # type: ignore[attr-defined]
        try:
            return drive(task)
        except BaseException:
            task.close()    # let go of it: nothing will resume it here
            raise
