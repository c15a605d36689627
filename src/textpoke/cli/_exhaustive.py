# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke verify --exhaustive``: every interleaving of one small
scenario within a bound (see :mod:`textpoke.verify._explore`), with
progress on stderr, a resumable ``--state FILE``, and ``--path P`` to
replay one path (a counterexample) action by action."""

from __future__ import annotations

import argparse
import sys

from ..verify._explore import explore, parse_bound, parse_path, replay_path
from . import _output as out
from ._args import UsageError
from ._signals import Terminated, exit_status, reporting

__all__ = ["run_exhaustive"]


def run_exhaustive(args: argparse.Namespace, names: list[str]) -> int:
    if len(names) != 1:
        raise UsageError("--exhaustive explores one --scenario (of 1-3 sites)")
    try:
        bound = parse_bound(args.bound, cpus=args.cpus if args.cpus != 3 else None,
                            line_size=args.line_size if args.line_size != 64 else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    scn = names[0]
    if args.path is not None:
        try:
            r = replay_path(scn, parse_path(args.path), strategy=args.strategy,
                            mutation=args.mutation, bound=bound)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.json:
            out.emit_json({"command": "verify", "exhaustive": True, **r})
        else:
            for i, a in enumerate(r["steps"]):
                out.print_plain(f"  {i:3} {a}")
            v = r["violation"]
            out.print_plain(f"violation: {v['kind']}: {v['detail']}" if v else
                            "no violation on this path")
        return 1 if r["violation"] else 0

    show = out.progress_enabled(args.json)

    def progress(d: dict) -> None:
        if show:
            print(f"\rdepth {d['depth']}, {d['states']:,} states, frontier {d['frontier']:,}, "
                  f"{d['seconds']:.1f} s", end="", file=sys.stderr, flush=True)

    interrupted: BaseException | None = None
    res = None
    try:
        res = explore(scn, strategy=args.strategy, mutation=args.mutation, bound=bound,
                      state_file=args.state, progress=progress)
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = e
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if show:
            print(file=sys.stderr)
        reporting()
    if res is None:
        where = f"; resume with --state {args.state}" if args.state else ""
        print(f"textpoke verify: exploration interrupted{where}", file=sys.stderr)
        if args.json:
            out.emit_json({"command": "verify", "exhaustive": True, "interrupted": True,
                           "int3_left": 0})
        return exit_status(interrupted)
    d = res.as_dict()
    if args.json:
        out.emit_json({"command": "verify", "exhaustive": True, "interrupted": False,
                       "int3_left": 0, **d})
    else:
        what = res.strategy + (f" minus {res.mutation}" if res.mutation else "")
        out.print_plain(f"exhaustive: {scn}, {what}; bound: {bound.describe()}")
        out.print_plain(f"  {res.states:,} states, {res.edges:,} transitions, "
                        f"{res.interleavings:,} interleavings covered, depth {res.depth}, "
                        f"{res.orders} queueing order(s), {res.seconds:.1f} s"
                        + ("" if res.complete or res.violation else " (incomplete)"))
        if res.violation:
            v = res.violation
            out.print_plain(f"  shortest counterexample ({len(res.path) - 1} actions): "
                            f"{v['kind']}: {v['detail']}")
            out.print_plain("replay: " + res.replay_command())
        else:
            out.print_plain("  no violation in any interleaving within the bound")
    return 1 if res.violation else 0
