# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live trace``: the ftrace function tracer (or its profiler) on
a running process, trace_pipe-style lines as the rings fill."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from . import _output as out
from ._args import UsageError
from ._live_session import run_session

__all__ = ["TRACE_JSON_EVENTS", "run"]

#: event records kept for --json (the count goes on beyond)
TRACE_JSON_EVENTS = 100_000


def run(args: argparse.Namespace) -> int:
    import time
    from ..live._trace import LiveTrace, TraceError, alive
    try:
        lt = LiveTrace(args.pid, args.functions, ring=args.buffer_size, profile=args.profile,
                       strategy=args.strategy)
    except TraceError as e:
        raise UsageError(str(e)) from None
    events: list[dict] = []
    nev = 0

    def emit(evs) -> None:
        nonlocal nev
        for e in evs:
            nev += 1
            if args.json:
                if len(events) < TRACE_JSON_EVENTS:
                    events.append({"comm": lt._comm.get(e.pid, "<...>"), "tid": e.pid,
                                   "ring": lt.ring.slot.get(e.cpu, 0) if lt.ring else 0,
                                   "ts": lt.seconds(e), "timestamp": e.ts,
                                   "function": lt.func_name(e.ip),
                                   "parent": lt.parent_name(e.parent_ip)})
            else:
                out.print_plain(lt.line(e))

    end: float | None = None

    def arm() -> None:
        nonlocal end
        lt.arm()
        n_ent = sum(1 for s in lt.sites if s.kind == "entry")
        n_pad = sum(1 for s in lt.sites if s.kind != "nop5")
        print(f"textpoke live trace: {'profiling' if args.profile else 'tracing'} "
              f"{len(lt.sites)} function(s) of process {args.pid} ({len(lt.sites) - n_ent} fentry "
              f"site(s), {n_ent} entr{'y' if n_ent == 1 else 'ies'}; {n_pad} through a pad; "
              f"{len(lt.skipped)} refused); "
              + (f"for {args.duration:g} s" if args.duration is not None else "Ctrl-C ends")
              + (f"; timestamps: the event counter ({lt.clock_note})"
                 if lt.clock_note and not args.profile else ""),
              file=sys.stderr, flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration

    def step() -> bool:
        slice_end = time.monotonic() + 0.02
        if end is not None:
            slice_end = min(slice_end, end)
        lt.pump(lambda: time.monotonic() >= slice_end)
        if not args.profile:
            emit(lt.take())
        return end is not None and time.monotonic() >= end

    s = run_session(lt, args.pid, arm=arm, step=step, alive=alive,
                    fallback=lambda e: {"int3_left": lt.int3_left(), "restored": lt.restored(),
                                        "regions_kept": [],
                                        "close_error": f"{type(e).__name__}: {e}"})
    left, err = s.left, s.err
    if not args.profile:
        emit(lt.final_events)
    gone = not alive(args.pid)
    s.refuse(gone, nothing_written=not lt.armed)
    counts = lt.final_counts or {"overruns": 0, "dropped": 0, "hits": 0}
    doc = {"pid": args.pid, "functions": args.functions,
           "tracer": "profile" if args.profile else "function",
           "sites": len(lt.sites), "entries": sum(1 for s in lt.sites if s.kind == "entry"),
           "kinds": dict(Counter(s.kind for s in lt.sites)),
           "skipped": len(lt.skipped),
           "events_read": nev, "overruns": counts["overruns"], "dropped": counts["dropped"],
           "hits": counts["hits"], "missed": counts.get("missed", 0),
           "buffer_size": args.buffer_size,
           "trace_clock": lt.clock,
           "tsc_hz": round(lt.time.hz()) if lt.time is not None else None,
           "threads": lt.stats.threads_seen,
           "threads_without_ring": lt.stats.threads_without_ring,
           "seconds": s.seconds(), "strategy": args.strategy,
           "target_alive": not gone,
           "interrupted": s.was_interrupted,
           "int3_left": left["int3_left"] if not gone else 0,
           "restored": bool(left["restored"]) if not gone else None,
           "regions_kept": left["regions_kept"]}
    if args.profile:
        doc["profile"] = [{"function": f, "hits": n, "time_ns": t,
                           "avg_ns": round(t / n, 1) if n else 0.0}
                          for f, n, t in lt.final_profile]
    if err is not None:
        doc["error"] = err
    if "close_error" in left:
        doc["close_error"] = left["close_error"]
    if args.json:
        if not args.profile:
            doc["events"] = events
            doc["events_dropped"] = max(0, nev - len(events))
        out.emit_json(doc)
    else:
        if args.profile:
            # trace_stat/function0's columns (the kernel prints times in us)
            w = max([len("Function")] + [len(f) for f, _n, _t in lt.final_profile])
            out.print_plain(f"  {'Function':<{w}}  {'Hit':>10}    {'Time':>14}    {'Avg':>12}")
            out.print_plain(f"  {'--------':<{w}}  {'---':>10}    {'----':>14}    {'---':>12}")
            for f, n, t in lt.final_profile:
                avg = t / n / 1000 if n else 0.0
                out.print_plain(f"  {f:<{w}}  {n:>10}    {t / 1000:>11.3f} us    "
                                f"{avg:>9.3f} us")
        print(f"textpoke live trace: {nev if not args.profile else counts['hits']} "
              f"{'event(s) read' if not args.profile else 'hit(s)'}, {counts['overruns']} "
              f"overrun(s), {counts['dropped']} dropped"
              + (f", {doc['missed']} call(s) missed (made with a GS base the program set itself)"
                 if doc["missed"] else "") + "; sites restored: "
              + ("yes" if doc["restored"] and doc["int3_left"] == 0 else
                 ("the process exited" if gone else "NO"))
              + (f"; {err}" if err else "")
              + (f"; kept mapped: {'; '.join(doc['regions_kept'])}" if doc["regions_kept"] else ""),
              file=sys.stderr)
    return s.status(gone or (doc["int3_left"] == 0 and bool(doc["restored"])))
