# SPDX-License-Identifier: GPL-2.0-only
"""A kernel image's own symbols: its ``kallsyms`` tables, decoded into the
one symbolizer (:class:`~._symbols.Symbols`).

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

import functools
import re
import struct
from array import array
from dataclasses import dataclass, replace
from itertools import accumulate
from operator import itemgetter
from typing import Iterator

from ._elf import ImageError
from ._symbols import Symbols

__all__ = ["KallsymsLayout", "find_kallsyms", "decode_kallsyms"]

_KSYM_NAME_LEN = 512            # the kernel's limit is 512 since 6.1 (was 128)
_DIGITS = b"".join(bytes((c, 0)) for c in b"0123456789")


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
