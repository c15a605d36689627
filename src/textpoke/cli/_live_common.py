# SPDX-License-Identifier: GPL-2.0-only
"""What several ``textpoke live`` subcommands share: opening the process's
machine and symbols, counting sites by kind, and the report of a command
interrupted outside its own report."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import _output as out
from ._signals import exit_status

__all__ = ["interrupted_report", "machine", "site_kinds", "symbols"]


def machine(args: argparse.Namespace):
    from ..live._machine import LiveMachine
    return LiveMachine(args.pid, strategy=args.strategy)


def symbols(pid: int):
    from ..live._symbols import Symbols
    return Symbols(pid)


def site_kinds(sites) -> dict[str, int]:
    d: dict[str, int] = {}
    for s in sites:
        d[s.kind] = d.get(s.kind, 0) + 1
    return d


def interrupted_report(args: argparse.Namespace, what: str, e: BaseException) -> int:
    """A command interrupted outside its own report: read every site of the
    pattern and say what it holds now (and what is left in flight)."""
    doc: dict[str, Any] = {"pid": args.pid, "functions": getattr(args, "functions", None),
                           "command": what, "interrupted": True}
    try:
        from ..live._fentry import fentry_sites
        from ..live._recover import check
        with symbols(args.pid) as syms:
            sites = fentry_sites(syms, args.functions)
        kinds = site_kinds(sites)
        left = check(args.pid)
        # fentry sites holding an INT3, and any journaled site (an entry's)
        ours = {s.addr for s in sites if s.kind == "int3"} | {int(a, 16) for a in left["int3_sites"]}
        doc.update(sites=len(sites), kinds=kinds, int3_left=len(ours), journal=left)
    except Exception as err:          # the process may be gone: still valid JSON
        doc.update(int3_left=None, error=f"{type(err).__name__}: {err}",
                   int3_left_reason=f"the sites could not be read back: {type(err).__name__}")
    if args.json:
        out.emit_json(doc)
    else:
        print(f"textpoke live {what}: interrupted; sites now: "
              + (", ".join(f"{k} {n}" for k, n in doc.get("kinds", {}).items()) or "unknown")
              + f"; INT3s of ours left: {doc.get('int3_left')}", file=sys.stderr)
    return exit_status(e)
