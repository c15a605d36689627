# SPDX-License-Identifier: GPL-2.0-only
"""``apply_retpolines`` over a real kernel's flat memory (Linux 6.12 with
the ITS backports): plain indirect branches, the LFENCE variant, the
call-depth thunk arrays, and ITS thunks for branches that would end in the
lower half of a cache line.  Rules learnt from
``arch/x86/kernel/alternative.c``; the code is our own."""

from __future__ import annotations

from typing import Callable

from ._code import CALL, INT3, JMP32, LFENCE, NOP1, emit_indirect, rel32
from ._kpasses import (F_CALL_DEPTH, F_INDIRECT_THUNK_ITS, F_RETPOLINE, F_RETPOLINE_LFENCE,
                       ITS_THUNK_SIZE, RETPOLINE_THUNK_SIZE, BootOptions, FastInsn, TableStats,
                       fast_decode)
from ._reloc import nops_pass
from ._ktext import CpuCaps, KernelBootError, KernelText

__all__ = ["ItsThunks", "apply_retpolines_k"]


# -------------------------------------------------------------- retpolines
class ItsThunks:
    """``its_allocate_thunk()``: ``jmp *%reg; int3`` thunks handed out in
    the upper half of 64-byte lines of pages from *pages* (in order); with
    no pages, the static ``__x86_indirect_its_thunk_array``."""

    def __init__(self, kt: KernelText, pages: list[int]) -> None:
        self.kt = kt
        self.pages = list(pages)
        self.page: int | None = None
        self.off = 0
        self.allocated: list[tuple[int, int]] = []      # (address, reg)

    def get(self, reg: int) -> int:
        size = 3 + reg // 8
        if self.page is None or self.off + size - 1 >= 4096:
            if not self.pages:
                return self.kt.sym("__x86_indirect_its_thunk_array") + ITS_THUNK_SIZE * reg
            self.page = self.pages.pop(0)
            self.off = 32
        if (self.off + size - 1) % 64 < 32:
            self.off = ((self.off - 1) | 0x3F) + 33
        a = self.page + self.off
        self.off += size
        self.allocated.append((a, reg))
        return a


def _emit_trampoline(addr: int, ins: FastInsn, call_dest: int, jmp_dest: int) -> bytes | None:
    out = bytearray()
    op = ins.op1
    if op == 0x0F:
        # Jcc.d32 to a thunk: the same condition, to the new destination
        out = bytearray([0x0F, ins.op2]) + ((jmp_dest - (addr + 6)) & 0xFFFFFFFF).to_bytes(4, "little")
        return bytes(out) if len(out) == ins.length else None
    if ins.length == 6:
        out.append(0x2E)
    i = len(out)
    if op == CALL:
        out += rel32(CALL, addr + i, call_dest)
    elif op == JMP32:
        out += rel32(JMP32, addr + i, jmp_dest)
    else:
        return None
    return bytes(out)


def apply_retpolines_k(kt: KernelText, sites: list[int], caps: CpuCaps, opts: BootOptions,
                       its: ItsThunks, dbg: Callable[[str], None] | None = None) -> TableStats:
    st = TableStats(entries=len(sites))
    array = kt.sym("__x86_indirect_thunk_array")
    call_arr = kt.opt("__x86_indirect_call_thunk_array")
    jump_arr = kt.opt("__x86_indirect_jump_thunk_array")
    retpoline = caps.has(F_RETPOLINE)
    lfence = caps.has(F_RETPOLINE_LFENCE)
    depth = caps.has(F_CALL_DEPTH)
    its_on = caps.has(F_INDIRECT_THUNK_ITS)
    for addr in sites:
        ins = fast_decode(kt, addr)
        if ins is None:
            st.skipped += 1
            st.note("undecodable")
            continue
        if not (ins.op1 in (CALL, JMP32) or (ins.op1 == 0x0F and 0x80 <= ins.op2 <= 0x8F)):
            st.skipped += 1
            st.note("not CALL/JMP/Jcc.d32")
            continue
        reg_off = ins.target - array
        if reg_off % RETPOLINE_THUNK_SIZE or not 0 <= reg_off < 16 * RETPOLINE_THUNK_SIZE:
            st.skipped += 1
            st.note("not a retpoline thunk")
            continue
        reg = reg_off // RETPOLINE_THUNK_SIZE
        if reg == 4:
            raise KernelBootError(f"retpoline site {kt.describe(addr)}: indirect branch via %rsp")
        if dbg:
            dbg(f"retpoline at: {kt.describe(addr)} ({addr:#x}) len: {ins.length} to: "
                f"{kt.describe(ins.target)}")
        new: bytes | None
        if retpoline and not lfence:
            if not depth:
                continue
            new = _emit_trampoline(addr, ins, call_arr + RETPOLINE_THUNK_SIZE * reg,
                                   jump_arr + RETPOLINE_THUNK_SIZE * reg)
        else:
            out = bytearray()
            op = ins.op1
            if op == 0x0F:
                out += bytes([0x70 + ((ins.op2 & 0xF) ^ 1), ins.length - 2])
                op = JMP32
            if lfence:
                out += LFENCE
            if its_on and not (addr + len(out) + 1 + reg // 8) & 0x20:
                th = its.get(reg)
                new = _emit_trampoline(addr, ins, th, th)
            else:
                out += emit_indirect(op, reg)
                if op == JMP32 and len(out) < ins.length:
                    out.append(INT3)
                while len(out) < ins.length:
                    out.append(NOP1)
                new = bytes(out)
        if new is None or len(new) != ins.length:
            st.skipped += 1
            st.note("does not fit")
            continue
        b = bytearray(new)
        nops_pass(b, len(b), kt.line)
        if dbg:
            dbg(f"{addr:#x}: orig: {kt.read(addr, ins.length).hex(' ')}")
            dbg(f"{addr:#x}: repl: {bytes(b).hex(' ')}")
        st.applied += 1
        st.changed += kt.write(".retpoline_sites", addr, bytes(b))
    return st


