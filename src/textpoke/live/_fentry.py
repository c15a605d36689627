# SPDX-License-Identifier: GPL-2.0-only
"""fentry sites of a running process: ``__mcount_loc`` and
``__patchable_function_entries``.

* ``gcc -pg -mfentry -mnop-mcount -mrecord-mcount`` (non-PIC only: GCC
  refuses ``-mnop-mcount`` with ``-fPIC``/PIE) puts a 5-byte NOP
  (``0f 1f 44 00 00``, the kernel's NOP5) as each function's first
  instruction, where ``call __fentry__`` would be, and records its address in
  ``__mcount_loc``.  These are the sites the kernel's ftrace patches, and the
  ones textpoke patches: one instruction, so the INT3 protocol applies.
* ``-fpatchable-function-entry=5`` (PIE is fine) records the entry in
  ``__patchable_function_entries``; GCC on x86 fills it with five one-byte
  NOPs.  Those are listed but flagged ``5xNOP1``: a thread may be stopped
  between two of them, so they cannot be replaced by one 5-byte instruction
  while the process runs (the INT3 protocol only covers the first byte).

Both sections hold link-time addresses (in a PIE, the dynamic linker
relocates them; the file holds the same values as the addends), so each
entry plus the module's load bias is the runtime address.  The *bytes found*
at each site are read from the live process, and classified:

``nop5``     the expected NOP5: patchable
``call``     a CALL (e.g. a site textpoke switched and a SIGKILL left on)
``jmp``      a JMP32
``int3``     an INT3 in the first byte: a stray breakpoint -- of a patcher
             that was SIGKILLed mid-batch, or of a debugger
``5xnop1``   five single-byte NOPs (``-fpatchable-function-entry=5``)
``call-got`` ``call *__fentry__@GOTPCREL(%rip)`` (``ff 15``, 6 bytes): the
             fentry call of a PIE built with ``-pg -mfentry`` (GCC refuses
             ``-mnop-mcount`` there)
``other``    anything else

The last two are not one 5-byte instruction, so the INT3 protocol cannot
switch them while threads run; :data:`QUIESCENT` kinds are switched with
every thread stopped, once none stands strictly inside the site (a thread
between two of the NOPs is single-stepped out first) -- the quiescence
optprobes wait for.  A ``call-got`` site becomes ``call stub; nop`` (5 + 1
bytes): a thread running inside ``__fentry__`` returns to site+6, still an
instruction boundary.  ENDBR64 stays first: the sites are recorded after it.
"""

from __future__ import annotations

import bisect
import fnmatch
import re
import struct
from typing import Callable, Iterable

from .._core._insn import x86_nops
from ._record import Record
from ._symbols import Module, SymbolError, Symbols, matching

__all__ = ["FentrySite", "NOP5", "QUIESCENT", "PATCHABLE", "classify", "fentry_sites", "module_report", "read_process"]

NOP5 = x86_nops[5]
NOP1X5 = b"\x90" * 5
#: kinds switched with every thread stopped (see the module doc)
QUIESCENT = frozenset({"5xnop1", "call-got"})
#: kinds count and toggle switch
PATCHABLE = frozenset({"nop5"}) | QUIESCENT

#: which sections list sites, and what built them
SECTIONS = {"__mcount_loc": "mcount", "__patchable_function_entries": "patchable"}


class FentrySite(Record):
    """One site (a slotted record, compared by every field: see
    :mod:`._record`)."""

    __slots__ = ("addr", "function", "func_addr", "module", "source", "found", "kind")
    __match_args__ = __slots__

    addr: int
    function: str          # name of the function it belongs to ("?" if none)
    func_addr: int
    module: str            # short name of the module
    source: str            # "mcount" or "patchable"
    found: bytes           # the bytes of the site read from the live process (5, or 6)
    kind: str              # see classify()

    def __init__(self, addr: int, function: str, func_addr: int, module: str, source: str,
                 found: bytes, kind: str) -> None:
        self.addr = addr
        self.function = function
        self.func_addr = func_addr
        self.module = module
        self.source = source
        self.found = found
        self.kind = kind

    @property
    def patchable(self) -> bool:
        return self.kind in PATCHABLE

    @property
    def stray_int3(self) -> bool:
        return self.kind == "int3"

    def as_dict(self) -> dict:
        return {"addr": f"{self.addr:#x}", "function": self.function, "module": self.module,
                "source": self.source, "bytes": self.found.hex(" "), "kind": self.kind}


def classify(found: bytes) -> str:
    if found[:5] == NOP5:
        return "nop5"
    if found[:2] == b"\xff\x15":
        return "call-got"
    if found[:1] == b"\xcc":
        return "int3"
    if found[:5] == NOP1X5:
        return "5xnop1"
    if found[:1] == b"\xe8":
        return "call"
    if found[:1] == b"\xe9":
        return "jmp"
    return "other"


def read_process(pid: int) -> Callable[[int, int], bytes]:
    """A reader of *pid*'s memory through /proc/PID/mem (no ptrace stop)."""
    import os
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read(addr: int, size: int) -> bytes:
        return os.pread(fd, size, addr)
    read.close = lambda: os.close(fd)  # type: ignore[attr-defined]
    return read


def _entries(mod: Module) -> Iterable[tuple[int, str]]:
    for sec, src in SECTIONS.items():
        raw = mod.section_bytes(sec)
        if not raw:
            continue
        for (v,) in struct.iter_unpack("<Q", raw[:len(raw) - len(raw) % 8]):
            if v:                       # 0: a function the linker dropped
                yield v + mod.bias, src


def _sorted_entries(mod: Module) -> tuple[list[int], list[str]]:
    """The runtime addresses of the recorded sites of *mod*, in order,
    without duplicates, and the source of each (parallel lists: no tuple
    per site for 10,000 sites)."""
    per = []
    for sec, src in SECTIONS.items():
        raw = mod.section_bytes(sec)
        if raw:
            per.append((src, memoryview(raw[:len(raw) - len(raw) % 8]).cast("Q").tolist()))
    bias = mod.bias
    if len(per) == 1:
        src, vals = per[0]
        addrs = sorted(set(vals))
        if addrs and addrs[0] == 0:     # 0: a function the linker dropped
            del addrs[0]
        return ([v + bias for v in addrs] if bias else addrs), [src] * len(addrs)
    pairs = sorted({(v + bias, src) for src, vals in per for v in vals if v})
    return [a for a, _s in pairs], [s for _a, s in pairs]


def fentry_sites(syms: Symbols, pattern: str | None = None, *,
                 read: Callable[[int, int], bytes] | None = None,
                 modules: Iterable[Module] | None = None) -> list[FentrySite]:
    """Every fentry site of the process's modules (or of *modules*), in
    address order; *pattern* (a glob, ``lib:glob`` for one module) keeps the
    sites whose function -- any of its names -- matches.  *read* reads live
    memory (default: /proc/PID/mem)."""
    lib = None
    if pattern and ":" in pattern:
        lib, pattern = pattern.split(":", 1)
    if modules is None:
        modules = syms.modules_named(lib)
    exact = pattern is not None and not any(c in pattern for c in "*?[")
    rx = re.compile(fnmatch.translate(pattern)) if pattern and not exact else None
    own = read is None
    if own:
        read = read_process(syms.pid)
    try:
        out: dict[int, FentrySite] = {}
        for mod in modules:
            ranges = mod.executable_ranges()
            if exact:
                # one name: its function looked up alone, not every symbol
                # of the module read to name every site
                secs = [(raw, src) for raw, src in ((mod.section_bytes(sec), src)
                                                    for sec, src in SECTIONS.items()) if raw]
                f = mod.lookup(pattern) if secs else None
                if f is None or not f.func:
                    continue
                lo, hi = f.addr - mod.bias, f.addr + max(f.size, 1) - mod.bias
                found = set()
                for raw, src in secs:
                    vals = memoryview(raw[:len(raw) - len(raw) % 8]).cast("Q").tolist()
                    found.update((v + mod.bias, src) for v in vals if lo <= v < hi)
                for addr, src in sorted(found):
                    if addr not in out and any(a <= addr and addr + 5 <= b for a, b in ranges):
                        out[addr] = FentrySite(addr, f.name, f.addr, mod.short, src, b"", "")
                continue
            eaddrs, esrcs = _sorted_entries(mod)
            if not eaddrs:
                continue
            # names, starts and sizes only: no Symbol made for 10,000 functions
            fnames, starts, fsizes = mod.function_table()
            if rx is not None:
                # only the entries inside a function whose name matches (each
                # still checked below against the functions that own it)
                keep: set[int] = set()
                for k in matching(rx, fnames):
                    a = starts[k]
                    keep.update(range(bisect.bisect_left(eaddrs, a),
                                      bisect.bisect_left(eaddrs, a + max(fsizes[k], 1))))
                entries = [(eaddrs[k], esrcs[k]) for k in sorted(keep)]
            else:
                entries = list(zip(eaddrs, esrcs))
            one = ranges[0] if len(ranges) == 1 else None
            for addr, src in entries:
                if addr in out:
                    continue
                if one is not None:
                    if not (one[0] <= addr and addr + 5 <= one[1]):
                        continue
                elif not any(a <= addr and addr + 5 <= b for a, b in ranges):
                    continue
                j = bisect.bisect_right(starts, addr) - 1
                fn = None
                names: list[str] = []
                i = j
                while i >= 0 and starts[i] == starts[j]:
                    if addr < starts[i] + max(fsizes[i], 1):
                        fn = i if fn is None else fn
                        names.append(fnames[i])
                    i -= 1
                if fn is None:
                    names, name, faddr = [], "?", addr
                else:
                    name, faddr = fnames[fn], starts[fn]
                if rx is not None and not any(rx.match(n) for n in names):
                    continue
                out[addr] = FentrySite(addr, name, faddr, mod.short, src, b"", "")
        sites = [out[a] for a in sorted(out)]
        _read_all(sites, read)
        return sites
    finally:
        if own:
            read.close()  # type: ignore[union-attr]


def module_report(syms: Symbols, sites: list[FentrySite], pattern: str | None = None,
                  entries: list | None = None, refused: list | None = None) -> list[dict]:
    """Per module of the process: what was found, and why a module has no
    patchable site (instead of a bare "0 sites"); with *entries* and
    *refused* (:func:`._entry.entry_sites`), the ordinary entries that can
    take a JMP and the refusals counted by reason."""
    lib = pattern.split(":", 1)[0] if pattern and ":" in pattern else None
    mods = syms.modules_named(lib)
    by_mod: dict[str, list[FentrySite]] = {}
    for s in sites:
        by_mod.setdefault(s.module, []).append(s)
    ent: dict[str, int] = {}
    for e in entries or ():
        ent[e.module] = ent.get(e.module, 0) + 1
    why_not: dict[str, dict[str, int]] = {}
    for r in refused or ():
        if r.reason != "fentry":
            d = why_not.setdefault(r.module, {})
            d[r.reason] = d.get(r.reason, 0) + 1
    out = []
    for mod in mods:
        secs = [sec for sec in SECTIONS if mod.section_bytes(sec)]
        try:
            nfuncs = len(mod.functions_sorted())
        except Exception:       # an unreadable symbol table: still report the module
            nfuncs = 0
        mine = by_mod.get(mod.short, [])
        kinds: dict[str, int] = {}
        for s in mine:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        n_ent = ent.get(mod.short, 0)
        reasons = dict(sorted(why_not.get(mod.short, {}).items(), key=lambda kv: -kv[1]))
        if mine or n_ent:
            why = ""
        elif not nfuncs:
            why = "no function symbols (.symtab and .dynsym have none)"
        elif reasons:
            why = "no entry can take a JMP: " + ", ".join(f"{k} {n}" for k, n in reasons.items())
        elif pattern:
            why = f"no function matching {pattern!r}"
        elif entries is None and not secs:
            why = ("no __mcount_loc or __patchable_function_entries section: built without "
                   "-pg -mrecord-mcount or -fpatchable-function-entry")
        else:
            why = "its site sections are empty"
        row = {"module": mod.short, "functions": nfuncs, "sections": secs,
               "sites": len(mine), "kinds": kinds, "why": why}
        if entries is not None:
            row.update(entries=n_ent, refused=sum(reasons.values()), reasons=reasons)
        out.append(row)
    return out


def _read_all(sites: list[FentrySite], read: Callable[[int, int], bytes]) -> None:
    """Fill in the bytes of every site with as few reads as possible (one
    per run of sites less than a page apart)."""
    i = 0
    while i < len(sites):
        j = i
        while j + 1 < len(sites) and sites[j + 1].addr - sites[j].addr < 4096:
            j += 1
        lo, hi = sites[i].addr, sites[j].addr + 6
        try:
            buf = read(lo, hi - lo)
        except OSError:
            try:                        # the last site ends its mapping
                buf = read(lo, hi - 1 - lo) + b"\x00"
            except OSError as e:
                raise SymbolError(f"cannot read the text at {lo:#x}: {e.strerror}") from None
        for s in sites[i:j + 1]:
            six = bytes(buf[s.addr - lo:s.addr - lo + 6])
            s.kind = classify(six)
            s.found = six if s.kind == "call-got" else six[:5]
        i = j + 1
