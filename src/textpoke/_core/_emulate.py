# SPDX-License-Identifier: GPL-2.0-only
"""Emulating one control-flow instruction from inside a trap handler.

While a site is being patched its first byte is INT3; the handler makes the
trapping CPU behave as if it had executed the instruction that is being
installed (or the one being removed -- either is correct at that moment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ._insn import CALL_INSN_SIZE, INT3_INSN_SIZE

__all__ = [
    "DataMemory", "PtRegs", "X86_EFLAGS_CF", "X86_EFLAGS_PF", "X86_EFLAGS_ZF",
    "X86_EFLAGS_SF", "X86_EFLAGS_OF", "int3_emulate_push", "int3_emulate_pop",
    "int3_emulate_call", "int3_emulate_jmp", "int3_emulate_jcc", "int3_emulate_ret",
    "jcc_taken",
]

X86_EFLAGS_CF = 1 << 0
X86_EFLAGS_PF = 1 << 2
X86_EFLAGS_ZF = 1 << 6
X86_EFLAGS_SF = 1 << 7
X86_EFLAGS_OF = 1 << 11

_MASK64 = (1 << 64) - 1


class DataMemory(Protocol):
    """Coherent data access to the machine (the stack lives here)."""

    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...


@dataclass(slots=True)
class PtRegs:
    """The registers a trap handler sees and may change (``struct pt_regs``).

    ``ip`` is the address *after* the trapping INT3, as the hardware leaves
    it.  ``gprs`` holds any other registers a backend chooses to expose.
    """

    ip: int
    sp: int
    flags: int
    mem: DataMemory
    cpu: int = 0
    user_mode: bool = False
    gprs: dict[str, int] = field(default_factory=dict)


def int3_emulate_push(regs: PtRegs, val: int) -> None:
    # The trap frame sits below the interrupted stack pointer, so pushing on
    # behalf of the interrupted context writes just below regs.sp.
    regs.sp = (regs.sp - 8) & _MASK64
    regs.mem.write(regs.sp, (val & _MASK64).to_bytes(8, "little"))


def int3_emulate_pop(regs: PtRegs) -> int:
    val = int.from_bytes(regs.mem.read(regs.sp, 8), "little")
    regs.sp = (regs.sp + 8) & _MASK64
    return val


def int3_emulate_jmp(regs: PtRegs, ip: int) -> None:
    regs.ip = ip & _MASK64


def int3_emulate_call(regs: PtRegs, func: int) -> None:
    """CALL from the INT3 at a 5-byte call site: ``regs.ip`` is the trap ip
    (site + 1), so the return address is site + 5."""
    int3_emulate_push(regs, regs.ip - INT3_INSN_SIZE + CALL_INSN_SIZE)
    int3_emulate_jmp(regs, func)


def int3_emulate_ret(regs: PtRegs) -> None:
    int3_emulate_jmp(regs, int3_emulate_pop(regs))


def jcc_taken(flags: int, cc: int) -> bool:
    """Evaluate condition code *cc* (0..15, the low nibble of 0x7X) on RFLAGS."""
    cf = bool(flags & X86_EFLAGS_CF)
    pf = bool(flags & X86_EFLAGS_PF)
    zf = bool(flags & X86_EFLAGS_ZF)
    sf = bool(flags & X86_EFLAGS_SF)
    of = bool(flags & X86_EFLAGS_OF)
    base = cc >> 1
    if base == 0:
        res = of                  # JO
    elif base == 1:
        res = cf                  # JB
    elif base == 2:
        res = zf                  # JE
    elif base == 3:
        res = cf or zf            # JBE
    elif base == 4:
        res = sf                  # JS
    elif base == 5:
        res = pf                  # JP
    elif base == 6:
        res = sf != of            # JL
    else:
        res = zf or (sf != of)    # JLE
    return res != bool(cc & 1)    # odd codes are the negations


def int3_emulate_jcc(regs: PtRegs, cc: int, ip: int, disp: int) -> None:
    """Jcc: *ip* is the address after the site, *disp* the branch offset."""
    if not 0 <= cc <= 15:
        raise ValueError(f"condition code {cc} out of range 0..15")
    if jcc_taken(regs.flags, cc):
        ip += disp
    int3_emulate_jmp(regs, ip)
