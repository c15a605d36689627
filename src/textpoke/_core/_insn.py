# SPDX-License-Identifier: GPL-2.0-only
"""Instruction facts the patcher needs, decoded with iced-x86.

This plays the role of the kernel's ``insn_decode_kernel()``: length, the
opcode bytes, where the immediate and displacement sit, and whether an
operand is RIP-relative.  Everything else about an instruction is left to
iced-x86.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import BadInstructionError

__all__ = [
    "INT3_INSN_OPCODE", "INT3_INSN_SIZE", "CALL_INSN_OPCODE", "CALL_INSN_SIZE",
    "JMP32_INSN_OPCODE", "JMP32_INSN_SIZE", "JMP8_INSN_OPCODE", "JMP8_INSN_SIZE",
    "RET_INSN_OPCODE", "RET_INSN_SIZE", "TEXT_POKE_MAX_OPCODE_SIZE",
    "MAX_PATCH_LEN", "ASM_NOP_MAX", "x86_nops", "Insn", "insn_decode_kernel",
    "text_gen_insn", "is_jcc32", "is_nop",
]

INT3_INSN_OPCODE = 0xCC
INT3_INSN_SIZE = 1
CALL_INSN_OPCODE = 0xE8
CALL_INSN_SIZE = 5
JMP32_INSN_OPCODE = 0xE9
JMP32_INSN_SIZE = 5
JMP8_INSN_OPCODE = 0xEB
JMP8_INSN_SIZE = 2
RET_INSN_OPCODE = 0xC3
RET_INSN_SIZE = 1

TEXT_POKE_MAX_OPCODE_SIZE = 5
MAX_PATCH_LEN = 255 - 1
ASM_NOP_MAX = 11

_NOP8 = bytes.fromhex("0f1f840000000000")
#: The kernel's preferred x86-64 NOPs, indexed by length (index 0 is empty).
x86_nops: tuple[bytes, ...] = (
    b"",
    bytes.fromhex("90"),
    bytes.fromhex("6690"),
    bytes.fromhex("0f1f00"),
    bytes.fromhex("0f1f4000"),
    bytes.fromhex("0f1f440000"),
    bytes.fromhex("660f1f440000"),
    bytes.fromhex("0f1f8000000000"),
    _NOP8,
    b"\x2e" + _NOP8,
    b"\x66\x2e" + _NOP8,
    b"\x66\x66\x2e" + _NOP8,
)

_MAX_INSN = 15


@dataclass(frozen=True, slots=True)
class Insn:
    """One decoded instruction (the subset of ``struct insn`` we use)."""

    addr: int
    length: int
    raw: bytes
    opcode: bytes            # opcode bytes, legacy/REX prefixes stripped
    mnemonic: str
    immediate_offset: int
    immediate_size: int
    immediate_value: int     # sign-extended for relative branches
    displacement_offset: int
    displacement_size: int
    displacement_value: int  # signed
    rip_relative: bool
    flow: str                # "next", "jmp", "jcc", "call", "ret", "int3", "indirect", "other"
    branch_target: int | None

    @property
    def end(self) -> int:
        return self.addr + self.length

    @property
    def text(self) -> str:
        """iced-x86's GAS formatting, for humans (made on demand: it costs
        more than the decode)."""
        ic = _iced()
        ins = ic.Decoder(64, self.raw, ip=self.addr).decode()
        return _FORMATTER.format(ins)


def _sext(value: int, size: int) -> int:
    bits = size * 8
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


# iced-x86 is imported at the first decode, not with the core: a batch of
# the patterns the core's own table knows (CALL/JMP rel32, NOP5, INT3: all
# that 'live toggle' writes) never needs it, and importing it costs more
# than the rest of a one-site toggle's start-up.
_ic = None
_FLOW: dict = {}
_FORMATTER = None
_TABLE_ESCAPE: dict = {}
_MNEMONIC_NAMES: dict = {}


def _iced():
    global _ic, _FORMATTER
    if _ic is None:
        import iced_x86 as ic
        fc = ic.FlowControl
        _FLOW.update({fc.NEXT: "next", fc.UNCONDITIONAL_BRANCH: "jmp",
                      fc.CONDITIONAL_BRANCH: "jcc", fc.CALL: "call", fc.RETURN: "ret",
                      fc.INTERRUPT: "int", fc.INDIRECT_BRANCH: "indirect",
                      fc.INDIRECT_CALL: "indirect", fc.EXCEPTION: "other",
                      fc.XBEGIN_XABORT_XEND: "other"})
        _FORMATTER = ic.Formatter(ic.FormatterSyntax.GAS)
        t = ic.OpCodeTableKind
        _TABLE_ESCAPE.update({t.NORMAL: b"", t.T0F: b"\x0f", t.T0F38: b"\x0f\x38",
                              t.T0F3A: b"\x0f\x3a"})
        _MNEMONIC_NAMES.update({v: k.lower() for k, v in vars(ic.Mnemonic).items()
                                if k.isupper()})
        _ic = ic
    return _ic


def _opcode_bytes(ins) -> bytes:          # an iced_x86.Instruction
    info = ins.op_code()
    esc = _TABLE_ESCAPE.get(info.table)
    if esc is None:  # VEX/EVEX/XOP: the map is implied; report the opcode byte only
        esc = b""
    return esc + info.op_code.to_bytes(info.op_code_len, "big")


def insn_decode_kernel(buf: bytes | bytearray | memoryview, addr: int = 0) -> Insn:
    """Decode the first instruction of *buf* as 64-bit code at *addr*.

    Raises :class:`BadInstructionError` when the bytes do not form a valid
    instruction (the kernel's ``insn_decode_kernel() < 0``).
    """
    data = bytes(buf[:_MAX_INSN])
    if not data:
        raise BadInstructionError("cannot decode an empty buffer")
    ic = _iced()
    dec = ic.Decoder(64, data, ip=addr)
    ins = dec.decode()
    if ins.code == ic.Code.INVALID:
        raise BadInstructionError(f"invalid instruction bytes {data.hex(' ')} at {addr:#x}")
    co = dec.get_constant_offsets(ins)
    raw = data[: ins.len]
    opcode = _opcode_bytes(ins)
    flow = _FLOW.get(ins.flow_control, "other")
    if opcode == b"\xcc":
        flow = "int3"
    target = None
    if ins.is_jcc_short_or_near or ins.is_jmp_short_or_near or ins.is_call_near:
        target = ins.near_branch_target
    imm_val = 0
    if co.has_immediate:
        imm_val = int.from_bytes(raw[co.immediate_offset:co.immediate_offset + co.immediate_size], "little")
        if target is not None:
            imm_val = _sext(imm_val, co.immediate_size)
    disp_val = 0
    if co.has_displacement:
        disp_val = _sext(int.from_bytes(
            raw[co.displacement_offset:co.displacement_offset + co.displacement_size], "little"),
            co.displacement_size)
    return Insn(
        addr=addr, length=ins.len, raw=raw, opcode=bytes(opcode),
        mnemonic=_mnemonic(ins),
        immediate_offset=co.immediate_offset if co.has_immediate else 0,
        immediate_size=co.immediate_size if co.has_immediate else 0,
        immediate_value=imm_val,
        displacement_offset=co.displacement_offset if co.has_displacement else 0,
        displacement_size=co.displacement_size if co.has_displacement else 0,
        displacement_value=disp_val,
        rip_relative=ins.is_ip_rel_memory_operand,
        flow=flow, branch_target=target,
    )


def _mnemonic(ins) -> str:          # an iced_x86.Instruction
    return _MNEMONIC_NAMES.get(ins.mnemonic, "?")


def is_jcc32(insn: Insn) -> bool:
    """Jcc with a 32-bit displacement: 0F 80..8F."""
    return len(insn.opcode) >= 2 and insn.opcode[0] == 0x0F and 0x80 <= insn.opcode[1] <= 0x8F


def is_nop(insn: Insn) -> bool:
    """True NOPs only: 90, 66 90, 0F 1F /0.  PAUSE (F3 90) is not a NOP."""
    if insn.raw[:1] == b"\xf3":
        return False
    return insn.mnemonic == "nop"


def text_gen_insn(opcode: int, addr: int, dest: int) -> bytes:
    """Encode CALL/JMP32/JMP8 at *addr* to *dest* (the kernel's text_gen_insn)."""
    if opcode in (CALL_INSN_OPCODE, JMP32_INSN_OPCODE):
        size = 5
    elif opcode == JMP8_INSN_OPCODE:
        size = 2
    else:
        raise BadInstructionError(f"text_gen_insn cannot encode opcode {opcode:#04x}")
    disp = dest - (addr + size)
    lo, hi = (-(1 << 7), (1 << 7) - 1) if size == 2 else (-(1 << 31), (1 << 31) - 1)
    if not lo <= disp <= hi:
        raise BadInstructionError(
            f"displacement {disp:#x} from {addr:#x} to {dest:#x} does not fit a {size}-byte jump")
    return bytes([opcode]) + disp.to_bytes(size - 1, "little", signed=True)
