# SPDX-License-Identifier: GPL-2.0-only
"""The machine protocol: what the core needs from a machine, and no more.

The core states *what* to write and *when* to synchronise; a machine knows
*where* bytes go and how its CPUs are serialised.  Operations that another
CPU could observe half-way are generators ("tasks"): they yield at every
such step so that a scheduling machine (sim) can interleave them with guest
code, while a synchronous machine simply runs them to the end.

A task yields either ``None`` (a step happened; others may run now) or a
:class:`WaitUntil` (do not resume me before the predicate holds).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable

from ._emulate import DataMemory, PtRegs
from .._errors import BadAddressError, MachineError

__all__ = ["WaitUntil", "Task", "TrapHandler", "TextRange", "Machine", "PAGE_SIZE"]

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


class Machine(abc.ABC):
    """Base class of the machines textpoke can patch."""

    name: str = "machine"

    def __init__(self) -> None:
        self._trap_handlers: list[TrapHandler] = []

    # --- what the core asks -------------------------------------------------
    @property
    @abc.abstractmethod
    def cpus(self) -> list[int]:
        """Ids of the CPUs whose references and syncs the core manages."""

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

    @abc.abstractmethod
    def text_write_early(self, addr: int, data: bytes) -> None:
        """Direct write used before other CPUs run (``text_poke_early``)."""

    @abc.abstractmethod
    def sync_each_cpu(self) -> Task:
        """Serialise every CPU (IPI + sync_core); returns when all have."""

    @abc.abstractmethod
    def run_task(self, task: Task) -> Any:
        """Drive *task* to completion (servicing CPUs meanwhile) and return
        its value."""

    def now(self) -> float:
        """Timestamp for events (machine-defined units)."""
        import time
        return time.monotonic()

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

    def register_trap_handler(self, handler: TrapHandler, *, first: bool = False) -> None:
        """Add a handler to the INT3 chain (the die-notifier chain)."""
        if first:
            self._trap_handlers.insert(0, handler)
        else:
            self._trap_handlers.append(handler)

    def unregister_trap_handler(self, handler: TrapHandler) -> None:
        self._trap_handlers.remove(handler)

    @property
    def trap_handlers(self) -> Iterable[TrapHandler]:
        return tuple(self._trap_handlers)


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
