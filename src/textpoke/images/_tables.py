# SPDX-License-Identifier: GPL-2.0-only
"""The one reader of a kernel's patching tables: the bundled image, a real
kernel (Debian's 6.12 and 6.1) and a module being loaded all decode their
tables here, into the same records.

Every table stores self-relative offsets (the value plus the address of
the field it is stored in gives the target), except ``__mcount_loc`` and
6.1's ``.parainstructions``, which hold absolute 64-bit addresses.

==========================  =======  ==========================================
section                     entry    layout
==========================  =======  ==========================================
``.altinstructions``        14       s32 instr, s32 repl, u32 ft_flags (cpuid
                                     low 16 bits, flags high 16), u8 instrlen,
                                     u8 replacementlen (packed); 6.1: 12 bytes,
                                     a u16 cpuid whose bit 15 inverts the test
``.smp_locks``              4        s32 lock prefix (0: page padding)
``__mcount_loc``            8        u64 fentry NOP5 (absolute; 0: padding)
``__jump_table``            16       s32 code, s32 target, s64 key | flags
                                     (bit 0 branch, bit 1 init)
``.static_call_sites``      8        s32 call/jmp, s32 key | flags
                                     (bit 0 tail call, bit 1 init)
``.retpoline_sites``        4        s32 call/jmp/jcc to a retpoline thunk
``.return_sites``           4        s32 jmp/jcc to __x86_return_thunk
``.call_sites``             4        s32 call (call-depth accounting)
``.ibt_endbr_seal``         4        s32 ENDBR64 to seal
``.parainstructions``       16       u64 site, u8 pv_ops slot, u8 len (6.1)
==========================  =======  ==========================================

Two steps, kept apart:

* **read** -- :func:`alt_instr_table`, :func:`jump_table`,
  :func:`static_call_table`, :func:`s32_table` / :func:`s32_sites`,
  :func:`mcount_table` / :func:`mcount_sites`, :func:`paravirt_table`: each
  takes a buffer, the address of its first byte and the table's ``[start,
  end)`` addresses, and returns records (named tuples, fast: a real kernel
  has ~300,000 entries) or bare addresses where that is all a pass needs.
  Only the table's size is checked (:class:`TableError`).
* **validate** -- :func:`check_entries` checks decoded entries against
  :class:`Bounds` (where sites, replacements and keys may lie, and which
  error to raise); :func:`check_table` reads and checks every entry, or a
  sample of them.

:func:`read_tables` does both for a linked ELF (the bundled image):
every site must lie in core text (``.text``), every replacement in
``.altinstr_replacement``, every key in a data section, no length may
exceed ``MAX_PATCH_LEN``.  A real kernel's loader checks a sample of each
table against its executable sections (:func:`check_table` with
``sample``); a module's loader checks every entry against the module's
text.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from .._core._insn import MAX_PATCH_LEN
from ._elf import ElfImage, ImageError, load_elf

__all__ = [
    "AltInstr", "SmpLock", "McountLoc", "JumpEntry", "StaticCallSite", "RetpolineSite",
    "ReturnSite", "ParaSite", "KernelTables", "read_tables", "TableError", "Bounds",
    "alt_instr_table", "jump_table", "static_call_table", "s32_table", "s32_count",
    "s32_sites", "mcount_table", "mcount_sites", "paravirt_table",
    "check_entries", "check_table", "ENTRY_SIZES",
    "ALT_INSTR_SIZE", "JUMP_ENTRY_SIZE", "STATIC_CALL_SITE_SIZE",
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
class AltInstr(NamedTuple):
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


class SmpLock(NamedTuple):
    addr: int               # the LOCK prefix byte
    entry: int = 0


class McountLoc(NamedTuple):
    addr: int               # the fentry NOP5
    entry: int = 0


class RetpolineSite(NamedTuple):
    addr: int               # CALL/JMP/Jcc to __x86_indirect_thunk_<reg>
    entry: int = 0


class ReturnSite(NamedTuple):
    addr: int               # JMP/Jcc to __x86_return_thunk
    entry: int = 0


class JumpEntry(NamedTuple):
    """One ``struct jump_entry``: the site, the branch target, the static
    key (flag bits removed) and the flag bits."""

    code: int
    target: int
    key: int
    branch: bool            # JUMP_TYPE_TRUE: the site was emitted for "likely"
    init: bool = False      # JUMP_TYPE_LINKED bit (init text in the kernel)
    entry: int = 0


class StaticCallSite(NamedTuple):
    addr: int               # the CALL or JMP to the trampoline
    key: int                # struct static_call_key
    tail: bool              # STATIC_CALL_SITE_TAIL: a JMP
    init: bool = False
    entry: int = 0


class ParaSite(NamedTuple):
    index: int
    instr: int              # the site (an absolute pointer in 6.1's table)
    type: int               # the pv_ops slot: *((void **)&pv_ops + type)
    len: int


# ------------------------------------------------------------------ reading
ALT_INSTR_SIZE = 14
JUMP_ENTRY_SIZE = 16
STATIC_CALL_SITE_SIZE = 8
_M64 = (1 << 64) - 1

#: entry size of every table this module reads (6.12's ``alt_instr``; 6.1's
#: is 12 bytes: ``alt_instr_table(..., layout="cpuid")``)
ENTRY_SIZES: dict[str, int] = {
    ".altinstructions": ALT_INSTR_SIZE, ".smp_locks": 4, "__mcount_loc": 8,
    "__jump_table": JUMP_ENTRY_SIZE, ".static_call_sites": STATIC_CALL_SITE_SIZE,
    ".retpoline_sites": 4, ".return_sites": 4, ".call_sites": 4, ".ibt_endbr_seal": 4,
    ".parainstructions": 16,
}


class TableError(ImageError):
    """A table whose bounds or size do not fit its layout."""


def _slice(buf, base: int, start: int, end: int, esize: int, what: str) -> memoryview:
    if end < start:
        raise TableError(f"{what}: end {end:#x} before start {start:#x}")
    lo, hi = start - base, end - base
    if lo < 0 or hi > len(buf):
        raise TableError(f"{what}: [{start:#x}, {end:#x}) is outside the image")
    if (hi - lo) % esize:
        raise TableError(f"{what} is {hi - lo} bytes, not a multiple of its {esize}-byte "
                         f"entries: truncated or not this format")
    return memoryview(buf)[lo:hi]


def _s32(buf, base: int, start: int, end: int, what: str) -> array:
    vals = array("i")
    vals.frombytes(_slice(buf, base, start, end, 4, what))
    return vals


def s32_table(buf, base: int, start: int, end: int, what: str = "s32 table",
              keep_zero: bool = False) -> list[int]:
    """Absolute addresses of a table of self-relative s32 entries; entries
    of 0 (padding) are dropped unless *keep_zero* (then they come back as
    None)."""
    vals = _s32(buf, base, start, end, what)
    # each entry's own address comes from range() rather than per-entry
    # arithmetic: these tables hold ~200,000 entries
    at = range(start, start + 4 * len(vals), 4)
    if keep_zero:
        return [a + v if v else None for a, v in zip(at, vals)]  # type: ignore[misc]
    return [a + v for a, v in zip(at, vals) if v]


def s32_count(buf, base: int, start: int, end: int, what: str = "s32 table") -> int:
    """How many entries :func:`s32_table` would return (the non-zero ones),
    without building the list."""
    vals = _s32(buf, base, start, end, what)
    return len(vals) - vals.count(0)


def s32_sites(buf, base: int, start: int, end: int, cls: Callable = RetpolineSite,
              what: str = "s32 table") -> list:
    """Every entry of an s32 table as a ``cls(addr, entry)`` record
    (:class:`SmpLock`, :class:`RetpolineSite`, :class:`ReturnSite`), zeros
    included."""
    vals = _s32(buf, base, start, end, what)
    return [cls(a + v, a) for a, v in zip(range(start, start + 4 * len(vals), 4), vals)]


def alt_instr_table(buf, base: int, start: int, end: int,
                    layout: str = "ft_flags", first: int = 0) -> list[AltInstr]:
    """*layout* "ft_flags": 6.12's 14-byte entry; "cpuid": 6.1's 12-byte
    one (u16 feature, bit 15 inverting the test -- returned as
    ALT_FLAG_NOT).  *first* is the index of the first entry."""
    if layout == "cpuid":
        mv = _slice(buf, base, start, end, 12, ".altinstructions")
        return [AltInstr(e + io, e + 4 + ro, cpuid & 0x7FFF,
                         ALT_FLAG_NOT if cpuid & 0x8000 else 0, il, rl, e, i)
                for (i, e), (io, ro, cpuid, il, rl) in
                zip(enumerate(range(start, end, 12), first), struct.iter_unpack("<iiHBB", mv))]
    mv = _slice(buf, base, start, end, ALT_INSTR_SIZE, ".altinstructions")
    new = tuple.__new__
    return [new(AltInstr, (e + io, e + 4 + ro, ft & 0xFFFF, ft >> 16, il, rl, e, i))
            for (i, e), (io, ro, ft, il, rl) in
            zip(enumerate(range(start, end, ALT_INSTR_SIZE), first),
                struct.iter_unpack("<iiIBB", mv))]


def paravirt_table(buf, base: int, start: int, end: int, first: int = 0) -> list[ParaSite]:
    """6.1's ``struct paravirt_patch_site`` (u8 *instr; u8 type; u8 len;
    padded to 16 bytes)."""
    mv = _slice(buf, base, start, end, 16, ".parainstructions")
    return [ParaSite(i, a, t, n) for i, (a, t, n) in
            enumerate(struct.iter_unpack("<QBB6x", mv), first)]


def jump_table(buf, base: int, start: int, end: int) -> list[JumpEntry]:
    """Every ``struct jump_entry`` of ``[start, end)``."""
    mv = _slice(buf, base, start, end, JUMP_ENTRY_SIZE, "__jump_table")
    new = tuple.__new__         # the records' fields in order, without the keyword layer
    return [new(JumpEntry, (e + c, e + 4 + t, key & ~3, key & 1 == 1, key & 2 == 2, e))
            for e, (c, t, k) in zip(range(start, end, JUMP_ENTRY_SIZE),
                                    struct.iter_unpack("<iiq", mv))
            for key in ((e + 8 + k) & _M64,)]


def static_call_table(buf, base: int, start: int, end: int) -> list[StaticCallSite]:
    """Every ``struct static_call_site`` of ``[start, end)``."""
    mv = _slice(buf, base, start, end, STATIC_CALL_SITE_SIZE, ".static_call_sites")
    new = tuple.__new__
    return [new(StaticCallSite, (e + a, key & ~3, key & 1 == 1, key & 2 == 2, e))
            for e, (a, k) in zip(range(start, end, STATIC_CALL_SITE_SIZE),
                                 struct.iter_unpack("<ii", mv))
            for key in (e + 4 + k,)]


def mcount_table(buf, base: int, start: int, end: int) -> list[int]:
    """Every ``__mcount_loc`` entry, 0 (padding) included: the kernel skips
    those itself and counts them."""
    vals = array("Q")
    vals.frombytes(_slice(buf, base, start, end, 8, "__mcount_loc"))
    return vals.tolist()


def mcount_sites(buf, base: int, start: int, end: int) -> list[McountLoc]:
    """:func:`mcount_table` as ``McountLoc(addr, entry)`` records."""
    return list(map(McountLoc, mcount_table(buf, base, start, end), range(start, end, 8)))


#: name -> reader(buf, base, start, end) giving the records validated below
_READERS: dict[str, Callable[..., list]] = {
    ".altinstructions": alt_instr_table,
    ".smp_locks": lambda *a: s32_sites(*a, SmpLock, ".smp_locks"),
    "__mcount_loc": mcount_sites,
    "__jump_table": jump_table,
    ".static_call_sites": static_call_table,
    ".retpoline_sites": lambda *a: s32_sites(*a, RetpolineSite, ".retpoline_sites"),
    ".return_sites": lambda *a: s32_sites(*a, ReturnSite, ".return_sites"),
    ".call_sites": lambda *a: s32_sites(*a, RetpolineSite, ".call_sites"),
    ".ibt_endbr_seal": lambda *a: s32_sites(*a, RetpolineSite, ".ibt_endbr_seal"),
}


# ------------------------------------------------------------------ validating
@dataclass(frozen=True)
class Bounds:
    """Where a table's entries may point, and what to raise when one does
    not: *text* for sites (named *text_name* in messages), *repl* for
    alternative replacements, *data* for static keys (None: keys are not
    checked); tables in *padding* may hold 0 entries (skipped)."""

    where: str                              # the image, or "module foo", for messages
    text: tuple[tuple[int, int], ...]
    text_name: str = ".text"
    repl: tuple[tuple[int, int], ...] = ()
    repl_name: str = ".altinstr_replacement"
    data: tuple[tuple[int, int], ...] | None = None
    padding: frozenset[str] = frozenset()
    error: type[Exception] = ImageError

    def _fail(self, what: str, addr: int, size: int, name: str, ranges) -> None:
        shown = f" [{ranges[0][0]:#x}, {ranges[0][1]:#x})" if len(ranges) == 1 else ""
        raise self.error(f"{self.where}: {what} at {addr:#x} (+{size}) lies outside "
                         f"{name}{shown}")

    def in_text(self, what: str, addr: int, size: int = 1) -> None:
        if not any(lo <= addr and addr + size <= hi for lo, hi in self.text):
            self._fail(what, addr, size, self.text_name, self.text)

    def in_repl(self, what: str, addr: int, size: int) -> None:
        if not any(lo <= addr and addr + size <= hi for lo, hi in self.repl):
            self._fail(what, addr, size, self.repl_name, self.repl)

    def in_data(self, what: str, addr: int) -> None:
        if self.data is not None and not any(lo <= addr < hi for lo, hi in self.data):
            raise self.error(f"{self.where}: {what} at {addr:#x} is not in a data section")


def check_entries(name: str, entries: Iterable[tuple[int, object]], b: Bounds) -> None:
    """Check (index, record) pairs of table *name* against *b*: every site
    in text, every replacement where replacements go, every key in data, no
    length beyond ``MAX_PATCH_LEN``."""
    pad = name in b.padding
    for i, r in entries:
        what = f"{name} entry {i}"
        if name == ".altinstructions":
            for field, n in (("instrlen", r.instrlen), ("replacementlen", r.replacementlen)):
                if n > MAX_PATCH_LEN:
                    raise b.error(f"{b.where}: {what}: {field} {n} exceeds MAX_PATCH_LEN "
                                  f"({MAX_PATCH_LEN})")
            b.in_text(f"{what}: instr", r.instr, max(r.instrlen, 1))
            if r.replacementlen:
                b.in_repl(f"{what}: replacement", r.repl, r.replacementlen)
        elif name == "__jump_table":
            b.in_text(f"{what}: code", r.code, 2)
            b.in_text(f"{what}: target", r.target)
            b.in_data(f"{what}: key", r.key)
        elif name == ".static_call_sites":
            b.in_text(what, r.addr, 5)
            b.in_data(f"{what}: key", r.key)
        elif not (pad and r.addr == r.entry or pad and name == "__mcount_loc" and not r.addr):
            b.in_text(what, r.addr, 5 if name == "__mcount_loc" else 1)


def check_table(name: str, buf, base: int, start: int, end: int, b: Bounds, *,
                layout: str = "ft_flags", sample: int | None = None) -> None:
    """Read table *name* from ``buf`` and check it: every entry, or with
    *sample* about that many spread evenly over the table (a real kernel's
    loader: the checks cost nothing next to decompression)."""
    if name == ".altinstructions":
        esz = 12 if layout == "cpuid" else ALT_INSTR_SIZE

        def read(lo: int, hi: int, i: int) -> list:
            return alt_instr_table(buf, base, lo, hi, layout, i)
    else:
        esz = ENTRY_SIZES[name]
        reader = _READERS[name]

        def read(lo: int, hi: int, i: int) -> list:
            return reader(buf, base, lo, hi)
    count = (end - start) // esz
    if sample is None or count <= sample:
        check_entries(name, enumerate(read(start, end, 0)), b)
        return
    for i in range(0, count, max(1, count // sample)):
        e = start + i * esz
        check_entries(name, ((i, r) for r in read(e, e + esz, i)), b)


# ------------------------------------------------------------------ an ELF image
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
        return {name: len(getattr(self, attr)) for name, attr in _TABLES}

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


#: (section, KernelTables attribute)
_TABLES = (
    (".altinstructions", "alt_instructions"),
    (".smp_locks", "smp_locks"),
    ("__mcount_loc", "mcount_loc"),
    ("__jump_table", "jump_table"),
    (".static_call_sites", "static_call_sites"),
    (".retpoline_sites", "retpoline_sites"),
    (".return_sites", "return_sites"),
)


def read_tables(image: ElfImage | str | Path | bytes) -> KernelTables:
    """Read and check every patching table of *image* (an :class:`ElfImage`,
    or a path / the bytes of an ELF file).  Absent tables are empty."""
    if not isinstance(image, ElfImage):
        image = load_elf(image)
    text = image.sections.get(".text")
    if text is None or text.kind != "text":
        raise ImageError(f"{image.path}: no executable .text section")
    repl = image.sections.get(".altinstr_replacement")
    rrange = (repl.addr, repl.end) if repl is not None else (0, 0)
    b = Bounds(image.path, ((text.addr, text.end),), ".text", (rrange,),
               data=tuple((s.addr, s.end) for s in image.sections.values()
                          if s.kind in ("data", "bss")))
    got: dict[str, tuple] = {}
    for name, attr in _TABLES:
        sec = image.sections.get(name)
        if sec is None:
            continue
        if sec.kind == "bss":
            raise ImageError(f"{image.path}: {name} has no contents (SHT_NOBITS)")
        try:
            recs = _READERS[name](sec.data, sec.addr, sec.addr, sec.end)
        except TableError as e:
            raise ImageError(f"{image.path}: {e}") from None
        check_entries(name, enumerate(recs), b)
        got[attr] = tuple(recs)
    return KernelTables(path=image.path, text=(text.addr, text.end), replacement=rrange, **got)
