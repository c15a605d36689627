# SPDX-License-Identifier: GPL-2.0-only
"""Loadable modules on four running vCPUs: a GCC-built object that uses a
kernel key and a kernel static call is loaded, called from every CPU,
switched both ways and unloaded; refusals leave the text unchanged."""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from textpoke import (ModuleRelocationError, UnknownCallError, UnknownKeyError,
                      UnknownSymbolError)
from textpoke.cli import main
from textpoke.images.build import have_gcc
from textpoke.selftests import module_selftest
from textpoke.images.modules import MODULES, REFUSALS, module_path
from textpoke.sim import ClientMachine

needs_gcc = pytest.mark.skipif(not have_gcc(), reason="gcc and binutils are needed")


@pytest.fixture
def cm():
    with ClientMachine(cpus=4, seed=5) as m:
        m.start()
        m.wait_passes(1)
        yield m


@pytest.fixture
def loader(cm):
    return cm.kernel.modules


def _module_text(cm) -> bytes:
    rng = next(t for t in cm.sim.text_ranges if not t.core)
    return cm.sim.text_read(rng.start, rng.end - rng.start)


def test_module_selftest_on_four_running_cpus(cm):
    r = module_selftest(cm)
    failed = [c for c in r.cases if not c["passed"]]
    assert not failed, failed
    assert r.passed and r.oopses == 0 and r.bad == []
    names = [c["name"] for c in r.cases]
    # loaded twice, switched both ways (keys and the call), unloaded twice, five refusals
    assert sum("switch" in n or n.startswith("reload:") for n in names) >= 8
    assert sum(n.startswith("refused") for n in names) == len(REFUSALS)
    assert r.batches > 0 and r.syncs >= 3 * 6


def test_relocations_resolve_to_the_kernel_and_the_module(cm, loader):
    m = loader.load(module_path("mod_clients.o"))
    assert cm.sim.text_read(m.text, m.text_size) != b"\xcc" * m.text_size
    # R_X86_64_64 in module data: the function pointer holds the kernel's sc_square
    assert cm.sim.read_u64(m.sym("mod_fp")) == cm.sym("sc_square")
    # every jump entry and static-call site of the module is registered with its owner
    assert [s.owner for s in cm.keys.key("jl_key_false").sites].count("mod_clients") == 2
    assert [s.owner for s in cm.keys.key("jl_key_true").sites].count("mod_clients") == 1
    assert [s.owner for s in cm.calls.call("sc_op").sites].count("mod_clients") == 2
    # sites are named after the module's symbols in refusals and listings
    e = next(s.entry for s in cm.keys.key("jl_key_false").sites if s.owner == "mod_clients")
    assert "[mod_clients]" in cm.keys.describe(e.code)
    # called from every CPU; the guest answer depends on relocated data, the
    # alternative, the retpoline site and a call into the kernel
    i = cm.add_probe("mod_misc", m.sym("mod_misc"), arg=3, allow=[226])
    assert cm.expect({i: 226}) == {}
    assert cm.calls_made(i) >= 4 and cm.oopses == 0 and cm.bad() == []


def test_key_flip_switches_module_sites_until_unload(cm, loader):
    m = loader.load(module_path("mod_clients.o"))
    keys = cm.keys
    mine = [s for s in keys.key("jl_key_false").sites if s.owner == "mod_clients"]
    assert len(mine) == 2
    assert all(keys.site_state(s.entry) == keys.jump_label_type(s.entry, False) for s in mine)
    keys.static_key_enable("jl_key_false")
    assert all(keys.site_state(s.entry) == keys.jump_label_type(s.entry, True) for s in mine)
    keys.static_key_disable("jl_key_false")
    assert all(keys.site_state(s.entry) == keys.jump_label_type(s.entry, False) for s in mine)
    text, size = m.text, m.text_size
    loader.unload(m)
    assert cm.sim.text_read(text, size) == b"\xcc" * size
    b0 = cm.core.stats.batches
    keys.static_key_enable("jl_key_false")
    assert cm.core.stats.batches - b0 == 1
    assert cm.sim.text_read(text, size) == b"\xcc" * size       # not touched after unload
    assert loader.execmem.used == {} and cm.oopses == 0


def test_sites_get_the_current_state_at_load(cm, loader):
    cm.keys.static_key_enable("jl_key_false")
    cm.calls.static_call_update("sc_op", "sc_square")
    m = loader.load(module_path("mod_clients.o"))
    slots = {n: cm.add_probe(n, m.sym(n), arg=a, allow=[v]) for n, a, v in
             (("mod_key_false", 0, 1), ("mod_key_false_likely", 0, 1),
              ("mod_call_op", 5, 1025), ("mod_tail_op", 6, 36))}
    assert cm.expect({i: v for i, v in zip(slots.values(), (1, 1, 1025, 36))}) == {}
    assert cm.bad() == [] and cm.oopses == 0


@pytest.mark.parametrize("obj,exc", [
    ("bad_reloc.o", ModuleRelocationError),     # R_X86_64_REX_GOTPCRELX
    ("bad_range.o", ModuleRelocationError),     # R_X86_64_32S beyond 2 GiB
    ("bad_sym.o", UnknownSymbolError),
    ("bad_key.o", UnknownKeyError),
    ("bad_call.o", UnknownCallError),
])
def test_refusals_leave_text_unchanged(cm, loader, obj, exc):
    before = _module_text(cm)
    with pytest.raises(exc) as ei:
        loader.load(module_path(obj))
    assert "nothing written" in str(ei.value) or exc is UnknownSymbolError
    assert _module_text(cm) == before
    assert loader.execmem.used == {} and loader.modules == {}
    if exc is ModuleRelocationError:
        assert ei.value.rtype in (42, 11)
    # and the loader still works afterwards
    m = loader.load(module_path("mod_clients.o"))
    assert m.live and cm.oopses == 0


def _patched(obj: bytes, section: str, index: int, how) -> bytes:
    elf = ELFFile(io.BytesIO(obj))
    rel = elf.get_section_by_name(section)
    raw = bytearray(obj)
    how(raw, elf, rel, rel["sh_offset"] + 24 * index)
    return bytes(raw)


def test_unknown_relocation_type_and_nonzero_field(cm, loader):
    obj = module_path("mod_clients.o").read_bytes()

    def set_type(raw, elf, rel, at):
        info = struct.unpack_from("<Q", raw, at + 8)[0]
        struct.pack_into("<Q", raw, at + 8, (info & ~0xFFFFFFFF) | 37)

    def dirty_field(raw, elf, rel, at):
        off = struct.unpack_from("<Q", raw, at)[0]
        text = elf.get_section(rel["sh_info"])
        raw[text["sh_offset"] + off] = 0x5A

    before = _module_text(cm)
    with pytest.raises(ModuleRelocationError, match="unknown relocation type 37"):
        loader.load(_patched(obj, ".rela.text", 0, set_type), name="m1")
    with pytest.raises(ModuleRelocationError, match="not zero"):
        loader.load(_patched(obj, ".rela.text", 0, dirty_field), name="m2")
    assert _module_text(cm) == before and loader.execmem.used == {}


def test_committed_objects_rebuild_identically():
    if not have_gcc():
        pytest.skip("gcc and binutils are needed")
    from textpoke.images.modules.build import build_all
    with tempfile.TemporaryDirectory() as tmp:
        built = build_all(Path(tmp))
        assert sorted(p.name for p in built) == sorted(MODULES + REFUSALS)
        for p in built:
            assert p.read_bytes() == module_path(p.name).read_bytes(), p.name


@needs_gcc
def test_generated_module_of_many_functions(cm, loader):
    from textpoke.images.modules.build import build_module, many_functions_source
    n = 300
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mod_many.c"
        src.write_text(many_functions_source(n))
        obj = build_module(src, Path(tmp) / "mod_many.o")
        m = loader.load(obj)
    assert m.jump_entries == n and m.static_call_sites == n
    i = cm.add_probe("mod_fn_7", m.sym("mod_fn_7"), arg=1, allow=[2 * 8])
    assert cm.expect({i: 16}) == {}
    cm.allow(i, [16, 16 + 7])
    b0 = cm.core.stats.batches
    cm.keys.static_key_enable("jl_key_false")
    assert cm.core.stats.batches - b0 == -(-(n + 2) // 256)    # the image's 2 sites + the module's
    assert cm.expect({i: 23}) == {}
    cm.disable_probe(i)
    cm.wait_passes(2)
    loader.unload(m)
    assert cm.oopses == 0 and cm.bad() == []


def test_cli_module_selftest_json(capsys):
    rc = main(["module", "--selftest", "--cpus", "4", "--seed", "2", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert d["selftest"]["passed"] is True and d["selftest"]["cases"]
    assert d["oopses"] == 0 and d["syncs"] > 0 and d["batches"] > 0


def test_cli_module_usage_errors(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["module", "--selftest", "--cpus", "99"])
    assert ei.value.code == 2
    assert "--cpus" in capsys.readouterr().err


# ------------------------------------------------------------------ call thunks and ENDBR
_CT_MODULE = r"""
	.text
	.balign	16
	.rept	16
	nop
	.endr
	.globl	mod_ct_helper
	.type	mod_ct_helper, @function
mod_ct_helper:
	endbr64
	leal	3(%rdi), %eax
	ret
	.size	mod_ct_helper, . - mod_ct_helper
	.balign	16
	.globl	mod_ct_entry
	.type	mod_ct_entry, @function
mod_ct_entry:
	endbr64
1:	call	mod_ct_helper
2:	call	sc_square
3:	call	mod_ct_nopad
	ret
	.size	mod_ct_entry, . - mod_ct_entry
	.globl	mod_ct_nopad
	.type	mod_ct_nopad, @function
mod_ct_nopad:
	ret
	.size	mod_ct_nopad, . - mod_ct_nopad

	.section .call_sites, "a"
	.balign	4
	.long	1b - .
	.long	2b - .
	.long	3b - .
	.section .ibt_endbr_seal, "a"
	.balign	4
	.long	mod_ct_helper - .
	.long	mod_ct_entry + 9 - .
	.section .note.GNU-stack, "", @progbits
"""


def _assemble(src: str) -> bytes:
    import subprocess
    with tempfile.TemporaryDirectory() as d:
        s, o = Path(d) / "m.S", Path(d) / "m.o"
        s.write_text(src)
        subprocess.run(["as", "--64", "-o", str(o), str(s)], check=True, capture_output=True)
        return o.read_bytes()


@needs_gcc
def test_module_finalize_call_thunks_and_endbr_seal():
    # arch/x86/kernel/module.c module_finalize, after the alternatives:
    # callthunks_patch_module_calls (arch/x86/kernel/callthunks.c patch_call)
    # re-aims each direct call of .call_sites whose destination is the
    # module's own text or core kernel text at the destination's accounting
    # thunk -- written into the padding (directly for the module's function,
    # with text_poke_copy_locked for the kernel's) when it still holds NOPs;
    # a destination without NOP padding keeps its direct call.  Then, with
    # CONFIG_X86_KERNEL_IBT, apply_seal_endbr turns each ENDBR listed in
    # .ibt_endbr_seal into the 4-byte poison NOP; an entry that is no ENDBR is
    # left alone.
    obj = _assemble(_CT_MODULE)
    with ClientMachine(cpus=1, seed=5) as cm:
        loader = cm.kernel.modules
        assert loader.ibt
        calls = cm.kernel.calls
        calls.thunks_initialized = True          # a boot that set up call-depth thunks
        t0 = cm.sym("skl_call_thunk_template")
        size = cm.sym("skl_call_thunk_tail") - t0
        sq = cm.sym("sc_square")
        m = loader.load(obj, "ct")
        rd = lambda a, n: cm.sim.text_read(a, n)                 # noqa: E731
        helper, entry, nopad = m.sym("mod_ct_helper"), m.sym("mod_ct_entry"), m.sym("mod_ct_nopad")

        def target(a):
            b = rd(a, 5)
            assert b[0] == 0xE8
            return a + 5 + int.from_bytes(b[1:], "little", signed=True)

        c1, c2, c3 = entry + 4, entry + 9, entry + 14
        assert target(c1) == helper - size and target(c2) == sq - size and target(c3) == nopad
        assert rd(helper - size, size) == calls._callthunks().code_at(helper - size)
        assert rd(sq - size, size) == calls._callthunks().code_at(sq - size)
        assert m.finalize[".call_sites"] == 2
        # ENDBR sealed at mod_ct_helper; mod_ct_entry+9 is a CALL: left
        assert rd(helper, 4) == bytes.fromhex("66 0f 1f 00")
        assert rd(entry, 4) == bytes.fromhex("f3 0f 1e fa")       # not listed: kept
        assert m.finalize[".ibt_endbr_seal"] == 1
        loader.unload(m)
    # without call-depth thunks and without IBT: calls and ENDBRs as linked
    with ClientMachine(cpus=1, seed=5) as cm:
        loader = cm.kernel.modules
        loader.ibt = False
        m = loader.load(obj, "ct")
        entry, helper = m.sym("mod_ct_entry"), m.sym("mod_ct_helper")
        b = cm.sim.text_read(entry + 4, 5)
        assert entry + 9 + int.from_bytes(b[1:], "little", signed=True) == helper
        assert cm.sim.text_read(helper, 4) == bytes.fromhex("f3 0f 1e fa")
        assert ".call_sites" not in m.finalize and ".ibt_endbr_seal" not in m.finalize


_OWN_KEYS_S = r"""
	.text
	.globl	own_false
	.type	own_false, @function
own_false:
1:	.byte	0x0f, 0x1f, 0x44, 0x00, 0x00
	xorl	%eax, %eax
	ret
2:	movl	$1, %eax
	ret
	.size	own_false, . - own_false
	.globl	own_true
	.type	own_true, @function
own_true:
3:	.byte	0x66, 0x90
	xorl	%eax, %eax
	ret
4:	movl	$2, %eax
	ret
	.size	own_true, . - own_true

	.data
	.balign	8
	.globl	own_key_false
own_key_false:				/* struct static_key: enabled, type */
	.long	0, 0
	.quad	0
	.globl	own_key_true
own_key_true:
	.long	1, 0
	.quad	1

	.section __jump_table, "aw"
	.balign	8
	.long	1b - .
	.long	2b - .
	.quad	own_key_false - .
	.long	3b - .
	.long	4b - .
	.quad	own_key_true - .
	.section .note.GNU-stack, "", @progbits
"""


@needs_gcc
def test_a_modules_own_static_keys(cm, loader, tmp_path):
    """jump_label_add_module: __jump_table entries whose key lies in the
    module (a DEFINE_STATIC_KEY of its own, its tracepoints' keys) get the
    state the key's initialiser gives at load, switch with the key, and
    the keys go with the module."""
    import subprocess
    src = tmp_path / "own_keys.S"
    src.write_text(_OWN_KEYS_S)
    subprocess.run(["gcc", "-c", str(src), "-o", str(tmp_path / "own_keys.o")], check=True)
    m = loader.load(tmp_path / "own_keys.o")
    keys = cm.keys
    kf, kt = keys.key(m.sym("own_key_false")), keys.key(m.sym("own_key_true"))
    assert kf.name == "own_keys:own_key_false" and m.own_keys == sorted([kf.addr, kt.addr])
    assert (kf.enabled, kt.enabled) == (0, 1)
    # the true key's entry (compiled as a NOP2) is a JMP8 to its target from the start
    assert cm.sim.text_read(m.sym("own_true"), 2) == bytes([0xEB, 3])
    assert cm.sim.text_read(m.sym("own_false"), 5) == bytes.fromhex("0f1f440000")
    i = cm.add_probe("own_false", m.sym("own_false"), arg=0, allow=[0, 1])
    j = cm.add_probe("own_true", m.sym("own_true"), arg=0, allow=[0, 2])
    assert cm.expect({i: 0, j: 2}) == {}
    cm.widen(i, 0, 1)
    cm.widen(j, 2, 0)
    keys.static_key_enable("own_keys:own_key_false")
    keys.static_key_disable(kt)
    assert cm.expect({i: 1, j: 0}) == {}
    # the count is mirrored into the module's own data
    assert struct.unpack("<i", cm.sim.mem_read(kf.addr, 4))[0] == 1
    cm.disable_probe(i)
    cm.disable_probe(j)
    cm.wait_passes(1)
    loader.unload(m)
    assert "own_keys:own_key_false" not in keys.keys
    with pytest.raises(UnknownKeyError):
        keys.key(kf.addr)
    assert cm.oopses == 0 and cm.bad() == []


@needs_gcc
def test_a_module_with_cfi_sites_is_refused(cm, loader, tmp_path):
    """kCFI/FineIBT (.cfi_sites, a clang CONFIG_CFI_CLANG build) is not
    modelled: such a module is refused with nothing written, not loaded
    with its preambles left as compiled."""
    import subprocess
    src = tmp_path / "cfi.S"
    src.write_text("""
	.text
	.globl	cfi_fn
cfi_fn:
1:	movl	$0x12345678, %eax
	ret
	.section .cfi_sites, "a"
	.long	1b - .
	.section .note.GNU-stack, "", @progbits
""")
    subprocess.run(["gcc", "-c", str(src), "-o", str(tmp_path / "cfi.o")], check=True)
    from textpoke import ModuleError
    before = _module_text(cm)
    with pytest.raises(ModuleError, match="cfi_sites.*nothing written"):
        loader.load(tmp_path / "cfi.o")
    assert _module_text(cm) == before and loader.execmem.used == {} and loader.modules == {}
    # likewise 6.1's paravirt patch sites (module_finalize's apply_paravirt)
    src.write_text(src.read_text().replace(".cfi_sites", ".parainstructions"))
    subprocess.run(["gcc", "-c", str(src), "-o", str(tmp_path / "pv.o")], check=True)
    with pytest.raises(ModuleError, match="parainstructions.*nothing written"):
        loader.load(tmp_path / "pv.o")
    assert _module_text(cm) == before and loader.execmem.used == {} and loader.modules == {}
