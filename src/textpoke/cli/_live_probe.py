# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live probe``: a kprobe on SYMBOL[+OFF] of a process, one
trace line per hit with fetch-args."""

from __future__ import annotations

import argparse
import sys

from . import _output as out
from ._args import UsageError
from ._signals import arrived as _arrived, exit_status, reporting, Terminated

__all__ = ["PROBE_JSON_EVENTS", "run"]


#: hit records kept for --json (the count goes on beyond)
PROBE_JSON_EVENTS = 100_000


def run(args: argparse.Namespace) -> int:
    import time
    from ..live._probe import FetchArgError, LiveProbe, alive
    try:
        lp = LiveProbe(args.pid, args.point, args.fetchargs)
    except FetchArgError as e:
        raise UsageError(str(e)) from None
    interrupted: BaseException | None = None
    events: list[dict] = []
    how = ""
    err: str | None = None
    nhit = 0
    emit = None
    cap = args.max_hits
    t0 = time.monotonic()
    try:
        lp.arm(strategy=args.strategy)
        how = lp.how()
        # said once the INT3 is in and every thread synced: tools (and the
        # tests) wait for this line, not for the byte in the target
        print(f"textpoke live probe: {lp.event} at {lp.symbol}+{lp.offset:#x} ({lp.addr:#x}, "
              f"{how}); " + (f"for {args.duration:g} s" if args.duration is not None
                             else "Ctrl-C ends"), file=sys.stderr, flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration

        def emit(hits) -> None:
            nonlocal nhit
            for h in hits:
                if cap is not None and nhit >= cap:
                    break
                if args.json:
                    if len(events) < PROBE_JSON_EVENTS:
                        events.append({"comm": h.comm, "tid": h.tid, "cpu": h.cpu,
                                       "timestamp": round(h.ts, 6),
                                       "args": {a.name: v for a, v in zip(lp.args, h.values)}})
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
        while True:
            slice_end = time.monotonic() + 0.02
            lp.pump(lambda: len(lp.hits) >= 64 or time.monotonic() >= slice_end or enough())
            emit(lp.take())
            if enough() or not lp.machine.threads or not alive(args.pid):
                break
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = e
    except Exception as e:
        from .._errors import TextPokeError
        if not isinstance(e, TextPokeError):
            raise
        err = f"{type(e).__name__}: {e}"
    finally:
        # the disarm runs to its end: a signal from now on is only recorded
        # (and still gives 130/143)
        reporting()
        try:
            left = lp.close()
        except Exception as e:          # the process went away under us
            left = {"int3_left": lp.int3_left(), "regions_kept": [],
                    "close_error": f"{type(e).__name__}: {e}"}
    if emit is not None:
        emit(lp.take())             # hits the handler saw before the end
    gone = not alive(args.pid)
    if err is not None and not gone and lp.probe is None:
        # refused before anything stayed written (a kprobe rule): one line, exit 2
        raise UsageError(err.split(": ", 1)[1])
    doc = {"pid": args.pid, "event": lp.event, "symbol": lp.symbol, "offset": lp.offset,
           "addr": f"{lp.addr:#x}", "how": how, "fetchargs": [a.name + "=" + a.text
                                                              for a in lp.args],
           "hits": nhit, "seconds": round(time.monotonic() - t0, 3), "strategy": args.strategy,
           "target_alive": not gone,
           "interrupted": interrupted is not None or _arrived() is not None,
           "int3_left": left["int3_left"] if not gone else 0, "regions_kept": left["regions_kept"]}
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
        print(f"textpoke live probe: {nhit} hit(s) of {lp.event}; probe point restored: "
              + ("yes" if doc["int3_left"] == 0 else "NO")
              + ("" if not gone else "; the process exited") + (f"; {err}" if err else ""),
              file=sys.stderr)
    if interrupted is not None:
        return exit_status(interrupted)
    from ._signals import status_for
    return status_for(0 if doc["int3_left"] == 0 and err is None else 1)
