# SPDX-License-Identifier: GPL-2.0-only
"""``execmem``: executable memory in a machine's non-core text range
(module text), for JIT output, trampolines and modules -- the one
allocator of it, on every machine that declares ``Capability.EXECMEM``
(a live process lends a region injected into it; see
``LiveMachine.execmem_range``).

:class:`ExecMem` hands out aligned chunks first-fit and takes them back.
It never writes: what goes into a chunk is written by its user with
``text_poke_copy`` (the kernel's ``bpf_arch_text_copy``) and a freed chunk
is filled with INT3 by ``text_poke_set`` (``bpf_arch_text_invalidate``)
before :meth:`ExecMem.free` returns it, so that a stale pointer into it
traps rather than runs leftovers.  State lives in the object (one per
user; two allocators over one range must be given disjoint ranges).
"""

from __future__ import annotations

from ._errors import NotSupportedError, TextPokeError
from ._core._machine import Capability

__all__ = ["ExecMem", "ExecMemError"]


class ExecMemError(TextPokeError, MemoryError):
    """Out of executable memory, or a free of something never allocated."""


class ExecMem:
    """Chunks of a machine's executable memory: of ``[start, end)`` if
    given, else of the range ``machine.execmem_range(size)`` gives (the
    sim's module text; on a live process a region mapped in it then)."""

    def __init__(self, core, *, start: int | None = None, end: int | None = None,
                 align: int = 16, size: int = 64 << 10) -> None:
        m = core.machine
        if Capability.EXECMEM not in m.capabilities:
            raise NotSupportedError(f"{m.name}: no executable memory outside core text (EXECMEM)")
        if start is None:
            rng = m.execmem_range(size)
            start, end = rng.start, rng.end
        self.core, self.start, self.end, self.align = core, start, end, align
        self._free: list[tuple[int, int]] = [(start, end)]
        self.used: dict[int, int] = {}

    def alloc(self, size: int) -> int:
        if size <= 0:
            raise ValueError("size must be positive")
        size = -(-size // self.align) * self.align
        for i, (lo, hi) in enumerate(self._free):
            if hi - lo >= size:
                self._free[i] = (lo + size, hi)
                if lo + size == hi:
                    del self._free[i]
                self.used[lo] = size
                return lo
        raise ExecMemError(f"execmem: no {size} bytes free in [{self.start:#x}, {self.end:#x})")

    def alloc_at(self, addr: int, size: int) -> int:
        """Take ``[addr, addr + size)`` -- where another allocator (a real
        kernel's, read from a reference) put something -- if it is free."""
        if size <= 0:
            raise ValueError("size must be positive")
        size = -(-size // self.align) * self.align
        for i, (lo, hi) in enumerate(self._free):
            if lo <= addr and addr + size <= hi:
                self._free[i:i + 1] = [r for r in ((lo, addr), (addr + size, hi)) if r[0] < r[1]]
                self.used[addr] = size
                return addr
        raise ExecMemError(f"execmem: [{addr:#x}, +{size:#x}) is not free in "
                           f"[{self.start:#x}, {self.end:#x})")

    def free(self, addr: int, *, invalidate: bool = True) -> None:
        size = self.used.get(addr)
        if size is None:
            raise ExecMemError(f"execmem: {addr:#x} was not allocated here")
        if invalidate:
            self.core.text_poke_set(addr, 0xCC, size)
        del self.used[addr]
        self._free.append((addr, addr + size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in self._free:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self._free = merged
