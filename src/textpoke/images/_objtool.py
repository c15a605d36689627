# SPDX-License-Identifier: GPL-2.0-only
"""objtool-lite: the site tables objtool would write, derived from the
relocations that ``ld --emit-relocs`` keeps in a linked image.

The kernel's objtool decodes every instruction of every object file; here
the compiler and assembler have already told us where every branch to an
external symbol is, because each such branch carries a PC-relative
relocation.  A relocation that targets

* ``__x86_indirect_thunk_<reg>`` from a CALL, JMP or Jcc is a retpoline
  site (``.retpoline_sites``);
* ``__x86_return_thunk`` from a JMP or Jcc is a return site
  (``.return_sites``);
* ``__SCT__<name>`` (a static-call trampoline) from a CALL or JMP is a
  static-call site (``.static_call_sites``, with the tail-call flag for a
  JMP and the key ``__SCK__<name>``).

Each table entry is an s32 relative to the entry's own address, as
objtool emits them.  :func:`sites_asm` writes the tables as an assembly
file whose ``.long target - .`` expressions the linker resolves, so the
second link places them wherever the linker script says.

Only core text is scanned: ``.altinstr_replacement`` (replacements are
copied, not run in place), the thunk array and the static-call trampolines
(between the linker-script symbols ``__indirect_thunk_start/_end`` and
``__static_call_text_start/_end``) hold no sites.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from .._errors import BadInstructionError
from .._core._insn import insn_decode_kernel
from ._elf import SHF_EXECINSTR, SHT_RELA, SHT_SYMTAB, ElfFile, ImageError, Section

__all__ = ["ObjtoolSites", "StaticCallSiteRef", "objtool_scan", "sites_asm", "branch_refs",
           "RETPOLINE_THUNK_PREFIX", "RETURN_THUNK", "STATIC_CALL_TRAMP_PREFIX",
           "STATIC_CALL_KEY_PREFIX"]

RETPOLINE_THUNK_PREFIX = "__x86_indirect_thunk_"
RETURN_THUNK = "__x86_return_thunk"
STATIC_CALL_TRAMP_PREFIX = "__SCT__"
STATIC_CALL_KEY_PREFIX = "__SCK__"

#: static_call_site key flags
STATIC_CALL_SITE_TAIL = 1 << 0

_R_X86_64_PC32 = 2
_R_X86_64_PLT32 = 4

#: output sections whose branches are not sites
_NOT_SITE_SECTIONS = (".altinstr_replacement",)
#: (start, end) symbol pairs of text ranges that hold no sites
_NOT_SITE_RANGES = (("__indirect_thunk_start", "__indirect_thunk_end"),
                    ("__static_call_text_start", "__static_call_text_end"))


@dataclass(frozen=True, slots=True)
class StaticCallSiteRef:
    addr: int          # the CALL/JMP instruction
    key: int           # address of __SCK__<name>
    tail: bool         # a JMP (tail call) rather than a CALL
    name: str          # <name>


@dataclass(frozen=True)
class ObjtoolSites:
    retpoline_sites: tuple[int, ...]
    return_sites: tuple[int, ...]
    static_call_sites: tuple[StaticCallSiteRef, ...]

    def counts(self) -> dict[str, int]:
        return {".retpoline_sites": len(self.retpoline_sites),
                ".return_sites": len(self.return_sites),
                ".static_call_sites": len(self.static_call_sites)}


def _branch_at(text: bytes, base: int, r_offset: int) -> tuple[int, str] | None:
    """The CALL/JMP32/Jcc.d32 whose rel32 is at *r_offset*, as (address,
    flow), or None when the relocation is not a branch displacement."""
    for start in (r_offset - 1, r_offset - 2):
        off = start - base
        if off < 0:
            continue
        try:
            insn = insn_decode_kernel(text[off:off + 15], start)
        except BadInstructionError:
            continue
        if insn.flow in ("call", "jmp", "jcc") and insn.immediate_size == 4 \
                and start + insn.immediate_offset == r_offset and insn.end == r_offset + 4:
            return start, insn.flow
    return None


def branch_refs(elf: ElfFile, skip_sections: tuple[str, ...] = _NOT_SITE_SECTIONS
                ) -> Iterator[tuple[Section, int, str, str]]:
    """(text section, r_offset, symbol, kind) of every rel32 (PC32/PLT32,
    addend -4) in an executable section's RELA relocations that names a
    retpoline thunk (kind "retpoline"), the return thunk ("return") or a
    static-call trampoline ("static_call") -- a linked image with
    ``--emit-relocs`` (r_offset an address) or a relocatable object (an
    offset into the section) alike."""
    for rel in elf.sections:
        if rel.type != SHT_RELA or rel.info >= len(elf.sections):
            continue
        target = elf.sections[rel.info]
        if not target.flags & SHF_EXECINSTR or target.name in skip_sections:
            continue
        names = elf.symbol_names(elf.sections[rel.link])
        for off, rtype, symi, addend in elf.relocations(rel):
            if rtype not in (_R_X86_64_PC32, _R_X86_64_PLT32) or addend != -4:
                continue
            name = names[symi]
            if name.startswith(RETPOLINE_THUNK_PREFIX) and not name.endswith("_array"):
                kind = "retpoline"
            elif name == RETURN_THUNK:
                kind = "return"
            elif name.startswith(STATIC_CALL_TRAMP_PREFIX):
                kind = "static_call"
            else:
                continue
            yield target, off, name, kind


def objtool_scan(elf_bytes: bytes, path: str = "<image>") -> ObjtoolSites:
    """Find retpoline, return and static-call sites in a linked image that
    still carries its relocations (``ld --emit-relocs``)."""
    try:
        return _scan(elf_bytes, path)
    except (struct.error, ValueError, KeyError, IndexError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: objtool-lite cannot read the image "
                         f"({type(e).__name__}: {e})") from None


def _scan(raw: bytes, path: str) -> ObjtoolSites:
    elf = ElfFile(raw, path)
    if not any(s.type == SHT_SYMTAB for s in elf.sections):
        raise ImageError(f"{path}: no symbol table; objtool-lite needs one")
    symbols = {name: value for name, value, *_ in elf.symbols(types=tuple(range(16)))}
    skip = [(symbols[a], symbols[b]) for a, b in _NOT_SITE_RANGES if a in symbols and b in symbols]
    retpolines: list[int] = []
    returns: list[int] = []
    static_calls: list[StaticCallSiteRef] = []
    saw_relocs = any(r.type == SHT_RELA and r.info < len(elf.sections)
                     and elf.sections[r.info].flags & SHF_EXECINSTR
                     and elf.sections[r.info].name not in _NOT_SITE_SECTIONS
                     for r in elf.sections)
    texts: dict[int, bytes] = {}
    for target, off, name, kind in branch_refs(elf):
        if any(lo <= off < hi for lo, hi in skip):
            continue
        text = texts.get(target.index)
        if text is None:
            text = texts[target.index] = elf.data(target)
        where = _branch_at(text, target.addr, off)
        if where is None:
            continue        # the address is taken (LEA ...), nothing to patch
        addr, flow = where
        if kind == "retpoline":
            retpolines.append(addr)
        elif kind == "return":
            if flow == "call":
                raise ImageError(f"{path}: CALL to {RETURN_THUNK} at {addr:#x}")
            returns.append(addr)
        else:
            call = name[len(STATIC_CALL_TRAMP_PREFIX):]
            key = symbols.get(STATIC_CALL_KEY_PREFIX + call)
            if key is None:
                raise ImageError(f"{path}: static call {call!r} has a trampoline but no "
                                 f"{STATIC_CALL_KEY_PREFIX}{call} key")
            if flow == "jcc":
                raise ImageError(f"{path}: conditional tail call to {name} at {addr:#x} "
                                 "is not a static-call site the patcher supports")
            static_calls.append(StaticCallSiteRef(addr, key, flow == "jmp", call))
    if not saw_relocs:
        raise ImageError(f"{path}: no relocations in text; link with --emit-relocs")
    return ObjtoolSites(tuple(sorted(retpolines)), tuple(sorted(returns)),
                        tuple(sorted(static_calls, key=lambda s: s.addr)))


def sites_asm(sites: ObjtoolSites) -> str:
    """The tables as GNU assembler source (s32 entries, ``target - .``)."""
    out = ["# Generated by textpoke.images._objtool (objtool-lite); do not edit.\n"]
    out.append('\t.section .static_call_sites, "a"\n\t.balign 4\n')
    for s in sites.static_call_sites:
        flags = STATIC_CALL_SITE_TAIL if s.tail else 0
        out.append(f"\t.long {s.addr:#x} - .\t# {s.name}{' (tail)' if s.tail else ''}\n")
        out.append(f"\t.long {s.key + flags:#x} - .\n")
    out.append('\t.section .retpoline_sites, "a"\n\t.balign 4\n')
    out.extend(f"\t.long {a:#x} - .\n" for a in sites.retpoline_sites)
    out.append('\t.section .return_sites, "a"\n\t.balign 4\n')
    out.extend(f"\t.long {a:#x} - .\n" for a in sites.return_sites)
    return "".join(out)
