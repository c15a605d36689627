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

__all__ = ["NOP5", "PAD_SIZE", "TraceError", "TraceSite", "fill_pads", "plan_sites",
           "reach_of", "switch_pads"]

NOP5 = x86_nops[5]
PAD_SIZE = 64
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

    def as_dict(self) -> dict:
        return {"function": self.function, "module": self.module, "kind": self.kind,
                "addr": f"{self.addr:#x}", "record": f"{self.record:#x}"}


def plan_sites(syms, pattern: str, pid: int, skipped: list[dict]) -> list[TraceSite]:
    """The sites of the functions matching *pattern*, by address; what is
    refused is appended to *skipped*.  Raises :class:`TraceError` when
    nothing can be traced or the sites lie too far apart."""
    from ._entry import entry_sites
    from ._fentry import fentry_sites
    try:
        funcs = syms.functions(pattern)
    except SymbolError as e:
        raise TraceError(str(e)) from None
    found = fentry_sites(syms, pattern)
    sites: list[TraceSite] = []
    for s in found:
        if s.kind in ("nop5", "5xnop1", "call-got"):
            sites.append(TraceSite(s.function, s.module, s.kind, s.addr, bytes(s.found)))
        else:
            skipped.append(dict(s.as_dict(), why=f"fentry site holds {s.kind}"))
    covered = {s.func_addr for s in found}
    ents, refused = entry_sites(syms, pattern,
                                functions=[f for f in funcs if f.addr not in covered])
    for e in ents:
        # the JMP covers 5 bytes: what goes back (the rest of the moved
        # instructions stays as it is)
        sites.append(TraceSite(e.function, e.module, "entry", e.addr, bytes(e.found),
                               plan=e.plan))
    skipped += [dict(r.as_dict(), kind=r.reason) for r in refused]
    if not sites:
        if not funcs and not found:
            raise TraceError(f"no function matching {pattern!r} in process {pid}")
        why = "; ".join(f"{d.get('function')}: {d.get('why')}" for d in skipped[:3])
        raise TraceError(f"nothing matching {pattern!r} can be traced ({len(skipped)} "
                         f"refused; {why})")
    sites.sort(key=lambda s: s.addr)
    lo, hi = reach_of(syms, sites)
    if hi - lo > REACH:
        mods = sorted({s.module for s in sites})
        raise TraceError(f"the functions matching {pattern!r} lie in modules more than 2 GiB "
                         f"apart ({', '.join(mods[:4])}): the sites call one runtime in rel32 "
                         "reach -- trace one module at a time (lib:GLOB)")
    return sites


def reach_of(syms, sites) -> tuple[int, int]:
    """The span the tracer's region must reach: the sites and the modules
    whose instructions are moved to pads."""
    lo, hi = sites[0].addr, sites[-1].addr + 8
    for mod in {s.module for s in sites if s.kind != "nop5"}:
        with contextlib.suppress(SymbolError):
            m = syms.module(mod)
            lo = min(lo, min(x.start for x in m.mappings))
            hi = max(hi, max(x.end for x in m.mappings))
    return lo, hi


def fill_pads(at: int, pads: list[TraceSite], code: bytearray, sites: list[TraceSite],
              skipped: list[dict], pattern: str) -> None:
    """The pads of *pads* appended to *code* (the first at *at*); a pad
    the relocator cannot build drops its site from *sites* (said in
    *skipped*).  Every site's ``record`` is set."""
    from .._relocate import RelocError, trampoline
    keep = []
    for s in pads:
        pad = at + PAD_SIZE * len(keep)
        try:
            if s.kind == "entry":
                body = trampoline(s.plan, pad, head=NOP5)
            else:       # an fentry form: nothing to move, the pad goes back after it
                body = NOP5 + text_gen_insn(JMP32_INSN_OPCODE, pad + 5, s.addr + len(s.found))
        except RelocError as e:
            skipped.append({"function": s.function, "addr": f"{s.addr:#x}",
                            "module": s.module, "kind": e.reason, "why": str(e)})
            sites.remove(s)
            continue
        assert len(body) <= PAD_SIZE, len(body)
        code += body.ljust(PAD_SIZE, b"\xcc")
        s.pad = s.record = pad
        s.jmp = text_gen_insn(JMP32_INSN_OPCODE, s.addr, pad) + b"\x90" * (len(s.found) - 5
                                                                           if s.kind != "entry" else 0)
        keep.append(s)
    for s in sites:
        if s.kind == "nop5":
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
    pads = [s for s in sites if s.kind != "nop5"]
    todo = []
    for s in pads:
        want = s.jmp if on else s.found
        if m.text_read(s.addr, len(want)) != want:
            todo.append((s, want))
    quiet = [(s.addr, w) for s, w in todo if s.kind in QUIESCENT]
    batch = [(s, w) for s, w in todo if s.kind not in QUIESCENT]
    if batch:
        entries = [s for s, _ in batch if on]
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
