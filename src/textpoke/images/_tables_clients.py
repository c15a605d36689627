# SPDX-License-Identifier: GPL-2.0-only
"""Address naming for the switching clients' refusals (:class:`SymbolMap`).

Their tables are read by :mod:`textpoke.images._tables`, as everyone's are.
"""

from __future__ import annotations

import bisect
from typing import Mapping

__all__ = ["SymbolMap"]


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
