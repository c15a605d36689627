# SPDX-License-Identifier: GPL-2.0-only
"""The one ELF reader: ELF64 little-endian files, read with ``struct``.

:class:`ElfFile` reads the headers, sections (with names), segments,
symbols and RELA relocations of a file held as bytes or an ``mmap`` --
offsets only, nothing copied until asked.  Everyone who reads an ELF uses
it: :func:`load_elf` (the bundled guest image, its sections as typed
regions and its symbol table as a dict), the real kernel's loader
(``_vmlinux``: a 60 MB vmlinux in milliseconds), and live processes
(``live._symbols``: every mapped library, where pyelftools' construct
parsing cost ~130 ms a module just for the headers).  It refuses anything
malformed with one line (:class:`ImageError`, or the caller's error
class) -- never a traceback from deep inside a parser.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from .._errors import TextPokeError

__all__ = ["ImageError", "ElfSection", "ElfImage", "load_elf", "ElfFile", "Section",
           "Segment", "SHT_SYMTAB", "SHT_RELA", "SHT_REL", "SHT_NOBITS", "SHT_DYNSYM", "SHN_ABS",
           "SHN_COMMON", "STB_WEAK", "SHF_WRITE",
           "SHF_ALLOC", "SHF_EXECINSTR", "PT_LOAD", "ET_REL", "ET_EXEC", "ET_DYN", "EM_X86_64"]

SHT_SYMTAB, SHT_RELA, SHT_NOBITS, SHT_REL, SHT_DYNSYM = 2, 4, 8, 9, 11
SHN_ABS, SHN_COMMON = 0xFFF1, 0xFFF2
STB_WEAK = 2
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
PT_LOAD = 1
ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
EM_X86_64 = 62
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2

_EHDR = struct.Struct("<HHIQQQIHHHHHH")        # from e_type (offset 16)
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
_MACHINES = {183: "arm64 (EM_AARCH64)", 40: "arm (EM_ARM)", 243: "riscv (EM_RISCV)",
             3: "i386 (EM_386)", 21: "ppc64 (EM_PPC64)", 22: "s390 (EM_S390)"}
_TYPES = {ET_REL: "ET_REL", ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN", 4: "ET_CORE"}


class ImageError(TextPokeError, ValueError):
    """A guest image is malformed, truncated or inconsistent."""


class Section(NamedTuple):
    """One section header, its name resolved."""

    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entsize: int

    @property
    def kind(self) -> str:
        """"text", "data", "rodata" or "bss", by type and flags."""
        if self.type == SHT_NOBITS:
            return "bss"
        if self.flags & SHF_EXECINSTR:
            return "text"
        return "data" if self.flags & SHF_WRITE else "rodata"


class Segment(NamedTuple):
    """One program header."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


class ElfFile:
    """The headers, sections, segments, symbols and relocations of an ELF64
    little-endian file in *raw* (bytes or an mmap), checked as they are
    read; *error* is the exception raised (one line, prefixed *path*)."""

    def __init__(self, raw, path: str = "<bytes>", *, error: type[Exception] | None = None):
        self.raw = raw
        self.path = path
        self.error = error or ImageError
        if len(raw) < 64 or raw[:4] != b"\x7fELF":
            raise self.error(f"{path}: not an ELF file" if raw[:4] != b"\x7fELF" or len(raw) < 4
                             else f"{path}: truncated ELF header")
        if raw[4] != 2 or raw[5] != 1:
            raise self.error(f"{path}: not a little-endian ELF64 file (class {raw[4]}, "
                             f"data {raw[5]})")
        (self.type, self.machine, _version, self.entry, phoff, shoff, _flags, _ehsize,
         phentsize, phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(raw, 16)
        if (shnum and shentsize != 64) or (phnum and phentsize != 56):
            raise self.error(f"{path}: ELF header sizes are not ELF64's (shentsize {shentsize}, "
                             f"phentsize {phentsize})")
        if shoff + shnum * 64 > len(raw) or phoff + phnum * 56 > len(raw):
            raise self.error(f"{path}: section or program headers run past the end of the "
                             f"file: truncated ELF")
        self.segments = [Segment(*_PHDR.unpack_from(raw, phoff + 56 * i)) for i in range(phnum)]
        heads = [_SHDR.unpack_from(raw, shoff + 64 * i) for i in range(shnum)]
        names = b""
        if heads:
            if shstrndx >= shnum:
                raise self.error(f"{path}: bad section-name table index {shstrndx}")
            off, size = heads[shstrndx][4], heads[shstrndx][5]
            if off + size > len(raw):
                raise self.error(f"{path}: section-name table runs past the end of the file")
            names = bytes(raw[off:off + size])
        self.sections = [Section(i, _cstr(names, h[0]), *h[1:]) for i, h in enumerate(heads)]
        self._by_name: dict[str, Section] = {}
        for sec in self.sections:
            self._by_name.setdefault(sec.name, sec)

    # ------------------------------------------------------------ checks
    def require(self, etype: int | tuple[int, ...], what: str = "a linked executable") -> None:
        """Refuse anything but x86-64 of (one of) *etype*."""
        if self.machine != EM_X86_64:
            raise self.error(f"{self.path}: an ELF for "
                             f"{_MACHINES.get(self.machine, f'machine {self.machine}')}, "
                             f"not x86-64")
        if self.type not in (etype if isinstance(etype, tuple) else (etype,)):
            raise self.error(f"{self.path}: not {what} "
                             f"(e_type {_TYPES.get(self.type, self.type)})")

    # ---------------------------------------------------------- sections
    def section(self, name: str) -> Section | None:
        return self._by_name.get(name)

    def data(self, sec: Section) -> bytes:
        """The section's bytes (zeros for SHT_NOBITS)."""
        if sec.type == SHT_NOBITS:
            return bytes(sec.size)
        self.check_in_file(sec)
        return bytes(self.raw[sec.offset:sec.offset + sec.size])

    def check_in_file(self, sec: Section) -> None:
        if sec.type != SHT_NOBITS and sec.offset + sec.size > len(self.raw):
            raise self.error(f"{self.path}: section {sec.name} runs past the end of the file "
                             f"({sec.offset + sec.size:#x} > {len(self.raw):#x}): truncated")

    def loads(self) -> list[Segment]:
        return [p for p in self.segments if p.type == PT_LOAD]

    # ----------------------------------------------------------- symbols
    def symbol_tables(self) -> list[Section]:
        """``.symtab`` and ``.dynsym``, in that order, where present."""
        return [s for t in (SHT_SYMTAB, SHT_DYNSYM) for s in self.sections if s.type == t]

    def _entries(self, sec: Section) -> tuple[bytes, Iterator[tuple]]:
        """A symbol table's string table and its raw ``Elf64_Sym`` entries."""
        self.check_in_file(sec)
        if sec.link >= len(self.sections):
            raise self.error(f"{self.path}: {sec.name} has no string table")
        st = self.sections[sec.link]
        self.check_in_file(st)
        n = sec.size // _SYM.size
        return (bytes(self.raw[st.offset:st.offset + st.size]),
                _SYM.iter_unpack(self.raw[sec.offset:sec.offset + n * _SYM.size]))

    def symbols(self, sec: Section | None = None,
                types: tuple[int, ...] = (STT_NOTYPE, STT_OBJECT, STT_FUNC)
                ) -> Iterator[tuple[str, int, int, int, int, int]]:
        """(name, value, size, type, bind, shndx) of every named, defined
        symbol of *sec* (default: the ``.symtab``) whose type is in *types*."""
        if sec is None:
            sec = next((s for s in self.sections if s.type == SHT_SYMTAB), None)
            if sec is None:
                return
        strs, ents = self._entries(sec)
        for nm, info, _other, shndx, value, size in ents:
            typ = info & 0xF
            if nm == 0 or shndx == 0 or typ not in types:
                continue
            yield _cstr(strs, nm), value, size, typ, info >> 4, shndx

    def symbol_table(self, sec: Section) -> list[tuple[str, int, int, int, int, int]]:
        """Every entry of symbol table *sec* by index -- what a relocation's
        symbol index refers to: (name, value, size, type, bind, shndx), name
        "" for an unnamed one, undefined ones (shndx 0) included."""
        strs, ents = self._entries(sec)
        return [(_cstr(strs, nm) if nm else "", value, size, info & 0xF, info >> 4, shndx)
                for nm, info, _other, shndx, value, size in ents]

    def symbol_names(self, sec: Section) -> list[str]:
        """The name of every entry of symbol table *sec*, by index."""
        return [e[0] for e in self.symbol_table(sec)]

    def relocations(self, sec: Section) -> Iterator[tuple[int, int, int, int]]:
        """(offset, type, symbol index, addend) of a SHT_RELA section."""
        if sec.type != SHT_RELA:
            raise self.error(f"{self.path}: {sec.name} is not SHT_RELA (x86-64 uses RELA)")
        data = self.data(sec)
        for off, info, addend in _RELA.iter_unpack(data[:len(data) - len(data) % _RELA.size]):
            yield off, info & 0xFFFFFFFF, info >> 32, addend


def _cstr(tab: bytes, i: int) -> str:
    j = tab.find(b"\0", i)
    return tab[i:j if j >= 0 else len(tab)].decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class ElfSection:
    name: str
    addr: int
    data: bytes
    kind: str        # "text", "rodata", "data", "bss"

    @property
    def end(self) -> int:
        return self.addr + len(self.data)


@dataclass(frozen=True, eq=False)
class ElfImage:
    path: str
    entry: int
    sections: dict[str, ElfSection]
    symbols: dict[str, int]
    sizes: dict[str, int] = field(default_factory=dict)
    raw: bytes = b""

    def _named(self, table, what: str, name: str):
        """``table[name]``, or one line naming what is missing."""
        try:
            return table[name]
        except KeyError:
            raise ImageError(f"{self.path}: no {what} {name!r}") from None

    def sym(self, name: str) -> int:
        return self._named(self.symbols, "symbol", name)

    def section(self, name: str) -> ElfSection:
        return self._named(self.sections, "section", name)

    def name_at(self, addr: int) -> str | None:
        best = None
        for n, a in self.symbols.items():
            if a == addr and (best is None or n < best):
                best = n
        return best


def load_elf(source: str | Path | bytes) -> ElfImage:
    """Load an executable image; *source* is a path or the file's bytes."""
    if isinstance(source, (bytes, bytearray)):
        raw, path = bytes(source), "<bytes>"
    else:
        path = str(source)
        try:
            raw = Path(source).read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read image {path}: {e.strerror}") from None
    try:
        return _load(raw, path)
    except (struct.error, ValueError, IndexError, UnicodeError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: malformed or truncated ELF ({type(e).__name__}: {e})") from None


def _load(raw: bytes, path: str) -> ElfImage:
    elf = ElfFile(raw, path)
    elf.require(ET_EXEC)
    sections: dict[str, ElfSection] = {}
    for sec in elf.sections:
        if not sec.flags & SHF_ALLOC or sec.size == 0:
            continue
        sections[sec.name] = ElfSection(sec.name, sec.addr, elf.data(sec), sec.kind)
    symbols: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, value, size, _typ, _bind, _shndx in elf.symbols():
        symbols[name] = value
        sizes[name] = size
    return ElfImage(path=path, entry=elf.entry, sections=sections, symbols=symbols,
                    sizes=sizes, raw=raw)
