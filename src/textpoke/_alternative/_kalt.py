# SPDX-License-Identifier: GPL-2.0-only
"""``apply_alternatives`` (incl. ``ALT_FLAG_DIRECT_CALL``), ``apply_seal_endbr``
and the uniprocessor ``alternatives_smp_unlock`` over a real kernel's flat
memory (Linux 6.12).  Rules learnt from ``arch/x86/kernel/alternative.c``;
the code is our own."""

from __future__ import annotations

from typing import Callable

from ..images._tables_real import ALT_FLAG_DIRECT_CALL, ALT_FLAG_NOT, RealAltInstr
from ._kpasses import CALL, ENDBR64, ENDBR_POISON, NOP1, TableStats, apply_relocation_k, optimize_nops_k
from ._ktext import CpuCaps, KernelBootError, KernelText

__all__ = ["apply_alternatives_k", "apply_seal_endbr_k", "smp_unlock_k"]


# ------------------------------------------------------------ alternatives
def apply_alternatives_k(kt: KernelText, entries: list[RealAltInstr], caps: CpuCaps,
                         dbg: Callable[[str], None] | None = None) -> TableStats:
    st = TableStats(entries=len(entries))
    lens = [e.instrlen for e in entries]
    i = 0
    while i < len(entries):
        j = i + 1
        while j < len(entries) and entries[j].instr == entries[i].instr:
            j += 1
        if j - i > 1:
            m = max(lens[i:j])
            lens[i:j] = [m] * (j - i)
        i = j
    buf, base = kt.buf, kt.base
    nop_func = kt.opt("nop_func")
    bug_func = kt.opt("BUG_func")
    ncap = 24 * 32
    for a, instrlen in zip(entries, lens):
        if instrlen > 254:
            raise KernelBootError(f".altinstructions {a.index}: instrlen {instrlen} > 254")
        if a.cpuid >= ncap:
            raise KernelBootError(f".altinstructions {a.index}: cpuid {a.cpuid} out of range")
        o = a.instr - base
        taken = caps.has_bit(a.cpuid) != bool(a.flags & ALT_FLAG_NOT)
        if not taken:
            b = bytearray(buf[o:o + instrlen + 16])
            optimize_nops_k(b, instrlen)
            st.changed += kt.write(".altinstructions", a.instr, bytes(b[:instrlen]))
            continue
        if dbg:
            dbg(f"feat: {a.cpuid >> 5}*32+{a.cpuid & 31}, old: ({kt.describe(a.instr)} "
                f"({a.instr:#x}) len: {instrlen}), repl: ({a.repl:#x}, len: "
                f"{a.replacementlen}) flags: {a.flags:#x}")
        ro = a.repl - base
        b = bytearray(buf[ro:ro + a.replacementlen])
        size = a.replacementlen
        if a.flags & ALT_FLAG_DIRECT_CALL:
            if a.replacementlen != 5 or b[0] != CALL:
                raise KernelBootError(f".altinstructions {a.index}: ALT_FLAG_DIRECT_CALL on a "
                                      "non-call replacement")
            if instrlen != 6 or buf[o] != 0xFF or buf[o + 1] != 0x15:
                raise KernelBootError(f".altinstructions {a.index} at {kt.describe(a.instr)}: "
                                      "ALT_FLAG_DIRECT_CALL on an unrecognised indirect call")
            disp = int.from_bytes(buf[o + 2:o + 6], "little", signed=True)
            target = kt.data_u64(a.instr + instrlen + disp)
            if not target:
                target = bug_func
            v = int.from_bytes(b[1:5], "little", signed=True) + (target - bug_func)
            b[1:5] = (v & 0xFFFFFFFF).to_bytes(4, "little")
            size = 0 if target == nop_func else 5
        del b[size:]
        b += bytes([NOP1]) * (instrlen - size)
        b += bytes(16)          # decode look-ahead, as the kernel's buffer has
        apply_relocation_k(b, a.instr, instrlen, a.repl, a.replacementlen)
        new = bytes(b[:instrlen])
        if dbg:
            dbg(f"{a.instr:#x}:   old_insn: {bytes(buf[o:o + instrlen]).hex(' ')}")
            dbg(f"{a.repl:#x}:   rpl_insn: {bytes(buf[ro:ro + a.replacementlen]).hex(' ')}")
            dbg(f"{a.instr:#x}: final_insn: {new.hex(' ')}")
        st.applied += 1
        st.changed += kt.write(".altinstructions", a.instr, new)
    return st


# ------------------------------------------------------------- ENDBR seal
def apply_seal_endbr_k(kt: KernelText, sites: list[int],
                       dbg: Callable[[str], None] | None = None) -> TableStats:
    st = TableStats(entries=len(sites))
    buf, base = kt.buf, kt.base
    poison = ENDBR_POISON.to_bytes(4, "little")
    for addr in sites:
        o = addr - base
        v = int.from_bytes(buf[o:o + 4], "little")
        if v != ENDBR_POISON and (v & ~0x01000000) != ENDBR64:
            st.skipped += 1
            st.note("not ENDBR")
            continue
        if dbg:
            dbg(f"ENDBR at: {kt.describe(addr)} ({addr:#x})")
        st.applied += 1
        st.changed += kt.write(".ibt_endbr_seal", addr, poison)
    return st


# ---------------------------------------------------------------- SMP locks
def smp_unlock_k(kt: KernelText, raw_entries: list[int | None], text: tuple[int, int],
                 dbg: Callable[[str], None] | None = None) -> TableStats:
    """``alternatives_smp_unlock``: LOCK (F0) -> DS (3E) inside *text*;
    *raw_entries* keeps zero entries as None (the kernel skips them)."""
    st = TableStats(entries=len(raw_entries))
    lo, hi = text
    buf, base = kt.buf, kt.base
    for addr in raw_entries:
        if addr is None or not lo <= addr < hi:
            st.skipped += 1
            continue
        if buf[addr - base] == 0xF0:
            st.applied += 1
            st.changed += kt.write(".smp_locks", addr, b"\x3e")
    return st
