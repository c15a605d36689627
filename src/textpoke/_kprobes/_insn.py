# SPDX-License-Identifier: GPL-2.0-only
"""What kprobes needs to know about one instruction: how to run it while
its first byte is an INT3 (emulate it, or execute a copy out of line),
whether a copy may jump straight back ("boost"), and how to move it.

Rules learnt from ``arch/x86/kernel/kprobes/core.c`` (Linux 6.12:
``prepare_emulation``, ``can_boost``, ``__copy_instruction``); the code is
our own.
"""

from __future__ import annotations

from dataclasses import dataclass

import iced_x86

from .._core._emulate import (PtRegs, X86_EFLAGS_ZF, int3_emulate_jcc, int3_emulate_jmp,
                              int3_emulate_pop, int3_emulate_push)
from .._core._insn import Insn

__all__ = ["Emulation", "prepare_emulation", "can_boost", "is_exception_insn", "relocate",
           "EFLAGS_IF", "GPR_OF"]

EFLAGS_IF = 1 << 9
_MASK64 = (1 << 64) - 1
_R = iced_x86.Register
#: iced-x86 64-bit registers -> PtRegs.gprs names
GPR_OF = {_R.RAX: "rax", _R.RBX: "rbx", _R.RCX: "rcx", _R.RDX: "rdx", _R.RSI: "rsi",
          _R.RDI: "rdi", _R.RBP: "rbp", _R.R8: "r8", _R.R9: "r9", _R.R10: "r10",
          _R.R11: "r11", _R.R12: "r12", _R.R13: "r13", _R.R14: "r14", _R.R15: "r15"}


def _s(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


@dataclass(frozen=True, slots=True)
class Emulation:
    """How the INT3 handler performs an instruction instead of running it."""

    kind: str            # call, jmp, jcc, ret, loop, call_ind, jmp_ind, cli, sti
    addr: int
    length: int
    target: int = 0      # call/jmp/jcc target
    cc: int = 0          # jcc condition / loop type
    imm: int = 0         # ret imm16
    reg: str = ""        # indirect register

    def __call__(self, regs: PtRegs) -> None:
        nxt = self.addr + self.length
        k = self.kind
        if k == "call":
            int3_emulate_push(regs, nxt)
            int3_emulate_jmp(regs, self.target)
        elif k == "jmp":
            int3_emulate_jmp(regs, self.target)
        elif k == "jcc":
            int3_emulate_jcc(regs, self.cc, nxt, self.target - nxt)
        elif k == "ret":
            ip = int3_emulate_pop(regs)
            regs.sp = (regs.sp + self.imm) & _MASK64
            int3_emulate_jmp(regs, ip)
        elif k == "call_ind":
            dest = regs.gprs[self.reg]
            int3_emulate_push(regs, nxt)
            int3_emulate_jmp(regs, dest)
        elif k == "jmp_ind":
            int3_emulate_jmp(regs, regs.gprs[self.reg])
        elif k == "loop":
            rcx = regs.gprs["rcx"]
            if self.cc == 3:                        # JRCXZ
                taken = rcx == 0
            else:
                rcx = (rcx - 1) & _MASK64
                regs.gprs["rcx"] = rcx
                taken = rcx != 0
                zf = bool(regs.flags & X86_EFLAGS_ZF)
                if self.cc == 0:                    # LOOPNE
                    taken = taken and not zf
                elif self.cc == 1:                  # LOOPE
                    taken = taken and zf
            int3_emulate_jmp(regs, self.target if taken else nxt)
        elif k == "cli":
            regs.flags &= ~EFLAGS_IF
            int3_emulate_jmp(regs, nxt)
        elif k == "sti":
            regs.flags |= EFLAGS_IF
            int3_emulate_jmp(regs, nxt)
        else:  # pragma: no cover - prepare_emulation makes no other kind
            raise AssertionError(k)


def _iced(insn: Insn) -> "iced_x86.Instruction":
    return iced_x86.Decoder(64, insn.raw, ip=insn.addr).decode()


_LEGACY = frozenset((0x66, 0x67, 0x2E, 0x3E, 0x26, 0x64, 0x65, 0x36, 0xF0, 0xF2, 0xF3))


def _prefix_len(raw: bytes) -> int:
    """Legacy prefixes, then REX."""
    i = 0
    while i < len(raw) and raw[i] in _LEGACY:
        i += 1
    if i < len(raw) and 0x40 <= raw[i] <= 0x4F:
        i += 1
    return i


def _modrm_reg(insn: Insn) -> int:
    """The reg field of the ModRM byte (the group-opcode extension)."""
    return (insn.raw[_prefix_len(insn.raw) + len(insn.opcode)] >> 3) & 7


def prepare_emulation(insn: Insn) -> "Emulation | None | str":
    """An :class:`Emulation` for the instructions the kernel emulates, None
    for those executed out of line, or a string saying why the instruction
    cannot be probed at all."""
    op = insn.opcode
    b0 = op[0]
    a, n = insn.addr, insn.length
    if b0 in (0xCC, 0xCD, 0xCE):
        return "a software interrupt (INT3/INT n/INTO) cannot be probed"
    if b0 == 0xCF:
        return "IRET cannot be probed"
    if b0 in (0x9A, 0xEA):
        return "far CALL/JMP is not supported"
    if b0 == 0xFA:
        return Emulation("cli", a, n)
    if b0 == 0xFB:
        return Emulation("sti", a, n)
    if b0 in (0xC2, 0xC3):
        return Emulation("ret", a, n, imm=insn.immediate_value if b0 == 0xC2 else 0)
    if b0 in (0xCA, 0xCB):
        return "far RET is not supported"
    if b0 == 0xE8:
        return Emulation("call", a, n, target=insn.branch_target)
    if b0 in (0xE9, 0xEB):
        return Emulation("jmp", a, n, target=insn.branch_target)
    if 0x70 <= b0 <= 0x7F:
        return Emulation("jcc", a, n, target=insn.branch_target, cc=b0 & 0xF)
    if b0 == 0x0F and len(op) >= 2:
        if 0x80 <= op[1] <= 0x8F:
            return Emulation("jcc", a, n, target=insn.branch_target, cc=op[1] & 0xF)
        return None
    if 0xE0 <= b0 <= 0xE3:
        ins = _iced(insn)
        return Emulation("loop", a, n, target=ins.near_branch_target, cc=b0 & 3)
    if b0 == 0xFF:
        ins = _iced(insn)
        reg = _modrm_reg(insn)
        if reg in (3, 5):
            return "far indirect CALL/JMP is not supported"
        if reg in (2, 4):
            if ins.op0_kind != iced_x86.OpKind.REGISTER or ins.op0_register not in GPR_OF:
                return "indirect CALL/JMP through memory is not supported (as in the kernel)"
            return Emulation("call_ind" if reg == 2 else "jmp_ind", a, n,
                             reg=GPR_OF[ins.op0_register])
    return None


def _rows(*rows: str) -> frozenset[int]:
    """A 256-entry opcode bitmap written as 16 rows of 16 '0'/'1'."""
    bits = "".join(r.replace(" ", "") for r in rows)
    assert len(bits) == 256
    return frozenset(i for i, c in enumerate(bits) if c == "1")


#: two-byte opcodes (0F xx) whose copy may jump straight back, as 6.12's
#: bitmap has them, one row per high nibble (x0 .. xf left to right).
#: In the 0x row only LAR, LSL, CLTS, INVD and WBINVD; NOP (1F); MOV to and
#: from CR/DR (20-23); RDTSC (31); CMOVcc, SETcc, BT/BTS/BTR/BTC, SHLD/SHRD,
#: CMPXCHG, XADD, BSWAP, MOVZX/MOVSX and much of MMX/SSE.  Out: Jcc (8x),
#: the bit-test group 0F BA, CMPXCHG8B/16B (C7), the SSE moves of the 1x,
#: 2x and 5x rows, the three-byte escapes 38/3A, and the gaps of Dx-Fx.
_TWOBYTE_BOOST = _rows(
    "0011 0010 1100 0000",   # 0x
    "0000 0000 0000 0001",   # 1x
    "1111 0000 0000 0000",   # 2x
    "0100 0000 0000 0000",   # 3x
    "1111 1111 1111 1111",   # 4x
    "0000 0000 0000 0000",   # 5x
    "1111 1111 1111 0011",   # 6x
    "0000 1111 0000 0011",   # 7x
    "0000 0000 0000 0000",   # 8x
    "1111 1111 1111 1111",   # 9x
    "1101 1100 1101 1101",   # Ax
    "1111 1111 0001 1111",   # Bx
    "1100 0000 1111 1111",   # Cx
    "0111 0100 1101 1101",   # Dx
    "0110 0100 1101 1101",   # Ex
    "0111 0100 1110 1110",   # Fx
)


def is_exception_insn(insn: Insn) -> bool:
    """UD0/UD1/UD2 and INT3/INT n/INTO/INT1: the kernel never probes them
    (they trap by design, and the trap handlers expect them in place)."""
    op = insn.opcode
    if op[0] == 0x0F:
        return len(op) >= 2 and op[1] in (0xFF, 0xB9, 0x0B)
    return op[0] in (0xCC, 0xCD, 0xCE, 0xF1)


def can_boost(insn: Insn) -> bool:
    """Whether a copy of *insn* can run with a JMP back after it (no trap),
    which is also what may be displaced into an optimised probe's detour.
    (The kernel also refuses an instruction with an exception-table entry;
    the images here carry no ``__ex_table``.)"""
    op = insn.opcode
    if len(op) == 2 and op[0] == 0x0F:
        return op[1] in _TWOBYTE_BOOST
    if len(op) != 1:
        return False
    # prefixes: CS override and address-size override make it unboostable;
    # LOCK, REP and the others do not
    prefixes = insn.raw[:_prefix_len(insn.raw)]
    if 0x2E in prefixes or 0x67 in prefixes:
        return False
    b0 = op[0]
    if b0 == 0x62 or 0x70 <= b0 <= 0x7F or b0 == 0x9A or 0xCC <= b0 <= 0xCE or b0 == 0xD6 \
            or 0xD8 <= b0 <= 0xDF or 0xE0 <= b0 <= 0xE3 or b0 in (0xE8, 0xE9, 0xEB) \
            or 0xF0 <= b0 <= 0xF4:
        return False
    if b0 in (0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3, 0xF6, 0xF7, 0xFE, 0xFF):
        reg = _modrm_reg(insn)
        if b0 in (0xF6, 0xF7):
            return reg != 1
        if b0 == 0xFE:
            return reg in (0, 1)
        if b0 == 0xFF:
            return reg in (0, 1, 4)
        return reg != 6
    return True


def relocate(insn: Insn, dest: int) -> bytes:
    """The bytes of *insn* to run at *dest*: a RIP-relative displacement is
    re-targeted so that it reaches the same data.  ValueError when the new
    displacement does not fit 32 bits."""
    raw = bytearray(insn.raw)
    if insn.rip_relative:
        target = insn.addr + insn.length + insn.displacement_value
        new = target - (dest + insn.length)
        if not -(1 << 31) <= new < (1 << 31):
            raise ValueError(f"RIP-relative operand of the instruction at {insn.addr:#x} cannot "
                             f"reach {target:#x} from {dest:#x}")
        o = insn.displacement_offset
        raw[o:o + 4] = new.to_bytes(4, "little", signed=True)
    return bytes(raw)
