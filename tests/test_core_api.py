# SPDX-License-Identifier: GPL-2.0-only
"""The core's public surface: argument types, the kernel's refusals, the
façade/low-level split, and a core that stands without Unicorn."""

import subprocess
import sys
import textwrap

import pytest

import textpoke
from textpoke import BadAddressError, TextPoke, lowlevel
from textpoke.testing import MemoryMachine

NOP5 = bytes.fromhex("0f1f440000")
TEXT, MODULE = 0x40_0000, 0x80_0000


@pytest.fixture
def mem():
    m = MemoryMachine({TEXT: NOP5 * 4, MODULE: b"\x90" * 64})
    with TextPoke(m) as core:
        yield m, core


@pytest.mark.parametrize("bad", [5, "e9000000", None, [0xE9, 0, 0, 0, 0], 3.0])
@pytest.mark.parametrize("api", ["text_poke", "text_poke_kgdb", "text_poke_copy", "batch_add",
                                 "single"])
def test_opcode_must_be_bytes_like(mem, api, bad):
    m, core = mem
    before = m.text_read(TEXT, 20), m.text_read(MODULE, 8)
    addr = MODULE if api == "text_poke_copy" else TEXT
    with core.text_mutex, pytest.raises(TypeError, match="opcode must be a bytes-like object"):
        if api == "batch_add":
            core.smp_text_poke_batch_add(addr, bad)
        elif api == "single":
            core.smp_text_poke_single(addr, bad)
        else:
            getattr(core, api)(addr, bad)
    assert (m.text_read(TEXT, 20), m.text_read(MODULE, 8)) == before


@pytest.mark.parametrize("opcode", [b"\xe9\0\0\0\0", bytearray(b"\xe9\0\0\0\0"),
                                    memoryview(b"\xe9\0\0\0\0")])
def test_bytes_like_opcodes_are_accepted(mem, opcode):
    m, core = mem
    with core.batch():
        core.smp_text_poke_batch_add(TEXT, opcode)
    assert m.text_read(TEXT, 5) == b"\xe9\0\0\0\0"


def test_emulate_must_be_bytes_like_too(mem):
    m, core = mem
    with core.text_mutex, pytest.raises(TypeError, match="emulate must be a bytes-like"):
        core.smp_text_poke_batch_add(TEXT, b"\xe9\0\0\0\0", emulate=0xE9)
    assert not core.text_poke_array.vec


def test_text_poke_set_refuses_core_text_as_the_kernel_does(mem):
    m, core = mem
    before = m.text_read(TEXT, 20)
    with pytest.raises(BadAddressError, match="text_poke_set refuses core kernel text"):
        core.text_poke_set(TEXT, 0xCC, 8)
    assert m.text_read(TEXT, 20) == before
    core.text_poke_set(MODULE, 0xCC, 8)              # module/JIT text is what it is for
    assert m.text_read(MODULE, 8) == b"\xcc" * 8
    with pytest.raises(TypeError):
        core.text_poke_set(MODULE, b"\xcc", 8)


def test_facade_and_lowlevel_are_separate_and_complete():
    for name in textpoke.__all__:
        assert hasattr(textpoke, name), name
    for name in lowlevel.__all__:
        assert hasattr(lowlevel, name), name
    # the batch's internals are low-level, not the façade's
    for name in ("SmpTextPokeLoc", "TextPokeArray", "Protocol", "WaitUntil", "drive"):
        assert name in lowlevel.__all__ and name not in textpoke.__all__


def test_protocol_is_decided_once_from_mutations():
    p = lowlevel.Protocol.build(mutations=("no-sync-2", "unordered"))
    assert (p.sync_after_int3, p.sync_after_tails, p.sync_after_first) == (True, False, True)
    assert p.order == "append" and p.mutations == {"no-sync-2", "unordered"}
    assert lowlevel.Protocol.build(keep_sorted=False).order == "flush"
    with pytest.raises(ValueError, match="unknown mutation"):
        lowlevel.Protocol.build(mutations=("no-sync-9",))


def test_the_core_imports_and_patches_without_unicorn():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "unicorn" or name.startswith("unicorn."):
                    raise ImportError("unicorn is blocked for this test")
        sys.meta_path.insert(0, Block())
        import textpoke, textpoke.lowlevel, textpoke.testing
        from textpoke.testing import MemoryMachine
        m = MemoryMachine({0x1000: bytes.fromhex("0f1f440000")})
        with textpoke.TextPoke(m) as core, core.batch():
            core.smp_text_poke_batch_add(0x1000, bytes.fromhex("e900000000"))
        assert m.text_read(0x1000, 5).hex() == "e900000000"
        assert not [k for k in sys.modules if k.startswith("unicorn")]
        try:
            import textpoke.sim
        except ImportError as e:
            print("sim needs unicorn:", e)
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "ok" in p.stdout and "sim needs unicorn" in p.stdout


def test_sites_beyond_2gib_need_a_machine_that_declares_wide_text():
    from textpoke import BadAddressError
    far = TEXT + (3 << 30)
    m = MemoryMachine({TEXT: NOP5, far: NOP5})
    with TextPoke(m) as core, core.text_mutex, pytest.raises(BadAddressError, match="2 GiB"):
        core.smp_text_poke_batch_add(far, b"\xe9\0\0\0\0")

    class Wide(MemoryMachine):
        wide_text = True
    w = Wide({TEXT: NOP5, far: NOP5})
    with TextPoke(w) as core, core.batch():
        core.smp_text_poke_batch_add(far, b"\xe9\0\0\0\0")
    assert w.text_read(far, 5) == b"\xe9\0\0\0\0"
