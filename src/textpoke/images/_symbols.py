# SPDX-License-Identifier: GPL-2.0-only
"""The one symbolizer: a kernel's (or a module's, or a process's) symbols,
whatever their source -- the image's kallsyms tables (:mod:`._kallsyms`), a
``System.map`` (:mod:`._system_map`) or an ELF ``.symtab``.

:class:`Symbols` is a ``dict`` of name -> address (the lowest address wins
when a name is defined more than once) that also keeps every entry in
address order, so that it names an address (``describe``:
``symbol+0xoff``), finds the symbol exactly at one (``name_at``), gives a
symbol's extent (``size``) and lists names by prefix (``prefixed``).  Entries
at one address are ordered as the kernel's ``scripts/kallsyms`` orders them
(strong before weak, ordinary names before linker-provided bounds, fewer
leading underscores first, then input order), whatever the source, so that
a map and the image name an address the same way.

:class:`SymbolMap` holds several owners' tables (the kernel and its
modules) for the clients' refusals; :func:`format_symbol` is the one
``name+0xoff`` formatter.
"""

from __future__ import annotations

import bisect
import re
from itertools import compress
from typing import Callable, Iterable, Iterator, Mapping

__all__ = ["Symbols", "SymbolMap", "format_symbol", "with_prefix"]

_right, _left = bisect.bisect_right, bisect.bisect_left


def with_prefix(symbols, prefix: str) -> list[tuple[str, int]]:
    """(name, address) of every symbol named *prefix*..., sorted by name,
    from a :class:`Symbols` (fast) or any name -> address mapping."""
    if isinstance(symbols, Symbols):
        return symbols.prefixed(prefix)
    return sorted((n, a) for n, a in symbols.items() if n.startswith(prefix))


def format_symbol(name: str, off: int, size: int | None = None, *,
                  offset0: bool = False) -> str:
    """``name+0xoff`` (the bare name at offset 0 unless *offset0*), with
    ``/0xsize`` when *size* is given, as the kernel's ``%pS`` prints it."""
    if size is not None:
        return f"{name}+{off:#x}/{size:#x}"
    return f"{name}+{off:#x}" if off or offset0 else name


def _provided(name: str) -> bool:
    """A name the linker script may provide (``__start_x``, ``__x_end``...):
    kallsyms sorts them after ordinary names at the same address."""
    if len(name) < 8 or not name.startswith("__"):
        return False
    return (name.startswith(("__start_", "__stop_", "__end_"))
            or name.endswith(("_start", "_end")))


def _rank(name: str, typ: str) -> tuple[int, int, int]:
    return (typ in ("w", "W"), _provided(name), len(name) - len(name.lstrip("_")))


class Symbols(dict):
    """name -> address, and every entry in address order.

    Build with :meth:`from_entries` (addresses, names, types in any order)
    or :meth:`from_sorted` (already in kallsyms order).  ``types`` holds one
    type letter per entry (``"T"``, ``"t"``, ``"D"``...) or is ``""`` when
    the source has none (an ELF symbol table).  ``sizes`` maps names to
    their sizes where the source has them; *esizes*, when given, is one
    size per entry (a name defined twice may have two).

    Naming an address (one implementation for every caller: boot records,
    the clients' refusals, oops reports, live processes and the CLI):
    :meth:`index_of` finds the entry, :meth:`lookup` returns ``(name,
    start, size)``, :meth:`describe` formats it with :func:`format_symbol`.
    Three rules: the nearest entry at or below the address (kallsyms's
    ``%pS``; the default), the same skipping sized entries that end before
    it (*covering*), or the innermost sized entry that contains it
    (*function*)."""

    __slots__ = ("source", "addrs", "names", "types", "sizes", "_text", "_esizes")

    def __init__(self, addrs: list[int], names: list[str], types: str = "",
                 source: str = "", sizes: dict[str, int] | None = None,
                 esizes: list[int] | None = None):
        # a name defined more than once keeps its lowest address (built from
        # the top down, so the dict iterates from the highest address down)
        super().__init__(zip(reversed(names), reversed(addrs)))
        self.addrs = addrs
        self.names = names
        self.types = types
        self.source = source
        self.sizes = sizes or {}
        self._text: str | None = None
        self._esizes = esizes

    # ------------------------------------------------------------ building
    @classmethod
    def from_sorted(cls, addrs: list[int], names: list[str], types: str = "",
                    source: str = "") -> "Symbols":
        """Entries already in kallsyms order (as the kernel's tables are)."""
        return cls(addrs, names, types, source)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[int, str, str]], source: str = "",
                     sizes: dict[str, int] | None = None) -> "Symbols":
        """(address, type, name) in input order (a map's lines, a symbol
        table's entries), sorted the way ``scripts/kallsyms`` sorts them."""
        ents = list(entries)
        if not ents:
            return cls([], [], "", source, sizes)
        addrs, types, names = (list(x) for x in zip(*ents))
        return cls.from_lists(addrs, names, "".join(types), source, sizes)

    @classmethod
    def from_lists(cls, addrs: list[int], names: list[str], types: str = "",
                   source: str = "", sizes: dict[str, int] | None = None) -> "Symbols":
        """Like :meth:`from_entries`, from parallel lists (a ``System.map``
        comes sorted by address: then only runs at one address move)."""
        n = len(addrs)
        if any(map(int.__gt__, addrs, addrs[1:])):
            order = sorted(range(n), key=addrs.__getitem__)
            addrs = [addrs[i] for i in order]
            names = [names[i] for i in order]
            if types:
                types = "".join([types[i] for i in order])
        # runs of one address: kallsyms's order (strong, not linker-provided,
        # fewer leading underscores, then input order)
        ties = list(compress(range(1, n), map(int.__eq__, addrs[1:], addrs)))
        if ties:
            names = list(names)
            tl = list(types) if types else None
            k = 0
            while k < len(ties):
                start = ties[k] - 1
                end = ties[k] + 1
                k += 1
                while k < len(ties) and ties[k] == end:
                    end += 1
                    k += 1
                idx = sorted(range(start, end),
                             key=lambda i: _rank(names[i], tl[i] if tl else ""))
                if idx != list(range(start, end)):
                    names[start:end] = [names[i] for i in idx]
                    if tl:
                        tl[start:end] = [tl[i] for i in idx]
            if tl:
                types = "".join(tl)
        return cls(addrs, names, types, source, sizes)

    @classmethod
    def from_mapping(cls, symbols: Mapping[str, int], sizes: Mapping[str, int] | None = None,
                     *, source: str = "",
                     keep: Callable[[str, int], bool] | None = None) -> "Symbols":
        """An ELF image's or a module's ``{name: address}`` and ``{name:
        size}`` tables (the bundled image, modules, ``ElfImage``): at one
        address a sized entry (the function) comes before unsized ones
        (labels at its start), then by name.  *keep* filters entries."""
        sizes = sizes or {}
        rows = sorted((a, not sizes.get(n), n) for n, a in symbols.items()
                      if keep is None or keep(n, a))
        names = [r[2] for r in rows]
        return cls([r[0] for r in rows], names, "", source, dict(sizes),
                    [sizes.get(n) or 0 for n in names])

    # ------------------------------------------------------------- queries
    def entries(self) -> Iterator[tuple[int, str, str]]:
        """(address, type, name) in address order; type "" when unknown."""
        if self.types:
            return zip(self.addrs, self.types, self.names)
        return ((a, "", n) for a, n in zip(self.addrs, self.names))

    def type_of(self, name: str) -> str:
        """The type letter of *name*'s first definition ("" if unknown)."""
        if not self.types or name not in self:
            return ""
        a = self[name]
        i = bisect.bisect_left(self.addrs, a)
        while self.names[i] != name:
            i += 1
        return self.types[i]

    def name_at(self, addr: int) -> str | None:
        """The symbol exactly at *addr* (the kernel's preferred one)."""
        i = bisect.bisect_left(self.addrs, addr)
        if i < len(self.addrs) and self.addrs[i] == addr:
            return self.names[i]
        return None

    def entry_sizes(self) -> list[int]:
        """One size per entry (0 where the source gives none)."""
        if self._esizes is None:
            sz = self.sizes
            self._esizes = [sz.get(n) or 0 for n in self.names] if sz else [0] * len(self.names)
        return self._esizes

    def index_of(self, addr: int, lo: int | None = None, *, function: bool = False,
                 covering: bool = False) -> int | None:
        """The entry that names *addr* (see the class doc for the rules),
        ignoring entries below *lo* (e.g. per-CPU offsets for text)."""
        addrs = self.addrs
        i = _right(addrs, addr) - 1
        if i < 0 or (lo is not None and addrs[i] < lo):
            return None
        if not (function or covering):
            return _left(addrs, addrs[i], 0, i + 1)
        es = self.entry_sizes()
        floor = max(0 if lo is None else bisect.bisect_left(addrs, lo), i - 64)
        while i >= floor:
            # the entries at one address, in their order of preference
            first = bisect.bisect_left(addrs, addrs[i], floor, i + 1)
            for j in range(first, i + 1):
                n = es[j]
                if addr < addrs[j] + n or (not n and not function):
                    return j
            i = first - 1
        return None

    def lookup(self, addr: int, lo: int | None = None, *, function: bool = False,
               covering: bool = False) -> tuple[str, int, int] | None:
        """``(name, start, size)`` of the entry that names *addr* (size 0
        when unknown), or None."""
        j = self.index_of(addr, lo, function=function, covering=covering)
        if j is None:
            return None
        return self.names[j], self.addrs[j], self.entry_sizes()[j]

    def symbolize(self, addr: int, lo: int | None = None) -> tuple[str, int] | None:
        """(symbol, offset) of the nearest symbol at or below *addr*
        (ignoring symbols below *lo*, e.g. per-CPU offsets for text)."""
        j = self.index_of(addr, lo)
        return None if j is None else (self.names[j], addr - self.addrs[j])

    def describe(self, addr: int, lo: int | None = None, *, function: bool = False,
                 covering: bool = False, offset0: bool = False) -> str:
        """``name+0xoff`` (``name`` at offset 0 unless *offset0*), or the
        bare hex address."""
        j = self.index_of(addr, lo, function=function, covering=covering)
        if j is None and function:
            j = self.index_of(addr, lo, covering=True)
        if j is None:
            return f"{addr:#x}"
        return format_symbol(self.names[j], addr - self.addrs[j], offset0=offset0)

    def following(self, addr: int) -> int | None:
        """The lowest symbol address above *addr*, or None."""
        i = bisect.bisect_right(self.addrs, addr)
        return self.addrs[i] if i < len(self.addrs) else None

    def size(self, name: str) -> int:
        """The symbol's size when the source has one, else the distance to
        the next higher address (0 for the last one)."""
        n = self.sizes.get(name)
        if n:
            return n
        a = self[name]
        nxt = self.following(a)
        return nxt - a if nxt is not None else 0

    def prefixed(self, prefix: str) -> list[tuple[str, int]]:
        """(name, address) of every distinct name starting with *prefix*,
        sorted by name (one regex scan of all names, no sort of them)."""
        if self._text is None:
            self._text = "\n" + "\n".join(self.names)
        # a pattern that starts with a literal: the engine skips to it
        found = re.findall("\n(" + re.escape(prefix) + "[^\n]*)", self._text)
        return [(n, self[n]) for n in sorted(set(found))]

    def __reduce__(self):
        return (Symbols, (self.addrs, self.names, self.types, self.source, self.sizes,
                          self._esizes))

    def __repr__(self) -> str:
        return f"<Symbols {len(self.addrs)} entries from {self.source or '?'}>"


class SymbolMap:
    """Several owners' :class:`Symbols` (the kernel as owner ``""``, then
    modules, added and removed as they come and go), naming an address as
    ``name+0xoff [owner]`` for the clients' refusals: the owner whose
    entry is nearest below the address, by the *covering* rule."""

    #: names that name no code: section symbols and linker-provided bounds
    _SKIP = (".", "__start", "__stop")

    def __init__(self, symbols: Mapping[str, int] | None = None,
                 sizes: Mapping[str, int] | None = None) -> None:
        self._tables: dict[str, Symbols] = {}
        if symbols:
            self.add("", symbols, sizes or {})

    def add(self, owner: str, symbols: Mapping[str, int], sizes: Mapping[str, int]) -> None:
        self._tables[owner] = Symbols.from_mapping(
            symbols, sizes, source=owner, keep=lambda n, a: not n.startswith(self._SKIP))

    def remove(self, owner: str) -> None:
        self._tables.pop(owner, None)

    def describe(self, addr: int) -> str:
        best = None
        for owner, table in self._tables.items():
            r = table.lookup(addr, covering=True)
            if r is not None and (best is None or r[1] > best[1][1]):
                best = (owner, r)
        if best is None:
            return f"{addr:#x}"
        owner, (name, start, _size) = best
        where = format_symbol(name, addr - start, offset0=True)
        return f"{where} [{owner}]" if owner else where
