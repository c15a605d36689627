# SPDX-License-Identifier: GPL-2.0-only
"""Byte-level fix-ups applied to a replacement block before it is written.

Boot-time patching (``apply_alternatives``), ftrace trampolines and the BPF
JIT all copy machine code that was assembled at one address (``repl``) to
another (``instr``).  Relative operands in that copy must then be adjusted so
that whatever they point at *outside* the copied block is still reached;
references inside the block move with it and need nothing.  Afterwards the
copy is tidied: runs of NOPs become as few instructions as possible.

This mirrors ``__apply_relocation()``, ``optimize_nops()`` and ``add_nop()``
in ``arch/x86/kernel/alternative.c``.  The rules were read from the kernel;
the code is our own.  Where the kernel would ``BUG()`` (a displacement that
no longer fits its field) we raise :class:`BadInstructionError` and leave the
caller's buffer exactly as it was.

Naming follows the kernel: ``instr`` is where the bytes will live, ``repl``
is where they were assembled, ``buf`` is the scratch copy being fixed.
"""

from __future__ import annotations

from .._errors import BadInstructionError
from .._core._insn import (ASM_NOP_MAX, INT3_INSN_OPCODE, JMP8_INSN_OPCODE,
                    JMP8_INSN_SIZE, JMP32_INSN_OPCODE, JMP32_INSN_SIZE, Insn, _sext,
                    insn_decode_kernel, is_nop, x86_nops)

__all__ = ["text_poke_apply_relocation", "optimize_nops", "add_nop"]

# A JMP8 over INT3 padding can skip at most this many bytes (rel8 of +125
# plus the two bytes of the jump itself still fits in a signed byte).
_JMP8_FILL_MAX = 127


def _fits(value: int, nbytes: int) -> bool:
    bits = nbytes * 8
    return -(1 << (bits - 1)) <= value < (1 << (bits - 1))


def _put(buf: bytearray, at: int, nbytes: int, value: int) -> None:
    buf[at:at + nbytes] = value.to_bytes(nbytes, "little", signed=True)


def _check_range(buf: bytearray, length: int, what: str) -> None:
    if length < 0 or length > len(buf):
        raise BadInstructionError(
            f"{what}: length {length} outside a buffer of {len(buf)} bytes")


# --------------------------------------------------------------------------
# NOP handling
# --------------------------------------------------------------------------

def add_nop(buf: bytearray, offset: int, length: int) -> None:
    """Fill ``buf[offset:offset+length]`` with one effective instruction.

    Up to ``ASM_NOP_MAX`` bytes this is the single longest kernel NOP of that
    length.  A longer hole is not worth executing NOP by NOP, so (as the
    kernel's ``add_nop()`` does since it replaced the old ``add_nops()``
    chain of NOPs) a jump to the end of the hole is emitted -- JMP8 while the
    distance fits a signed byte, JMP32 otherwise -- and the bytes it skips
    become INT3, which traps if anything ever lands in the middle.
    """
    if length < 0 or offset < 0 or offset + length > len(buf):
        raise BadInstructionError(
            f"add_nop: [{offset}, {offset + length}) outside a buffer of {len(buf)} bytes")
    if length == 0:
        return
    if length <= ASM_NOP_MAX:
        buf[offset:offset + length] = x86_nops[length]
        return
    if length <= _JMP8_FILL_MAX:
        jmp = bytes([JMP8_INSN_OPCODE, length - JMP8_INSN_SIZE])
    else:
        jmp = bytes([JMP32_INSN_OPCODE]) + (length - JMP32_INSN_SIZE).to_bytes(4, "little")
    buf[offset:offset + length] = jmp + bytes([INT3_INSN_OPCODE]) * (length - len(jmp))


def _decode(buf: bytearray, off: int, limit: int, addr: int) -> Insn | None:
    """Decode at *off* without looking past *limit*; None when the bytes do
    not form a whole instruction inside the limit."""
    try:
        return insn_decode_kernel(bytes(buf[off:limit]), addr)
    except BadInstructionError:
        return None


def _skip_nops(buf: bytearray, offset: int, length: int, addr: int) -> int:
    """Offset of the first byte at or after *offset* that does not start a NOP."""
    while offset < length:
        insn = _decode(buf, offset, length, addr + offset)
        if insn is None or not is_nop(insn):
            break
        offset += insn.length
    return offset


def optimize_nops(instr: int, buf: bytearray, length: int) -> None:
    """Rewrite every run of NOPs in ``buf[:length]`` with :func:`add_nop`.

    Only real NOPs count (``is_nop``: 90, 66 90, NOPL 0F 1F /0 ...): PAUSE
    (F3 90) is a spin-loop hint with its own timing and is kept.  Like the
    kernel, a lone NOP that already ends the buffer is taken as "done" and
    the scan stops there, and an undecodable byte ends the scan quietly --
    this is an optimisation, never a reason to refuse.  *instr* is the
    address the bytes are destined for; it only labels the decode.
    """
    _check_range(buf, length, "optimize_nops")
    i = 0
    while i < length:
        insn = _decode(buf, i, length, instr + i)
        if insn is None:
            return
        nxt = i + insn.length
        if is_nop(insn):
            if nxt == length:
                return
            nxt = _skip_nops(buf, nxt, length, instr)
            add_nop(buf, i, nxt - i)
        i = nxt


# --------------------------------------------------------------------------
# Relocation
# --------------------------------------------------------------------------

def _rel_branch_target(insn: Insn) -> int | None:
    """Absolute target of a relative branch, or None for anything else.

    Jcc.d8/d32, JMP8/32 and CALL rel32 are the kernel's set.  LOOP/LOOPcc/
    JrCXZ (E0..E3) are rel8 branches too; the kernel skips them (they never
    appear in alternatives) but a copy that moved them would silently jump
    elsewhere, so they are treated like Jcc.d8 here.
    """
    if insn.branch_target is not None:
        return insn.branch_target
    if insn.opcode[:1] and 0xE0 <= insn.opcode[0] <= 0xE3 and insn.immediate_size:
        return insn.end + _sext(insn.immediate_value, insn.immediate_size)
    return None


def _outside(target: int, repl: int, repl_len: int) -> bool:
    # The end of the block counts as inside: "jmp 1f" with "1:" right after
    # the replacement means "skip the rest of me" and must stay relative.
    return target < repl or target > repl + repl_len


def _relocate_field(buf: bytearray, base: int, field_off: int, nbytes: int, old: int,
                    diff: int, insn: Insn, what: str) -> int:
    new = old + diff
    if not _fits(new, nbytes):
        raise BadInstructionError(
            f"relocating '{insn.text}' at +{base:#x} ({insn.raw.hex(' ')}): {what} "
            f"{old:#x} + {diff:#x} = {new:#x} does not fit {nbytes} byte(s)")
    _put(buf, base + field_off, nbytes, new)
    return new


def _shrink_jmp32(buf: bytearray, off: int, insn: Insn, disp: int) -> None:
    """Turn a (possibly prefixed) JMP rel32 at *off* into JMP8 + INT3 padding
    when its target, measured from the end of a 2-byte jump, fits rel8.

    The kernel does this inline in ``__apply_relocation()``.  Our
    adjustment uses the instruction's real length, so a prefixed E9 (e.g.
    ``2e e9``) keeps its target as well.
    """
    short = disp + insn.length - JMP8_INSN_SIZE
    if _fits(short, 1):
        buf[off:off + insn.length] = (bytes([JMP8_INSN_OPCODE, short & 0xFF])
                                      + bytes([INT3_INSN_OPCODE]) * (insn.length - JMP8_INSN_SIZE))


def _apply_relocation(buf: bytearray, instr: int, repl: int, repl_len: int) -> None:
    diff = repl - instr
    i = 0
    while i < repl_len:
        # Decode as if at the assembly address, so that targets come out in
        # the block's own frame and can be compared with [repl, repl+len].
        insn = _decode(buf, i, repl_len, repl + i)
        if insn is None:
            raise BadInstructionError(
                f"relocation: cannot decode a whole instruction at +{i:#x} of the "
                f"{repl_len}-byte block ({bytes(buf[i:min(i + 15, repl_len)]).hex(' ')})")
        target = _rel_branch_target(insn)
        if target is not None:
            disp = _sext(insn.immediate_value, insn.immediate_size)
            if _outside(target, repl, repl_len):
                disp = _relocate_field(buf, i, insn.immediate_offset, insn.immediate_size,
                                       disp, diff, insn, "branch displacement")
            if insn.opcode == bytes([JMP32_INSN_OPCODE]):
                _shrink_jmp32(buf, i, insn, disp)
        elif insn.rip_relative:
            target = insn.end + insn.displacement_value
            if _outside(target, repl, repl_len):
                _relocate_field(buf, i, insn.displacement_offset, insn.displacement_size,
                                insn.displacement_value, diff, insn, "RIP-relative displacement")
        i = insn.end - repl


def text_poke_apply_relocation(buf: bytearray, instr: int, instrlen: int,
                               repl: int, repl_len: int) -> None:
    """Fix a copy of a replacement block so it runs correctly at *instr*.

    ``buf[:repl_len]`` holds the bytes assembled at *repl*; ``buf[:instrlen]``
    is what will be written at *instr* (the caller pads the tail, normally
    with NOPs).  For every relative branch (Jcc, JMP, CALL) and RIP-relative
    memory operand whose target lies outside ``[repl, repl + repl_len]`` the
    displacement grows by ``repl - instr``, so the absolute target stays put.
    A JMP32 whose new target is in rel8 reach becomes JMP8 + INT3s.  Then
    :func:`optimize_nops` runs over ``buf[:instrlen]``.

    Raises :class:`BadInstructionError` -- with *buf* unchanged -- when a
    displacement no longer fits its field, when the block does not decode
    into whole instructions, or when the block is longer than the site.
    """
    if repl_len < 0 or instrlen < 0:
        raise BadInstructionError("relocation: negative length")
    if repl_len > instrlen:
        raise BadInstructionError(
            f"relocation: replacement of {repl_len} bytes does not fit a {instrlen}-byte site")
    _check_range(buf, instrlen, "text_poke_apply_relocation")
    work = bytearray(buf[:instrlen])
    _apply_relocation(work, instr, repl, repl_len)
    optimize_nops(instr, work, instrlen)
    buf[:instrlen] = work
