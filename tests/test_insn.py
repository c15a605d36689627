# SPDX-License-Identifier: GPL-2.0-only
"""The decoder, the NOP table and text_gen_insn."""

import iced_x86
import pytest
from hypothesis import given
from hypothesis import strategies as st

from textpoke import (ASM_NOP_MAX, CALL_INSN_OPCODE, JMP8_INSN_OPCODE, JMP32_INSN_OPCODE,
                      BadInstructionError, insn_decode_kernel, text_gen_insn, x86_nops)
from textpoke.lowlevel import is_jcc32, is_nop


@pytest.mark.parametrize("n", range(1, ASM_NOP_MAX + 1))
def test_every_kernel_nop_decodes_as_one_nop_of_its_length(n):
    insn = insn_decode_kernel(x86_nops[n])
    assert insn.length == n
    assert is_nop(insn)


def test_pause_is_not_a_nop():
    insn = insn_decode_kernel(bytes.fromhex("f390"))
    assert insn.length == 2 and insn.mnemonic == "pause"
    assert not is_nop(insn)


def test_jcc32_opcode_and_immediate():
    insn = insn_decode_kernel(bytes.fromhex("0f8510000000"), 0x1000)
    assert is_jcc32(insn)
    assert insn.opcode == b"\x0f\x85"
    assert insn.immediate_offset == 2 and insn.immediate_size == 4
    assert insn.immediate_value == 0x10 and insn.branch_target == 0x1016


def test_rip_relative_displacement():
    insn = insn_decode_kernel(bytes.fromhex("488d05f0ffffff"), 0x2000)
    assert insn.rip_relative
    assert insn.displacement_offset == 3 and insn.displacement_size == 4
    assert insn.displacement_value == -16


def test_invalid_bytes_are_refused():
    with pytest.raises(BadInstructionError):
        insn_decode_kernel(b"\x06")          # push %es: invalid in 64-bit mode
    with pytest.raises(BadInstructionError):
        insn_decode_kernel(b"")


@given(st.sampled_from([CALL_INSN_OPCODE, JMP32_INSN_OPCODE]),
       st.integers(0x1000, 1 << 40), st.integers(-(1 << 31), (1 << 31) - 1))
def test_text_gen_insn_rel32_round_trips(op, addr, disp):
    dest = addr + 5 + disp
    raw = text_gen_insn(op, addr, dest)
    insn = insn_decode_kernel(raw, addr)
    assert insn.length == 5 and insn.opcode[0] == op
    assert insn.branch_target == dest & ((1 << 64) - 1)


@given(st.integers(0x1000, 1 << 40), st.integers(-300, 300))
def test_text_gen_insn_jmp8_fits_or_refuses(addr, disp):
    dest = addr + 2 + disp
    if -128 <= disp <= 127:
        insn = insn_decode_kernel(text_gen_insn(JMP8_INSN_OPCODE, addr, dest), addr)
        assert insn.length == 2 and insn.branch_target == dest
    else:
        with pytest.raises(BadInstructionError):
            text_gen_insn(JMP8_INSN_OPCODE, addr, dest)


@given(st.binary(min_size=1, max_size=15), st.integers(0, 1 << 47))
def test_decoder_agrees_with_iced_on_arbitrary_bytes(raw, addr):
    ref = iced_x86.Decoder(64, raw, ip=addr).decode()
    if ref.code == iced_x86.Code.INVALID:
        with pytest.raises(BadInstructionError):
            insn_decode_kernel(raw, addr)
        return
    insn = insn_decode_kernel(raw, addr)
    assert insn.length == ref.len
    assert insn.raw == raw[: ref.len]
    if insn.immediate_size:
        assert insn.immediate_offset + insn.immediate_size <= insn.length
    if insn.displacement_size:
        assert insn.displacement_offset + insn.displacement_size <= insn.length
    if insn.branch_target is not None and insn.immediate_size:
        assert insn.branch_target == (addr + insn.length + insn.immediate_value) & ((1 << 64) - 1)
