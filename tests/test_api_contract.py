# SPDX-License-Identifier: GPL-2.0-only
"""Issue 18's API bits: refusals are TextPokeErrors, empty writes are
refused, a write that does not read back leaves old bytes (never a third
value), a batch finished forward after a fault says which sites are new,
and int3_left reads the text back."""

from __future__ import annotations

import pytest

from textpoke import BadInstructionError, TextPoke, TextPokeError, VerifyMismatchError
from textpoke.testing import MemoryMachine

CORE = 0x1000
MOD = 0x10000
NOP5 = bytes.fromhex("0f1f440000")
JMP = bytes.fromhex("e900000000")


def _m(**kw):
    return MemoryMachine({CORE: NOP5 + b"\xcc" * 11, MOD: bytes(range(64)) * 192}, **kw)


def test_set_fill_byte_out_of_range_is_a_textpoke_error():
    with TextPoke(_m()) as core:
        for c in (256, -1):
            with pytest.raises(TextPokeError, match="fill byte"):
                core.text_poke_set(MOD, c, 4)


@pytest.mark.parametrize("length", [-1, 0])
def test_set_nothing_is_refused(length):
    m = _m()
    with TextPoke(m) as core:
        with pytest.raises(BadInstructionError, match="nothing to write"):
            core.text_poke_set(MOD, 0xCC, length)
    assert m.writes == 0


def test_copy_and_poke_of_nothing_are_refused():
    m = _m()
    with TextPoke(m) as core:
        with pytest.raises(BadInstructionError, match="empty"):
            core.text_poke_copy(MOD, b"")
        with core.text_mutex, pytest.raises(BadInstructionError, match="empty"):
            core.text_poke(CORE, b"")
    assert m.writes == 0


@pytest.mark.parametrize("call", ["poke", "set", "copy", "copy-3-pages"])
def test_a_corrupted_write_leaves_the_old_bytes(call):
    m = _m(corrupt_on_write=1 if call == "copy-3-pages" else 0)
    before = {a: m.text_read(a, 16) for a in (CORE,)}
    mod_before = m.text_read(MOD, 3 * 4096)
    with TextPoke(m) as core:
        with pytest.raises(VerifyMismatchError, match="old bytes were put back"):
            if call == "poke":
                with core.text_mutex:
                    core.text_poke(CORE, JMP)
            elif call == "set":
                core.text_poke_set(MOD, 0xCC, 100)
            elif call == "copy":
                core.text_poke_copy(MOD, b"\x90" * 100)
            else:           # the second chunk fails: the first is put back too
                core.text_poke_copy(MOD + 100, b"\x90" * (2 * 4096 + 500))
    assert m.text_read(CORE, 16) == before[CORE]
    assert m.text_read(MOD, 3 * 4096) == mod_before


def test_a_batch_finished_forward_after_a_fault_says_which_sites_are_new():
    # writes: 0 int3, 1 tail, 2 first byte (fails), 3 finish-forward's first byte
    m = _m(fail_on_write=2)
    with TextPoke(m) as core:
        with pytest.raises(TextPokeError) as ei:
            with core.batch():
                core.smp_text_poke_batch_add(CORE, JMP)
        assert core.int3_left() == 0
    assert m.text_read(CORE, 5) == JMP
    assert f"{CORE:#x}" in str(ei.value) and "finished" in str(ei.value)
    assert ei.value.new_sites == [CORE]


def test_int3_left_reads_the_text_back():
    m = _m()
    with TextPoke(m) as core:
        with core.batch():
            core.smp_text_poke_batch_add(CORE, JMP)
        assert core.int3_left() == 0
        m.text_write_early(CORE, b"\xcc")       # as a dead recovery would leave it
        assert core.int3_left() == 1
        m.text_write_early(CORE, JMP[:1])
        assert core.int3_left() == 0
