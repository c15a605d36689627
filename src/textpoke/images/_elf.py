# SPDX-License-Identifier: GPL-2.0-only
"""Loading linked guest images (ELF64 x86-64 executables) with pyelftools.

The loader reads allocated sections into typed regions and the symbol
table into a dict, and refuses anything malformed with :class:`ImageError`
-- never a traceback from deep inside pyelftools.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import TextPokeError

__all__ = ["ImageError", "ElfSection", "ElfImage", "load_elf"]


class ImageError(TextPokeError, ValueError):
    """A guest image is malformed, truncated or inconsistent."""


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

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise ImageError(f"{self.path}: no symbol {name!r}") from None

    def section(self, name: str) -> ElfSection:
        try:
            return self.sections[name]
        except KeyError:
            raise ImageError(f"{self.path}: no section {name!r}") from None

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
    # pyelftools is imported here, not with the module: a real kernel's
    # loader (images._vmlinux) reads its ELF itself and never needs it
    from elftools.common.exceptions import ELFError
    try:
        return _load(raw, path)
    except ImageError:
        raise
    except (ELFError, ValueError, KeyError, IndexError, AssertionError, EOFError, OSError) as e:
        raise ImageError(f"{path}: malformed or truncated ELF ({type(e).__name__}: {e})") from None
    except Exception as e:  # construct's errors have no common public base
        raise ImageError(f"{path}: malformed or truncated ELF ({type(e).__name__}: {e})") from None


def _load(raw: bytes, path: str) -> ElfImage:
    from elftools.elf.constants import SH_FLAGS
    from elftools.elf.elffile import ELFFile
    if raw[:4] != b"\x7fELF":
        raise ImageError(f"{path}: not an ELF file")
    elf = ELFFile(io.BytesIO(raw))
    if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
        raise ImageError(f"{path}: not an ELF64 x86-64 image ({elf['e_machine']}, {elf.elfclass}-bit)")
    if elf["e_type"] != "ET_EXEC":
        raise ImageError(f"{path}: not a linked executable (e_type {elf['e_type']})")
    sections: dict[str, ElfSection] = {}
    for sec in elf.iter_sections():
        flags = sec["sh_flags"]
        if not flags & SH_FLAGS.SHF_ALLOC or sec["sh_size"] == 0:
            continue
        if sec["sh_type"] == "SHT_NOBITS":
            data, kind = bytes(sec["sh_size"]), "bss"
        else:
            end = sec["sh_offset"] + sec["sh_size"]
            if end > len(raw):
                raise ImageError(f"{path}: section {sec.name} runs past the end of the file "
                                 f"({end:#x} > {len(raw):#x}): truncated image")
            data = sec.data()
            if flags & SH_FLAGS.SHF_EXECINSTR:
                kind = "text"
            elif flags & SH_FLAGS.SHF_WRITE:
                kind = "data"
            else:
                kind = "rodata"
        sections[sec.name] = ElfSection(sec.name, sec["sh_addr"], bytes(data), kind)
    symbols: dict[str, int] = {}
    sizes: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    if symtab is not None:
        for s in symtab.iter_symbols():
            if s.name and s["st_info"]["type"] in ("STT_FUNC", "STT_NOTYPE", "STT_OBJECT") \
                    and s["st_shndx"] != "SHN_UNDEF":
                symbols[s.name] = s["st_value"]
                sizes[s.name] = s["st_size"]
    return ElfImage(path=path, entry=elf["e_entry"], sections=sections, symbols=symbols,
                    sizes=sizes, raw=raw)
