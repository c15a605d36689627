# SPDX-License-Identifier: GPL-2.0-only
"""The machine-code pieces every boot pass shares, for the bundled image
and a real kernel alike: opcodes, the fits/rel32/indirect-branch encoders,
the memoised decoder of a scratch buffer and the NOP test.

One copy of each: the passes (``_reloc``, ``_thunks``, ``_apply``,
``_callthunks``, ``_kparavirt``) and the clients' init passes import them
from here.
"""

from __future__ import annotations

from .._core._insn import Insn, _sext, insn_decode_kernel, is_nop as _iced_is_nop
from .._errors import BadInstructionError

__all__ = ["INT3", "CALL", "JMP32", "JMP8", "RET", "NOP1", "LFENCE", "fits", "rel32",
           "emit_indirect", "decode_buf", "is_nop", "signed", "FastInsn", "decode_site"]

INT3 = 0xCC
CALL = 0xE8
JMP32 = 0xE9
JMP8 = 0xEB
RET = 0xC3
NOP1 = 0x90
LFENCE = b"\x0f\xae\xe8"


def fits(v: int, nbytes: int) -> bool:
    """Whether *v* fits a signed field of *nbytes* bytes."""
    b = nbytes * 8
    return -(1 << (b - 1)) <= v < (1 << (b - 1))


def signed(v: int, nbytes: int) -> int:
    """*v* read as a signed field of *nbytes* bytes."""
    return _sext(v, nbytes)


def rel32(op: int, addr: int, dest: int) -> bytes:
    """CALL/JMP rel32 (*op*) at *addr* to *dest*."""
    return bytes([op]) + ((dest - (addr + 5)) & 0xFFFFFFFF).to_bytes(4, "little")


def emit_indirect(op: int, reg: int) -> bytes:
    """``call *%reg`` (*op* CALL) / ``jmp *%reg`` (JMP32): FF /2, FF /4,
    REX.B for r8..r15."""
    modrm = 0xD0 if op == CALL else 0xE0
    return (b"\x41" if reg >= 8 else b"") + bytes([0xFF, modrm + (reg & 7)])


# ------------------------------------------------------------------ decoding
_DECODE_CACHE: dict[bytes, Insn | None] = {}
_BY_RAW: dict[bytes, Insn] = {}
_RAW_LENS: list[int] = []
_MISS = object()


def decode_buf(buf: bytes | bytearray, i: int, limit: int | None = None) -> Insn | None:
    """The instruction at *buf[i]*, decoded at address 0 (memoised: the
    passes meet the same few hundred instructions thousands of times, and
    an :class:`Insn` is immutable).  An instruction's decoding depends on
    its own bytes only, and no instruction's bytes are a proper prefix of
    another's, so an instruction seen once is found again by its bytes
    whatever follows it.  With *limit*, an instruction that would end past
    ``buf[limit]`` does not decode (the kernel's own decoder has no limit)."""
    key = bytes(buf[i:i + 15])
    ins = _DECODE_CACHE.get(key, _MISS)
    if ins is _MISS:
        b0 = key[0] if key else -1
        if (b0 == 0xE8 or b0 == 0xE9) and len(key) >= 5:
            # CALL/JMP rel32: most of what the passes decode (a relocated
            # replacement's displacement is new at every site), built here
            # the way insn_decode_kernel reports it at address 0
            imm = int.from_bytes(key[1:5], "little", signed=True)
            call = b0 == 0xE8
            ins = Insn(0, 5, key[:5], key[:1], "call" if call else "jmp", 1, 4, imm, 0, 0, 0,
                       False, "call" if call else "jmp", (5 + imm) & 0xFFFFFFFFFFFFFFFF)
        else:
            ins = None
            for n in _RAW_LENS:
                ins = _BY_RAW.get(key[:n])
                if ins is not None:
                    break
            else:
                try:
                    ins = insn_decode_kernel(key, 0)
                except BadInstructionError:
                    ins = None
                if len(_DECODE_CACHE) < 200_000:
                    _DECODE_CACHE[key] = ins
                    if ins is not None and ins.raw not in _BY_RAW:
                        _BY_RAW[ins.raw] = ins
                        if ins.length not in _RAW_LENS:
                            _RAW_LENS.append(ins.length)
    if limit is not None and ins is not None and i + ins.length > limit:
        return None
    return ins


def is_nop(ins: Insn, kernel: bool = True) -> bool:
    """A NOP for ``optimize_nops``.  *kernel*: ``insn_is_nop()``'s test
    (opcode 0x90 without REP, or NOPL 0F 1F -- so ``41 90``, an XCHG,
    counts); otherwise true NOPs only (``41 90`` and PAUSE do not)."""
    if not kernel:
        return _iced_is_nop(ins)
    op = ins.opcode
    if op[:1] == b"\x90":
        return ins.raw[:1] != b"\xf3"
    return op[:2] == b"\x0f\x1f"


class FastInsn:
    """The fields of ``struct insn`` the site passes read: length, first
    opcode bytes, immediate, branch target, and the full decode when the
    instruction was not one of the shapes read by hand."""
    __slots__ = ("length", "op1", "op2", "imm", "target", "full")

    def __init__(self, length: int, op1: int, op2: int, imm: int, target: int | None,
                 full: Insn | None = None) -> None:
        self.length, self.op1, self.op2, self.imm, self.target = length, op1, op2, imm, target
        self.full = full

    def text(self) -> str:
        if self.full is not None:
            return self.full.text
        return {CALL: "call", JMP32: "jmp"}.get(self.op1, "j<cc>") + f" {self.target:#x}"


def decode_site(buf: bytes | bytearray, o: int, addr: int) -> FastInsn | None:
    """The instruction at ``buf[o]``, which lives at *addr*: rel32
    CALL/JMP/Jcc (with CS prefixes) by hand -- most of what the passes meet
    --, anything else with the full decoder.  None when it does not decode."""
    n = len(buf)
    p = 0
    while p < 3 and o + p < n and buf[o + p] == 0x2E:
        p += 1
    if o + p + 6 <= n:
        b0 = buf[o + p]
        if b0 == CALL or b0 == JMP32:
            imm = int.from_bytes(buf[o + p + 1:o + p + 5], "little", signed=True)
            ln = p + 5
            return FastInsn(ln, b0, 0, imm, addr + ln + imm)
        if b0 == 0x0F and 0x80 <= buf[o + p + 1] <= 0x8F:
            imm = int.from_bytes(buf[o + p + 2:o + p + 6], "little", signed=True)
            ln = p + 6
            return FastInsn(ln, 0x0F, buf[o + p + 1], imm, addr + ln + imm)
    try:
        ins = insn_decode_kernel(bytes(buf[o:o + 15]), addr)
    except BadInstructionError:
        return None
    op = ins.opcode
    return FastInsn(ins.length, op[0], op[1] if len(op) > 1 else 0,
                    ins.immediate_value, ins.branch_target, ins)
