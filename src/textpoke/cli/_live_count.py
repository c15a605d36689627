# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live count``: count calls of the matching functions for a
while, like bcc's funccount, with stubs injected into the process."""

from __future__ import annotations

import argparse
import sys

from . import _output as out
from ._live_common import interrupted_report
from ._signals import exit_status, reporting, Terminated

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from ..live._count import live_count
    interrupted: list[BaseException] = []

    def window() -> None:
        import time
        # Said once every site is switched on: the window has opened.  Tools
        # (and the tests) wait for this line, not for the bytes in the target,
        # which read CALL before the arming batch has finished.
        try:
            # inside the try: a Ctrl-C right after this line ends the window too
            print(f"textpoke live count: counting for {args.duration:g} s "
                  "(Ctrl-C ends the window early)", file=sys.stderr, flush=True)
            time.sleep(args.duration)
        except (KeyboardInterrupt, Terminated) as e:   # end the window early, then disarm
            interrupted.append(e)

    try:
        with out.progress(out.progress_enabled(args.json), "switching sites") as update:
            res = live_count(args.pid, args.functions, args.duration, strategy=args.strategy,
                             window=window, progress=update)
    except (KeyboardInterrupt, Terminated) as e:
        # before the window (arming) or after it (disarming): the batch was
        # finished or rolled back and live_count switched back what it could;
        # say what every site holds now
        reporting()
        return interrupted_report(args, "count", e)
    reporting()
    if args.json:
        # int3_left: every counted site read back (fentry sites and entries)
        out.emit_json(dict(res.as_dict(), pid=args.pid, interrupted=bool(interrupted)))
    else:
        _print_count(res, args)
    if interrupted:
        return exit_status(interrupted[0])
    return 0 if res.restored and res.alive else 1


def _print_count(res, args: argparse.Namespace) -> None:
    rows = res.counts[:args.top] if args.top else res.counts
    w = max([len("FUNC")] + [len(f) for f, _ in rows])
    out.print_plain(f"Counted {res.sites} functions matching {res.pattern!r} in process "
                    f"{args.pid} for {res.duration:.2f} s ({res.strategy}).")
    out.print_plain(f"{'FUNC':<{w}}  {'COUNT':>12}")
    for f, n in rows:
        out.print_plain(f"{f:<{w}}  {n:>12}")
    if args.top and len(res.counts) > args.top:
        out.print_plain(f"... {len(res.counts) - args.top} more")
    t = res.timings
    attach = t.get("arm_total", 0) + t.get("disarm_total", 0)
    out.print_plain(f"total {sum(n for _, n in res.counts):,} calls; switch on+off {attach:.3f} s "
                    f"attached; sites restored: {'yes' if res.restored else 'NO'}; stubs "
                    + ("freed" if res.freed else "kept mapped: " + "; ".join(res.kept_mapped)))
    if res.skipped:
        by: dict[str, int] = {}
        for k in res.skipped:
            by[k["kind"]] = by.get(k["kind"], 0) + 1
        out.print_plain(f"not counted: {len(res.skipped)} function(s) ("
                        + ", ".join(f"{k} {n}" for k, n in sorted(by.items(), key=lambda kv: -kv[1]))
                        + f"); first: {res.skipped[0]['function']}: {res.skipped[0]['why']}")
