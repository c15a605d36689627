# SPDX-License-Identifier: GPL-2.0-only
"""The switching clients' tables as the bundled image (and its modules) lay
them out, parsed from raw section bytes at any address.

:func:`read_tables` in ``_tables`` checks that every site lies in core
text; a module's ``__jump_table`` and ``.static_call_sites`` point into
module text, and a module's tables are read from its (relocated) section
bytes before they are placed anywhere.  So these parsers take the bytes and
the address they live at, and leave range checks to the caller.

``__jump_table``: 16-byte ``struct jump_entry`` -- s32 code, s32 target,
s64 key, each relative to its own field; the key's bit 0 is the branch
polarity (``JUMP_TYPE_TRUE``), bit 1 the init mark.
``.static_call_sites``: 8 bytes -- s32 site, s32 key (bit 0 tail call,
bit 1 init), each relative to its own field.

:class:`SymbolMap` names an address as ``symbol+0xoff`` for refusals.
"""

from __future__ import annotations

import bisect
import struct
from typing import Mapping

from ._elf import ImageError
from ._tables import (JUMP_TYPE_LINKED, JUMP_TYPE_TRUE, STATIC_CALL_SITE_INIT,
                      STATIC_CALL_SITE_TAIL, JumpEntry, StaticCallSite)

__all__ = ["JUMP_ENTRY_SIZE", "STATIC_CALL_SITE_SIZE", "parse_jump_table",
           "parse_static_call_sites", "SymbolMap"]

_JUMP = struct.Struct("<iiq")
_SCS = struct.Struct("<ii")
JUMP_ENTRY_SIZE = _JUMP.size
STATIC_CALL_SITE_SIZE = _SCS.size


def _count(data: bytes, size: int, what: str) -> int:
    if len(data) % size:
        raise ImageError(f"{what}: {len(data)} bytes is not a whole number of {size}-byte entries")
    return len(data) // size


def parse_jump_table(data: bytes, base: int, what: str = "__jump_table") -> list[JumpEntry]:
    """Every ``struct jump_entry`` in *data*, which lives at *base*."""
    out = []
    for i in range(_count(data, _JUMP.size, what)):
        e = base + i * _JUMP.size
        code, target, key = _JUMP.unpack_from(data, i * _JUMP.size)
        raw = (e + 8 + key) & ((1 << 64) - 1)
        out.append(JumpEntry(code=e + code, target=e + 4 + target, key=raw & ~3,
                             branch=bool(raw & JUMP_TYPE_TRUE), init=bool(raw & JUMP_TYPE_LINKED),
                             entry=e))
    return out


def parse_static_call_sites(data: bytes, base: int,
                            what: str = ".static_call_sites") -> list[StaticCallSite]:
    """Every ``struct static_call_site`` in *data*, which lives at *base*."""
    out = []
    for i in range(_count(data, _SCS.size, what)):
        e = base + i * _SCS.size
        addr, key = _SCS.unpack_from(data, i * _SCS.size)
        raw = e + 4 + key
        out.append(StaticCallSite(addr=e + addr, key=raw & ~3,
                                  tail=bool(raw & STATIC_CALL_SITE_TAIL),
                                  init=bool(raw & STATIC_CALL_SITE_INIT), entry=e))
    return out


class SymbolMap:
    """Addresses to ``name+0xoff`` (the kernel's ``%pS``), over one or more
    symbol tables; later tables (modules) can be added and removed."""

    def __init__(self, symbols: Mapping[str, int] | None = None,
                 sizes: Mapping[str, int] | None = None) -> None:
        self._tables: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        self._addrs: list[int] = []
        self._names: list[tuple[str, int]] = []
        if symbols:
            self.add("", symbols, sizes or {})

    def add(self, owner: str, symbols: Mapping[str, int], sizes: Mapping[str, int]) -> None:
        self._tables[owner] = (dict(symbols), dict(sizes))
        self._rebuild()

    def remove(self, owner: str) -> None:
        self._tables.pop(owner, None)
        self._rebuild()

    def _rebuild(self) -> None:
        rows = []
        for owner, (syms, sizes) in self._tables.items():
            for n, a in syms.items():
                if n.startswith(".") or n.startswith("__start") or n.startswith("__stop"):
                    continue
                rows.append((a, 0 if sizes.get(n) else 1, n, sizes.get(n, 0), owner))
        rows.sort()
        self._addrs = [r[0] for r in rows]
        self._names = [(r[2], r[3], r[4]) for r in rows]

    def describe(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        while i >= 0:
            name, size, owner = self._names[i]
            a = self._addrs[i]
            if size == 0 or addr < a + size:
                where = f"{name}+{addr - a:#x}"
                return f"{where} [{owner}]" if owner else where
            i -= 1
        return f"{addr:#x}"
