# SPDX-License-Identifier: GPL-2.0-only
"""A machine for users' tests: text in plain memory, no CPUs running.

:class:`MemoryMachine` implements the machine protocol and nothing else --
as httpx ships ``MockTransport`` -- so that code built on
:class:`textpoke.TextPoke` (a client, a tool) can be tested without an
emulator or a live process, and so that the core's own cost per site can
be measured with nothing else in the way.

    >>> from textpoke import TextPoke
    >>> from textpoke.testing import MemoryMachine
    >>> m = MemoryMachine({0x1000: bytes.fromhex("0f1f440000") + b"\\xcc" * 11})
    >>> with TextPoke(m) as core, core.batch():
    ...     core.smp_text_poke_batch_add(0x1000, bytes.fromhex("e9 00 00 00 00"))
    >>> m.text_read(0x1000, 5).hex()
    'e900000000'

Faults can be injected to test what happens when a machine fails part-way:
``fail_on_write=n`` raises :class:`~textpoke.MachineError` on the n-th
(0-based) write through the alias, ``corrupt_on_write=n`` makes that write
store different bytes (so its read-back does not verify).
"""

from __future__ import annotations

from typing import Callable, Mapping

from ._core._machine import PAGE_SIZE, Capability, Machine, StillCpus, Task, TextRange
from ._errors import MachineError

__all__ = ["MemoryMachine"]


class _Memory:
    """Data memory: sparse, zero-filled, byte-addressed."""

    def __init__(self) -> None:
        self._bytes: dict[int, int] = {}

    def read(self, addr: int, size: int) -> bytes:
        get = self._bytes.get
        return bytes(get(a, 0) for a in range(addr, addr + size))

    def write(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self._bytes[addr + i] = b


class MemoryMachine(StillCpus, Machine):
    """Text ranges held in bytearrays; *ncpus* CPUs that never run.

    *text* maps a start address to the initial bytes of a range (the first
    is core kernel text; the others are module text, as execmem).  Each
    range is padded with INT3 to a whole page.
    """

    name = "memory"
    capabilities = frozenset({Capability.HOTPLUG})

    def __init__(self, text: Mapping[int, bytes], *, ncpus: int = 1,
                 fail_on_write: int | None = None, corrupt_on_write: int | None = None) -> None:
        super().__init__()
        if not text:
            raise ValueError("need at least one text range")
        if ncpus < 1:
            raise ValueError("need at least one CPU")
        self._bufs: list[tuple[int, bytearray]] = []
        ranges = []
        for i, (start, data) in enumerate(text.items()):
            size = max(PAGE_SIZE, -(-len(data) // PAGE_SIZE) * PAGE_SIZE)
            buf = bytearray(data) + b"\xcc" * (size - len(data))
            self._bufs.append((start, buf))
            ranges.append(TextRange(start, start + size, "text" if i == 0 else f"module{i}", i == 0))
        self._ranges = ranges
        self._cpus = list(range(ncpus))
        self._mem = _Memory()
        self.writes = 0
        self.syncs = 0
        self.fail_on_write = fail_on_write
        self.corrupt_on_write = corrupt_on_write
        self._faults = fail_on_write is not None or corrupt_on_write is not None
        #: called with (addr, data) after every write through the alias
        self.on_write: Callable[[int, bytes], None] | None = None

    def _buf(self, addr: int, size: int) -> tuple[bytearray, int]:
        return self._span_in(self._bufs, addr, size)

    _text_span = _buf        # StillCpus' early writes go here

    def text_read(self, addr: int, size: int) -> bytes:
        start, buf = self._bufs[0]
        off = addr - start
        if not (0 <= off and off + size <= len(buf)):
            buf, off = self._buf(addr, size)
        return bytes(buf[off:off + size])

    def text_poke_write(self, addr: int, data: bytes) -> Task:
        n = self.writes
        self.writes = n + 1
        if self._faults and n in (self.fail_on_write, self.corrupt_on_write):
            self._check_open()
            if n == self.fail_on_write:
                raise MachineError(f"injected failure on write {n} at {addr:#x}")
            data = bytes(b ^ 0xFF for b in data)
        buf, off = self._buf(addr, len(data))
        buf[off:off + len(data)] = data
        if self.on_write is not None:
            self.on_write(addr, bytes(data))
        return
        yield  # a task: nothing else runs here, so there is nothing to wait for

    # hotplug, for tests of code that must follow the set of CPUs
    def add_cpu(self) -> int:
        cpu = max(self._cpus, default=-1) + 1
        self._cpus_changed("add", cpu)
        self._cpus.append(cpu)
        return cpu

    def remove_cpu(self, cpu: int) -> None:
        if cpu not in self._cpus:
            raise ValueError(f"cpu{cpu} is not present")
        if len(self._cpus) == 1:
            raise MachineError("the last CPU cannot be removed")
        self._cpus.remove(cpu)
        self._cpus_changed("remove", cpu)
