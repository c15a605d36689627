# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live toggle``: switch the matching functions to ``call FUNC``,
``jmp FUNC`` or back, in one batch -- at their fentry site (NOP5 <-> CALL or
JMP) or, for any other function, at its entry (see :mod:`textpoke.live._toggle`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import _output as out
from ._args import UsageError
from ._live_common import interrupted_report, machine, symbols
from ._signals import exit_status, reporting, Terminated

__all__ = ["run"]

_JMP, _CALL = 0xE9, 0xE8


def _rel32(op: int, at: int, to: int) -> bytes | None:
    rel = to - (at + 5)
    if not -2**31 <= rel < 2**31:
        return None
    return bytes([op]) + rel.to_bytes(4, "little", signed=True)


def run(args: argparse.Namespace) -> int:
    from ..live._fentry import NOP5, QUIESCENT, fentry_sites
    import time
    t0 = time.perf_counter()
    kind, _, name = args.to.partition(":")
    syms = None
    entries = None
    try:
        try:
            syms = symbols(args.pid)
            fsites = fentry_sites(syms, args.functions)
            target = syms.resolve(name) if name else None
            esites, estates, refused = _entries(syms, args.functions, fsites)
            if not fsites and not esites and not refused:
                raise UsageError(f"no function matching {args.functions!r} in process {args.pid}")
        except (KeyboardInterrupt, Terminated) as e:       # nothing written yet
            reporting()
            return interrupted_report(args, "toggle", e)
        if target is not None:
            from ..live._checks import check_branch_target
            check_branch_target(args.pid, target, f"{kind} target {name}")
        bad = [s for s in fsites if s.kind not in ("nop5", "call", "jmp") and s.kind not in QUIESCENT]
        if bad:
            raise UsageError(f"{len(bad)} site(s) hold no fentry form (NOP5, CALL, five NOP1s, "
                             f"call *__fentry__@GOTPCREL), e.g. {bad[0].function} "
                             f"at {bad[0].addr:#x}: {bad[0].found.hex(' ')} ({bad[0].kind}); "
                             f"see 'textpoke live sites --check --pid {args.pid}' and 'textpoke "
                             f"live recover --pid {args.pid}'")
        if refused:
            from ..live._entry import reasons_text
            what = reasons_text(refused)
            raise UsageError(f"{len(refused)} function(s) matching {args.functions!r} cannot take "
                             f"a JMP at their entry ({what}), e.g. {refused[0].function}: "
                             f"{refused[0].why}; nothing written (see 'textpoke live sites "
                             f"--pid {args.pid} --functions GLOB' for each function)")
        writes, quiet = [], []
        for s in fsites:
            if target is None:
                new = NOP5
            else:
                new = _rel32(_CALL if kind == "call" else _JMP, s.addr, target)
                if new is None:
                    raise UsageError(f"{kind} target {name} ({target:#x}) is beyond ±2 GiB of "
                                     f"{s.function}'s site at {s.addr:#x}: a rel32 cannot reach it")
            new += b"\x90" * (len(s.found) - len(new))     # call-got: 6 bytes, + NOP1
            if new != s.found:
                # not one instruction now: written with every thread stopped
                (quiet if s.kind in QUIESCENT else writes).append((s.addr, new))
        if esites:
            import os
            from ..live._toggle import plan_entries
            fd = os.open(f"/proc/{args.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                entries = plan_entries(args.pid, kind, target, esites, estates,
                                       lambda a, n: os.pread(fd, n, a))
            except ValueError as e:
                raise UsageError(str(e)) from None
            finally:
                os.close(fd)
        return _apply(args, syms, fsites, esites, writes, quiet, entries,
                      {"resolve": time.perf_counter() - t0})
    finally:
        if syms is not None:
            syms.close()


def _entries(syms, pattern: str, fsites):
    """The matching functions without an fentry site: their entries (as
    :func:`textpoke.live._entry.toggle_sites`); nothing is imported for a
    pattern whose functions all have one."""
    from ..live._symbols import SymbolError
    try:
        funcs = syms.functions(pattern)
    except SymbolError:
        if fsites:
            return [], [], []
        raise
    covered = {s.func_addr for s in fsites}
    rest = [f for f in funcs if f.addr not in covered]
    if not rest:
        return [], [], []
    from ..live._entry import toggle_sites
    return toggle_sites(syms, rest, pattern)


def _apply(args, syms, fsites, esites, writes, quiet, entries, timings) -> int:
    import time
    t0 = time.perf_counter()
    from ..live._switch import switch_sites
    interrupted: BaseException | None = None
    stats: dict[str, Any] = {}
    after: list[bytes] = []
    want = {a: b for a, b in writes + quiet}
    with machine(args) as m:
        try:
            try:
                if entries is not None:
                    from .._relocate import RelocError
                    try:
                        entries.map_slots(m, syms)
                    except RelocError as e:     # a slot that cannot be written: nothing was
                        raise UsageError(f"cannot build the trampoline: {e}") from None
                    entries.journal_old(m)
                    writes = writes + entries.writes
                    want.update(entries.writes)
                if writes:
                    with out.progress(out.progress_enabled(args.json) and len(writes) >= 256,
                                      "queueing sites") as update:
                        stats = switch_sites(m, writes, update,
                                             entries=entries.quiesce if entries else ())
                if quiet:
                    m.write_stopped(quiet)
            finally:
                if entries is not None:
                    entries.settle(m)
        except (KeyboardInterrupt, Terminated) as e:
            interrupted = e
        sites = list(fsites) + list(esites)
        after = [m.text_read(s.addr, len(s.found)) for s in sites]
    reporting()
    # what the command does inside: names and sites resolved, then attached
    # (every thread seized, the batch, detached)
    timings["attached"] = time.perf_counter() - t0
    switched = len(want)
    int3_left = sum(1 for b in after if b[:1] == b"\xcc")
    done = sum(1 for s, b in zip(sites, after) if b == want.get(s.addr, s.found))
    doc = {"pid": args.pid, "functions": args.functions, "to": args.to, "sites": len(sites),
           "fentry_sites": len(fsites), "entries": len(esites),
           "switched": switched, "now_as_asked": done, "strategy": args.strategy,
           "stats": stats, "interrupted": interrupted is not None, "int3_left": int3_left,
           "timings": {k: round(v, 6) for k, v in timings.items()}}
    if entries is not None:
        doc.update(trampoline_regions_mapped=[f"{r.base:#x}" for r in entries.new_regions
                                              if r.base not in entries.freed],
                   trampoline_regions_freed=[f"{b:#x}" for b in entries.freed],
                   kept=entries.kept)
    if args.json:
        out.emit_json(doc)
    else:
        at = (f"; {len(esites)} at function entries" if esites and fsites else
              "; at function entries" if esites else "")
        out.print_plain(f"{switched} of {len(sites)} sites switched to {args.to} "
                        f"({len(sites) - switched} already were{at}); {done} read back as asked; "
                        f"syncs {stats.get('syncs', 0)}, INT3 hits {stats.get('int3_hits', 0)}")
        for k in (entries.kept if entries is not None else ()):
            out.print_plain(k)
    if interrupted is not None:
        print(f"textpoke live toggle: interrupted; INT3s of ours left in the text: {int3_left}",
              file=sys.stderr)
        return exit_status(interrupted)
    return 0 if done == len(sites) else 1
