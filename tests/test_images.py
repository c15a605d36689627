# SPDX-License-Identifier: GPL-2.0-only
"""The kernel-like image: loading, table parsing, refusal of malformed
input, objtool-lite, reproducible rebuilds and agreement with objdump."""

from __future__ import annotations

import io
import random
import re
import shutil
import struct
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from textpoke import MAX_PATCH_LEN, insn_decode_kernel
from textpoke.lowlevel import is_nop
from textpoke.images import ImageError, image_path, load_elf
from textpoke.images._kernel import alt_probes, kernel_regions
from textpoke.sim._boot import boot_kernel_image
from textpoke.images._objtool import objtool_scan, sites_asm
from textpoke.images._tables import (ALT_FLAG_DIRECT_CALL, ALT_FLAG_NOT, X86_FEATURES, AltInstr,
                                     KernelTables, feature_name, feature_number, feature_set,
                                     read_tables)

KERNEL = image_path("kernel.elf")
KERNEL_SRC = Path(__file__).resolve().parents[1] / "src" / "textpoke" / "images" / "kernel"

#: what the committed image holds
EXPECTED_COUNTS = {
    ".altinstructions": 102,
    ".smp_locks": 10,
    "__mcount_loc": 84,
    "__jump_table": 1128,
    ".static_call_sites": 10,
    ".retpoline_sites": 8,
    ".return_sites": 176,
}

have_build_tools = all(shutil.which(t) for t in ("gcc", "as", "ld"))
have_objdump = shutil.which("objdump") is not None


@lru_cache(maxsize=None)
def _raw() -> bytes:
    return KERNEL.read_bytes()


@pytest.fixture(scope="module")
def image():
    return load_elf(KERNEL)


@pytest.fixture(scope="module")
def tables(image):
    return read_tables(image)


@pytest.fixture(scope="module")
def booted():
    return boot_kernel_image(ncpus=1)


def _text(image, addr: int, size: int) -> bytes:
    for sec in image.sections.values():
        if sec.addr <= addr and addr + size <= sec.end:
            return sec.data[addr - sec.addr: addr - sec.addr + size]
    raise AssertionError(f"{addr:#x} not in any section")


def _insn_at(image, addr: int):
    for sec in image.sections.values():
        if sec.addr <= addr < sec.end:
            return insn_decode_kernel(sec.data[addr - sec.addr: addr - sec.addr + 15], addr)
    raise AssertionError(f"{addr:#x} not in any section")


def _disasm(image, addr: int, size: int) -> list:
    raw = _text(image, addr, size)
    out, off = [], 0
    while off < size:
        insn = insn_decode_kernel(raw[off:], addr + off)
        out.append(insn)
        off += insn.length
    return out


# ------------------------------------------------------------------ loading
def test_image_loads(image):
    for name in (".text", ".altinstr_replacement", ".altinstructions", ".smp_locks",
                 "__mcount_loc", "__jump_table", ".static_call_sites", ".retpoline_sites",
                 ".return_sites", ".data"):
        assert name in image.sections, name
    assert image.sections[".text"].addr == 0x1000000
    assert image.sections[".text"].kind == "text"
    assert image.sections[".altinstr_replacement"].kind == "text"
    assert image.entry == image.sym("start_kernel")
    for sym in ("__x86_return_thunk", "__x86_indirect_thunk_array", "__x86_indirect_thunk_rax",
                "__x86_indirect_thunk_r15", "nop_func", "BUG_func", "int3_selftest_ip",
                "int3_magic", "alt_reloc_selftest", "__SCT__sc_op", "__SCK__sc_op"):
        assert sym in image.symbols, sym


def test_thunk_array_layout(image):
    base = image.sym("__x86_indirect_thunk_array")
    regs = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"] + [f"r{i}" for i in range(8, 16)]
    for i, reg in enumerate(regs):
        assert image.sym(f"__x86_indirect_thunk_{reg}") == base + 32 * i


def test_static_call_trampolines_carry_signature(image):
    for name in ("sc_op", "sc_hook", "sc_ret0"):
        tramp = image.sym(f"__SCT__{name}")
        assert _text(image, tramp + 5, 3) == b"\x0f\xb9\xcc"
    assert _text(image, image.sym("__SCT__sc_hook"), 5) == bytes.fromhex("c3cc909090")


# ------------------------------------------------------------------- tables
def test_table_counts(tables):
    assert tables.counts() == EXPECTED_COUNTS
    assert len(tables.alt_instructions) >= 50


def test_every_entry_lies_in_text(image, tables):
    lo, hi = tables.text
    assert (lo, hi) == (image.sections[".text"].addr, image.sections[".text"].end)
    rlo, rhi = tables.replacement
    for a in tables.alt_instructions:
        assert lo <= a.instr and a.instr + a.instrlen <= hi
        assert rlo <= a.repl and a.repl + a.replacementlen <= rhi
        assert a.instrlen <= MAX_PATCH_LEN
    for rec in (*tables.smp_locks, *tables.mcount_loc, *tables.retpoline_sites,
                *tables.return_sites, *tables.static_call_sites):
        assert lo <= rec.addr < hi
    for j in tables.jump_table:
        assert lo <= j.code < hi and lo <= j.target < hi
        assert image.sections[".data"].addr <= j.key < image.sections[".bss"].end


def test_sites_hold_what_their_table_says(image, tables):
    for m in tables.mcount_loc:
        assert _text(image, m.addr, 5) == bytes.fromhex("0f1f440000")
    for lock in tables.smp_locks:
        assert _text(image, lock.addr, 1) == b"\xf0"
    thunks = {image.sym(f"__x86_indirect_thunk_{r}") for r in
              ["rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi"] + [f"r{i}" for i in range(8, 16)]}
    for s in tables.retpoline_sites:
        insn = _insn_at(image, s.addr)
        assert insn.flow in ("call", "jmp", "jcc") and insn.branch_target in thunks
    ret_thunk = image.sym("__x86_return_thunk")
    for s in tables.return_sites:
        insn = _insn_at(image, s.addr)
        assert insn.flow in ("jmp", "jcc") and insn.branch_target == ret_thunk
    for s in tables.static_call_sites:
        insn = _insn_at(image, s.addr)
        name = image.name_at(s.key)
        assert name.startswith("__SCK__")
        if insn.flow == "jcc":      # listed by hand (sc_jcc.S), aimed at the initial function
            assert s.tail and insn.length == 6
            initial = struct.unpack("<Q", _text(image, s.key, 8))[0]
            assert insn.branch_target == initial
            continue
        assert insn.flow == ("jmp" if s.tail else "call")
        assert insn.branch_target == image.sym("__SCT__" + name.removeprefix("__SCK__"))
    assert any(s.tail for s in tables.static_call_sites)
    assert any(not s.tail for s in tables.static_call_sites)


def test_jump_entries_match_initial_key_state(image, tables):
    sizes = set()
    for j in tables.jump_table:
        enabled = struct.unpack("<i", _text(image, j.key, 4))[0] != 0
        insn = _insn_at(image, j.code)
        sizes.add(insn.length)
        if enabled != j.branch:      # the kernel's jump_label_type(): JMP
            assert insn.flow == "jmp" and insn.branch_target == j.target
        else:
            assert insn.raw == bytes.fromhex("0f1f440000")
    assert sizes == {2, 5}           # both JMP8 and NOP5/JMP32 sites


def test_alternative_coverage(image, tables):
    alts = tables.alt_instructions
    always = X86_FEATURES["always"]
    assert any(a.cpuid == always and not a.flags for a in alts)           # present
    assert any(a.cpuid == X86_FEATURES["xenpv"] and not a.flags for a in alts)  # absent
    assert any(a.flags & ALT_FLAG_NOT for a in alts)
    assert any(a.flags & ALT_FLAG_DIRECT_CALL for a in alts)
    groups = tables.alt_groups()
    nested = [g for g in groups if len(g) > 1]
    assert len(nested) >= 5 and any(len(g) == 3 for g in nested)
    # a nested group whose outer entry padded further than the inner one
    assert any(len({a.instrlen for a in g}) > 1 for g in nested)
    flows, rip, jmp32 = set(), False, False
    for a in alts:
        for insn in _disasm(image, a.repl, a.replacementlen):
            flows.add(insn.flow)
            rip |= insn.rip_relative
            if insn.opcode == b"\xe9":
                jmp32 = True
    assert {"call", "jmp", "jcc"} <= flows and rip and jmp32
    # an original padded with a NOP run longer than ASM_NOP_MAX
    pad = image.sym("alt_probe_pad_15")
    assert any(a.instr > pad and _text(image, a.instr, 15) == b"\x90" * 15 for a in alts)
    # direct-call sites are "call *disp(%rip)" replaced by "call BUG_func"
    for a in alts:
        if a.direct_call:
            assert a.instrlen == 6 and _text(image, a.instr, 2) == b"\xff\x15"
            insn = _insn_at(image, a.repl)
            assert insn.flow == "call" and insn.branch_target == image.sym("BUG_func")


def test_alt_records(image, tables):
    sec = image.sections[".altinstructions"]
    for a in tables.alt_instructions:
        assert isinstance(a, AltInstr)
        assert a.entry == sec.addr + 14 * a.index
        instr_off, repl_off, ft_flags = struct.unpack_from("<iiI", sec.data, 14 * a.index)
        assert (a.instr, a.repl, a.ft_flags) == (a.entry + instr_off, a.entry + 4 + repl_off, ft_flags)
        assert a.ft_flags == (a.flags << 16) | a.cpuid
    a = tables.alt_instructions[0]
    with pytest.raises(AttributeError):
        a.instr = 0                       # frozen
    text = "\n".join(x.describe() for x in tables.alt_instructions)
    assert "!xenpv" in text and "direct-call" in text


def test_features_match_header():
    header = (KERNEL_SRC / "cpufeatures.h").read_text()
    found = {m.group(1).lower(): int(m.group(2)) * 32 + int(m.group(3)) for m in
             re.finditer(r"#define X86_FEATURE_(\w+)\s+\(\s*(\d+)\*32\+\s*(\d+)\)", header)}
    assert found == X86_FEATURES


def test_feature_names():
    assert feature_number("ERMS") == feature_number("X86_FEATURE_ERMS") == 9 * 32 + 9
    assert feature_number("9*32+10") == 298
    assert feature_name(9 * 32 + 9) == "erms" and feature_name(298) == "9*32+10"
    assert X86_FEATURES["always"] in feature_set([])
    with pytest.raises(ValueError):
        feature_number("no_such_feature")


# -------------------------------------------------------------------- boot
def test_boot_maps_image(booted):
    sim, image, tables = booted
    assert isinstance(tables, KernelTables)
    text = image.sections[".text"]
    assert sim.text_ranges[0].start == text.addr
    assert sim.text_read(text.addr, 16) == text.data[:16]
    repl = image.sections[".altinstr_replacement"]
    assert sim.text_read(repl.addr, 8) == repl.data[:8]
    assert sim.mem_read(image.sections[".altinstructions"].addr, 14) == \
        image.sections[".altinstructions"].data[:14]


def test_probes_run_original_before_patching(booted):
    sim, image, tables = booted
    probes = alt_probes(image, tables)
    assert len(probes) >= 45
    for p in probes:
        assert sim.call(p.addr) == 1, p.name
    # the oracle: last matching entry wins
    by_name = {p.name: p for p in probes}
    assert by_name["alt_probe_always"].expected(feature_set([])) == 2
    assert by_name["alt_probe_xenpv"].expected(feature_set([])) == 1
    assert by_name["alt_probe_not_xenpv"].expected(feature_set([])) == 2
    assert by_name["alt_probe_nested2"].expected(feature_set(["erms"])) == 2
    assert by_name["alt_probe_nested2"].expected(feature_set(["erms", "fsrm"])) == 3


def test_unpatched_functions_behave(booted):
    sim, image, _ = booted
    call = lambda name, *a: sim.call(image.sym(name), *a)   # noqa: E731
    assert call("smp_locks_exercise") == 0x1234
    assert call("hweight32", 0xF0F0_0001) == 9
    assert call("pv_add", 40, 2) == 42 and call("pv_read_value") == 42
    assert call("alt_call_native") == 2 and call("alt_call_nop") == 2
    assert call("alt_reloc_selftest") == 0            # empty original: nothing ran
    assert call("jl_likely_true") == 1 and call("jl_unlikely_false") == 2
    assert call("jl_likely_false") == 2 and call("jl_unlikely_true") == 1
    assert call("sc_call_op", 5) == 11 and call("sc_tail_op", 5) == 10
    assert call("sc_run_hook", 5) == 5 and call("sc_call_ret0", 7) == 5
    assert call("dispatch", 2, 7) == 15 and call("dispatch_compose", image.sym("op_inc"),
                                                    image.sym("op_twice"), 3) == 12
    assert call("asm_call_indirect", image.sym("probe_ret2")) == 3


def test_regions_refuse_shared_pages(image):
    import dataclasses
    from textpoke.images import ElfSection
    secs = dict(image.sections)
    text = secs[".text"]
    secs["bad"] = ElfSection("bad", text.end, b"\0" * 8, "data")
    with pytest.raises(ImageError, match="shares a page"):
        kernel_regions(dataclasses.replace(image, sections=secs))


# ---------------------------------------------------------------- malformed
def _section_header(raw: bytes, name: str) -> tuple[int, int, int]:
    """(offset of the section header, sh_offset, sh_size) of *name*."""
    elf = ELFFile(io.BytesIO(raw))
    for i, sec in enumerate(elf.iter_sections()):
        if sec.name == name:
            return elf["e_shoff"] + i * elf["e_shentsize"], sec["sh_offset"], sec["sh_size"]
    raise KeyError(name)


def _patch(raw: bytes, at: int, data: bytes) -> bytes:
    return raw[:at] + data + raw[at + len(data):]


def test_refuses_truncated_file():
    raw = _raw()
    for cut in (0, 3, 16, 63, 64, 200, len(raw) // 3, len(raw) // 2, len(raw) - 1):
        with pytest.raises(ImageError):
            read_tables(raw[:cut])


def test_refuses_garbage():
    with pytest.raises(ImageError, match="not an ELF"):
        read_tables(b"MZ" + bytes(100))
    with pytest.raises(ImageError):
        read_tables(Path("/nonexistent/kernel.elf"))


def test_corrupted_bytes_never_escape_as_other_errors():
    raw = _raw()
    rng = random.Random(3)
    hdr_end = 64
    for _ in range(60):
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(buf)) if rng.random() < 0.5 else rng.randrange(hdr_end)
            buf[at] = rng.randrange(256)
        try:
            read_tables(bytes(buf))
        except ImageError:
            pass


@pytest.mark.parametrize("name,entry", [(".altinstructions", 14), (".smp_locks", 4),
                                        ("__jump_table", 16), (".return_sites", 4),
                                        ("__mcount_loc", 8), (".static_call_sites", 8)])
def test_refuses_bad_table_size(name, entry):
    raw = _raw()
    hdr, _off, size = _section_header(raw, name)
    bad = _patch(raw, hdr + 32, struct.pack("<Q", size - 1))      # sh_size
    with pytest.raises(ImageError, match=f"{re.escape(name)}.*not a multiple of its {entry}-byte"):
        read_tables(bad)


def _alt_entry_offset(raw: bytes, index: int) -> int:
    _hdr, off, _size = _section_header(raw, ".altinstructions")
    return off + 14 * index


def test_refuses_alt_instr_outside_text():
    raw = _raw()
    at = _alt_entry_offset(raw, 7)
    (instr_off,) = struct.unpack_from("<i", raw, at)
    bad = _patch(raw, at, struct.pack("<i", instr_off + 0x10_0000))
    with pytest.raises(ImageError, match=r"\.altinstructions entry 7: instr .* outside \.text"):
        read_tables(bad)


def test_refuses_instrlen_over_max_patch_len():
    raw = _raw()
    bad = _patch(raw, _alt_entry_offset(raw, 3) + 12, bytes([255]))
    with pytest.raises(ImageError, match="instrlen 255 exceeds MAX_PATCH_LEN"):
        read_tables(bad)


def test_refuses_replacement_outside_its_section():
    raw = _raw()
    at = _alt_entry_offset(raw, 5) + 4
    (repl_off,) = struct.unpack_from("<i", raw, at)
    bad = _patch(raw, at, struct.pack("<i", repl_off - 0x40_0000))     # into .text
    with pytest.raises(ImageError, match=r"replacement .* outside \.altinstr_replacement"):
        read_tables(bad)


@pytest.mark.parametrize("name,field,delta,msg", [
    (".smp_locks", 0, 0x100_0000, r"\.smp_locks entry 0 .* outside \.text"),
    (".return_sites", 0, -0x100_0000, r"\.return_sites entry 0 .* outside \.text"),
    (".retpoline_sites", 0, 0x40_0000, r"\.retpoline_sites entry 0 .* outside \.text"),
    ("__jump_table", 4, 0x200_0000, r"__jump_table entry 0: target .* outside \.text"),
    ("__jump_table", 8, -0x100_0000, r"__jump_table entry 0: key .* not in a data section"),
    (".static_call_sites", 0, 0x800_0000, r"\.static_call_sites entry 0 .* outside \.text"),
])
def test_refuses_site_outside(name, field, delta, msg):
    raw = _raw()
    _hdr, off, _size = _section_header(raw, name)
    (val,) = struct.unpack_from("<i", raw, off + field)
    bad = _patch(raw, off + field, struct.pack("<i", val + delta))
    with pytest.raises(ImageError, match=msg):
        read_tables(bad)


def test_refuses_mcount_outside_text():
    raw = _raw()
    _hdr, off, _size = _section_header(raw, "__mcount_loc")
    bad = _patch(raw, off, struct.pack("<Q", 0x10))
    with pytest.raises(ImageError, match="__mcount_loc entry 0 at 0x10"):
        read_tables(bad)


def test_image_without_tables_parses_empty():
    t = read_tables(load_elf(image_path("workload.elf")))
    assert set(t.counts().values()) == {0}


# ----------------------------------------------------------------- objtool
def test_objtool_lite_agrees_with_image(image, tables):
    sites = objtool_scan(_raw(), "kernel.elf")
    assert sites.retpoline_sites == tuple(s.addr for s in tables.retpoline_sites)
    assert sites.return_sites == tuple(s.addr for s in tables.return_sites)
    # objtool-lite lists CALL/JMP sites; the one Jcc.d32 tail call is listed by hand
    hand = {image.sym("sc_jcc_site")}
    assert [(s.addr, s.key, s.tail) for s in sites.static_call_sites] == \
        [(s.addr, s.key, s.tail) for s in tables.static_call_sites if s.addr not in hand]
    asm = sites_asm(sites)
    assert asm.count(".long") == 2 * len(sites.static_call_sites) + len(sites.retpoline_sites) \
        + len(sites.return_sites)


def test_objtool_lite_needs_relocations():
    with pytest.raises(ImageError, match="emit-relocs"):
        objtool_scan(image_path("workload.elf").read_bytes(), "workload.elf")
    with pytest.raises(ImageError):
        objtool_scan(_raw()[:500], "cut")


# ------------------------------------------------------------------ rebuild
def _gcc_version() -> str:
    out = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(" ", 1)[1] if out else ""


def _image_gcc_version() -> str:
    elf = ELFFile(io.BytesIO(_raw()))
    comment = elf.get_section_by_name(".comment").data().split(b"\0")[0].decode()
    return comment.split(" ", 1)[1]


@pytest.mark.skipif(not have_build_tools, reason="needs gcc, as and ld")
def test_rebuild_reproduces_image(tmp_path):
    from textpoke.images import build

    built = build.build_kernel(tmp_path)
    rebuilt = load_elf(built)
    if _gcc_version() != _image_gcc_version():
        # Another compiler: the image may differ in bytes but must still
        # parse, and objtool-lite must agree with itself.
        t = read_tables(rebuilt)
        assert len(t.alt_instructions) == EXPECTED_COUNTS[".altinstructions"]
        pytest.skip(f"gcc {_gcc_version()} differs from the image's {_image_gcc_version()}")
    assert built.read_bytes() == _raw()
    assert build.main(["--check", "--only", "kernel.elf"]) == 0


# ------------------------------------------------------------------ objdump
_PREFIXES = {"lock", "rep", "repz", "repnz", "repe", "repne", "data16", "data32", "cs", "ds",
             "ss", "es", "fs", "gs", "addr32", "bnd", "notrack"}
_ALIASES = {"movzbl": "movzx", "movzwl": "movzx", "movzbw": "movzx", "movsbl": "movsx",
            "movswl": "movsx", "movslq": "movsxd", "cltq": "cdqe", "cqto": "cqo", "cltd": "cdq",
            "movabs": "mov", "pushf": "pushfq", "popf": "popfq"}


def _objdump(section: str) -> dict[int, tuple[int, str, str]]:
    """addr -> (length, mnemonic, text) from GNU objdump -d."""
    out = subprocess.run(["objdump", "-d", "-w", "-j", section, str(KERNEL)],
                         capture_output=True, text=True, check=True).stdout
    insns = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$", line)
        if not m:
            continue
        text = m.group(3).split("#")[0].strip()
        insns[int(m.group(1), 16)] = (len(m.group(2).split()), text)
    return insns


def _same_mnemonic(objdump_text: str, insn) -> bool:
    words = [w for w in objdump_text.replace(";", " ").split()]
    while words and (words[0] in _PREFIXES or words[0].startswith("rex")):
        words = words[1:]
    mn = words[0] if words else ""
    ours = insn.mnemonic
    if is_nop(insn) and mn in ("nop", "nopw", "nopl", "xchg"):
        return True
    mn = _ALIASES.get(mn, mn)
    return mn == ours or (mn[:-1] == ours and mn[-1] in "bwlq")


@pytest.mark.skipif(not have_objdump, reason="needs GNU objdump")
@pytest.mark.parametrize("section", [".text", ".altinstr_replacement"])
def test_disassembly_matches_objdump(image, section):
    theirs = _objdump(section)
    sec = image.sections[section]
    if section == ".text":
        ranges = [(a, image.sizes[n]) for n, a in image.symbols.items()
                  if sec.addr <= a < sec.end and image.sizes.get(n)]
    else:
        ranges = [(sec.addr, len(sec.data))]
    checked = 0
    for start, size in ranges:
        for insn in _disasm(image, start, size):
            assert insn.addr in theirs, f"{insn.addr:#x} ({insn.text}) is not an objdump boundary"
            length, text = theirs[insn.addr]
            assert length == insn.length, f"{insn.addr:#x}: {insn.text} vs {text}"
            assert _same_mnemonic(text, insn), f"{insn.addr:#x}: {insn.mnemonic} vs {text}"
            checked += 1
    assert checked > (500 if section == ".text" else 100)


@pytest.mark.skipif(not have_build_tools, reason="needs as and ld")
def test_objtool_lite_synthetic(tmp_path):
    """CALL, Jcc and JMP sites are found; an address taken with LEA and a
    branch inside the thunk block are not sites; a trampoline without a key
    is refused."""
    src = tmp_path / "t.s"
    src.write_text("""
        .text
        .globl _start
    _start:
        call __x86_indirect_thunk_r11
        jne __x86_return_thunk
        lea __x86_indirect_thunk_rax(%rip), %rax
        jmp __SCT__foo
        call __SCT__foo
        jmp __x86_return_thunk
        .section .text.thunks, "ax"
        .globl __indirect_thunk_start, __indirect_thunk_end
    __indirect_thunk_start:
        .globl __x86_indirect_thunk_rax, __x86_indirect_thunk_r11
    __x86_indirect_thunk_rax:
        jmp __x86_return_thunk
    __x86_indirect_thunk_r11:
        ret
    __indirect_thunk_end:
        .globl __x86_return_thunk, __SCT__foo
    __x86_return_thunk:
        ret
    __SCT__foo:
        ret
        .data
        .globl __SCK__foo
    __SCK__foo:
        .quad 0, 1
    """)
    obj, elf = tmp_path / "t.o", tmp_path / "t.elf"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "--emit-relocs", "-Ttext=0x1000000", "-Tdata=0x3000000", "-e", "_start",
                    "-o", str(elf), str(obj)], check=True)
    raw = elf.read_bytes()
    start = load_elf(raw).sym("_start")
    sites = objtool_scan(raw, "t.elf")
    # call 5 | jne 6 | lea 7 | jmp 5 | call 5 | jmp 5
    assert sites.retpoline_sites == (start,)
    assert sites.return_sites == (start + 5, start + 28)
    key = load_elf(raw).sym("__SCK__foo")
    assert [(s.addr, s.key, s.tail) for s in sites.static_call_sites] == \
        [(start + 18, key, True), (start + 23, key, False)]
    no_key = raw.replace(b"__SCK__foo", b"__SCK__bar")
    with pytest.raises(ImageError, match="no __SCK__foo key"):
        objtool_scan(no_key, "t.elf")
