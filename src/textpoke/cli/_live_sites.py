# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live sites``: the fentry sites of a process, which function
entries can take a JMP (and why the others cannot), stray INT3s with ``--check``."""

from __future__ import annotations

import argparse

from . import _output as out
from ._live_common import site_kinds, symbols
from ._signals import arrived as _arrived, reporting

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from ..live._entry import entry_sites, refused_by_reason
    from ..live._fentry import fentry_sites, module_report
    from ..live._recover import check, leftovers
    with symbols(args.pid) as syms:
        sites = fentry_sites(syms, args.functions)
        if args.check:
            # stray INT3s and a dead patcher's leftovers only: no need to plan
            # every entry (a second on python3 and its libraries)
            entries, refused = [], []
            modules = module_report(syms, sites, args.functions)
        else:
            # every other function: can its entry take a JMP (and why not)?
            entries, refused = entry_sites(syms, args.functions,
                                           skip={s.func_addr for s in sites})
            refused = [r for r in refused if r.reason != "fentry"]
            modules = module_report(syms, sites, args.functions, entries, refused)
    left = check(args.pid)
    dead = leftovers(left)
    reporting()
    stray = [s for s in sites if s.stray_int3]
    if args.json:
        out.emit_json({"pid": args.pid, "functions": args.functions, "sites": [s.as_dict() for s in sites],
                       "stray_int3": len(stray),
                       "kinds": site_kinds(sites), "modules": modules, "journal": left,
                       "leftovers": dead, "entries": [e.as_dict() for e in entries],
                       "refused": [r.as_dict() for r in refused],
                       "refused_by_reason": refused_by_reason(refused),
                       # read only: a signal ends it early at most; the INT3s it saw
                       "interrupted": _arrived() is not None, "int3_left": len(stray)})
    else:
        if not args.check or stray:
            from rich.table import Table
            tab = Table(title=f"sites of process {args.pid}"
                        + (f" matching {args.functions}" if args.functions else ""),
                        title_justify="left")
            for col in ("address", "function", "module", "from", "bytes", "kind"):
                tab.add_column(col)
            for s in (stray if args.check else sites):
                kind = f"[red]{s.kind}[/]" if s.kind == "int3" else s.kind
                tab.add_row(f"{s.addr:#x}", s.function, s.module, s.source,
                            out.escape(s.found.hex(" ")), kind)
            if args.functions and not args.check:
                # ordinary entries: listed one by one for a pattern only (a
                # whole process has thousands; the module lines count them)
                for e in entries:
                    tab.add_row(f"{e.addr:#x}", e.function, e.module, "entry",
                                out.escape(e.found.hex(" ")), f"entry (moves {e.plan.length})")
                for r in refused:
                    tab.add_row(f"{r.addr:#x}", r.function, r.module, "entry", "",
                                f"[yellow]refused: {out.escape(r.reason)}[/]")
            if tab.row_count:
                out.console().print(tab)
        if not args.check:
            for md in modules:
                what = ", ".join(f"{k} {n}" for k, n in md["kinds"].items())
                ent = (f"; entries: {md['entries']} can take a JMP, {md['refused']} refused"
                       + (" (" + ", ".join(f"{k} {n}" for k, n in md["reasons"].items()) + ")"
                          if md["reasons"] else ""))
                out.print_plain(f"{md['module']}: {md['functions']} functions, "
                                f"{md['sites']} fentry sites" + (f" ({what})" if what else "")
                                + ent + (f" -- {md['why']}" if md["why"] else ""))
            if args.functions:
                for r in refused[:20]:
                    out.print_plain(f"  {r.function}: {r.reason}: {r.why}")
                if len(refused) > 20:
                    out.print_plain(f"  ... {len(refused) - 20} more refused (--json lists all)")
        summary = ", ".join(f"{k} {n}" for k, n in site_kinds(sites).items()) or "no sites"
        out.print_plain(f"{len(sites)} sites: {summary}" + (
            "" if args.check else      # --check plans no entries: it would say 0 of 0
            f"; ordinary entries: {len(entries)} can take a JMP, {len(refused)} refused"))
        if args.check:
            out.print_plain(f"stray INT3s: {len(stray)}" + (
                f" -- run 'textpoke live recover --pid {args.pid}'" if stray else ""))
        if left["journal"]:
            who = (f"textpoke pid {left['patcher']} (running)" if left["patcher_alive"]
                   else f"a dead patcher (pid {left['patcher']})")
            out.print_plain(f"journal of {who}: {left['summary']}; now: "
                            f"{len(left['int3_sites'])} INT3 site(s), {left['calls_into_stubs']} "
                            f"CALL(s) into stubs, {len(left['stub_regions_mapped'])} stub "
                            f"region(s) mapped, "
                            + (f"{left['gs_into_regions']} thread(s) with a GS base into them, "
                               if left["gs_into_regions"] else "")
                            + "SIGTRAP guard "
                            + ("mapped" if left["guard_mapped"] else "gone")
                            + (f" -- run 'textpoke live recover --pid {args.pid}'" if dead else ""))
    return 1 if (args.check and (stray or dead)) else 0
