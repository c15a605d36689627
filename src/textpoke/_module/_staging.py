# SPDX-License-Identifier: GPL-2.0-only
"""A module on its staging buffers, before anything is written to the
machine: its sections where they will be (:class:`Staged`, with the
patching tables read from the staged data by the image's one table
reader), the text the boot passes see through a shadow
(:class:`ModuleShadow`), and the module's own ITS thunk pages
(:class:`ModuleIts`, :func:`its_page_bytes`)."""

from __future__ import annotations

from .._alternative._shadow import Shadow
from .._alternative._thunks import ItsThunks
from ..images._elf import ImageError
from ..images._tables import Bounds, check_entries
from ._link import ModuleFormatError
from ._types import Module

__all__ = ["Staged", "StagedText", "ModuleShadow", "ModuleIts", "its_page_bytes", "PAGE_SIZE"]

PAGE_SIZE = 4096


class Staged:
    """A module's allocated sections on the staging buffers: *addr* maps a
    section index to its address, *text* and *data* are the staged bytes
    (*data_off*: a data section's offset in *data*)."""

    def __init__(self, mod: Module, secs, addr: dict[int, int], text: bytearray,
                 data: bytearray, data_off: dict[int, int]) -> None:
        self.mod, self.secs, self.addr = mod, secs, addr
        self.text, self.data, self.data_off = text, data, data_off
        tbase, tend = mod.text, mod.text + mod.text_size
        # the image's table reader, its checks against the module's text
        self._bounds = Bounds(f"module {mod.name}", ((tbase, tend),), "its text",
                              ((tbase, tend),), "its text", error=ModuleFormatError)
        #: the module's init text: freed after init, so not core text
        #: (within_coretext); a jump entry there is an "init" entry
        self.init = [(addr[i], addr[i] + x.size) for i, x in enumerate(secs)
                     if i in addr and x.name.startswith(".init")]

    def table(self, name: str) -> tuple[bytes, int] | None:
        """The staged bytes of data section *name* and its address."""
        for i, s in enumerate(self.secs):
            if s.name == name and i in self.data_off:
                off = self.data_off[i]
                return bytes(self.data[off:off + s.size]), self.addr[i]
        return None

    def read(self, name: str, reader, *args) -> list:
        """Table *name*'s records (``[]`` if the module has none), read by
        *reader* of :mod:`textpoke.images._tables` and checked against the
        module's text."""
        t = self.table(name)
        if t is None:
            return []
        raw, base = t
        try:
            recs = reader(raw, base, base, base + len(raw), *args)
        except ImageError as e:
            raise ModuleFormatError(f"module {self.mod.name}: {e}") from None
        check_entries(name, enumerate(recs), self._bounds)
        return recs


class StagedText:
    """What the boot passes read through ``shadow.machine``: the staged
    module text and data where they will be, the machine elsewhere."""

    def __init__(self, machine, text: tuple[int, bytearray], data: tuple[int, bytearray]) -> None:
        self._m, self._text, self._data = machine, text, data
        self.mem = self
        self.text_ranges = machine.text_ranges

    @staticmethod
    def _in(area: tuple[int, bytearray], addr: int, size: int) -> bytes | None:
        base, buf = area
        if base <= addr and addr + size <= base + len(buf):
            return bytes(buf[addr - base:addr - base + size])
        return None

    def text_read(self, addr: int, size: int) -> bytes:
        got = self._in(self._text, addr, size)
        return self._m.text_read(addr, size) if got is None else got

    def read(self, addr: int, size: int) -> bytes:        # as machine.mem.read
        got = self._in(self._data, addr, size)
        return self._m.mem.read(addr, size) if got is None else got


class ModuleShadow(Shadow):
    """A shadow whose only range is the staged module text: the passes
    rewrite the staging buffer in place; there is nothing to commit."""

    def __init__(self, core, text: tuple[int, bytearray], data: tuple[int, bytearray]) -> None:
        self.core = core
        self.machine = StagedText(core.machine, text, data)
        base, buf = text
        self._ranges = [(base, base + len(buf), buf)]
        self.writes = []


class ModuleIts(ItsThunks):
    """``its_allocate_thunk`` while a module is finalised: when the page in
    use is full -- or none was taken for this module yet -- a new one comes
    from *alloc*, never the image's static thunk array."""

    def __init__(self, tb, alloc) -> None:
        super().__init__(tb)
        self._alloc = alloc

    def get(self, reg: int) -> int:
        size = 3 + reg // 8
        if (self.page is None or self.off + size - 1 >= PAGE_SIZE) and not self.pages:
            self.pages.append(self._alloc())
        return super().get(reg)


def its_page_bytes(thunks: "list[tuple[int, int]]", page: int) -> bytes:
    """An ITS thunk page as the kernel leaves it: INT3 everywhere but the
    thunks, ``jmp *%reg; int3`` each (REX.B for r8-r15)."""
    out = bytearray(b"\xcc" * PAGE_SIZE)
    for a, reg in thunks:
        code = (b"\x41" if reg >= 8 else b"") + bytes([0xFF, 0xE0 + reg % 8, 0xCC])
        out[a - page:a - page + len(code)] = code
    return bytes(out)
