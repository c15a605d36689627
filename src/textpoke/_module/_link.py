# SPDX-License-Identifier: GPL-2.0-only
"""Linking a module's relocatable object: laying its sections out,
resolving its symbols against the kernel image and applying its
relocations (``layout_sections``, ``simplify_symbols`` and
``apply_relocate_add``), on staging buffers -- nothing here touches a
machine.  :class:`~textpoke._module.ModuleLoader` runs these steps, then
``module_finalize`` and the keys' and calls' registration.

Rules learnt from ``kernel/module/main.c`` and ``arch/x86/kernel/module.c``
(Linux 6.12); the code is our own.
"""

from __future__ import annotations

from .._errors import TextPokeError
from ..images._elf import SHN_ABS, SHN_COMMON, SHT_REL, SHT_RELA, STB_WEAK

__all__ = ["ModuleError", "ModuleFormatError", "ModuleRelocationError", "UnknownSymbolError",
           "RELOCATION_TYPES", "layout", "placed", "align", "resolve_symbols", "relocate"]

R_X86_64_NONE, R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32 = 0, 1, 2, 4
R_X86_64_32, R_X86_64_32S, R_X86_64_PC64 = 10, 11, 24
#: type -> (name, field size)
RELOCATION_TYPES = {R_X86_64_NONE: ("R_X86_64_NONE", 0), R_X86_64_64: ("R_X86_64_64", 8),
                    R_X86_64_PC32: ("R_X86_64_PC32", 4), R_X86_64_PLT32: ("R_X86_64_PLT32", 4),
                    R_X86_64_32: ("R_X86_64_32", 4), R_X86_64_32S: ("R_X86_64_32S", 4),
                    R_X86_64_PC64: ("R_X86_64_PC64", 8)}
_SHF_ALLOC, _SHF_EXEC = 0x2, 0x4
#: undefined symbols the x86-64 loader lets pass (GOT-relative code names it)
_IGNORED_UNDEF = frozenset({"_GLOBAL_OFFSET_TABLE_"})
_M64 = (1 << 64) - 1



class ModuleError(TextPokeError):
    """A module the loader refuses; nothing was written."""


class ModuleFormatError(ModuleError, ValueError):
    """Not an x86-64 ELF relocatable object, or a malformed one."""


class ModuleRelocationError(ModuleError):
    """An unknown relocation type, a value that does not fit its field, or
    a field that is not zero before relocation (``-ENOEXEC``)."""

    def __init__(self, msg: str, *, rtype: int = 0, section: str = "", offset: int = 0,
                 symbol: str = "", value: int = 0) -> None:
        super().__init__(msg)
        self.rtype, self.section, self.offset, self.symbol, self.value = \
            rtype, section, offset, symbol, value


class UnknownSymbolError(ModuleError, LookupError):
    """An undefined symbol the kernel image does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def layout(secs, name: str) -> tuple[dict[int, int], dict[int, int], int, int, int, int]:
    """(text_off, data_off, tsize, dsize, talign, dalign): every allocated
    section's offset in the text chunk (executable ones) or the data chunk
    (the others), as ``layout_sections`` lays them out."""
    text_off: dict[int, int] = {}
    data_off: dict[int, int] = {}
    tsize = dsize = 0
    talign = dalign = 16
    for i, s in enumerate(secs):
        if not s.flags & _SHF_ALLOC or s.size == 0:
            continue
        a = s.align or 1
        if s.flags & _SHF_EXEC:
            tsize = align(tsize, a)
            text_off[i] = tsize
            tsize += s.size
            talign = max(talign, a)
        else:
            dsize = align(dsize, a)
            data_off[i] = dsize
            dsize += s.size
            dalign = max(dalign, a)
    if not tsize:
        raise ModuleFormatError(f"module {name}: no executable section")
    return text_off, data_off, tsize, dsize, talign, dalign


def placed(secs, at: "dict[str, int]", name: str):
    """(text_off, data_off, tbase, tsize, dbase, dsize) of *secs* placed
    at the addresses *at* gives by section name."""
    text, data = {}, {}
    for i, s in enumerate(secs):
        if not s.flags & _SHF_ALLOC or s.size == 0:
            continue
        if s.name not in at and s.name in (".modinfo", "__versions"):
            continue            # the loader drops these (no SHF_ALLOC once loaded)
        if s.name not in at:
            raise ModuleFormatError(f"module {name}: no address given for section {s.name}")
        (text if s.flags & _SHF_EXEC else data)[i] = (at[s.name], s.size)
    tbase = min(a for a, _ in text.values())
    tsize = max(a + n for a, n in text.values()) - tbase
    dbase = min((a for a, _ in data.values()), default=0)
    dsize = max((a + n for a, n in data.values()), default=dbase) - dbase
    return ({i: a - tbase for i, (a, _n) in text.items()},
            {i: a - dbase for i, (a, _n) in data.items()}, tbase, tsize, dbase, dsize)


def align(v: int, a: int) -> int:
    a = max(a, 1)
    return -(-v // a) * a


def _sym_name(name: str, shndx: int, secs) -> str:
    """A symbol's name, or its section's for a section symbol."""
    if name:
        return name
    return secs[shndx].name if shndx < len(secs) else "?"


def _s64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def resolve_symbols(elf, secs, addr: dict[int, int], mod, kernel) -> tuple[list[int], list[str]]:
    """Every ``.symtab`` entry's value (undefined ones from *kernel*, a
    name -> address mapping) and name (a section symbol by its section's);
    the module's own defined symbols go into ``mod.symbols``/``mod.sizes``.
    :class:`UnknownSymbolError` names every undefined symbol the kernel
    does not have."""
    symtab = elf.section(".symtab")
    if symtab is None:
        raise ModuleFormatError(f"module {mod.name}: no symbol table")
    vals = []
    missing = []
    names: list[str] = []
    for sname, value, size, typ, bind, shndx in elf.symbol_table(symtab):
        names.append(_sym_name(sname, shndx, secs))
        v = 0
        if shndx == 0:                              # SHN_UNDEF
            if sname:
                if sname in kernel:
                    v = kernel[sname]
                elif bind != STB_WEAK and sname not in _IGNORED_UNDEF:
                    missing.append(sname)
        elif shndx == SHN_ABS:
            v = value
        elif shndx == SHN_COMMON:
            raise ModuleFormatError(f"module {mod.name}: common symbol {sname} "
                                    "(build with -fno-common)")
        elif shndx < 0xFF00 and shndx in addr:
            v = addr[shndx] + value
            if sname and typ in (0, 1, 2):          # NOTYPE, OBJECT, FUNC
                mod.symbols[sname] = v
                mod.sizes[sname] = size
        vals.append(v)
    if missing:
        raise UnknownSymbolError(f"module {mod.name}: Unknown symbol "
                                 f"{', '.join(sorted(set(missing)))} (not in the kernel image)")
    return vals, names

def relocate(elf, secs, addr, symvals: list[int], names: list[str], mod, text: bytearray,
             data: bytearray, text_off: dict[int, int], data_off: dict[int, int]) -> None:
    """``apply_relocate_add`` on the staged *text* and *data*: every RELA
    section of an allocated section, each field checked (known type, value
    in range, zero before the write) before it is written."""
    for rel in secs:
        if rel.type not in (SHT_REL, SHT_RELA):
            continue
        if rel.type != SHT_RELA:
            raise ModuleFormatError(f"module {mod.name}: {rel.name} is SHT_REL; x86-64 "
                                    "modules use RELA")
        tgt = rel.info
        if tgt not in addr:         # relocations of non-allocated sections (debug info)
            continue
        buf, base = (text, text_off[tgt]) if tgt in text_off else (data, data_off[tgt])
        tname = secs[tgt].name
        for off, t, symi, addend in elf.relocations(rel):
            if symi >= len(symvals):
                raise ModuleFormatError(f"module {mod.name}: {rel.name} names symbol {symi} "
                                        "beyond the symbol table")
            sname = names[symi]
            where = f"{tname}+{off:#x}"
            if t not in RELOCATION_TYPES:
                raise ModuleRelocationError(
                    f"module {mod.name}: unknown relocation type {t} at {where} against "
                    f"{sname}; nothing written", rtype=t, section=tname, offset=off,
                    symbol=sname)
            rname, size = RELOCATION_TYPES[t]
            if not size:
                continue
            loc = addr[tgt] + off
            val = (symvals[symi] + addend) & _M64
            if t in (R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_PC64):
                val = (val - loc) & _M64
            sv = _s64(val)
            ok = {R_X86_64_64: True, R_X86_64_PC64: True,
                  R_X86_64_32: 0 <= val < (1 << 32),
                  R_X86_64_32S: -(1 << 31) <= sv < (1 << 31),
                  R_X86_64_PC32: -(1 << 31) <= sv < (1 << 31),
                  R_X86_64_PLT32: -(1 << 31) <= sv < (1 << 31)}[t]
            if not ok:
                raise ModuleRelocationError(
                    f"module {mod.name}: {rname} at {where} against {sname}: value "
                    f"{sv:#x} does not fit {size} bytes; nothing written", rtype=t,
                    section=tname, offset=off, symbol=sname, value=sv)
            at = base + off
            if at + size > len(buf) or off + size > secs[tgt].size:
                raise ModuleFormatError(f"module {mod.name}: {rname} at {where} is outside "
                                        f"{tname}")
            if any(buf[at:at + size]):
                raise ModuleRelocationError(
                    f"module {mod.name}: {rname} at {where}: the field is not zero "
                    f"({bytes(buf[at:at + size]).hex(' ')}) before relocation; nothing "
                    "written", rtype=t, section=tname, offset=off, symbol=sname, value=sv)
            buf[at:at + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
