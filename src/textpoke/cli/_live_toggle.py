# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live toggle``: fentry sites to ``call SYMBOL`` or back to NOP5,
in one batch."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import _output as out
from ._args import UsageError
from ._live_common import interrupted_report, machine, symbols
from ._signals import exit_status, reporting, Terminated

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from .._core._insn import CALL_INSN_OPCODE, text_gen_insn
    from ..live._count import switch_sites
    from ..live._fentry import NOP5, QUIESCENT, fentry_sites
    try:
        with symbols(args.pid) as syms:
            sites = fentry_sites(syms, args.functions)
            target = syms.resolve(args.to[5:]) if args.to.startswith("call:") else None
            if not sites:
                from ..live._count import _why_no_site
                why = _why_no_site(syms, args.functions, args.pid)
    except (KeyboardInterrupt, Terminated) as e:       # nothing written yet
        reporting()
        return interrupted_report(args, "toggle", e)
    if not sites:
        raise UsageError(why)
    if target is not None:
        from ..live._checks import check_branch_target
        check_branch_target(args.pid, target, f"call target {args.to[5:]}")
    bad = [s for s in sites if s.kind not in ("nop5", "call") and s.kind not in QUIESCENT]
    if bad:
        raise UsageError(f"{len(bad)} site(s) hold no fentry form (NOP5, CALL, five NOP1s, "
                         f"call *__fentry__@GOTPCREL), e.g. {bad[0].function} "
                         f"at {bad[0].addr:#x}: {bad[0].found.hex(' ')} ({bad[0].kind}); "
                         f"see 'textpoke live sites --check --pid {args.pid}' and 'textpoke live "
                         f"recover --pid {args.pid}'")
    writes, quiet = [], []
    for s in sites:
        new = NOP5 if target is None else text_gen_insn(CALL_INSN_OPCODE, s.addr, target)
        new += b"\x90" * (len(s.found) - len(new))     # call-got: 6 bytes, + NOP1
        if new != s.found:
            # not one instruction now: written with every thread stopped
            (quiet if s.kind in QUIESCENT else writes).append((s.addr, new))
    interrupted: BaseException | None = None
    stats: dict[str, Any] = {}
    after: list[bytes] = []
    with machine(args) as m:
        try:
            if writes:
                with out.progress(out.progress_enabled(args.json) and len(writes) >= 256,
                                  "queueing sites") as update:
                    stats = switch_sites(m, writes, update)
            if quiet:
                m.write_stopped(quiet)
        except (KeyboardInterrupt, Terminated) as e:
            interrupted = e
        after = [m.text_read(s.addr, len(s.found)) for s in sites]
    reporting()
    writes += quiet
    want = {a: b for a, b in writes}
    int3_left = sum(1 for b in after if b[:1] == b"\xcc")
    done = sum(1 for s, b in zip(sites, after) if b == want.get(s.addr, s.found))
    doc = {"pid": args.pid, "functions": args.functions, "to": args.to, "sites": len(sites),
           "switched": len(writes), "now_as_asked": done, "strategy": args.strategy,
           "stats": stats, "interrupted": interrupted is not None, "int3_left": int3_left}
    if args.json:
        out.emit_json(doc)
    else:
        out.print_plain(f"{len(writes)} of {len(sites)} sites switched to {args.to} "
                        f"({len(sites) - len(writes)} already were); {done} read back as asked; "
                        f"syncs {stats.get('syncs', 0)}, INT3 hits {stats.get('int3_hits', 0)}")
    if interrupted is not None:
        print(f"textpoke live toggle: interrupted; INT3s of ours left in the text: {int3_left}",
              file=sys.stderr)
        return exit_status(interrupted)
    return 0 if done == len(sites) else 1
