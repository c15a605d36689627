# SPDX-License-Identifier: GPL-2.0-only
"""What a batch entry may be: the checks of ``__smp_text_poke_batch_add``
on one site (its length, the instruction a CPU emulates while the site is
in flux, the padding after it, its reach from ``_stext``), the decoding
they need (a table for the forms a batch sees all the time, iced-x86 for
the rest), and the checks of the bytes a caller gives any text_poke*.

Pure functions of their arguments and the machine's text ranges; the
batch (:mod:`._batch`) and the plain pokes (:mod:`._textpoke`) use them.
"""

from __future__ import annotations

from .._errors import BadAddressError, BadInstructionError
from ._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, JMP8_INSN_OPCODE, JMP32_INSN_OPCODE,
                    RET_INSN_OPCODE, TEXT_POKE_MAX_OPCODE_SIZE, insn_decode_kernel, is_jcc32,
                    x86_nops)
from ._machine import Machine
from ._types import _S32_MAX, _S32_MIN, SmpTextPokeLoc

__all__ = ["make_loc", "decode_fast", "decode_slow", "describe", "take_bytes"]

#: Opcode forms decoded without iced: first byte -> (length, opcode, immediate size).
_FAST_FORMS = {
    CALL_INSN_OPCODE: (5, CALL_INSN_OPCODE, 4),
    JMP32_INSN_OPCODE: (5, JMP32_INSN_OPCODE, 4),
    JMP8_INSN_OPCODE: (2, JMP8_INSN_OPCODE, 1),
    RET_INSN_OPCODE: (1, RET_INSN_OPCODE, 0),
    INT3_INSN_OPCODE: (1, INT3_INSN_OPCODE, 0),
    **{op: (2, op, 1) for op in range(0x70, 0x80)},
}
_NOP2, _NOP5 = x86_nops[2], x86_nops[5]
_BYTES_LIKE = (bytes, bytearray, memoryview)


def make_loc(machine: Machine, stext: int, addr: int, opcode: bytes, length: int,
             emulate: bytes | None) -> SmpTextPokeLoc:
    """The entry for *opcode* (*length* bytes) at *addr*, by the rules of
    ``__smp_text_poke_batch_add``, as refusals: the site length, the
    instruction a CPU emulates meanwhile (*emulate*, default the new one),
    the INT3 padding after a shorter JMP or RET, the reach from *stext*."""
    if length == 6:
        if not (opcode[0] == 0x0F and 0x80 <= opcode[1] <= 0x8F):
            raise BadInstructionError(
                f"length 6 is reserved for Jcc.d32 (0f 8x), got {opcode.hex(' ')}")
    elif not 1 <= length <= TEXT_POKE_MAX_OPCODE_SIZE:
        raise BadInstructionError(f"site length {length} not in 1..5 (or 6 for Jcc.d32)")
    machine.text_range_of(addr, length)
    rel = addr - stext
    if not _S32_MIN <= rel <= _S32_MAX and not machine.wide_text:
        raise BadAddressError(f"{addr:#x} is beyond ±2 GiB of _stext")
    text = opcode[1:6] if length == 6 else opcode[:length].ljust(5, b"\0")
    emu = opcode if emulate is None else emulate
    op, disp, ilen = decode_fast(emu)
    if op < 0:
        op, disp, ilen = decode_slow(emu, addr)
    if op in (RET_INSN_OPCODE, JMP32_INSN_OPCODE, JMP8_INSN_OPCODE) and emu[:2] != _NOP2:
        if ilen > length:
            raise BadInstructionError(
                f"{describe(emu, addr)} is {ilen} bytes, longer than the site ({length})")
        pad = opcode[ilen:length]
        if pad.count(INT3_INSN_OPCODE) != len(pad):
            raise BadInstructionError(
                f"bytes after {describe(emu, addr)} must be INT3 padding, got {pad.hex(' ')}")
    elif ilen != length:
        raise BadInstructionError(
            f"site length {length} disagrees with {describe(emu, addr)} ({ilen} bytes)")
    return SmpTextPokeLoc(rel, disp, length, op, text)


def decode_fast(emu: bytes) -> tuple[int, int, int]:
    """(opcode, displacement, length) for the few forms a batch sees all
    the time, by table; opcode -1 when iced-x86 has to decide."""
    if not emu:
        raise BadInstructionError("cannot decode an empty instruction")
    form = _FAST_FORMS.get(emu[0])
    if form is not None:
        length, op, isz = form
        if len(emu) < length:
            raise BadInstructionError(f"truncated instruction {emu.hex(' ')}")
        if isz == 4:
            return op, int.from_bytes(emu[1:5], "little", signed=True), length
        if isz == 1:
            return op, int.from_bytes(emu[1:2], "little", signed=True), length
        return op, 0, length
    if emu[:5] == _NOP5 and len(emu) >= 5:
        return JMP32_INSN_OPCODE, 0, 5      # NOP5 behaves as JMP32 +0
    if emu[:2] == _NOP2:
        return JMP8_INSN_OPCODE, 0, 2       # NOP2 behaves as JMP8 +0
    return -1, 0, 0


def decode_slow(emu: bytes, addr: int) -> tuple[int, int, int]:
    """iced-x86 for everything the table does not know; refuses what
    cannot stand in while a site is patched."""
    try:
        insn = insn_decode_kernel(emu, addr)
    except BadInstructionError as e:
        raise BadInstructionError(f"cannot decode the instruction to emulate: {e}") from None
    if is_jcc32(insn):
        return insn.opcode[1] - 0x10, insn.immediate_value, insn.length
    raise BadInstructionError(
        f"cannot emulate {insn.text!r} ({emu[:insn.length].hex(' ')}): only CALL, JMP, Jcc, "
        "RET, INT3 and the kernel's NOP2/NOP5 can stand in while a site is patched")


def describe(emu: bytes, addr: int) -> str:
    try:
        return repr(insn_decode_kernel(emu, addr).text)
    except BadInstructionError:
        return emu.hex(" ")


def take_bytes(opcode: object, length: int | None, name: str, empty_ok: bool = True) -> bytes:
    """*opcode* as bytes, cut to *length*: a TypeError for what is not
    bytes-like, BadInstructionError for a length it does not have (or for
    nothing at all, unless *empty_ok*)."""
    if not isinstance(opcode, _BYTES_LIKE):
        raise TypeError(f"{name} must be a bytes-like object (bytes, bytearray, memoryview), "
                        f"not {type(opcode).__name__}")
    data = bytes(opcode)
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int or None, not {type(length).__name__}")
        if length < 0 or length > len(data):
            raise BadInstructionError(f"length {length} but only {len(data)} {name} bytes given")
        data = data[:length]
    if not data and not empty_ok:
        raise BadInstructionError(f"no {name} bytes to write (an empty poke is refused)")
    return data
