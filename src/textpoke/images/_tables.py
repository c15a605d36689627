# SPDX-License-Identifier: GPL-2.0-only
"""The boot-time patching tables of a kernel-like image, as typed records.

Every table stores self-relative offsets (the value plus the address of
the field it is stored in gives the target), except ``__mcount_loc``,
which holds absolute 64-bit addresses.  :func:`read_tables` resolves all
of them to absolute addresses and checks them against the image: every
site must lie in core text (``.text``), every replacement in
``.altinstr_replacement``, every key in a data section, no ``instrlen``
may exceed ``MAX_PATCH_LEN``, and a table's size must be a whole number of
entries.  Anything else is refused with :class:`ImageError`.

==========================  =======  ==========================================
section                     entry    layout
==========================  =======  ==========================================
``.altinstructions``        14       s32 instr, s32 repl, u32 ft_flags,
                                     u8 instrlen, u8 replacementlen (packed)
``.smp_locks``              4        s32 lock prefix
``__mcount_loc``            8        u64 fentry NOP5 (absolute)
``__jump_table``            16       s32 code, s32 target, s64 key | flags
``.static_call_sites``      8        s32 call/jmp, s32 key | flags
``.retpoline_sites``        4        s32 call/jmp/jcc to a retpoline thunk
``.return_sites``           4        s32 jmp/jcc to __x86_return_thunk
==========================  =======  ==========================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .._core._insn import MAX_PATCH_LEN
from ._elf import ElfImage, ElfSection, ImageError, load_elf

__all__ = [
    "AltInstr", "SmpLock", "McountLoc", "JumpEntry", "StaticCallSite", "RetpolineSite",
    "ReturnSite", "KernelTables", "read_tables",
    "ALT_FLAGS_SHIFT", "ALT_FLAG_NOT", "ALT_FLAG_DIRECT_CALL",
    "JUMP_TYPE_TRUE", "JUMP_TYPE_LINKED", "STATIC_CALL_SITE_TAIL", "STATIC_CALL_SITE_INIT",
    "X86_FEATURES", "feature_name", "feature_number", "feature_set",
]

ALT_FLAGS_SHIFT = 16
ALT_FLAG_NOT = 1 << 0
ALT_FLAG_DIRECT_CALL = 1 << 1

#: jump_entry key bits: branch polarity, and the kernel's init-section mark
JUMP_TYPE_TRUE = 1 << 0
JUMP_TYPE_LINKED = 1 << 1
#: static_call_site key bits
STATIC_CALL_SITE_TAIL = 1 << 0
STATIC_CALL_SITE_INIT = 1 << 1

#: Feature numbers (word * 32 + bit) of the bundled image, named as the
#: kernel's X86_FEATURE_* macros without the prefix.  Must agree with
#: kernel/cpufeatures.h (a test checks).
X86_FEATURES: dict[str, int] = {
    "xmm2": 0 * 32 + 26,
    "rdtscp": 1 * 32 + 27,
    "up": 3 * 32 + 9,
    "lfence_rdtsc": 3 * 32 + 18,
    "always": 3 * 32 + 21,
    "popcnt": 4 * 32 + 23,
    "hypervisor": 4 * 32 + 31,
    "retpoline": 7 * 32 + 12,
    "retpoline_lfence": 7 * 32 + 13,
    "xenpv": 8 * 32 + 16,
    "avx2": 9 * 32 + 5,
    "bmi2": 9 * 32 + 8,
    "erms": 9 * 32 + 9,
    "smap": 9 * 32 + 20,
    "clflushopt": 9 * 32 + 23,
    "rethunk": 11 * 32 + 14,
    "fsrm": 18 * 32 + 4,
}
_FEATURE_NAMES = {v: k for k, v in X86_FEATURES.items()}


def feature_name(cpuid: int) -> str:
    """``"erms"`` for 9*32+9; ``"9*32+10"`` for a number the image does not name."""
    return _FEATURE_NAMES.get(cpuid, f"{cpuid // 32}*32+{cpuid % 32}")


def feature_number(name: str) -> int:
    """The number of a feature given by name (case-insensitive, with or
    without ``X86_FEATURE_``) or as ``word*32+bit``."""
    key = name.strip().lower().removeprefix("x86_feature_")
    if key in X86_FEATURES:
        return X86_FEATURES[key]
    word, sep, bit = key.partition("*32+")
    if sep and word.isdigit() and bit.isdigit() and int(bit) < 32:
        return int(word) * 32 + int(bit)
    raise ValueError(f"unknown CPU feature {name!r} (known: {', '.join(sorted(X86_FEATURES))})")


def feature_set(names: Iterable[str | int]) -> frozenset[int]:
    """A feature set for patching: the given features plus ``always``, which
    the kernel forces on every CPU."""
    nums = {n if isinstance(n, int) else feature_number(n) for n in names}
    return frozenset(nums | {X86_FEATURES["always"]})


# ------------------------------------------------------------------ records
@dataclass(frozen=True, slots=True)
class AltInstr:
    """One ``struct alt_instr``, offsets resolved to addresses."""

    instr: int
    repl: int
    cpuid: int
    flags: int
    instrlen: int
    replacementlen: int
    entry: int = 0          # address of the table entry itself
    index: int = 0          # position in .altinstructions

    @property
    def ft_flags(self) -> int:
        return (self.flags << ALT_FLAGS_SHIFT) | self.cpuid

    @property
    def not_flag(self) -> bool:
        return bool(self.flags & ALT_FLAG_NOT)

    @property
    def direct_call(self) -> bool:
        return bool(self.flags & ALT_FLAG_DIRECT_CALL)

    @property
    def feature(self) -> str:
        return feature_name(self.cpuid)

    def wanted(self, features: Iterable[int]) -> bool:
        """Whether a CPU with *features* takes this replacement."""
        return (self.cpuid in features) != self.not_flag

    def describe(self) -> str:
        cond = ("!" if self.not_flag else "") + self.feature
        extra = " direct-call" if self.direct_call else ""
        return (f"{self.instr:#x} len {self.instrlen} <- {self.repl:#x} len "
                f"{self.replacementlen} if {cond}{extra}")


@dataclass(frozen=True, slots=True)
class SmpLock:
    addr: int               # the LOCK prefix byte
    entry: int = 0


@dataclass(frozen=True, slots=True)
class McountLoc:
    addr: int               # the fentry NOP5
    entry: int = 0


@dataclass(frozen=True, slots=True)
class JumpEntry:
    """One ``struct jump_entry``: the site, the branch target, the static
    key (flag bits removed) and the flag bits."""

    code: int
    target: int
    key: int
    branch: bool            # JUMP_TYPE_TRUE: the site was emitted for "likely"
    init: bool = False      # JUMP_TYPE_LINKED bit (init text in the kernel)
    entry: int = 0


@dataclass(frozen=True, slots=True)
class StaticCallSite:
    addr: int               # the CALL or JMP to the trampoline
    key: int                # struct static_call_key
    tail: bool              # STATIC_CALL_SITE_TAIL: a JMP
    init: bool = False
    entry: int = 0


@dataclass(frozen=True, slots=True)
class RetpolineSite:
    addr: int               # CALL/JMP/Jcc to __x86_indirect_thunk_<reg>
    entry: int = 0


@dataclass(frozen=True, slots=True)
class ReturnSite:
    addr: int               # JMP/Jcc to __x86_return_thunk
    entry: int = 0


@dataclass(frozen=True)
class KernelTables:
    path: str
    text: tuple[int, int]                   # [start, end) of core text
    replacement: tuple[int, int]            # [start, end) of .altinstr_replacement
    alt_instructions: tuple[AltInstr, ...] = ()
    smp_locks: tuple[SmpLock, ...] = ()
    mcount_loc: tuple[McountLoc, ...] = ()
    jump_table: tuple[JumpEntry, ...] = ()
    static_call_sites: tuple[StaticCallSite, ...] = ()
    retpoline_sites: tuple[RetpolineSite, ...] = ()
    return_sites: tuple[ReturnSite, ...] = ()

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, attr)) for name, attr, _ in _TABLES}

    def alt_groups(self) -> list[tuple[AltInstr, ...]]:
        """Runs of consecutive entries patching the same address (a nested
        ALTERNATIVE), in table order; the kernel pads every entry of a run
        to the run's largest instrlen."""
        groups: list[list[AltInstr]] = []
        for a in self.alt_instructions:
            if groups and groups[-1][0].instr == a.instr:
                groups[-1].append(a)
            else:
                groups.append([a])
        return [tuple(g) for g in groups]


# ------------------------------------------------------------------ parsing
_ALT = struct.Struct("<iiIBB")
_S32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_JUMP = struct.Struct("<iiq")
_SCS = struct.Struct("<ii")

#: (section, KernelTables attribute, entry size)
_TABLES = (
    (".altinstructions", "alt_instructions", _ALT.size),
    (".smp_locks", "smp_locks", 4),
    ("__mcount_loc", "mcount_loc", 8),
    ("__jump_table", "jump_table", _JUMP.size),
    (".static_call_sites", "static_call_sites", _SCS.size),
    (".retpoline_sites", "retpoline_sites", 4),
    (".return_sites", "return_sites", 4),
)


class _Checker:
    def __init__(self, image: ElfImage) -> None:
        self.path = image.path
        text = image.sections.get(".text")
        if text is None or text.kind != "text":
            raise ImageError(f"{image.path}: no executable .text section")
        self.text = (text.addr, text.end)
        repl = image.sections.get(".altinstr_replacement")
        self.repl = (repl.addr, repl.end) if repl is not None else (0, 0)
        self.data = [(s.addr, s.end) for s in image.sections.values() if s.kind in ("data", "bss")]

    def in_text(self, what: str, addr: int, size: int = 1) -> None:
        lo, hi = self.text
        if not (lo <= addr and addr + size <= hi):
            raise ImageError(f"{self.path}: {what} at {addr:#x} (+{size}) lies outside "
                             f".text [{lo:#x}, {hi:#x})")

    def in_repl(self, what: str, addr: int, size: int) -> None:
        lo, hi = self.repl
        if not (lo <= addr and addr + size <= hi) and not (size == 0 and lo <= addr <= hi):
            raise ImageError(f"{self.path}: {what} at {addr:#x} (+{size}) lies outside "
                             f".altinstr_replacement [{lo:#x}, {hi:#x})")

    def in_data(self, what: str, addr: int) -> None:
        if not any(lo <= addr < hi for lo, hi in self.data):
            raise ImageError(f"{self.path}: {what} at {addr:#x} is not in a data section")


def _entries(image: ElfImage, name: str, size: int) -> tuple[ElfSection | None, int]:
    sec = image.sections.get(name)
    if sec is None:
        return None, 0
    if sec.kind == "bss":
        raise ImageError(f"{image.path}: {name} has no contents (SHT_NOBITS)")
    if len(sec.data) % size:
        raise ImageError(f"{image.path}: {name} is {len(sec.data)} bytes, not a multiple of "
                         f"its {size}-byte entries: truncated or not this format")
    return sec, len(sec.data) // size


def _read_alt(image: ElfImage, ck: _Checker) -> tuple[AltInstr, ...]:
    sec, n = _entries(image, ".altinstructions", _ALT.size)
    out = []
    for i in range(n):
        e = sec.addr + i * _ALT.size
        instr_off, repl_off, ft_flags, instrlen, repllen = _ALT.unpack_from(sec.data, i * _ALT.size)
        a = AltInstr(instr=e + instr_off, repl=e + 4 + repl_off, cpuid=ft_flags & 0xFFFF,
                     flags=ft_flags >> ALT_FLAGS_SHIFT, instrlen=instrlen,
                     replacementlen=repllen, entry=e, index=i)
        what = f".altinstructions entry {i}"
        if instrlen > MAX_PATCH_LEN:
            raise ImageError(f"{image.path}: {what}: instrlen {instrlen} exceeds MAX_PATCH_LEN "
                             f"({MAX_PATCH_LEN})")
        if repllen > MAX_PATCH_LEN:
            raise ImageError(f"{image.path}: {what}: replacementlen {repllen} exceeds "
                             f"MAX_PATCH_LEN ({MAX_PATCH_LEN})")
        ck.in_text(f"{what}: instr", a.instr, max(instrlen, 1))
        ck.in_repl(f"{what}: replacement", a.repl, repllen)
        out.append(a)
    return tuple(out)


def _read_s32_sites(image: ElfImage, ck: _Checker, name: str, cls: type) -> tuple:
    sec, n = _entries(image, name, 4)
    out = []
    for i in range(n):
        e = sec.addr + 4 * i
        (off,) = _S32.unpack_from(sec.data, 4 * i)
        rec = cls(addr=e + off, entry=e)
        ck.in_text(f"{name} entry {i}", rec.addr)
        out.append(rec)
    return tuple(out)


def _read_mcount(image: ElfImage, ck: _Checker) -> tuple[McountLoc, ...]:
    sec, n = _entries(image, "__mcount_loc", 8)
    out = []
    for i in range(n):
        (addr,) = _U64.unpack_from(sec.data, 8 * i)
        ck.in_text(f"__mcount_loc entry {i}", addr, 5)
        out.append(McountLoc(addr, sec.addr + 8 * i))
    return tuple(out)


def _read_jump(image: ElfImage, ck: _Checker) -> tuple[JumpEntry, ...]:
    sec, n = _entries(image, "__jump_table", _JUMP.size)
    out = []
    for i in range(n):
        e = sec.addr + i * _JUMP.size
        code_off, target_off, key_off = _JUMP.unpack_from(sec.data, i * _JUMP.size)
        raw_key = e + 8 + key_off
        j = JumpEntry(code=e + code_off, target=e + 4 + target_off, key=raw_key & ~3,
                      branch=bool(raw_key & JUMP_TYPE_TRUE), init=bool(raw_key & JUMP_TYPE_LINKED),
                      entry=e)
        ck.in_text(f"__jump_table entry {i}: code", j.code, 2)
        ck.in_text(f"__jump_table entry {i}: target", j.target)
        ck.in_data(f"__jump_table entry {i}: key", j.key)
        out.append(j)
    return tuple(out)


def _read_static_calls(image: ElfImage, ck: _Checker) -> tuple[StaticCallSite, ...]:
    sec, n = _entries(image, ".static_call_sites", _SCS.size)
    out = []
    for i in range(n):
        e = sec.addr + i * _SCS.size
        addr_off, key_off = _SCS.unpack_from(sec.data, i * _SCS.size)
        raw_key = e + 4 + key_off
        s = StaticCallSite(addr=e + addr_off, key=raw_key & ~3,
                           tail=bool(raw_key & STATIC_CALL_SITE_TAIL),
                           init=bool(raw_key & STATIC_CALL_SITE_INIT), entry=e)
        ck.in_text(f".static_call_sites entry {i}", s.addr, 5)
        ck.in_data(f".static_call_sites entry {i}: key", s.key)
        out.append(s)
    return tuple(out)


def read_tables(image: ElfImage | str | Path | bytes) -> KernelTables:
    """Parse and check every patching table of *image* (an :class:`ElfImage`,
    or a path / the bytes of an ELF file).  Absent tables are empty."""
    if not isinstance(image, ElfImage):
        image = load_elf(image)
    ck = _Checker(image)
    return KernelTables(
        path=image.path,
        text=ck.text,
        replacement=ck.repl,
        alt_instructions=_read_alt(image, ck),
        smp_locks=_read_s32_sites(image, ck, ".smp_locks", SmpLock),
        mcount_loc=_read_mcount(image, ck),
        jump_table=_read_jump(image, ck),
        static_call_sites=_read_static_calls(image, ck),
        retpoline_sites=_read_s32_sites(image, ck, ".retpoline_sites", RetpolineSite),
        return_sites=_read_s32_sites(image, ck, ".return_sites", ReturnSite),
    )
