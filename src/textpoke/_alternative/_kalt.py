# SPDX-License-Identifier: GPL-2.0-only
"""``apply_alternatives`` (6.12's, incl. ``ALT_FLAG_DIRECT_CALL``, and 6.1's
CALL/JMP-only fix-ups, as the image's kernel line says), ``apply_seal_endbr``
and the uniprocessor ``alternatives_smp_unlock`` over a real kernel's flat
memory (Linux 6.12 and 6.1).  Rules learnt from ``arch/x86/kernel/alternative.c``;
the code is our own."""

from __future__ import annotations

from typing import Callable

from ..images._tables_real import ALT_FLAG_DIRECT_CALL, ALT_FLAG_NOT, RealAltInstr
from .._core._insn import x86_nops
from .._errors import BadInstructionError
from ._code import CALL, JMP8, JMP32, NOP1
from ._kpasses import TableStats
from ._reloc import apply_relocation, nops_pass
from ._ktext import CpuCaps, KernelBootError, KernelText

__all__ = ["apply_alternatives_k", "smp_unlock_k"]


# ------------------------------------------------------------ alternatives
def apply_alternatives_k(kt: KernelText, entries: list[RealAltInstr], caps: CpuCaps,
                         dbg: Callable[[str], None] | None = None) -> TableStats:
    if kt.line.alt_fixup == "call_jmp":
        return _apply_alternatives_call_jmp(kt, entries, caps, dbg)
    st = TableStats(entries=len(entries))
    lens = [e.instrlen for e in entries]
    i = 0
    while i < len(entries) and kt.line.alt_shared_len:
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
    ncap = kt.line.ncaps * 32
    for a, instrlen in zip(entries, lens):
        if instrlen > 254:
            raise KernelBootError(f".altinstructions {a.index}: instrlen {instrlen} > 254")
        if a.cpuid >= ncap:
            raise KernelBootError(f".altinstructions {a.index}: cpuid {a.cpuid} out of range")
        o = a.instr - base
        taken = caps.has_bit(a.cpuid) != bool(a.flags & ALT_FLAG_NOT)
        if not taken:
            b = bytearray(buf[o:o + instrlen + 16])
            nops_pass(b, instrlen, kt.line)
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
        try:
            apply_relocation(b, a.instr, instrlen, a.repl, a.replacementlen, kt.line)
        except BadInstructionError as e:
            raise KernelBootError(f".altinstructions {a.index} at {a.instr:#x}: {e}") from None
        new = bytes(b[:instrlen])
        if dbg:
            dbg(f"{a.instr:#x}:   old_insn: {bytes(buf[o:o + instrlen]).hex(' ')}")
            dbg(f"{a.repl:#x}:   rpl_insn: {bytes(buf[ro:ro + a.replacementlen]).hex(' ')}")
            dbg(f"{a.instr:#x}: final_insn: {new.hex(' ')}")
        st.applied += 1
        st.changed += kt.write(".altinstructions", a.instr, new)
    return st


def _recompute_jump(b: bytearray, instr: int, repl: int) -> None:
    """6.1's ``recompute_jump``: a 5-byte JMP replacement aimed from the
    site; the 2-byte form when the target lies ahead within reach (then a
    3-byte NOP), else JMP rel32 (behind the site always takes rel32)."""
    o_dspl = int.from_bytes(b[1:5], "little", signed=True)
    n_dspl = repl + 5 + o_dspl - instr
    if n_dspl >= 0 and n_dspl - 2 <= 127:
        b[0] = JMP8
        b[1] = (n_dspl - 2) & 0xFF
        b[2:5] = x86_nops[3]
    else:
        b[0] = JMP32
        b[1:5] = ((n_dspl - 5) & 0xFFFFFFFF).to_bytes(4, "little")


def _apply_alternatives_call_jmp(kt: KernelText, entries: list[RealAltInstr], caps: CpuCaps,
                                 dbg: Callable[[str], None] | None) -> TableStats:
    """``apply_alternatives`` of a line without replacement relocation
    (6.1): each entry on its own length; a 5-byte CALL gets its displacement
    moved by (replacement - site), a 5-byte JMP is recomputed, the rest of
    the site is 0x90; then, applied or not, ``optimize_nops`` runs over the
    site in place."""
    st = TableStats(entries=len(entries))
    buf, base = kt.buf, kt.base
    ncap = kt.line.ncaps * 32
    line = kt.line
    for a in entries:
        instrlen = a.instrlen
        if instrlen > 254:
            raise KernelBootError(f".altinstructions {a.index}: instrlen {instrlen} > 254")
        if a.cpuid >= ncap:
            raise KernelBootError(f".altinstructions {a.index}: cpuid {a.cpuid} out of range")
        o = a.instr - base
        taken = caps.has_bit(a.cpuid) != bool(a.flags & ALT_FLAG_NOT)
        if taken:
            if dbg:
                dbg(f"feat: {'!' if a.flags & ALT_FLAG_NOT else ''}{a.cpuid >> 5}*32+"
                    f"{a.cpuid & 31}, old: ({kt.describe(a.instr)} ({a.instr:#x}) len: "
                    f"{instrlen}), repl: ({a.repl:#x}, len: {a.replacementlen})")
            ro = a.repl - base
            rlen = a.replacementlen
            b = bytearray(buf[ro:ro + rlen])
            if rlen == 5 and b[0] == CALL:
                v = int.from_bytes(b[1:5], "little", signed=True) + (a.repl - a.instr)
                b[1:5] = (v & 0xFFFFFFFF).to_bytes(4, "little")
            if rlen == 5 and buf[ro] in (JMP8, JMP32):
                _recompute_jump(b, a.instr, a.repl)
            b += bytes([NOP1]) * (instrlen - rlen)
            st.applied += 1
            if kt.write(".altinstructions", a.instr, bytes(b)):
                st.changed += 1
            if dbg:
                dbg(f"{a.instr:#x}: final_insn: {bytes(b).hex(' ')}")
        w = bytearray(buf[o:o + instrlen + 16])
        nops_pass(w, instrlen, line)
        if kt.write(".altinstructions", a.instr, bytes(w[:instrlen])) and not taken:
            st.changed += 1
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
