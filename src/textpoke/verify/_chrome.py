# SPDX-License-Identifier: GPL-2.0-only
"""A recording in the Chrome JSON trace format (``traceEvents``, ``ph``
B/E/X/i/M, one ``tid`` per lane; one scheduler step written as one
microsecond), which Perfetto's UI and chrome://tracing open as it is."""

from __future__ import annotations

import json

from ._lanes import _PHASE_LABEL, Item, lanes
from ._recording import Recording

__all__ = ["chrome_trace"]


def chrome_trace(rec: Recording) -> dict:
    """The recording in the Chrome JSON trace format (one step = 1 us)."""
    names, items, placed = lanes(rec)
    # spans that may overlap others on their lane get a track of their own
    # (a JSON trace's slices must nest on one thread): syncs, pending IPIs
    def track(i: Item) -> str:
        if i.kind == "sync":
            return "patcher syncs"
        if i.kind == "ipi":
            return f"{i.lane} IPIs"
        return i.lane
    order = [t for n in names for t in (n, f"{n} syncs" if n == "patcher" else f"{n} IPIs")]
    tid = {n: k for k, n in enumerate(order)}
    ev: list[dict] = [{"ph": "M", "pid": 1, "tid": 0, "name": "process_name",
                       "args": {"name": f"textpoke: {rec.title}"}}]
    for n, t in tid.items():
        ev.append({"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": n}})
        ev.append({"ph": "M", "pid": 1, "tid": t, "name": "thread_sort_index",
                   "args": {"sort_index": t}})
    pat = [i for i in items if i.lane == "patcher"]
    if pat:
        ev.append({"ph": "B", "pid": 1, "tid": 0, "ts": min(i.start for i in pat),
                   "name": "patcher task", "cat": "patcher"})
        ev.append({"ph": "E", "pid": 1, "tid": 0,
                   "ts": max(i.end if i.end is not None else i.start for i in pat),
                   "name": "patcher task", "cat": "patcher"})
    for i in items:
        base = {"pid": 1, "tid": tid[track(i)], "ts": i.start, "cat": i.kind,
                "args": {"detail": i.label, **i.args}}
        if i.kind == "violation":
            ev.append({**base, "ph": "i", "s": "g", "name": f"VIOLATION {i.label[:60]}"})
        elif i.end is not None:
            name = {"phase": f"write {_PHASE_LABEL.get(i.cls, i.cls)}",
                    "sync": i.label.split(":")[0], "ipi": "IPI pending",
                    "int3": "INT3 handler"}.get(i.kind, i.kind)
            ev.append({**base, "ph": "X", "dur": max(i.end - i.start, 0.5), "name": name})
        else:
            name = {"exec": f"{i.args.get('site', '')} {i.cls}", "write": "write",
                    "poke": "commit", "refill": "refill", "oops": "OOPS"}.get(i.kind, i.kind)
            ev.append({**base, "ph": "i", "s": "t", "name": name})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"title": rec.title, "time_unit": "1 us = 1 scheduler step",
                          "replay_command": rec.replay_command or "",
                          "violations": json.dumps(placed)}}
