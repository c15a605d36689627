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

__all__ = ["Emulation", "prepare_emulation", "can_boost", "relocate", "EFLAGS_IF", "GPR_OF"]

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


#: two-byte opcodes (0F xx) whose copy may jump straight back
_TWOBYTE_BOOST = set(range(0x40, 0x50)) | set(range(0x90, 0xA0)) | {
    0x1F, 0xA3, 0xAB, 0xAF, 0xB3, 0xB6, 0xB7, 0xBA, 0xBB, 0xBC, 0xBD, 0xBE, 0xBF, 0xC8,
    0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF}


def can_boost(insn: Insn) -> bool:
    """Whether a copy of *insn* can run with a JMP back after it (no trap),
    which is also what may be displaced into an optimised probe's detour."""
    op = insn.opcode
    if len(op) == 2 and op[0] == 0x0F:
        return op[1] in _TWOBYTE_BOOST
    if len(op) != 1:
        return False
    prefixes = insn.raw[:_prefix_len(insn.raw)]
    if 0x2E in prefixes or 0x67 in prefixes:
        return False
    b0 = op[0]
    if b0 == 0x62 or 0x70 <= b0 <= 0x7F or b0 == 0x9A or 0xCC <= b0 <= 0xCE or b0 == 0xD6 \
            or 0xD8 <= b0 <= 0xDF or 0xE0 <= b0 <= 0xE3 or b0 in (0xE8, 0xE9, 0xEB) \
            or 0xF0 <= b0 <= 0xF4:
        return False
    if b0 in (0xF0, 0xF2, 0xF3):
        return False
    if 0xF0 in prefixes:           # LOCK
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
