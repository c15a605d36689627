# SPDX-License-Identifier: GPL-2.0-only
"""The one reader of each kind (issue 13): the ELF reader against
pyelftools as an independent oracle, the table reader's layouts and its
validate step, and the symbolizer's three naming rules."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from textpoke.images._elf import ElfFile
from textpoke.images import ImageError, load_elf
from textpoke.images._symbols import SymbolMap, Symbols, format_symbol
from textpoke.images._tables import (ALT_FLAG_NOT, AltInstr, Bounds, JumpEntry, TableError,
                                     alt_instr_table, check_entries, check_table, jump_table,
                                     read_tables, s32_sites, static_call_table)

IMAGES = Path(__file__).resolve().parents[1] / "src" / "textpoke" / "images"


# ---------------------------------------------------------------------- ELF
@pytest.mark.parametrize("name", ["kernel.elf", "modules/mod_clients.o"])
def test_elf_reader_agrees_with_pyelftools(name):
    raw = (IMAGES / name).read_bytes()
    ours = ElfFile(raw, name)
    ref = ELFFile(io.BytesIO(raw))
    assert [(s.name, s.addr, s.size, s.offset) for s in ours.sections] == \
        [(s.name, s["sh_addr"], s["sh_size"], s["sh_offset"]) for s in ref.iter_sections()]
    for sec in ours.sections:
        if sec.type != 8 and sec.size:                  # not SHT_NOBITS
            assert ours.data(sec) == ref.get_section(sec.index).data()
    symtab = ours.section(".symtab")
    assert [e[0] for e in ours.symbol_table(symtab)] == \
        [s.name for s in ref.get_section_by_name(".symtab").iter_symbols()]
    rels = [r for r in ref.iter_sections() if isinstance(r, RelocationSection)]
    assert rels, "the image keeps its relocations (--emit-relocs / a .o)"
    for r in rels:
        got = list(ours.relocations(ours.sections[ref.get_section_index(r.name)]))
        assert got == [(x["r_offset"], x["r_info_type"], x["r_info_sym"], x["r_addend"])
                       for x in r.iter_relocations()]


def test_elf_reader_refuses_in_one_line():
    raw = (IMAGES / "kernel.elf").read_bytes()
    with pytest.raises(ImageError, match="not an ELF file"):
        ElfFile(b"MZ" + bytes(100))
    with pytest.raises(ImageError, match="truncated"):
        ElfFile(raw[:200])
    arm = bytearray(raw)
    arm[18:20] = (183).to_bytes(2, "little")            # e_machine = EM_AARCH64
    with pytest.raises(ImageError, match="arm64"):
        load_elf(bytes(arm))

    class Mine(Exception):
        pass
    with pytest.raises(Mine):                            # the caller's error class
        ElfFile(b"\x7fELF" + bytes(10), "x", error=Mine)


# ------------------------------------------------------------------- tables
def test_alt_instr_layouts_612_and_61():
    base = 0x1000
    e612 = struct.pack("<iiIBB", 0x100, 0x200, (ALT_FLAG_NOT << 16) | (9 * 32 + 9), 5, 3)
    (a,) = alt_instr_table(e612, base, base, base + 14)
    assert a == AltInstr(base + 0x100, base + 4 + 0x200, 9 * 32 + 9, ALT_FLAG_NOT, 5, 3, base, 0)
    assert a.not_flag and a.feature == "erms"
    e61 = struct.pack("<iiHBB", 0x100, 0x200, 0x8000 | 42, 6, 2)
    (b,) = alt_instr_table(e61 * 2, base, base + 12, base + 24, layout="cpuid", first=1)
    assert (b.instr, b.cpuid, b.flags, b.instrlen, b.index) == \
        (base + 12 + 0x100, 42, ALT_FLAG_NOT, 6, 1)
    with pytest.raises(TableError, match="not a multiple of its 14-byte"):
        alt_instr_table(e612, base, base, base + 13)


def test_jump_and_static_call_flag_bits():
    base = 0x2000
    ent = struct.pack("<iiq", 0x10, 0x20, 0x300 + 3 - 8)   # key field at base+8
    (j,) = jump_table(ent, base, base, base + 16)
    assert j == JumpEntry(base + 0x10, base + 4 + 0x20, base + 0x300, True, True, base)
    (s,) = static_call_table(struct.pack("<ii", 0x40, 0x80 + 1 - 4), base, base, base + 8)
    assert (s.addr, s.key, s.tail, s.init, s.entry) == (base + 0x40, base + 0x80, True, False, base)


def test_validate_step_names_the_entry_and_samples():
    base = 0x10000
    text = ((base, base + 0x1000),)
    b = Bounds("img", text, repl=text, padding=frozenset({".smp_locks"}))
    # every 100th entry points outside text; entry 0 is padding (0)
    offs = [0] + [(0x1000 if i % 100 == 0 else 0x10) for i in range(1, 1000)]
    raw = struct.pack(f"<{len(offs)}i", *offs)
    with pytest.raises(ImageError, match=r"\.smp_locks entry 100 at .* lies outside \.text"):
        check_entries(".smp_locks", enumerate(s32_sites(raw, base, base, base + len(raw))), b)
    # a sample of 10 spread over the table meets entries 0, 100, 200...: caught
    with pytest.raises(ImageError, match="entry 100 "):
        check_table(".smp_locks", raw, base, base, base + len(raw), b, sample=10)
    # the caller's error class (a module loader's)
    mb = Bounds("module m", text, "its text", error=KeyError)
    with pytest.raises(KeyError):
        check_entries(".return_sites", [(0, s32_sites(raw, base, base + 400, base + 404)[0])], mb)


def test_read_tables_of_the_bundled_image_as_records():
    t = read_tables(IMAGES / "kernel.elf")
    assert t.alt_instructions and all(isinstance(a, AltInstr) for a in t.alt_instructions)
    assert [a.index for a in t.alt_instructions] == list(range(len(t.alt_instructions)))
    assert all(t.text[0] <= j.code < t.text[1] for j in t.jump_table)


# ------------------------------------------------------------------ symbols
def test_symbolizer_rules():
    s = Symbols.from_mapping({"f": 0x10, "lbl": 0x14, "g": 0x40, "alias": 0x40},
                             {"f": 0x20, "g": 0x8})
    assert s.describe(0x18) == "lbl+0x4"                       # nearest, as kallsyms
    assert s.describe(0x18, function=True) == "f+0x8"          # the enclosing function
    assert s.lookup(0x18, function=True) == ("f", 0x10, 0x20)
    assert s.describe(0x38, function=True) == "lbl+0x24"       # past f's end: the label
    assert s.describe(0x40) == "g" and s.describe(0x40, offset0=True) == "g+0x0"
    assert s.describe(0x44) == "g+0x4"                         # sized first at one address
    assert s.describe(0x8) == "0x8" and s.lookup(0x8) is None
    assert format_symbol("g", 4, 8) == "g+0x4/0x8"


def test_symbol_map_owners():
    m = SymbolMap({"f": 0x10, "__start_x": 0x18, ".text": 0x10}, {"f": 0x10})
    assert m.describe(0x18) == "f+0x8"          # section names and bounds name nothing
    m.add("mod", {"m": 0x1000}, {"m": 0x10})
    assert m.describe(0x1004) == "m+0x4 [mod]"
    m.remove("mod")
    assert m.describe(0x1004) == "0x1004"       # past f's end: named by nothing
