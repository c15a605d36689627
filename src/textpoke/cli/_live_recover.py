# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live recover``: undo what a patcher killed with SIGKILL left
(from its journal)."""

from __future__ import annotations

import argparse

from . import _output as out
from ._live_common import interrupted_report, symbols
from ._signals import arrived as _arrived, reporting, Terminated

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from ..live._recover import recover
    try:
        rep = recover(args.pid)
    except (KeyboardInterrupt, Terminated) as e:    # sites written whole or not at all
        reporting()
        return interrupted_report(args, "recover", e)
    reporting()
    if args.json:
        rep = dict(rep, interrupted=_arrived() is not None,
                   int3_left=_int3_sites(args.pid) if rep["kept"] else 0)
    if args.json:
        out.emit_json(rep)
    elif not rep["journal"]:
        out.print_plain(f"process {args.pid}: no journal of a textpoke patcher: nothing to recover")
    else:
        out.print_plain(f"process {args.pid}: found {rep['found']}; INT3 sites put back: "
                        f"{rep['int3_restored']}, CALLs switched back: {rep['calls_restored']}, "
                        f"stub regions freed: {rep['regions_freed']}, threads' GS bases put "
                        f"back: {rep['gs_restored']}, SIGTRAP guard removed: "
                        + ("yes" if rep["guard_removed"] else "no"))
        for k in rep["kept"]:
            out.print_plain(f"kept: {k}")
    return 1 if rep["kept"] else 0


def _int3_sites(pid: int) -> int:
    from ..live._fentry import fentry_sites
    with symbols(pid) as syms:
        return sum(1 for x in fentry_sites(syms, None) if x.kind == "int3")
