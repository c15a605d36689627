# SPDX-License-Identifier: GPL-2.0-only
"""The text of a running machine as a boot pass's text buffer: reads are
the machine's, each write is a ``text_poke`` (one site at a time, the
other CPUs may run), the symbols are the image's.  What the SMP-lock pass
runs on when a machine goes SMP or a module registers its LOCK prefixes
after boot (a booting image is patched through ``_shadow.Shadow``, a real
kernel through ``_ktext.KernelText``)."""

from __future__ import annotations

from .._core import TextPoke
from .._errors import TextPokeError
from ..images._lines import LINE_BUNDLED, KernelLine
from ._code import FastInsn, decode_site
from ._ktext import SymbolicText
from ._shadow import Symbols

__all__ = ["LiveText"]


class LiveText(SymbolicText):
    """A :class:`~._ktext.TextBuffer` over *core*'s machine."""

    def __init__(self, core: TextPoke, symbols: Symbols, line: KernelLine = LINE_BUNDLED) -> None:
        self.core = core
        self.symbols = symbols
        self.line = line
        self.written = 0

    def read(self, addr: int, n: int) -> bytes:
        return self.core.machine.text_read(addr, n)

    def write(self, table: str, addr: int, data: bytes) -> bool:
        if self.read(addr, len(data)) == data:
            return False
        self.core.text_poke(addr, data)
        self.written += 1
        return True

    def peek(self, addr: int, n: int) -> bytes:
        for k in sorted({n, 8, 6, 5, 2, 1}, reverse=True):   # fewer at the end of text
            if k <= n:
                try:
                    return self.read(addr, k)
                except TextPokeError:
                    continue
        return b""

    def decode(self, addr: int) -> FastInsn | None:
        data = self.peek(addr, 15)
        return decode_site(data, 0, addr) if data else None

    def data_u64(self, addr: int) -> int:
        return int.from_bytes(self.core.machine.mem.read(addr, 8), "little")
