# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time patching of a kernel-like image: ``alternative_instructions``.

The compiler and objtool leave tables in the image; at boot the kernel walks
them, in this order, before any secondary CPU runs:

1. ``int3_selftest`` -- an INT3 at a known address must behave as a CALL
   once a trap handler emulates it (the SMP batch relies on exactly that);
2. ``apply_retpolines`` -- calls and jumps to ``__x86_indirect_thunk_<reg>``
   become plain indirect branches (optionally LFENCE-guarded) when the CPU
   needs no retpoline; this runs before the alternatives because the thunks
   are themselves alternative sites;
3. ``apply_returns`` -- ``jmp __x86_return_thunk`` becomes ``ret; int3...``
   when no return thunk is wanted;
4. ``apply_alternatives`` -- every ``struct alt_instr`` in table order;
5. ``apply_seal_endbr`` -- only with IBT (see below);
6. SMP locks: when a single CPU is present, LOCK prefixes listed in
   ``.smp_locks`` become harmless DS prefixes (``alternatives_smp_unlock``),
   and go back (``alternatives_smp_lock``) when the machine goes SMP;
7. ``alt_reloc_selftest`` -- a replacement holding a RIP-relative LEA and a
   CALL, copied to its site, must still reach both targets.

The rules were learnt from ``arch/x86/kernel/alternative.c``; the code and
comments here are our own.  Differences, all Python manners:

* Where the kernel would ``BUG()`` (a replacement longer than its site, a
  displacement that no longer fits, a direct-call site that is not
  ``call *disp(%rip)``, a retpoline through %rsp) we raise
  :class:`AlternativeError` -- and nothing has been written: the three
  patching passes (retpolines, returns, alternatives) are computed on a
  shadow copy of text and committed with ``text_poke_early`` only when all
  of them succeeded (a failure while committing rolls back what was
  written).
* Where the kernel would ``WARN`` and skip a site, the site is skipped and
  the reason is kept in its record.
* Self-test failures are recorded; ``strict=True`` (the default) turns them
  into :class:`SelfTestError`.  A failing INT3 self-test stops the boot
  before anything is patched, as the kernel's ``BUG_ON`` would.
* Writes whose bytes equal what is already there are skipped (the kernel
  writes them anyway; nothing can observe the difference).

Not modelled: IBT/ENDBR sealing (the image is built with
``-fcf-protection=none``, so there are no ENDBR instructions and no
``.ibt_endbr_seal`` table: :func:`apply_seal_endbr` accepts only an empty
table), FineIBT/kCFI, call-depth tracking and ITS thunks, paravirt
capability setting, and the static-call re-initialisation that
``apply_returns`` asks for (static calls are patched by their own client).
In the kernel ``X86_FEATURE_UP`` comes from CPU setup, not from here: the
feature set is exactly what the caller passes (plus ``always``).
"""

from __future__ import annotations

import bisect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ._reloc import optimize_nops, text_poke_apply_relocation
from .._core import TextPoke
from .._core._emulate import PtRegs, int3_emulate_call
from ..images._tables import X86_FEATURES, feature_name, feature_set   # tables own the numbering
from .._errors import BadAddressError, BadInstructionError, MachineError, TextPokeError
from .._core._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, INT3_INSN_SIZE, JMP32_INSN_OPCODE,
                    MAX_PATCH_LEN, RET_INSN_OPCODE, Insn,
                    insn_decode_kernel, is_jcc32, text_gen_insn)

__all__ = [
    # kernel entry points
    "DEFAULT_FEATURES", "alternative_instructions", "apply_alternatives", "apply_retpolines", "apply_returns",
    "apply_seal_endbr", "alternatives_smp_lock", "alternatives_smp_unlock",
    "alternatives_smp_module_add", "alternatives_smp_module_del", "alternatives_enable_smp",
    "alternatives_text_reserved", "int3_selftest", "alt_reloc_selftest",
    # results
    "AltSitePatch", "SitePatch", "SelfTest", "DebugRecord", "BootResult",
    # errors
    "AlternativeError", "SelfTestError",
    # debug-alternative mask bits
    "DA_ALL", "DA_ALT", "DA_RET", "DA_RETPOLINE", "DA_ENDBR", "DA_SMP", "DA_NAMES",
    "parse_debug_alternative",
]

#: ``debug-alternative=MASK`` bits, as on the kernel command line.
DA_ALT = 0x01
DA_RET = 0x02
DA_RETPOLINE = 0x04
DA_ENDBR = 0x08
DA_SMP = 0x10
#: A present-day x86-64 host without speculation mitigations (the default of
#: ``textpoke boot`` and of the demo's boot).
DEFAULT_FEATURES = ("xmm2", "rdtscp", "lfence_rdtsc", "popcnt", "avx2", "bmi2", "erms",
                    "fsrm", "smap", "clflushopt")

DA_ALL = 0x1F
DA_NAMES = {DA_ALT: "alt", DA_RET: "ret", DA_RETPOLINE: "retpoline", DA_ENDBR: "endbr",
            DA_SMP: "smp"}

_LOCK_PREFIX = 0xF0
_DS_PREFIX = 0x3E
_NOP1 = 0x90
_CALL_RIP_REL = b"\xff\x15"          # call *disp32(%rip)
_LFENCE = b"\x0f\xae\xe8"
_RETPOLINE_THUNK_SIZE = 32
_REG_RSP = 4

_FEATURE_RETPOLINE = "retpoline"
_FEATURE_RETPOLINE_LFENCE = "retpoline_lfence"
_FEATURE_RETHUNK = "rethunk"


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
    if all(part in names for part in text.split(",")):
        mask = 0
        for part in text.split(","):
            mask |= names[part]
        return mask
    try:
        return int(text, 0) & DA_ALL
    except ValueError:
        return DA_ALL


# --------------------------------------------------------------------------
# errors and results
# --------------------------------------------------------------------------

class AlternativeError(BadInstructionError):
    """A boot-time patch site the kernel would ``BUG()`` on.  Raised before
    anything is written."""

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


def _hex(b: bytes) -> str:
    return b.hex(" ")


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


@dataclass(frozen=True)
class BootResult:
    features: tuple[str, ...]
    ncpus: int                       # present CPUs at boot
    possible_cpus: int
    alternatives: tuple[AltSitePatch, ...] = ()
    retpolines: tuple[SitePatch, ...] = ()
    returns: tuple[SitePatch, ...] = ()
    smp_locks: tuple[SitePatch, ...] = ()
    selftests: tuple[SelfTest, ...] = ()
    uniproc_patched: bool = False
    seal_endbr: str = "not modelled: the image has no ENDBR (built without IBT)"
    table_entries: Mapping[str, int] = field(default_factory=dict)
    debug: tuple[DebugRecord, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)

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


SITE_ACTIONS = ("patched", "unchanged", "kept", "skipped")


def _site_counts(sites: Sequence[SitePatch]) -> dict[str, int]:
    out = {"entries": len(sites)}
    for act in SITE_ACTIONS:
        out[act] = sum(s.action == act for s in sites)
    return out


# --------------------------------------------------------------------------
# helpers: symbols, features, a shadow of text
# --------------------------------------------------------------------------

class _Symbols:
    """Address -> "function+0xoff" for records and debug lines."""

    def __init__(self, symbols: Mapping[str, int] | None, sizes: Mapping[str, int] | None) -> None:
        self.by_name = dict(symbols or {})
        sizes = sizes or {}
        best: dict[int, tuple[str, int]] = {}
        for name, addr in self.by_name.items():
            size = sizes.get(name, 0)
            if name.startswith((".", "__start", "__stop")):
                continue
            cur = best.get(addr)
            # prefer sized (function) symbols, then the shorter name
            if cur is None or (size, -len(name)) > (cur[1], -len(cur[0])):
                best[addr] = (name, size)
        self._starts = sorted(best)
        self._info = [best[a] for a in self._starts]

    def get(self, name: str) -> int | None:
        return self.by_name.get(name)

    def __call__(self, addr: int) -> str:
        i = bisect.bisect_right(self._starts, addr) - 1
        label = None
        # A sized (function) symbol that contains addr wins over a bare
        # label that merely precedes it.
        for j in range(i, max(-1, i - 64), -1):
            name, size = self._info[j]
            start = self._starts[j]
            if size and addr < start + size:
                label = (name, start)
                break
            if not size and label is None and addr - start < 4096:
                label = (name, start)
        if label is None:
            return f"{addr:#x}"
        name, start = label
        off = addr - start
        return f"{name}+{off:#x}" if off else name


def _symbols_of(image: Any) -> _Symbols:
    if image is None:
        return _Symbols({}, {})
    if isinstance(image, Mapping):
        return _Symbols(image, {})
    return _Symbols(getattr(image, "symbols", {}), getattr(image, "sizes", {}))


def _features(features: Iterable[str | int]) -> tuple[frozenset[int], tuple[str, ...]]:
    nums = feature_set(features)
    return nums, tuple(sorted(feature_name(n) for n in nums))


def _has(nums: frozenset[int], name: str) -> bool:
    return X86_FEATURES[name] in nums


class _Shadow:
    """A copy-on-first-touch image of text on which a boot pass works.

    Reads see earlier writes of the same pass (a nested alternative reads
    what the previous entry left); nothing reaches the machine until
    :meth:`commit`, so a refused site leaves the text exactly as it was.
    """

    def __init__(self, core: TextPoke) -> None:
        self.core = core
        self.machine = core.machine
        self._ranges: list[tuple[int, int, bytearray | None]] = [
            (r.start, r.end, None) for r in self.machine.text_ranges]
        self.writes: list[tuple[int, bytes, bytes]] = []

    def _buf(self, addr: int, size: int) -> tuple[bytearray, int]:
        for i, (start, end, buf) in enumerate(self._ranges):
            if start <= addr and addr + size <= end:
                if buf is None:
                    buf = bytearray(self.machine.text_read(start, end - start))
                    self._ranges[i] = (start, end, buf)
                return buf, addr - start
        raise BadAddressError(f"[{addr:#x}, +{size}) is not inside mapped text")

    def read(self, addr: int, size: int) -> bytes:
        buf, off = self._buf(addr, size)
        return bytes(buf[off:off + size])

    def write(self, addr: int, data: bytes) -> bool:
        """Stage a write; False (and nothing staged) when it changes nothing."""
        buf, off = self._buf(addr, len(data))
        old = bytes(buf[off:off + len(data)])
        if old == data:
            return False
        buf[off:off + len(data)] = data
        self.writes.append((addr, old, bytes(data)))
        return True

    def commit(self) -> int:
        """Write every staged change with text_poke_early, in order; undo the
        ones already written if any write fails."""
        done: list[tuple[int, bytes, bytes]] = []
        try:
            for addr, old, new in self.writes:
                self.core.text_poke_early(addr, new)
                done.append((addr, old, new))
        except BaseException:
            for addr, old, _new in reversed(done):
                self.machine.text_write_early(addr, old)
            raise
        n = len(self.writes)
        self.writes = []
        return n


class _Debug:
    def __init__(self, mask: int, sym: _Symbols) -> None:
        self.mask = mask
        self.sym = sym
        self.records: list[DebugRecord] = []

    def __call__(self, kind: int, message: str, addr: int | None = None) -> None:
        if self.mask & kind:
            self.records.append(DebugRecord(kind, message, addr))

    def dump(self, kind: int, addr: int, label: str, data: bytes) -> None:
        if self.mask & kind and data:
            self.records.append(DebugRecord(kind, f"{addr:#x}: {label}: {_hex(data)}", addr))


def _decode(shadow: _Shadow, addr: int) -> Insn | None:
    for n in (15, 8, 6, 5, 2, 1):      # near the end of text fewer bytes remain
        try:
            data = shadow.read(addr, n)
        except BadAddressError:
            continue
        try:
            return insn_decode_kernel(data, addr)
        except BadInstructionError:
            return None
    return None


# --------------------------------------------------------------------------
# apply_alternatives
# --------------------------------------------------------------------------

def _group_lengths(entries: Sequence[Any]) -> list[int]:
    """Each entry's instrlen after the nested-site rule: consecutive entries
    at one address all take the largest instrlen among them (the outer
    ALTERNATIVE may pad more than the inner one)."""
    lens = [e.instrlen for e in entries]
    i = 0
    while i < len(entries):
        j = i + 1
        while j < len(entries) and entries[j].instr == entries[i].instr:
            j += 1
        m = max(lens[i:j])
        lens[i:j] = [m] * (j - i)
        i = j
    return lens


def _alt_replace_call(shadow: _Shadow, a: Any, instrlen: int, buf: bytearray,
                      sym: _Symbols) -> tuple[int, int]:
    """ALT_FLAG_DIRECT_CALL: turn the replacement's ``call BUG_func`` into a
    direct call to whatever the original ``call *disp(%rip)`` would reach.
    Returns (bytes of *buf* to keep: 0 when the target is nop_func, else 5;
    the call target)."""
    where = f".altinstructions entry {a.index} at {a.instr:#x} ({sym(a.instr)})"
    if a.replacementlen != 5 or buf[:1] != bytes([CALL_INSN_OPCODE]):
        raise AlternativeError(f"{where}: ALT_FLAG_DIRECT_CALL on a replacement that is not a "
                               f"5-byte CALL ({_hex(bytes(buf[:a.replacementlen]))})",
                               addr=a.instr, table=".altinstructions", index=a.index)
    cur = shadow.read(a.instr, instrlen)
    if instrlen != 6 or cur[:2] != _CALL_RIP_REL:
        raise AlternativeError(f"{where}: ALT_FLAG_DIRECT_CALL on a site that is not "
                               f"'call *disp32(%rip)' ({_hex(cur)})",
                               addr=a.instr, table=".altinstructions", index=a.index)
    disp = int.from_bytes(cur[2:6], "little", signed=True)
    slot = a.instr + 6 + disp
    try:
        target = int.from_bytes(shadow.machine.mem.read(slot, 8), "little")
    except TextPokeError as e:
        raise AlternativeError(f"{where}: cannot read the call pointer at {slot:#x}: {e}",
                               addr=a.instr, table=".altinstructions", index=a.index) from None
    # The replacement was assembled as "call BUG_func"; its own target is
    # the placeholder a NULL pointer resolves to.
    bug = a.repl + 5 + int.from_bytes(buf[1:5], "little", signed=True)
    if target == 0:
        target = sym.get("BUG_func") or bug
    rel = target - (a.repl + 5)
    if not -(1 << 31) <= rel < (1 << 31):
        raise AlternativeError(f"{where}: call target {target:#x} is beyond rel32 reach",
                               addr=a.instr, table=".altinstructions", index=a.index)
    buf[1:5] = rel.to_bytes(4, "little", signed=True)
    nop_func = sym.get("nop_func")
    return (0 if nop_func is not None and target == nop_func else 5), target


def _apply_alternatives(shadow: _Shadow, entries: Sequence[Any], feats: frozenset[int],
                        sym: _Symbols, dbg: _Debug) -> list[AltSitePatch]:
    machine = shadow.machine
    lens = _group_lengths(entries)
    # A replacement longer than its site would overwrite the code after it
    # on a CPU that takes it.  Such a table is broken whatever this CPU's
    # features are, so it is refused before anything else happens.
    for a, instrlen in zip(entries, lens):
        if a.replacementlen > instrlen:
            raise AlternativeError(
                f".altinstructions entry {a.index} at {a.instr:#x} ({sym(a.instr)}): replacement "
                f"of {a.replacementlen} bytes does not fit the {instrlen}-byte site",
                addr=a.instr, table=".altinstructions", index=a.index)
    out: list[AltSitePatch] = []
    if entries:
        dbg(DA_ALT, f"alt table {len(entries)} entries, {entries[0].entry:#x} -> "
                    f"{entries[-1].entry + 14:#x}")
    nested = 0
    for k, a in enumerate(entries):
        nested = nested + 1 if k and entries[k - 1].instr == a.instr else 1
        instrlen = lens[k]
        def where(a: Any = a) -> str:       # only built when something is refused
            return f".altinstructions entry {a.index} at {a.instr:#x} ({sym(a.instr)})"
        if instrlen > MAX_PATCH_LEN:
            raise AlternativeError(f"{where()}: instrlen {instrlen} exceeds MAX_PATCH_LEN",
                                   addr=a.instr, table=".altinstructions", index=a.index)
        try:
            old = shadow.read(a.instr, instrlen)
            replacement = machine.text_read(a.repl, a.replacementlen) if a.replacementlen else b""
        except BadAddressError as e:
            raise AlternativeError(f"{where()}: {e}", addr=a.instr, table=".altinstructions",
                                   index=a.index) from None
        taken = a.wanted(feats)
        target = None
        if not taken:
            # The original stays; only its padding NOPs are merged.
            buf = bytearray(old)
            optimize_nops(a.instr, buf, instrlen)
        else:
            dbg(DA_ALT, f"feat: {a.cpuid >> 5}*32+{a.cpuid & 31}, old: ({sym(a.instr)} "
                        f"({a.instr:#x}) len: {instrlen}), repl: ({a.repl:#x}, len: "
                        f"{a.replacementlen}) flags: {a.flags:#x}", a.instr)
            buf = bytearray(replacement)
            keep = a.replacementlen
            if a.direct_call:
                keep, target = _alt_replace_call(shadow, a, instrlen, buf, sym)
            # Pad to the site with single-byte NOPs; the relocation pass
            # merges them (and refuses a replacement longer than the site).
            buf[keep:] = bytes([_NOP1]) * max(0, instrlen - keep)
            try:
                text_poke_apply_relocation(buf, a.instr, instrlen, a.repl, a.replacementlen)
            except BadInstructionError as e:
                raise AlternativeError(f"{where()}: {e}", addr=a.instr, table=".altinstructions",
                                       index=a.index) from None
            dbg.dump(DA_ALT, a.instr, "  old_insn", old)
            dbg.dump(DA_ALT, a.repl, "  rpl_insn", replacement)
            dbg.dump(DA_ALT, a.instr, "final_insn", bytes(buf[:instrlen]))
        final = bytes(buf[:instrlen])
        written = shadow.write(a.instr, final)
        if written and not taken:
            dbg(DA_ALT, f"{a.instr:#x}: optimized NOPs: {_hex(final)}", a.instr)
        out.append(AltSitePatch(
            index=a.index, instr=a.instr, repl=a.repl, instrlen=instrlen,
            replacementlen=a.replacementlen, cpuid=a.cpuid, flags=a.flags, feature=a.feature,
            taken=taken, old=old, replacement=replacement, final=final, written=written,
            nested=nested, symbol=sym(a.instr), direct_call_target=target))
    return out


# --------------------------------------------------------------------------
# apply_retpolines / apply_returns
# --------------------------------------------------------------------------

def _emit_indirect(op: int, reg: int) -> bytes | None:
    """``call *%reg`` / ``jmp *%reg`` (FF /2, FF /4, REX.B for r8..r15)."""
    if op == CALL_INSN_OPCODE:
        modrm = 0xD0
    elif op == JMP32_INSN_OPCODE:
        modrm = 0xE0
    else:
        return None
    rex = b"\x41" if reg >= 8 else b""
    return rex + bytes([0xFF, modrm + (reg & 7)])


def _patch_retpoline(addr: int, insn: Insn, reg: int, feats: frozenset[int]) -> tuple[bytes | None, str]:
    if _has(feats, _FEATURE_RETPOLINE) and not _has(feats, _FEATURE_RETPOLINE_LFENCE):
        return None, "retpoline wanted: the call through the thunk stays"
    out = bytearray()
    op = insn.opcode[0]
    if is_jcc32(insn):
        # Jcc thunk  ->  J!cc.d8 over the rest; [lfence]; jmp *%reg
        cc = (insn.opcode[1] & 0xF) ^ 1
        out += bytes([0x70 + cc, insn.length - 2])
        op = JMP32_INSN_OPCODE
    if _has(feats, _FEATURE_RETPOLINE_LFENCE):
        out += _LFENCE
    ind = _emit_indirect(op, reg)
    if ind is None:
        return None, f"cannot rewrite {insn.text!r}"
    out += ind
    if op == JMP32_INSN_OPCODE and len(out) < insn.length:
        out.append(INT3_INSN_OPCODE)          # straight-line speculation stop
    if len(out) > insn.length:
        return None, f"{len(out)}-byte rewrite does not fit the {insn.length}-byte site"
    out += bytes([_NOP1]) * (insn.length - len(out))
    return bytes(out), ""


def _apply_retpolines(shadow: _Shadow, sites: Sequence[Any], feats: frozenset[int],
                      sym: _Symbols, dbg: _Debug) -> list[SitePatch]:
    out: list[SitePatch] = []
    if not sites:
        return out
    array = sym.get("__x86_indirect_thunk_array")
    if array is None:
        raise AlternativeError("image has .retpoline_sites but no __x86_indirect_thunk_array",
                               table=".retpoline_sites")
    for i, s in enumerate(sites):
        addr = s.addr
        insn = _decode(shadow, addr)

        def skip(why: str, insn: Insn | None = insn, action: str = "skipped") -> None:
            raw = insn.raw if insn is not None else shadow.read(addr, 1)
            out.append(SitePatch("retpoline", addr, raw, raw, action, why, sym(addr),
                                 insn.branch_target if insn is not None else None))

        if insn is None:
            skip("cannot decode the site")
            continue
        op = insn.opcode[0]
        if 0x70 <= op <= 0x7F:
            skip("Jcc.d8 to a thunk (FineIBT only)")
            continue
        if op not in (CALL_INSN_OPCODE, JMP32_INSN_OPCODE) and not is_jcc32(insn):
            skip(f"not a CALL/JMP/Jcc.d32: {insn.text!r}")
            continue
        target = insn.branch_target
        off = target - array
        if off % _RETPOLINE_THUNK_SIZE or not 0 <= off // _RETPOLINE_THUNK_SIZE < 16:
            skip(f"target {sym(target)} is not a retpoline thunk")
            continue
        reg = off // _RETPOLINE_THUNK_SIZE
        if reg == _REG_RSP:
            raise AlternativeError(f".retpoline_sites entry {i} at {addr:#x} ({sym(addr)}): "
                                   "an indirect branch through %rsp", addr=addr,
                                   table=".retpoline_sites", index=i)
        dbg(DA_RETPOLINE, f"retpoline at: {sym(addr)} ({addr:#x}) len: {insn.length} to: "
                          f"{sym(target)}", addr)
        new, why = _patch_retpoline(addr, insn, reg, feats)
        if new is None:
            skip(why, action="kept")
            continue
        buf = bytearray(new)
        optimize_nops(addr, buf, len(buf))
        new = bytes(buf)
        dbg.dump(DA_RETPOLINE, addr, "orig", insn.raw)
        dbg.dump(DA_RETPOLINE, addr, "repl", new)
        written = shadow.write(addr, new)
        out.append(SitePatch("retpoline", addr, insn.raw, new,
                             "patched" if written else "unchanged", "", sym(addr), target))
    return out


def _apply_returns(shadow: _Shadow, sites: Sequence[Any], feats: frozenset[int],
                   sym: _Symbols, dbg: _Debug) -> list[SitePatch]:
    out: list[SitePatch] = []
    if not sites:
        return out
    thunk = sym.get("__x86_return_thunk")
    if thunk is None:
        raise AlternativeError("image has .return_sites but no __x86_return_thunk",
                               table=".return_sites")
    rethunk = _has(feats, _FEATURE_RETHUNK)
    for s in sites:
        addr = s.addr
        insn = _decode(shadow, addr)
        if insn is None:
            raw = shadow.read(addr, 1)
            out.append(SitePatch("return", addr, raw, raw, "skipped", "cannot decode the site",
                                 sym(addr)))
            continue
        dest = insn.branch_target if insn.opcode[0] == JMP32_INSN_OPCODE else None
        if dest != thunk:
            # The kernel warns "missing return thunk" and leaves the site.
            out.append(SitePatch("return", addr, insn.raw, insn.raw, "skipped",
                                 f"missing return thunk: {insn.text!r}", sym(addr), dest))
            continue
        dbg(DA_RET, f"return thunk at: {sym(addr)} ({addr:#x}) len: {insn.length} to: "
                    f"{sym(dest)}", addr)
        if rethunk:
            new = text_gen_insn(JMP32_INSN_OPCODE, addr, thunk)
        else:
            new = bytes([RET_INSN_OPCODE])
        new += bytes([INT3_INSN_OPCODE]) * (insn.length - len(new))
        dbg.dump(DA_RET, addr, "orig", insn.raw)
        dbg.dump(DA_RET, addr, "repl", new)
        written = shadow.write(addr, new)
        out.append(SitePatch("return", addr, insn.raw, new,
                             "patched" if written else "unchanged",
                             "" if written or not rethunk else "the return thunk is wanted",
                             sym(addr), dest))
    return out


def _wrap_pass(core: TextPoke, fn, *args) -> list:
    shadow = _Shadow(core)
    res = fn(shadow, *args)
    shadow.commit()
    return res


def apply_alternatives(core: TextPoke, entries: Iterable[Any], features: Iterable[str | int],
                       *, image: Any = None, debug_alternative: int = 0) -> tuple[AltSitePatch, ...]:
    """Apply ``.altinstructions`` entries (:class:`~textpoke.images._tables.AltInstr`
    records, in table order) for a CPU with *features*.  Refuses -- with the
    text untouched -- any entry the kernel would BUG() on.  *image* (an
    ElfImage or a symbol dict) names sites and provides ``nop_func`` /
    ``BUG_func`` for ALT_FLAG_DIRECT_CALL."""
    feats, _ = _features(features)
    sym = _symbols_of(image)
    return tuple(_wrap_pass(core, _apply_alternatives, list(entries), feats, sym,
                            _Debug(debug_alternative, sym)))


def apply_retpolines(core: TextPoke, sites: Iterable[Any], features: Iterable[str | int],
                     *, image: Any) -> tuple[SitePatch, ...]:
    """Rewrite calls/jumps to ``__x86_indirect_thunk_<reg>`` (``.retpoline_sites``)."""
    feats, _ = _features(features)
    sym = _symbols_of(image)
    return tuple(_wrap_pass(core, _apply_retpolines, list(sites), feats, sym, _Debug(0, sym)))


def apply_returns(core: TextPoke, sites: Iterable[Any], features: Iterable[str | int],
                  *, image: Any) -> tuple[SitePatch, ...]:
    """Rewrite ``jmp __x86_return_thunk`` (``.return_sites``)."""
    feats, _ = _features(features)
    sym = _symbols_of(image)
    return tuple(_wrap_pass(core, _apply_returns, list(sites), feats, sym, _Debug(0, sym)))


def apply_seal_endbr(core: TextPoke, sites: Iterable[Any] = ()) -> tuple[SitePatch, ...]:
    """IBT sealing is not modelled: there is no ENDBR in an image built with
    ``-fcf-protection=none`` and no ``.ibt_endbr_seal`` table.  An empty
    table is accepted (nothing to do); anything else is refused."""
    sites = list(sites)
    if sites:
        raise AlternativeError("apply_seal_endbr: IBT/ENDBR sealing is not modelled",
                               table=".ibt_endbr_seal")
    return ()


# --------------------------------------------------------------------------
# SMP locks
# --------------------------------------------------------------------------

def _lock_pass(core: TextPoke, locks: Iterable[Any], text: tuple[int, int], want: int,
               have: int, sym: _Symbols, dbg: _Debug | None) -> list[SitePatch]:
    core.text_mutex.assert_held("alternatives_smp_lock/unlock")
    lo, hi = text
    out: list[SitePatch] = []
    for lk in locks:
        addr = lk.addr if hasattr(lk, "addr") else int(lk)
        if not lo <= addr < hi:
            out.append(SitePatch("smp-lock", addr, b"", b"", "skipped", "outside the text range",
                                 sym(addr)))
            continue
        cur = core.machine.text_read(addr, 1)
        if cur[0] != have:
            if cur[0] == want:
                out.append(SitePatch("smp-lock", addr, cur, cur, "unchanged", "", sym(addr)))
            else:
                out.append(SitePatch("smp-lock", addr, cur, cur, "skipped",
                                     f"prefix is {cur[0]:#04x}, not {have:#04x}", sym(addr)))
            continue
        core.text_poke(addr, bytes([want]))
        if dbg is not None:
            dbg(DA_SMP, f"{sym(addr)} ({addr:#x}): {have:02x} -> {want:02x}", addr)
        out.append(SitePatch("smp-lock", addr, cur, bytes([want]), "patched", "", sym(addr)))
    if any(s.patched for s in out):
        # Whoever runs this code next -- the boot CPU, or a CPU coming
        # online -- must fetch the new prefix.
        core.smp_text_poke_sync_each_cpu()
    return out


def alternatives_smp_unlock(core: TextPoke, locks: Iterable[Any], text: tuple[int, int], *,
                            image: Any = None) -> tuple[SitePatch, ...]:
    """LOCK (F0) -> DS (3E) at every listed prefix inside *text*: a single
    CPU needs no bus lock, and DS is a no-op prefix of the same length.
    Needs ``text_mutex``."""
    return tuple(_lock_pass(core, locks, text, _DS_PREFIX, _LOCK_PREFIX, _symbols_of(image), None))


def alternatives_smp_lock(core: TextPoke, locks: Iterable[Any], text: tuple[int, int], *,
                          image: Any = None) -> tuple[SitePatch, ...]:
    """DS (3E) -> LOCK (F0): undo :func:`alternatives_smp_unlock`.  Needs
    ``text_mutex``."""
    return tuple(_lock_pass(core, locks, text, _LOCK_PREFIX, _DS_PREFIX, _symbols_of(image), None))


@dataclass
class _SmpAltModule:
    name: str
    locks: tuple[Any, ...]
    text: tuple[int, int]


class _SmpAlt:
    """The kernel's ``smp_alt_modules`` list and ``uniproc_patched`` flag,
    one per TextPoke core (protected by its text_mutex)."""

    def __init__(self) -> None:
        self.modules: list[_SmpAltModule] = []
        self.uniproc_patched = False
        self.possible_cpus = 0


_SMP_ALT: "weakref.WeakKeyDictionary[TextPoke, _SmpAlt]" = weakref.WeakKeyDictionary()


def _smp_alt(core: TextPoke) -> _SmpAlt:
    st = _SMP_ALT.get(core)
    if st is None:
        st = _SMP_ALT[core] = _SmpAlt()
        st.possible_cpus = len(core.machine.cpus)
    return st


def alternatives_smp_module_add(core: TextPoke, name: str, locks: Iterable[Any],
                                text: tuple[int, int], *, image: Any = None,
                                _dbg: _Debug | None = None) -> tuple[SitePatch, ...]:
    """Register a text range's LOCK prefixes; unlock them now if the
    machine was patched for one CPU.  With a single possible CPU they are
    not remembered (there will never be a reason to lock them again)."""
    st = _smp_alt(core)
    sym = _symbols_of(image)
    with core.text_mutex:
        if not st.uniproc_patched:
            return ()
        locks = tuple(locks)
        if st.possible_cpus > 1:
            st.modules.append(_SmpAltModule(name, locks, text))
            if _dbg is not None:
                _dbg(DA_SMP, f"locks {len(locks)} entries, text {text[0]:#x} -> {text[1]:#x}, "
                             f"name {name}")
        return tuple(_lock_pass(core, locks, text, _DS_PREFIX, _LOCK_PREFIX, sym, _dbg))


def alternatives_smp_module_del(core: TextPoke, name: str) -> None:
    st = _smp_alt(core)
    with core.text_mutex:
        st.modules = [m for m in st.modules if m.name != name]


def alternatives_enable_smp(core: TextPoke, *, image: Any = None) -> tuple[SitePatch, ...]:
    """Going SMP: put the LOCK prefixes back in every registered range.
    Refused on a machine with one possible CPU (the kernel's BUG_ON)."""
    st = _smp_alt(core)
    if st.possible_cpus == 1:
        raise MachineError("alternatives_enable_smp: this machine has a single possible CPU")
    sym = _symbols_of(image)
    out: list[SitePatch] = []
    with core.text_mutex:
        if st.uniproc_patched:
            for m in st.modules:
                out += _lock_pass(core, m.locks, m.text, _LOCK_PREFIX, _DS_PREFIX, sym, None)
            st.uniproc_patched = False
    return tuple(out)


def alternatives_text_reserved(core: TextPoke, start: int, end: int) -> bool:
    """Whether [start, end] holds a LOCK prefix the SMP switch may rewrite
    (kprobes must not be placed there).  Needs ``text_mutex``."""
    core.text_mutex.assert_held("alternatives_text_reserved")
    for m in _smp_alt(core).modules:
        if m.text[0] > end or m.text[1] < start:
            continue
        for lk in m.locks:
            addr = lk.addr if hasattr(lk, "addr") else int(lk)
            if start <= addr < end:
                return True
    return False


# --------------------------------------------------------------------------
# self-tests
# --------------------------------------------------------------------------

def _scratch(machine: Any) -> int | None:
    """Eight bytes of data the self-tests may scribble on: the bottom of the
    boot CPU's stack, far below anything a short call uses."""
    base = getattr(machine, "stack_base", None)
    return None if base is None else base + 64


def int3_selftest(core: TextPoke, image: Any) -> SelfTest:
    """Run the image's ``int3_selftest(&val)``: its INT3 at
    ``int3_selftest_ip`` must act as ``call int3_magic`` (which stores 1)
    once a trap handler emulates the CALL -- the same emulation the SMP
    batch relies on while a site is in flux."""
    name = "int3_selftest"
    sym = _symbols_of(image)
    fn, ip, magic = sym.get("int3_selftest"), sym.get("int3_selftest_ip"), sym.get("int3_magic")
    machine = core.machine
    if None in (fn, ip, magic):
        return SelfTest(name, None, "the image has no int3_selftest/int3_selftest_ip/int3_magic")
    val = _scratch(machine)
    if not hasattr(machine, "call") or val is None:
        return SelfTest(name, None, f"the {machine.name} machine cannot run guest functions")

    hits = []

    def int3_exception_notify(regs: PtRegs):
        if regs.user_mode or regs.ip - INT3_INSN_SIZE != ip:
            return False
        hits.append(regs.cpu)
        int3_emulate_call(regs, magic)
        return True
        yield  # a trap handler is a generator (it never needs to wait)

    machine.mem.write(val, b"\0" * 4)
    machine.register_trap_handler(int3_exception_notify)
    try:
        machine.call(fn, val)
    except MachineError as e:
        return SelfTest(name, False, f"INT3 at {ip:#x} was not emulated: {e}")
    finally:
        machine.unregister_trap_handler(int3_exception_notify)
    got = int.from_bytes(machine.mem.read(val, 4), "little")
    ok = got == 1 and len(hits) == 1
    return SelfTest(name, ok, f"INT3 at {ip:#x} emulated as call {sym(magic)}: val = {got}"
                    + ("" if ok else f" (expected 1, handler hits {len(hits)})"), got)


def alt_reloc_selftest(core: TextPoke, image: Any) -> SelfTest:
    """Run the image's ``alt_reloc_selftest()`` after patching: 1 means the
    replacement's RIP-relative LEA and its CALL both still reached their
    targets from the site; 2 a wrong address; 0 an unpatched site."""
    name = "alt_reloc_selftest"
    sym = _symbols_of(image)
    fn = sym.get("alt_reloc_selftest")
    machine = core.machine
    if fn is None:
        return SelfTest(name, None, "the image has no alt_reloc_selftest")
    if not hasattr(machine, "call"):
        return SelfTest(name, None, f"the {machine.name} machine cannot run guest functions")
    try:
        got = machine.call(fn) & 0xFFFFFFFF
    except MachineError as e:
        return SelfTest(name, False, f"alt_reloc_selftest crashed: {e}")
    meaning = {0: "the replacement was not patched in",
               1: "LEA and CALL reached their targets",
               2: "the LEA computed a wrong address"}.get(got, "unexpected result")
    return SelfTest(name, got == 1, f"returned {got}: {meaning}", got)


# --------------------------------------------------------------------------
# alternative_instructions
# --------------------------------------------------------------------------

def alternative_instructions(core: TextPoke, image: Any, tables: Any,
                             features: Iterable[str | int], *, ncpus: int | None = None,
                             noreplace_smp: bool = False, debug_alternative: int = 0,
                             selftests: bool = True, strict: bool = True) -> BootResult:
    """Boot-time patching of *image* (an ElfImage) on ``core.machine``, from
    *tables* (``read_tables(image)``), for a CPU with *features* (names or
    numbers; ``always`` is implied).  *ncpus* is the number of present CPUs
    (default: the machine's); with one, LOCK prefixes are turned into DS.
    Call it before any CPU was started: alternatives are written with
    ``text_poke_early``."""
    feats, names = _features(features)
    machine = core.machine
    possible = len(machine.cpus)
    present = possible if ncpus is None else ncpus
    if not 1 <= present <= possible:
        raise ValueError(f"ncpus must be in 1..{possible} (the machine's CPUs), got {present}")
    sym = _symbols_of(image)
    dbg = _Debug(debug_alternative, sym)
    timings: dict[str, float] = {}
    tests: list[SelfTest] = []
    entries = {name: n for name, n in tables.counts().items()} if hasattr(tables, "counts") else {}

    def partial(**kw: Any) -> BootResult:
        return BootResult(features=names, ncpus=present, possible_cpus=possible,
                          selftests=tuple(tests), table_entries=entries,
                          debug=tuple(dbg.records), timings=dict(timings), **kw)

    t = time.perf_counter()
    if selftests:
        tests.append(int3_selftest(core, image))
        if strict and tests[-1].passed is False:
            raise SelfTestError(f"int3_selftest failed: {tests[-1].detail}", partial())
    timings["int3_selftest"] = time.perf_counter() - t

    # Retpolines first: the thunks they stop using are alternative sites.
    shadow = _Shadow(core)
    t = time.perf_counter()
    retp = _apply_retpolines(shadow, tables.retpoline_sites, feats, sym, dbg)
    timings["apply_retpolines"] = time.perf_counter() - t
    t = time.perf_counter()
    rets = _apply_returns(shadow, tables.return_sites, feats, sym, dbg)
    timings["apply_returns"] = time.perf_counter() - t
    t = time.perf_counter()
    alts = _apply_alternatives(shadow, tables.alt_instructions, feats, sym, dbg)
    timings["apply_alternatives"] = time.perf_counter() - t
    apply_seal_endbr(core, ())
    t = time.perf_counter()
    shadow.commit()
    timings["commit"] = time.perf_counter() - t

    t = time.perf_counter()
    st = _smp_alt(core)
    st.possible_cpus = possible
    locks: tuple[SitePatch, ...] = ()
    if not noreplace_smp and present == 1:
        st.uniproc_patched = True
        text = (sym.get("_text") or tables.text[0], sym.get("_etext") or tables.text[1])
        locks = alternatives_smp_module_add(core, "core kernel", tables.smp_locks, text,
                                            image=image, _dbg=dbg)
    timings["smp_locks"] = time.perf_counter() - t

    if selftests:
        t = time.perf_counter()
        tests.append(alt_reloc_selftest(core, image))
        timings["alt_reloc_selftest"] = time.perf_counter() - t
    result = partial(alternatives=tuple(alts), retpolines=tuple(retp), returns=tuple(rets),
                     smp_locks=locks, uniproc_patched=st.uniproc_patched)
    if strict and not result.ok:
        bad = "; ".join(f"{s.name}: {s.detail}" for s in result.selftests if s.passed is False)
        raise SelfTestError(f"boot self-test failed: {bad}", result)
    return result
