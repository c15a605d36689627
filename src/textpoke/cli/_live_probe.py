# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live probe``: a kprobe on SYMBOL[+OFF] of a process, one
trace line per hit with fetch-args."""

from __future__ import annotations

import argparse
import sys

from . import _output as out
from ._args import UsageError

__all__ = ["PROBE_JSON_EVENTS", "run"]


#: hit records kept for --json (the count goes on beyond)
PROBE_JSON_EVENTS = 100_000


def run(args: argparse.Namespace) -> int:
    import time
    from ..live._probe import FetchArgError, LiveProbe, alive, split_probe_def
    from ._live_session import run_session
    try:
        defs = [split_probe_def(d) for d in getattr(args, "add", None) or []]
        if getattr(args, "point", None) is None:
            if args.fetchargs or not defs:
                raise FetchArgError("give a probe point: SYMBOL[+OFF] [FETCHARG...], or "
                                    "-a 'SYMBOL[+OFF] [FETCHARG...]'")
            (point, fetchargs), defs = defs[0], defs[1:]
        else:
            point, fetchargs = args.point, args.fetchargs
        lp = LiveProbe(args.pid, point, fetchargs, more=defs)
    except FetchArgError as e:
        raise UsageError(str(e)) from None
    events: list[dict] = []
    how = ""
    hows: dict[str, str] = {}
    nhit = 0
    cap = args.max_hits
    end: float | None = None

    def emit(hits) -> None:
        nonlocal nhit
        for h in hits:
            if cap is not None and nhit >= cap:
                break
            if args.json:
                if len(events) < PROBE_JSON_EVENTS:
                    events.append({"event": h.point.event, "comm": h.comm, "tid": h.tid,
                                   "cpu": h.cpu, "timestamp": round(h.ts, 6),
                                   "args": {a.name: v for a, v in zip(h.point.args, h.values)}})
                nhit += 1
                if nhit == 1:       # stdout holds the JSON only: say it on stderr
                    print(f"textpoke live probe: first hit (thread {h.tid})",
                          file=sys.stderr, flush=True)
            else:
                nhit += 1
                out.print_plain(lp.line(h))

    def enough() -> bool:
        return (cap is not None and lp.nhit >= cap) or (end is not None and
                                                        time.monotonic() >= end)

    def arm() -> None:
        nonlocal how, end
        lp.arm(strategy=args.strategy, optimize=getattr(args, "optimize", True),
               allow_single_step=getattr(args, "allow_single_step", False))
        how = lp.how()
        hows.update({p.event: lp.how(p) for p in lp.points})
        # said once the probes are in and every thread synced: tools (and
        # the tests) wait for this line, not for the bytes in the target
        # (one line per probe, the last says how long)
        for i, p in enumerate(lp.points, 1):
            tail = ((f"for {args.duration:g} s" if args.duration is not None else "Ctrl-C ends")
                    if i == len(lp.points) else f"probe {i} of {len(lp.points)}")
            print(f"textpoke live probe: {p.event} at {p.symbol}+{p.offset:#x} ({p.addr:#x}, "
                  f"{hows[p.event]}); {tail}", file=sys.stderr, flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration

    def step() -> bool:
        slice_end = time.monotonic() + 0.02
        lp.pump(lambda: len(lp.hits) >= 64 or time.monotonic() >= slice_end or enough())
        emit(lp.take())
        return enough()

    s = run_session(lp, args.pid, arm=arm, step=step, alive=alive,
                    fallback=lambda e: {"int3_left": lp.int3_left(), "regions_kept": [],
                                        "close_error": f"{type(e).__name__}: {e}"})
    left, err = s.left, s.err
    emit(lp.take())                 # hits the handler saw before the end
    gone = not alive(args.pid)
    # refused before anything stayed written (a kprobe rule): one line, exit 2
    s.refuse(gone, nothing_written=all(p.probe is None for p in lp.points))
    doc = {"pid": args.pid, "event": lp.event, "symbol": lp.symbol, "offset": lp.offset,
           "addr": f"{lp.addr:#x}", "how": how, "fetchargs": [a.name + "=" + a.text
                                                              for a in lp.args],
           "optimized": bool(how.startswith("optimised")), "not_optimized_reason": lp.opt_reason,
           "hits": nhit, "seconds": s.seconds(), "strategy": args.strategy,
           "target_alive": not gone,
           "interrupted": s.was_interrupted,
           "int3_left": left["int3_left"] if not gone else 0, "regions_kept": left["regions_kept"],
           "probes": [{"event": p.event, "symbol": p.symbol, "offset": p.offset,
                       "addr": f"{p.addr:#x}", "how": hows.get(p.event, ""),
                       "fetchargs": [a.name + "=" + a.text for a in p.args],
                       "optimized": hows.get(p.event, "").startswith("optimised"),
                       "not_optimized_reason": p.opt_reason, "hits": p.nhit}
                      for p in lp.points]}
    if lp.ring is not None:
        # optimised: hits the ring's writers lapped before a read (overruns)
        # or that never committed (a thread killed mid-write): counted
        doc["hits_lost"] = lp.ring.overruns + lp.ring.dropped
    if gone:
        doc["int3_left_reason"] = "the process has exited: no text left to hold an INT3"
    if err is not None:
        doc["error"] = err
    if "close_error" in left:
        doc["close_error"] = left["close_error"]
    if args.json:
        doc["events"] = events
        doc["events_dropped"] = max(0, nhit - len(events))
        out.emit_json(doc)
    else:
        lost = doc.get("hits_lost", 0)
        print(f"textpoke live probe: {nhit} hit(s) of "
              + ", ".join(p.event for p in lp.points)
              + (f" ({lost} more lost: the ring overran before it was read)" if lost else "")
              + ("; probe point restored: " if len(lp.points) == 1
                 else "; probe points restored: ")
              + ("yes" if doc["int3_left"] == 0 else "NO")
              + ("" if not gone else "; the process exited") + (f"; {err}" if err else ""),
              file=sys.stderr)
    return s.status(doc["int3_left"] == 0)
