# SPDX-License-Identifier: GPL-2.0-only
"""What boot-time patching reports: one frozen record per site, the
self-test outcomes, the ``debug-alternative`` lines, the whole boot's
result, and the two errors it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from .._errors import BadInstructionError, TextPokeError

if TYPE_CHECKING:                      # annotation only: _smp_locks builds on these records
    from ._smp_locks import SmpAlternatives

__all__ = ["DA_ALT", "DA_RET", "DA_RETPOLINE", "DA_ENDBR", "DA_SMP", "DA_ALL", "DA_NAMES",
           "parse_debug_alternative", "AlternativeError", "SelfTestError", "AltSitePatch",
           "SitePatch", "SITE_ACTIONS", "SelfTest", "DebugRecord", "BootResult", "hexbytes",
           "KernelBootError", "TableStats", "DebugLog", "PassLog"]

#: ``debug-alternative=MASK`` bits, as on the kernel command line.
DA_ALT = 0x01
DA_RET = 0x02
DA_RETPOLINE = 0x04
DA_ENDBR = 0x08
DA_SMP = 0x10
DA_ALL = 0x1F
DA_NAMES = {DA_ALT: "alt", DA_RET: "ret", DA_RETPOLINE: "retpoline", DA_ENDBR: "endbr",
            DA_SMP: "smp"}


def parse_debug_alternative(value: str | int | None) -> int:
    """The mask of ``debug-alternative[=MASK]``: no value (or an unparsable
    one, as the kernel does) means everything."""
    if value is None:
        return DA_ALL
    if isinstance(value, int):
        return value & DA_ALL
    text = value.strip().lower()
    if text in ("", "all"):
        return DA_ALL
    names = {v: k for k, v in DA_NAMES.items()}
    parts = text.split(",")
    if all(part in names for part in parts):
        mask = 0
        for part in parts:
            mask |= names[part]
        return mask
    try:
        return int(text, 0) & DA_ALL
    except ValueError:
        return DA_ALL


def hexbytes(b: bytes) -> str:
    """Bytes as the kernel's debug output spells them: ``0f 1f 00``."""
    return b.hex(" ")


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

class KernelBootError(TextPokeError):
    """A boot pass met what the kernel would BUG() on, or an input it
    cannot use."""


class AlternativeError(KernelBootError, BadInstructionError):
    """A boot-time patch site the kernel would ``BUG()`` on, named by table
    and entry.  On a machine (the bundled image, a module) it is raised
    before anything is written."""

    def __init__(self, message: str, *, addr: int | None = None, table: str = "",
                 index: int | None = None) -> None:
        super().__init__(message)
        self.addr = addr
        self.table = table
        self.index = index


class SelfTestError(TextPokeError, RuntimeError):
    """A boot self-test failed.  ``result`` holds what had been done (None
    when the INT3 self-test failed before any patching)."""

    def __init__(self, message: str, result: "BootResult | None" = None) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class AltSitePatch:
    """What one ``.altinstructions`` entry did.

    ``old`` is what the site held when this entry was reached (earlier
    entries of a nested site may have changed it), ``replacement`` the
    replacement bytes as assembled, ``final`` what the site holds after this
    entry.  ``instrlen`` is the site length after the nested-site padding
    rule (the largest instrlen of consecutive entries at one address).
    """

    index: int
    instr: int
    repl: int
    instrlen: int
    replacementlen: int
    cpuid: int
    flags: int
    feature: str
    taken: bool
    old: bytes
    replacement: bytes
    final: bytes
    written: bool
    nested: int = 1                  # 1-based position within its site
    symbol: str = ""
    direct_call_target: int | None = None

    @property
    def condition(self) -> str:
        return ("!" if self.flags & 1 else "") + self.feature

    def as_dict(self) -> dict:
        return {"index": self.index, "instr": self.instr, "symbol": self.symbol,
                "repl": self.repl, "instrlen": self.instrlen,
                "replacementlen": self.replacementlen, "feature": self.feature,
                "cpuid": self.cpuid, "flags": self.flags, "condition": self.condition,
                "nested": self.nested, "taken": self.taken, "written": self.written,
                "old": self.old.hex(), "replacement": self.replacement.hex(),
                "final": self.final.hex(), "direct_call_target": self.direct_call_target}


#: What happened at a retpoline, return or SMP-lock site.
SITE_ACTIONS = ("patched", "unchanged", "kept", "skipped")


@dataclass(frozen=True)
class SitePatch:
    """One retpoline, return or SMP-lock site: old and new bytes and what
    happened -- ``patched`` (rewritten), ``unchanged`` (already as wanted),
    ``kept`` (the CPU wants the site as it is, e.g. a retpoline that stays)
    or ``skipped`` (a site the kernel would warn about and leave)."""

    kind: str                        # "retpoline", "return", "smp-lock"
    addr: int
    old: bytes
    new: bytes
    action: str                      # one of SITE_ACTIONS
    reason: str = ""
    symbol: str = ""
    target: int | None = None

    @property
    def patched(self) -> bool:
        return self.action == "patched"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "addr": self.addr, "symbol": self.symbol,
                "old": self.old.hex(), "new": self.new.hex(), "action": self.action,
                "reason": self.reason, "target": self.target}


@dataclass(frozen=True)
class SelfTest:
    name: str
    passed: bool | None              # None: not run (see detail)
    detail: str
    value: int | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail,
                "value": self.value}


@dataclass(frozen=True)
class DebugRecord:
    """One line of ``debug-alternative`` output; ``mask`` is its DA_* bit."""

    mask: int
    message: str
    addr: int | None = None

    @property
    def kind(self) -> str:
        return DA_NAMES.get(self.mask, str(self.mask))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "mask": self.mask, "addr": self.addr,
                "message": self.message}


class DebugLog:
    """The ``debug-alternative`` lines whose DA_* bit is in *mask*."""

    def __init__(self, mask: int = 0) -> None:
        self.mask = mask
        self.records: list[DebugRecord] = []

    def __call__(self, kind: int, message: str, addr: int | None = None) -> None:
        if self.mask & kind:
            self.records.append(DebugRecord(kind, message, addr))

    def dump(self, kind: int, addr: int, label: str, data: bytes) -> None:
        if self.mask & kind and data:
            self.records.append(DebugRecord(kind, f"{addr:#x}: {label}: {hexbytes(data)}", addr))

    def lines(self) -> list[str]:
        return [r.message for r in self.records]


@dataclass
class TableStats:
    """A pass's counts over one table."""
    entries: int = 0
    applied: int = 0      # sites the pass acted on (wrote, possibly the same bytes)
    changed: int = 0      # sites whose bytes changed
    skipped: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    def note(self, why: str) -> None:
        self.notes[why] = self.notes.get(why, 0) + 1

    def as_dict(self) -> dict:
        d = {"entries": self.entries, "applied": self.applied, "changed": self.changed}
        if self.skipped:
            d["skipped"] = self.skipped
        if self.notes:
            d["notes"] = dict(self.notes)
        return d


class PassLog:
    """What one pass reports, whatever it runs on: its counts
    (:class:`TableStats`, always), a :class:`SitePatch` per site when
    *records* is a list (the bundled image and modules keep them; a real
    kernel's ~100,000 sites only count), and debug lines through *dbg*."""

    __slots__ = ("stats", "records", "describe", "dbg")

    def __init__(self, entries: int, describe, dbg: DebugLog | None = None,
                 records: list[SitePatch] | None = None) -> None:
        self.stats = TableStats(entries=entries)
        self.records = records
        self.describe = describe
        self.dbg = dbg if dbg is not None else DebugLog(0)

    def leave(self, kind: str, addr: int, raw: bytes, action: str, why: str,
              note: str | None = None, target: int | None = None) -> None:
        """A site left as it is; *note* (even empty) counts it as skipped."""
        if note is not None:
            self.stats.skipped += 1
            if note:
                self.stats.note(note)
        if self.records is not None:
            self.records.append(SitePatch(kind, addr, raw, raw, action, why, self.describe(addr),
                                          target))

    def done(self, kind: str, addr: int, old: bytes, new: bytes, written: bool,
             target: int | None = None, why: str = "") -> None:
        """A site the pass acted on (*written*: its bytes changed)."""
        self.stats.applied += 1
        self.stats.changed += written
        if self.records is not None:
            self.records.append(SitePatch(kind, addr, old, new,
                                          "patched" if written else "unchanged", why,
                                          self.describe(addr), target))


@dataclass(frozen=True)
class BootResult:
    """What ``alternative_instructions`` did.  ``smp`` is the SMP-alternatives
    state the boot left (the registered LOCK-prefix ranges): keep it to go
    SMP later (:func:`alternatives_enable_smp`) or to ask
    :func:`alternatives_text_reserved`."""

    features: tuple[str, ...]
    ncpus: int                       # present CPUs at boot
    possible_cpus: int
    alternatives: tuple[AltSitePatch, ...] = ()
    retpolines: tuple[SitePatch, ...] = ()
    returns: tuple[SitePatch, ...] = ()
    smp_locks: tuple[SitePatch, ...] = ()
    selftests: tuple[SelfTest, ...] = ()
    uniproc_patched: bool = False
    seal_endbr: str = "nothing to seal: the image has no .ibt_endbr_seal (built without IBT)"
    table_entries: Mapping[str, int] = field(default_factory=dict)
    debug: tuple[DebugRecord, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    smp: "SmpAlternatives | None" = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return all(t.passed is not False for t in self.selftests)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per table: entries, and how many sites were taken / rewritten."""
        alt = self.alternatives
        out = {
            ".altinstructions": {"entries": len(alt),
                                 "taken": sum(a.taken for a in alt),
                                 "written": sum(a.written for a in alt)},
            ".retpoline_sites": _site_counts(self.retpolines),
            ".return_sites": _site_counts(self.returns),
            ".smp_locks": _site_counts(self.smp_locks),
        }
        for name, n in self.table_entries.items():
            out.setdefault(name, {"entries": n, "patched": 0})
            out[name]["entries"] = n
        return out

    def site(self, symbol: str) -> tuple[AltSitePatch, ...]:
        """The alternative entries whose site lies in function *symbol*."""
        return tuple(a for a in self.alternatives if a.symbol.split("+")[0] == symbol)

    def as_dict(self, *, debug_mask: int = DA_ALL) -> dict:
        return {
            "features": list(self.features),
            "ncpus": self.ncpus,
            "possible_cpus": self.possible_cpus,
            "uniproc_patched": self.uniproc_patched,
            "ok": self.ok,
            "counts": self.counts(),
            "selftests": [t.as_dict() for t in self.selftests],
            "alternatives": [a.as_dict() for a in self.alternatives],
            "retpolines": [s.as_dict() for s in self.retpolines],
            "returns": [s.as_dict() for s in self.returns],
            "smp_locks": [s.as_dict() for s in self.smp_locks],
            "seal_endbr": self.seal_endbr,
            "debug_alternative": [d.as_dict() for d in self.debug if d.mask & debug_mask],
            "timings": dict(self.timings),
        }


def _site_counts(sites: Sequence[SitePatch]) -> dict[str, int]:
    out = {"entries": len(sites)}
    for act in SITE_ACTIONS:
        out[act] = sum(s.action == act for s in sites)
    return out
