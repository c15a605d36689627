# SPDX-License-Identifier: GPL-2.0-only
"""Kernel lines: what differs between the x86-64 kernels textpoke reads,
as data.

One set of boot passes (``textpoke._alternative._k*``) runs every line;
a :class:`KernelLine` says how the line lays out its tables, numbers its
CPU features, which passes ``alternative_instructions()`` runs and in which
order, and which of the rules that changed between versions apply.  The
line of an image is chosen by :func:`line_of` from the version in its
``linux_banner`` and checked against its symbols; an image of a line not
described here is refused in one line that names the lines known.

What changed between 6.1 and 6.12 (learnt from Debian's linux-source-6.1
and -6.12, arch/x86/kernel/alternative.c, callthunks.c, static_call.c,
include/asm/alternative.h, cpufeatures.h, processor.h, nops.h):

* ``struct alt_instr``: 6.1 has a u16 ``cpuid`` whose bit 15 inverts the
  test (12 bytes); 6.12 a u32 ``ft_flags`` (feature low 16 bits, flags
  ALT_FLAG_NOT / ALT_FLAG_DIRECT_CALL high 16; 14 bytes).
* ``apply_alternatives``: 6.12 pads every entry of one site to the
  longest entry's length, relocates every relative operand of a
  replacement (``text_poke_apply_relocation``) and knows
  ``ALT_FLAG_DIRECT_CALL``; 6.1 fixes only a 5-byte CALL's displacement
  and recomputes a 5-byte JMP (2-byte form when it reaches forward), pads
  with 0x90 and runs ``optimize_nops`` over the site in place afterwards,
  whether the entry applied or not.
* ``optimize_nops``: 6.12 merges any run of NOP instructions (JMP over
  runs too long for one NOP, NOPs up to 11 bytes); 6.1 merges runs of
  0x90 bytes only, into NOPs of at most 8 bytes.
* passes: 6.1 runs ``apply_paravirt`` (``.parainstructions``) first and
  has no call-depth thunks (``callthunks_patch_builtin_calls``) and no
  runtime constants; both seal ENDBR when the build has IBT.
* feature numbers (``indirect_thunk_its`` is 21*32+5 in 6.1, 21*32+6 in
  6.12; ``clear_cpu_buf`` moved from word 11 to word 3, ...), and
  ``boot_cpu_data.x86_capability``'s offset (40 in 6.1, 48 in 6.12).
* early boot: 6.12 routes the APIC driver's callbacks and the early LSM
  hooks through static calls (``apic_call_*``, ``lsm_static_call_*``),
  6.1 through plain pointers that no text depends on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from ._elf import ImageError
from . import _features
from ._tables import X86_FEATURES

__all__ = ["KernelLine", "LINES", "LINE_612", "LINE_61", "LINE_BUNDLED", "line_of", "line_named",
           "known_lines", "feature_table", "cpuinfo_table"]


def feature_table(line: str) -> dict[str, int]:
    """Feature/bug name -> ``word*32 + bit`` in kernel line *line* ("6.1",
    "6.12"): the numbers the lines share with the line's own, in number order."""
    own = _features.OWN[line]
    return dict(sorted({**_features.SHARED, **own}.items(), key=lambda kv: kv[1]))


def cpuinfo_table(line: str) -> dict[str, str]:
    """/proc/cpuinfo name -> feature name, where they differ, in line *line*."""
    return {**_features.CPUINFO_SHARED, **_features.CPUINFO_OWN[line]}


@dataclass(frozen=True)
class KernelLine:
    """Everything the real-kernel passes need to know about one kernel line."""

    name: str                               # "6.12"
    series: tuple[int, int]                 # (6, 12)
    features: Mapping[str, int]             # feature/bug name -> word*32+bit
    cpuinfo_names: Mapping[str, str]        # /proc/cpuinfo name -> feature name
    ncapints: int
    nbugints: int
    caps_offset: int                        # of x86_capability in struct cpuinfo_x86
    #: struct alt_instr: "ft_flags" (s32, s32, u32 feature|flags<<16, u8, u8)
    #: or "cpuid" (s32, s32, u16 feature with bit 15 = NOT, u8, u8)
    alt_layout: str
    alt_instr_size: int
    #: the passes of alternative_instructions(), in order
    passes: tuple[str, ...]
    #: apply_alternatives: entries of one site share the longest length
    alt_shared_len: bool
    #: apply_alternatives: "relocate" (every relative operand, then
    #: optimize_nops) or "call_jmp" (a 5-byte CALL/JMP only, NOP padding,
    #: optimize_nops over the site in place)
    alt_fixup: str
    #: optimize_nops: "nops" (any NOP run, JMP over long ones) or "nop1"
    #: (runs of 0x90 bytes)
    nops: str
    nop_max: int
    #: tables the image must have: name -> (entry size, start, stop, section)
    tables: Mapping[str, tuple[int, str, str, str | None]] = field(default_factory=dict)
    #: symbols an image of this line has, and symbols it cannot have
    #: (checked when the line is chosen from the banner)
    signature: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()
    #: struct apic callback offsets (6.12's static calls), None: not static calls
    apic_slots: Mapping[str, int] | None = None
    apic_name_offset: int | None = None
    #: the bundled image's choice: refuse what the kernel would get silently
    #: wrong (a relocation that does not decode, a prefixed JMP32 shrunk
    #: from the wrong end, LOOP/JrCXZ moved without their target); a real
    #: line follows the kernel byte for byte
    checked: bool = False

    @property
    def ncaps(self) -> int:
        return self.ncapints + self.nbugints

    def describe(self) -> str:
        return f"Linux {self.name}"


def _tables(alt_size: int, *extra: str) -> dict[str, tuple[int, str, str, str | None]]:
    t: dict[str, tuple[int, str, str, str | None]] = {
        ".altinstructions": (alt_size, "__alt_instructions", "__alt_instructions_end",
                             ".altinstructions"),
        ".retpoline_sites": (4, "__retpoline_sites", "__retpoline_sites_end", ".retpoline_sites"),
        ".return_sites": (4, "__return_sites", "__return_sites_end", ".return_sites"),
        ".call_sites": (4, "__call_sites", "__call_sites_end", ".call_sites"),
        ".ibt_endbr_seal": (4, "__ibt_endbr_seal", "__ibt_endbr_seal_end", ".ibt_endbr_seal"),
        ".smp_locks": (4, "__smp_locks", "__smp_locks_end", ".smp_locks"),
        "__mcount_loc": (8, "__start_mcount_loc", "__stop_mcount_loc", None),
        "__jump_table": (16, "__start___jump_table", "__stop___jump_table", None),
        ".static_call_sites": (8, "__start_static_call_sites", "__stop_static_call_sites", None),
    }
    if ".parainstructions" in extra:
        # struct paravirt_patch_site: u8 *instr; u8 type; u8 len; (padded to 16)
        t[".parainstructions"] = (16, "__parainstructions", "__parainstructions_end",
                                  ".parainstructions")
    return t


# struct apic (6.12, arch/x86/include/asm/apic.h): callback -> byte offset
_APIC_SLOTS_612 = {"eoi": 0, "native_eoi": 8, "write": 16, "read": 24, "wait_icr_idle": 32,
                   "send_IPI": 48, "send_IPI_mask": 56, "send_IPI_mask_allbutself": 64,
                   "send_IPI_allbutself": 72, "send_IPI_all": 80, "send_IPI_self": 88,
                   "icr_read": 112, "icr_write": 120, "wakeup_secondary_cpu": 176,
                   "wakeup_secondary_cpu_64": 184}

def _real_line(name: str, series: tuple[int, int], **rules) -> KernelLine:
    """A real kernel line: its feature numbering and capability words from
    the generated tables (:mod:`._features`), the rest as given."""
    ncap, nbug = _features.WORDS[name]
    return KernelLine(name=name, series=series, features=feature_table(name),
                      cpuinfo_names=cpuinfo_table(name), ncapints=ncap, nbugints=nbug, **rules)


LINE_612 = _real_line(
    "6.12", (6, 12), caps_offset=48, alt_layout="ft_flags", alt_instr_size=14,
    passes=("jump_label_init", "static_call_init", "ftrace_init", "runtime_sync",
            "apply_retpolines", "apply_returns", "apply_alternatives", "callthunks",
            "apply_seal_endbr", "smp_locks"),
    alt_shared_len=True, alt_fixup="relocate", nops="nops", nop_max=11,
    tables=_tables(14), signature=("__alt_instructions",), foreign=("__parainstructions",),
    apic_slots=_APIC_SLOTS_612, apic_name_offset=192)

LINE_61 = _real_line(
    "6.1", (6, 1), caps_offset=40, alt_layout="cpuid", alt_instr_size=12,
    passes=("jump_label_init", "static_call_init", "ftrace_init", "runtime_sync",
            "apply_paravirt", "apply_retpolines", "apply_returns", "apply_alternatives",
            "apply_seal_endbr", "smp_locks"),
    alt_shared_len=False, alt_fixup="call_jmp", nops="nop1", nop_max=8,
    tables=_tables(12, ".parainstructions"), signature=("__alt_instructions",),
    foreign=("__call_sites", "__SCK__apic_call_eoi"))

LINES: tuple[KernelLine, ...] = (LINE_61, LINE_612)

#: The bundled kernel-like image (images/kernel/): 6.12's rules, its own
#: feature numbering and tables, checked relocation; not a line an image's
#: banner can name (so not in LINES).
LINE_BUNDLED = KernelLine(
    name="bundled", series=(0, 0), features=X86_FEATURES, cpuinfo_names={},
    ncapints=22, nbugints=2, caps_offset=0, alt_layout="ft_flags", alt_instr_size=14,
    passes=("apply_retpolines", "apply_returns", "apply_alternatives", "apply_seal_endbr",
            "smp_locks"),
    alt_shared_len=True, alt_fixup="relocate", nops="nops", nop_max=11, checked=True)


def known_lines() -> str:
    return " and ".join(f"{ln.name}" for ln in LINES)


def line_named(name: str) -> KernelLine:
    for ln in LINES:
        if ln.name == name:
            return ln
    raise ImageError(f"no kernel line {name!r}: textpoke knows the {known_lines()} lines")


def line_of(version: str, symbols: Mapping[str, int], path: str = "<image>") -> KernelLine:
    """The line of a kernel whose banner says *version* (``uname -r``),
    checked against its *symbols*; refuses lines textpoke does not know."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ImageError(f"{path}: cannot read a kernel version from the banner ({version!r})")
    series = (int(m.group(1)), int(m.group(2)))
    line = next((ln for ln in LINES if ln.series == series), None)
    if line is None:
        raise ImageError(f"{path}: Linux {series[0]}.{series[1]} ({version}) is a kernel line "
                         f"textpoke does not know; it knows the {known_lines()} lines "
                         f"(Debian 12's kernels)")
    missing = [s for s in line.signature if s not in symbols]
    alien = [s for s in line.foreign if s in symbols]
    if missing or alien:
        what = (f"without {', '.join(missing)}" if missing else
                f"with {', '.join(alien)}, which {line.name} does not have")
        raise ImageError(f"{path}: a {line.name} kernel ({version}) {what}: not a build "
                         f"textpoke knows (the x86-64 {known_lines()} lines)")
    return line
