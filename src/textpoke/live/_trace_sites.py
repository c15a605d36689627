# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``'s sites: which functions are traced and how the tracer
enters each (a ``-mnop-mcount`` NOP5 is its own record; any other function
gets a *pad* in the tracer's region), the pads' code, and the switch of the
entries to their pads and back.  See :mod:`._trace` for the design."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .._core._insn import JMP32_INSN_OPCODE, text_gen_insn, x86_nops
from .._errors import TextPokeError
from ._symbols import SymbolError

__all__ = ["BRIDGE_SLOT", "NOP5", "PAD_SIZE", "TraceError", "TraceSite", "fill_pads",
           "group_sites", "plan_sites", "reach_of", "switch_pads"]

NOP5 = x86_nops[5]
PAD_SIZE = 64
#: a site's slot in its bridge: ``jmp *`` to its pad (16), then its tail
BRIDGE_SLOT = 80
_BRIDGE_HEAD = 16
#: a trace cannot call across more than this (rel32 from any site to the runtime)
REACH = (1 << 31) - (64 << 20)


class TraceError(TextPokeError, ValueError):
    """Nothing to trace, or the functions cannot be traced (one line)."""


@dataclass(slots=True)
class TraceSite:
    """One traced function: where the tracer enters it."""

    function: str
    module: str
    kind: str                 # "nop5", "entry", "5xnop1", "call-got"
    addr: int                 # the site in the function
    found: bytes              # its bytes now (what goes back at the end)
    plan: object = None       # EntryPlan (entries)
    record: int = 0           # the NOP5 the client switches (addr, or the pad's)
    pad: int = 0              # the pad (not nop5)
    jmp: bytes = b""          # what the site holds while traced (not nop5)
    bridge: int = -1          # its bridge (out of the runtime's reach), or -1
    slot: int = 0             # its slot in that bridge

    @property
    def padded(self) -> bool:
        """Entered through a pad (a NOP5 site near the runtime is its own record)."""
        return self.kind != "nop5" or self.bridge >= 0

    def as_dict(self) -> dict:
        return {"function": self.function, "module": self.module, "kind": self.kind,
                "addr": f"{self.addr:#x}", "record": f"{self.record:#x}"}


def plan_sites(syms, pattern: str, pid: int, skipped: list[dict]) -> list[TraceSite]:
    """The sites of the functions matching *pattern* (globs, ``lib:glob``,
    several separated by commas, as set_ftrace_filter takes several), by
    address; what is refused is appended to *skipped*.  Raises
    :class:`TraceError` when nothing can be traced."""
    from ._entry import entry_sites
    from ._fentry import fentry_sites
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    if not pats:
        raise TraceError(f"no function pattern in {pattern!r}")
    sites: list[TraceSite] = []
    seen: set[int] = set()
    nfuncs = nfound = 0
    for pat in pats:
        try:
            funcs = syms.functions(pat)
        except SymbolError as e:
            raise TraceError(str(e)) from None
        found = [s for s in fentry_sites(syms, pat) if s.func_addr not in seen]
        nfuncs, nfound = nfuncs + len(funcs), nfound + len(found)
        for s in found:
            if s.kind in ("nop5", "5xnop1", "call-got"):
                sites.append(TraceSite(s.function, s.module, s.kind, s.addr, bytes(s.found)))
            else:
                skipped.append(dict(s.as_dict(), why=f"fentry site holds {s.kind}"))
        covered = {s.func_addr for s in found} | seen
        ents, refused = entry_sites(syms, pat,
                                    functions=[f for f in funcs if f.addr not in covered])
        for e in ents:
            # the JMP covers 5 bytes: what goes back (the rest of the moved
            # instructions stays as it is)
            sites.append(TraceSite(e.function, e.module, "entry", e.addr, bytes(e.found),
                                   plan=e.plan))
        skipped += [dict(r.as_dict(), kind=r.reason) for r in refused]
        seen |= covered | {f.addr for f in funcs}
    if not sites:
        if not nfuncs and not nfound:
            raise TraceError(f"no function matching {pattern!r} in process {pid}")
        why = "; ".join(f"{d.get('function')}: {d.get('why')}" for d in skipped[:3])
        raise TraceError(f"nothing matching {pattern!r} can be traced ({len(skipped)} "
                         f"refused; {why})")
    sites.sort(key=lambda s: s.addr)
    group_sites(syms, sites)
    return sites


def group_sites(syms, sites: list[TraceSite]) -> list[tuple[int, int]]:
    """Modules within rel32 reach of one another form a group; the group
    with the most sites gets the runtime (``bridge`` -1), every other group
    a bridge region of its own near it (``bridge`` its index in the list
    returned: the spans each bridge must reach)."""
    per: dict[str, list[TraceSite]] = {}
    for s in sites:
        per.setdefault(s.module, []).append(s)
    spans = []
    for mod, ss in per.items():
        lo, hi = reach_of(syms, ss, moved=True)
        if hi - lo > REACH:
            raise TraceError(f"module {mod} spans more than 2 GiB: its sites cannot all reach "
                             "one region in rel32")
        spans.append((lo, hi, mod))
    spans.sort()
    groups: list[list] = []
    for lo, hi, mod in spans:
        g = groups[-1] if groups else None
        if g is not None and max(g[1], hi) - g[0] <= REACH:
            g[1] = max(g[1], hi)
            g[2].append(mod)
        else:
            groups.append([lo, hi, [mod]])
    main = max(range(len(groups)), key=lambda i: (sum(len(per[m]) for m in groups[i][2]), -i))
    far = [g for i, g in enumerate(groups) if i != main]
    slot: dict[int, int] = {}
    for s in sites:
        s.bridge = next((i for i, g in enumerate(far) if s.module in g[2]), -1)
        if s.bridge >= 0:
            s.slot = slot.get(s.bridge, 0)
            slot[s.bridge] = s.slot + 1
    return [(g[0], g[1]) for g in far]


def reach_of(syms, sites, *, moved: bool = False) -> tuple[int, int]:
    """The span a region must reach for *sites*: the sites and the modules
    whose instructions are moved to pads (every module of *sites* with
    *moved*: a far NOP5 site gets a pad too)."""
    sites = sorted(sites, key=lambda s: s.addr)
    lo, hi = sites[0].addr, sites[-1].addr + 8
    for mod in {s.module for s in sites if moved or s.kind != "nop5"}:
        with contextlib.suppress(SymbolError):
            m = syms.module(mod)
            lo = min(lo, min(x.start for x in m.mappings))
            hi = max(hi, max(x.end for x in m.mappings))
    return lo, hi


def _tail(s: TraceSite, at: int) -> bytes:
    """What follows a pad's record: the moved instructions and a JMP back
    (an entry), or the JMP back after the site (an fentry form)."""
    from .._relocate import trampoline
    if s.kind == "entry":
        return trampoline(s.plan, at)
    return text_gen_insn(JMP32_INSN_OPCODE, at, s.addr + len(s.found))


def _jmp_abs(to: int) -> bytes:
    """``jmp *0(%rip)`` and its 8-byte target: any distance."""
    return b"\xff\x25\x00\x00\x00\x00" + to.to_bytes(8, "little")


def fill_pads(at: int, pads: list[TraceSite], code: bytearray, sites: list[TraceSite],
              skipped: list[dict], pattern: str,
              bridges: list[tuple[int, bytearray]] = ()) -> None:
    """The pads of *pads* appended to *code* (the first at *at*); a pad
    the relocator cannot build drops its site from *sites* (said in
    *skipped*).  Every site's ``record`` is set.

    A site out of the runtime's rel32 reach (``bridge`` >= 0) goes through
    its bridge (*bridges*: (base, code) of each, filled here), a region
    near its module: the site jumps to its slot's first half, ``jmp *``
    (absolute) to its pad by the runtime; the pad is the record (a NOP5
    the client switches to ``call ftrace_caller``) and a ``jmp *`` back to
    the slot's second half, which holds what a pad holds after its record
    (the moved instructions, re-encoded for that place, within reach of
    the module, and the JMP back)."""
    from .._relocate import RelocError
    keep = []
    for s in pads:
        pad = at + PAD_SIZE * len(keep)
        try:
            if s.bridge < 0:
                body = NOP5 + _tail(s, pad + 5)
                enter = pad
            else:
                bbase, bcode = bridges[s.bridge]
                enter = bbase + BRIDGE_SLOT * s.slot
                tail = _tail(s, enter + _BRIDGE_HEAD)
                assert len(tail) <= BRIDGE_SLOT - _BRIDGE_HEAD, len(tail)
                body = NOP5 + _jmp_abs(enter + _BRIDGE_HEAD)
                bcode[BRIDGE_SLOT * s.slot:BRIDGE_SLOT * (s.slot + 1)] = \
                    (_jmp_abs(pad).ljust(_BRIDGE_HEAD, b"\xcc") + tail).ljust(BRIDGE_SLOT, b"\xcc")
        except RelocError as e:
            skipped.append({"function": s.function, "addr": f"{s.addr:#x}",
                            "module": s.module, "kind": e.reason, "why": str(e)})
            sites.remove(s)
            continue
        assert len(body) <= PAD_SIZE, len(body)
        code += body.ljust(PAD_SIZE, b"\xcc")
        s.pad = s.record = pad
        s.jmp = text_gen_insn(JMP32_INSN_OPCODE, s.addr, enter) + b"\x90" * (len(s.found) - 5
                                                                             if s.kind != "entry" else 0)
        keep.append(s)
    for s in sites:
        if not s.padded:
            s.record = s.addr
    if not sites:
        raise TraceError(f"nothing matching {pattern!r} can be traced: every entry's "
                         "instructions are out of reach of the tracer's region")


class _EntryView:
    """What :func:`quiescent_tails` reads of an entry site."""

    __slots__ = ("addr", "plan")

    def __init__(self, s: TraceSite) -> None:
        self.addr, self.plan = s.addr, s.plan


def switch_pads(m, core, sites: list[TraceSite], on: bool) -> None:
    """Entries (and the other fentry forms) to ``jmp pad`` or back."""
    from ._entry import quiescent_tails
    from ._fentry import QUIESCENT
    pads = [s for s in sites if s.padded]
    todo = []
    for s in pads:
        want = s.jmp if on else s.found
        if m.text_read(s.addr, len(want)) != want:
            todo.append((s, want))
    quiet = [(s.addr, w) for s, w in todo if s.kind in QUIESCENT]
    batch = [(s, w) for s, w in todo if s.kind not in QUIESCENT]
    if batch:
        entries = [s for s, _ in batch if on and s.kind == "entry"]
        tails = quiescent_tails(m, [_EntryView(s) for s in entries]) if entries \
            else contextlib.nullcontext()
        with tails:
            with core.batch():
                for s, w in batch:
                    # going back: while the INT3 stands the old JMP is emulated
                    # (the pad runs the same instructions)
                    core.smp_text_poke_batch_add(s.addr, w, emulate=None if on else s.jmp)
    if quiet:
        m.write_stopped(quiet)
