# SPDX-License-Identifier: GPL-2.0-only
"""Table parsers for a real kernel image held as one flat buffer
(``_text`` .. ``_end``, the kernel's memory layout).

Each reader takes the buffer, the address of its first byte and a table's
``[start, end)`` addresses (from ``__start_*``/``__stop_*`` or the section
bounds) and returns plain tuples, fast: the real image has ~300,000
entries in these tables.  Layouts are those of Linux 6.12 on x86-64:

* ``s32`` tables (``.retpoline_sites``, ``.return_sites``, ``.call_sites``,
  ``.ibt_endbr_seal``, ``.smp_locks``): each entry is an offset from its
  own address; an entry of 0 is padding (``.smp_locks`` skips it);
* ``struct alt_instr`` (14 bytes, packed): s32 instr, s32 repl, u32
  ft_flags (cpuid low 16 bits, flags high 16), u8 instrlen, u8
  replacementlen;
* ``struct jump_entry`` (16 bytes): s32 code, s32 target, s64 key, all
  relative to their own field; the key's low bits carry the flags (bit 0:
  branch, bit 1: init);
* ``struct static_call_site`` (8 bytes): s32 addr, s32 key, relative; the
  key's low bits: 1 tail call, 2 init;
* ``__mcount_loc``: u64 absolute addresses, 0 for padding.
"""

from __future__ import annotations

import struct
from array import array
from typing import NamedTuple

from .._errors import TextPokeError

__all__ = ["TableError", "RealAltInstr", "JumpEntry", "StaticCallSite", "s32_table",
           "alt_instr_table", "paravirt_table", "ParaSite", "jump_table", "s32_count", "static_call_table",
           "mcount_table",
           "ALT_INSTR_SIZE", "JUMP_ENTRY_SIZE", "STATIC_CALL_SITE_SIZE"]

ALT_INSTR_SIZE = 14
JUMP_ENTRY_SIZE = 16
STATIC_CALL_SITE_SIZE = 8
ALT_FLAG_NOT = 1 << 0
ALT_FLAG_DIRECT_CALL = 1 << 1


class TableError(TextPokeError):
    """A table whose bounds or size do not fit its layout."""


def _slice(buf: bytes | bytearray | memoryview, base: int, start: int, end: int, esize: int,
           what: str) -> memoryview:
    if end < start:
        raise TableError(f"{what}: end {end:#x} before start {start:#x}")
    lo, hi = start - base, end - base
    if lo < 0 or hi > len(buf):
        raise TableError(f"{what}: [{start:#x}, {end:#x}) is outside the image")
    if (hi - lo) % esize:
        raise TableError(f"{what}: {hi - lo} bytes is not a whole number of {esize}-byte entries")
    return memoryview(buf)[lo:hi]


def s32_table(buf, base: int, start: int, end: int, what: str = "s32 table",
              keep_zero: bool = False) -> list[int]:
    """Absolute addresses of a table of self-relative s32 entries; entries
    of 0 are dropped unless *keep_zero* (then they come back as None)."""
    mv = _slice(buf, base, start, end, 4, what)
    vals = array("i")
    vals.frombytes(mv)
    # each entry's own address comes from range() rather than per-entry
    # arithmetic: these tables hold ~200,000 entries
    at = range(start, start + 4 * len(vals), 4)
    if keep_zero:
        return [a + v if v else None for a, v in zip(at, vals)]  # type: ignore[misc]
    return [a + v for a, v in zip(at, vals) if v]


def s32_count(buf, base: int, start: int, end: int, what: str = "s32 table") -> int:
    """How many entries :func:`s32_table` would return (the non-zero ones),
    without building the list: a pass with nothing to do reports only the
    count."""
    vals = array("i")
    vals.frombytes(_slice(buf, base, start, end, 4, what))
    return len(vals) - vals.count(0)


class RealAltInstr(NamedTuple):
    index: int
    entry: int          # address of the entry itself
    instr: int
    repl: int
    cpuid: int
    flags: int
    instrlen: int
    replacementlen: int


def alt_instr_table(buf, base: int, start: int, end: int,
                    layout: str = "ft_flags") -> list[RealAltInstr]:
    """*layout* "ft_flags": 6.12's 14-byte entry; "cpuid": 6.1's 12-byte
    one (u16 feature, bit 15 inverting the test -- returned as ALT_FLAG_NOT)."""
    if layout == "cpuid":
        mv = _slice(buf, base, start, end, 12, ".altinstructions")
        out = []
        for i, (io, ro, cpuid, il, rl) in enumerate(struct.iter_unpack("<iiHBB", mv)):
            e = start + 12 * i
            out.append(RealAltInstr(i, e, e + io, e + 4 + ro, cpuid & 0x7FFF,
                                    ALT_FLAG_NOT if cpuid & 0x8000 else 0, il, rl))
        return out
    mv = _slice(buf, base, start, end, ALT_INSTR_SIZE, ".altinstructions")
    out = []
    for i, (io, ro, ft, il, rl) in enumerate(struct.iter_unpack("<iiIBB", mv)):
        e = start + ALT_INSTR_SIZE * i
        out.append(RealAltInstr(i, e, e + io, e + 4 + ro, ft & 0xFFFF, ft >> 16, il, rl))
    return out


class ParaSite(NamedTuple):
    index: int
    instr: int          # the site (an absolute pointer in 6.1's table)
    type: int           # the pv_ops slot: *((void **)&pv_ops + type)
    len: int


def paravirt_table(buf, base: int, start: int, end: int) -> list[ParaSite]:
    """6.1's ``struct paravirt_patch_site`` (u8 *instr; u8 type; u8 len;
    padded to 16 bytes)."""
    mv = _slice(buf, base, start, end, 16, ".parainstructions")
    return [ParaSite(i, a, t, n) for i, (a, t, n) in
            enumerate(struct.iter_unpack("<QBB6x", mv))]


class JumpEntry(NamedTuple):
    code: int
    target: int
    key: int            # address of the struct static_key
    branch: bool        # the entry's default is the branch (likely)


def jump_table(buf, base: int, start: int, end: int) -> list[JumpEntry]:
    mv = _slice(buf, base, start, end, JUMP_ENTRY_SIZE, "__jump_table")
    out = []
    for i, (c, t, k) in enumerate(struct.iter_unpack("<iiq", mv)):
        e = start + JUMP_ENTRY_SIZE * i
        key = (e + 8 + k) & 0xFFFFFFFFFFFFFFFF
        out.append(JumpEntry(e + c, e + 4 + t, key & ~3, bool(key & 1)))
    return out


class StaticCallSite(NamedTuple):
    addr: int
    key: int            # address of the struct static_call_key
    tail: bool
    init: bool


def static_call_table(buf, base: int, start: int, end: int) -> list[StaticCallSite]:
    mv = _slice(buf, base, start, end, STATIC_CALL_SITE_SIZE, ".static_call_sites")
    out = []
    for i, (a, k) in enumerate(struct.iter_unpack("<ii", mv)):
        e = start + STATIC_CALL_SITE_SIZE * i
        key = e + 4 + k
        out.append(StaticCallSite(e + a, key & ~3, bool(key & 1), bool(key & 2)))
    return out


def mcount_table(buf, base: int, start: int, end: int) -> list[int]:
    """Every ``__mcount_loc`` entry, 0 (padding) included: the kernel skips
    those itself and counts them."""
    mv = _slice(buf, base, start, end, 8, "__mcount_loc")
    vals = array("Q")
    vals.frombytes(mv)
    return vals.tolist()
