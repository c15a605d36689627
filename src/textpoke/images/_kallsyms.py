# SPDX-License-Identifier: GPL-2.0-only
"""A kernel's symbols, from wherever they come: the kernel image's own
``kallsyms`` tables, a ``System.map``, or an ELF ``.symtab``.

:class:`Symbols` is the one symbolizer: a ``dict`` of name -> address (the
lowest address wins when a name is defined more than once) that also keeps
every entry in address order, so that it names an address (``describe``:
``symbol+0xoff``), finds the symbol exactly at one (``name_at``), gives a
symbol's extent (``size``) and lists names by prefix (``prefixed``).  Entries
at one address are ordered as the kernel's ``scripts/kallsyms`` orders them
(strong before weak, ordinary names before linker-provided bounds, fewer
leading underscores first, then input order), whatever the source, so that
a map and the image name an address the same way.

:func:`find_kallsyms` locates the tables that ``scripts/kallsyms`` links
into ``.rodata`` and :func:`decode_kallsyms` reads them.  The tables carry
no header; they are found by their shape:

* ``kallsyms_token_table``: 256 NUL-terminated strings.  The compressor
  keeps every character that occurs in a symbol as a one-character token at
  its own code, so the ten digits sit in a row: ``"0\\0" ... "9\\0"``.
* ``kallsyms_token_index``: 256 ``u16`` -- the offset of each token in the
  table -- right after it (8-byte aligned, as every kallsyms label).
* ``kallsyms_markers``: one ``u32`` per 256 symbols, the offset of symbol
  256*k in ``kallsyms_names``; starts with 0 and increases.
* ``kallsyms_names``: per symbol a length (one byte, or two when the top
  bit is set: 7 bits each, low first) then that many token codes; the first
  character decoded is the symbol's type letter.
* ``kallsyms_num_syms`` (``u32``) right before the names.
* ``kallsyms_offsets`` (``s32`` per symbol) and ``kallsyms_relative_base``
  (``u64``): with ``--absolute-percpu`` (x86-64 SMP) a non-negative offset
  is the address itself (per-CPU symbols) and a negative one means
  ``relative_base - 1 - offset``; without it, ``relative_base + (u32)offset``.
  Kernels built without base-relative kallsyms store ``u64`` addresses
  (``kallsyms_addresses``) instead.

Two orders of these tables exist in the kernels textpoke reads: 6.12 puts
``num_syms, names, markers, token_table, token_index, offsets,
relative_base, seqs_of_names``; 6.1 puts ``offsets, relative_base,
num_syms, names, markers, seqs_of_names, token_table, token_index``.
Both are tried; a candidate is accepted only when the names walk to exactly
the markers and the addresses come out in ascending order.
"""

from __future__ import annotations

import bisect
import functools
import re
import struct
from array import array
from dataclasses import dataclass, replace
from itertools import accumulate, compress, repeat
from operator import itemgetter
from typing import Callable, Iterable, Iterator, Mapping

from ._elf import ImageError

__all__ = ["Symbols", "SymbolMap", "format_symbol", "KallsymsLayout", "find_kallsyms",
           "decode_kallsyms", "parse_system_map", "symbol_differences", "with_prefix"]

_right, _left = bisect.bisect_right, bisect.bisect_left
_KSYM_NAME_LEN = 512            # the kernel's limit is 512 since 6.1 (was 128)
_DIGITS = b"".join(bytes((c, 0)) for c in b"0123456789")


# ===================================================================== Symbols
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


# ================================================================= System.map
_MAP_LINE = re.compile(r"^([0-9a-fA-F]{8,16}) ([A-Za-z?]) ([\x21-\x7e]+)\r?$", re.M)


def parse_system_map(raw: bytes, path: str = "<System.map>") -> Symbols:
    """A ``System.map`` (``nm -n`` lines: address, type letter, name)."""
    text = raw.decode("latin-1")
    words = text.split()
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    ok = False
    if words and len(words) % 3 == 0 and len(words) // 3 == lines:
        a, t, n = words[0::3], words[1::3], words[2::3]
        types = "".join(t)
        try:
            addrs = list(map(int, a, repeat(16)))
            ok = len(types) == len(t) and types.isalpha() and types.isascii() \
                and max(map(len, a)) <= 16 and "".join(n).isascii()
        except ValueError:
            pass
    if not ok:
        # not the plain layout: line by line, bad lines counted
        found = _MAP_LINE.findall(text)
        if not found or lines - len(found) > len(found) // 100 + 10:
            hint = ""
            if "real System.map is in" in text:
                hint = " (Debian's placeholder: the real one is in the -dbg package)"
            raise ImageError(f"{path}: not a System.map{hint}")
        a, t, n = (list(x) for x in zip(*found))
        addrs, types = list(map(int, a, repeat(16))), "".join(t)
    return Symbols.from_lists(addrs, list(n), types, source=path)


#: what ``scripts/kallsyms`` leaves out besides absolute symbols (6.1; 6.12's
#: ``mksysmap`` keeps these out of the map too): its own tables, which only
#: appear after its first pass, and a few name spaces of other architectures
_NOT_IN_KALLSYMS = frozenset(f"kallsyms_{t}" for t in (
    "addresses", "offsets", "relative_base", "num_syms", "names", "markers",
    "token_table", "token_index", "seqs_of_names"))
_NOT_IN_KALLSYMS_PREFIX = ("__kcfi_typeid_", "__efistub_", "__kvm_nvhe_$", "__kvm_nvhe_.L")


def symbol_differences(image: Symbols, smap: Symbols, *, strict: bool = False,
                       limit: int | None = None) -> list[str]:
    """How *smap* (a ``System.map``) disagrees with *image* (the symbols the
    image carries itself), one line each, at most *limit*; empty when it is
    the image's map.

    ``scripts/kallsyms`` takes its input from the same ``nm`` listing as the
    map, drops absolute symbols (type ``A``; in 6.1 also its own tables'
    names) and, on x86-64 SMP, stores the
    per-CPU symbols as absolute ones: so every image symbol must be in the
    map at the same address with the same type, per-CPU ones (``A`` in the
    image) excepted.  With *strict*, the map may hold nothing more than
    that (true of kernels built with ``CONFIG_KALLSYMS_ALL``)."""
    out: list[str] = []

    def full() -> bool:
        return limit is not None and len(out) >= limit

    def at(s: Symbols, n: str) -> str:
        return f"{s[n]:#x}" if n in s else "missing"

    for key in ("_text", "_etext", "_end", "linux_banner"):
        if key in image and image.get(key) != smap.get(key):
            out.append(f"{key} is {at(smap, key)} in the map but {image[key]:#x} in the image")
            if full():
                return out
    # the map without what kallsyms leaves out, entry for entry
    mt = smap.types
    drop = {i for i in (m.start() for m in re.finditer("[aA]", mt))
            if smap.names[i] not in image}
    drop.update(i for i, n in enumerate(smap.names)
                if (n in _NOT_IN_KALLSYMS or n.startswith(_NOT_IN_KALLSYMS_PREFIX))
                and n not in image)
    addrs, names = list(smap.addrs), list(smap.names)
    for i in sorted(drop, reverse=True):
        del addrs[i], names[i]
    if drop:
        mt = "".join([t for i, t in enumerate(mt) if i not in drop]) if mt else mt
    it = image.types
    if addrs == image.addrs and names == image.names:
        if mt and it and mt != it:
            # per-CPU symbols are "A" in the image: take the map's word there
            fixed = list(mt)
            for m in re.finditer("A", it):
                fixed[m.start()] = "A"
            if "".join(fixed) != it:
                for a, n, x, y in zip(addrs, names, it, mt):
                    if x != y and x != "A":
                        out.append(f"{n} is type {y!r} in the map but {x!r} in the image")
                        if full():
                            break
        return out
    have = set(zip(addrs, names))
    for a, n in zip(image.addrs, image.names):
        if (a, n) not in have:
            out.append(f"{n} is {at(smap, n)} in the map but {a:#x} in the image")
            if full():
                return out
    if strict:
        mine = set(zip(image.addrs, image.names))
        for a, n in zip(addrs, names):
            if (a, n) not in mine:
                out.append(f"{n} at {a:#x} is in the map but not in the image")
                if full():
                    return out
    return out


# ================================================================= kallsyms
@dataclass(frozen=True, slots=True)
class KallsymsLayout:
    """Where the kallsyms tables lie (offsets into the searched buffer)."""

    num_syms: int               # the count
    names: int                  # kallsyms_names
    names_end: int
    markers: int
    token_table: int
    token_index: int
    offsets: int                # kallsyms_offsets, or kallsyms_addresses
    relative_base: int          # the u64's position; -1 for absolute addresses
    order: str                  # "6.12" or "6.1" table order
    percpu_absolute: bool = False

    @property
    def absolute(self) -> bool:
        return self.relative_base < 0


def _u32(mem, off: int) -> int:
    return int.from_bytes(mem[off:off + 4], "little")


def _align8(x: int) -> int:
    return (x + 7) & ~7


def _token_table_at(mem, q: int, hi: int) -> tuple[int, int, list[bytes]] | None:
    """The token table whose token ``"0"`` is at *q*: (table, index, tokens)."""
    if q < 1 or mem[q - 1] != 0:
        return None
    rel = []
    p = q
    for _ in range(48, 256):
        e = mem.find(b"\0", p, min(p + _KSYM_NAME_LEN, hi))
        if e <= p:
            return None
        rel.append(p - q)
        p = e + 1
    idx = _align8(p)
    if idx + 512 > hi:
        return None
    index = struct.unpack_from("<256H", mem, idx)
    table = q - index[48]
    if table < 0 or index[0] != 0 or any(index[48 + k] - index[48] != r
                                         for k, r in enumerate(rel)):
        return None
    tokens: list[bytes] = []
    for i in range(256):
        s = table + index[i]
        e = mem.find(b"\0", s, s + _KSYM_NAME_LEN)
        if e <= s or (i < 255 and e + 1 != table + index[i + 1]):
            return None
        tokens.append(bytes(mem[s:e]))
    return table, idx, tokens


def _marker_run(mem, m: int, limit: int) -> list[int]:
    """The increasing u32 run at *m* that could be ``kallsyms_markers``."""
    out = [0]
    p = m + 4
    last = 0
    while p + 4 <= limit:
        v = _u32(mem, p)
        if not 2 * 256 <= v - last <= 256 * (_KSYM_NAME_LEN + 2):
            break
        out.append(v)
        last = v
        p += 4
    return out


def _walk(mem, s: int, count: int, limit: int) -> int:
    """The end of *count* names entries from *s* (-1 if they overrun)."""
    p = s
    for _ in range(count):
        if p >= limit:
            return -1
        n = mem[p]
        if n & 0x80:
            n = (n & 0x7f) | (mem[p + 1] << 7)
            p += 2
        else:
            p += 1
        if n == 0:
            return -1
        p += n
    return p if p <= limit else -1


def _names_for(mem, m: int, markers: list[int], lo: int,
               nsyms: int | None) -> tuple[int, int, int, int] | None:
    """(num_syms position, names start, names end, count) for markers at
    *m*: the names end within the 8 bytes before *m*, and the count sits
    in the 8 bytes before them."""
    k = len(markers)
    last = markers[-1]
    first, top = 256 * (k - 1) + 1, 256 * k
    if nsyms is not None:
        if not first <= nsyms <= top:
            return None
        first = top = nsyms
    # the last chunk has 1..256 entries of 2..KSYM_NAME_LEN+2 bytes
    s = (m - last - 2) & ~7
    s_lo = max(lo + 8, m - last - 256 * (_KSYM_NAME_LEN + 2) - 8)
    while s >= s_lo:
        ns = _u32(mem, s - 8)
        if first <= ns <= top:
            e = _walk(mem, s + last, ns - 256 * (k - 1), m)
            if e >= 0 and _align8(e) == m:
                return s - 8, s, e, ns
        s -= 8
    return None


def find_kallsyms(mem, lo: int = 0, hi: int | None = None) -> KallsymsLayout:
    """Locate the kallsyms tables in ``mem[lo:hi]`` (*mem* a bytes-like with
    ``find``; offsets must keep the 8-byte alignment of the kernel's
    addresses).  Raises :class:`ImageError` when they are not there."""
    return _locate(mem, lo, hi)[0]


def _locate(mem, lo: int, hi: int | None) -> tuple[KallsymsLayout, list[int]]:
    hi = len(mem) if hi is None else hi
    found: list[tuple[KallsymsLayout, list[int]]] = []
    q = mem.find(_DIGITS, lo, hi)
    while q >= 0 and len(found) < 2:
        tt = _token_table_at(mem, q, hi)
        if tt is not None:
            got = _tables_around(mem, lo, hi, *tt[:2])
            if got is not None:
                found.append(got)
        q = mem.find(_DIGITS, q + 1, hi)
    if not found:
        raise ImageError("no kallsyms tables (the kernel was built without "
                         "CONFIG_KALLSYMS?): give its System.map")
    if len(found) > 1:
        raise ImageError("two candidate kallsyms tables: give the image's System.map")
    return found[0]


def _tables_around(mem, lo: int, hi: int, table: int,
                   index: int) -> tuple[KallsymsLayout, list[int]] | None:
    # 6.12 order: the markers end right before the token table
    for m in _marker_starts(mem, lo, table):
        markers = _marker_run(mem, m, table)
        end = m + 4 * len(markers)
        if _align8(end) == table:
            r = _names_for(mem, m, markers, lo, None)
            if r is not None:
                ns_pos, s, e, n = r
                offs = _align8(index + 512)
                rb = _align8(offs + 4 * n)
                got = _check_addresses(mem, KallsymsLayout(n, s, e, m, table, index, offs, rb,
                                                           "6.12"), hi)
                if got is not None:
                    return got
        # 6.1 order: the markers, then 3 bytes per symbol, then the tokens
        gap = table - _align8(end)
        for pad in range(8):
            if (gap - pad) % 3 == 0:
                n = (gap - pad) // 3
                if 256 * (len(markers) - 1) < n <= 256 * len(markers) and _align8(3 * n) == gap:
                    r = _names_for(mem, m, markers, lo, n)
                    if r is not None:
                        ns_pos, s, e, n = r
                        for lay in (KallsymsLayout(n, s, e, m, table, index,
                                                   ns_pos - 8 - _align8(4 * n), ns_pos - 8, "6.1"),
                                    KallsymsLayout(n, s, e, m, table, index,
                                                   ns_pos - 8 * n, -1, "6.1")):
                            got = _check_addresses(mem, lay, hi)
                            if got is not None:
                                return got
        if m < table - 4 * 256 * 1024 - 3 * (1 << 22):
            break
    return None


def _marker_starts(mem, lo: int, table: int) -> Iterator[int]:
    """Candidate starts of ``kallsyms_markers`` below *table*, nearest
    first: 8-aligned, a 0 then a small offset (of symbol 256)."""
    limit = max(lo, table - (4 << 20))
    pos = table - 8
    pat = re.compile(rb"\x00\x00\x00\x00[\x00-\xff][\x02-\xff]\x00\x00", re.S)
    while pos >= limit:
        start = max(limit, pos - (1 << 16))
        cands = [mt.start() for mt in pat.finditer(mem, start, pos + 8) if mt.start() % 8 == 0]
        for c in reversed(cands):
            yield c
        pos = start - 8


def _check_addresses(mem, lay: KallsymsLayout,
                     hi: int) -> tuple[KallsymsLayout, list[int]] | None:
    """*lay* and its addresses, if they come out in ascending order."""
    n = lay.num_syms
    if lay.offsets < 0 or lay.offsets + (8 if lay.absolute else 4) * n > hi:
        return None
    if not lay.absolute and lay.relative_base + 8 > hi:
        return None
    try:
        addrs = _addresses(mem, lay)
    except (ValueError, struct.error):
        return None
    if addrs is None or addrs != sorted(addrs):
        return None
    if not lay.absolute and addrs[0] < 0xffff800000000000:
        lay = replace(lay, percpu_absolute=True)
    return lay, addrs


def _addresses(mem, lay: KallsymsLayout) -> list[int] | None:
    n = lay.num_syms
    if lay.absolute:
        a = array("Q")
        a.frombytes(bytes(mem[lay.offsets:lay.offsets + 8 * n]))
        return a.tolist()
    (base,) = struct.unpack_from("<Q", mem, lay.relative_base)
    if base < 0xffff800000000000:
        return None
    offs = array("i")
    offs.frombytes(bytes(mem[lay.offsets:lay.offsets + 4 * n]))
    if min(offs) < 0:
        # --absolute-percpu: per-CPU symbols are absolute, the others are
        # negative; sorted by address, the absolute ones come first
        k = next(i for i, o in enumerate(offs) if o < 0)
        if max(offs[k:]) >= 0:
            return None
        return offs[:k].tolist() + list(map((base - 1).__sub__, offs[k:]))
    return list(map(base.__add__, offs))


def _entries_of(text: str, n: int, markers: tuple[int, ...]) -> list[str]:
    """The *n* entries of ``kallsyms_names`` (as latin-1 text, each without
    its length), checked against ``kallsyms_markers``."""
    # one regex pass when every length fits one byte (of the alternatives,
    # only the one whose length byte matches is tried past its first char)
    ents = _entry_re().findall(text)
    if len(ents) == n and sum(map(len, ents)) == len(text):
        starts = [0, *accumulate(map(len, ents[:n - 1]))][::256]
        if tuple(starts) != markers:
            raise ImageError("kallsyms_names does not agree with kallsyms_markers")
        return list(map(_BODY, ents))
    # two-byte lengths (names of 128 tokens or more): walk them one by one
    ents = []
    p = 0
    for i in range(n):
        if p >= len(text):
            raise ImageError("kallsyms_names is shorter than kallsyms_num_syms says")
        if i % 256 == 0 and p != markers[i // 256]:
            raise ImageError("kallsyms_names does not agree with kallsyms_markers")
        c = ord(text[p])
        q = p + 1
        if c & 0x80:
            c = (c & 0x7f) | (ord(text[q]) << 7)
            q += 1
        if c == 0 or q + c > len(text):
            raise ImageError("kallsyms_names is malformed: not the kernel's layout")
        ents.append(text[q:q + c])
        p = q + c
    if p != len(text):
        raise ImageError("kallsyms_names does not end where kallsyms_markers starts")
    return ents


@functools.cache
def _entry_re() -> re.Pattern:
    """One length-prefixed kallsyms name (compiled on first use: 127
    alternatives take tens of ms, which every command would pay at import)."""
    return re.compile("(?s)" + "|".join(re.escape(chr(k)) + ".{%d}" % k for k in range(1, 128)))
_BODY = itemgetter(slice(1, None))
_FIRST = itemgetter(0)


def decode_kallsyms(mem, lay: KallsymsLayout | None = None, *, lo: int = 0,
                    hi: int | None = None, source: str = "kallsyms") -> Symbols:
    """The kernel's symbols from its kallsyms tables in *mem*."""
    if lay is None:
        lay, addrs = _locate(mem, lo, hi)
    else:
        addrs = _addresses(mem, lay)
        if addrs is None:
            raise ImageError("kallsyms_relative_base is not a kernel address")
    idx = struct.unpack_from("<256H", mem, lay.token_index)
    tt = lay.token_table
    tokens = []
    for i in range(256):
        s = tt + idx[i]
        tokens.append(bytes(mem[s:mem.find(b"\0", s)]).decode("latin-1"))
    nm = (lay.num_syms + 255) // 256
    markers = struct.unpack_from(f"<{nm}I", mem, lay.markers)
    ents = _entries_of(bytes(mem[lay.names:lay.names_end]).decode("latin-1"), lay.num_syms,
                       markers)
    # the entries' codes joined by U+0100, which no code is, and one
    # translate of them all: "Tname\nTname..." (T the type letter)
    decoded = "\u0100".join(ents).translate(tokens + ["\n"]).split("\n")
    types = "".join(map(_FIRST, decoded))
    names = list(map(_BODY, decoded))
    if len(names) != lay.num_syms:
        raise ImageError(f"kallsyms_names decodes to {len(names)} names, not "
                         f"kallsyms_num_syms's {lay.num_syms}")
    return Symbols.from_sorted(addrs, names, types, source)
