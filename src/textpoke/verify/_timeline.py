# SPDX-License-Identifier: GPL-2.0-only
"""Pictures of one schedule: CPUs as lanes over scheduler steps.

:func:`record_schedule` replays a schedule (a :class:`~textpoke.sim._verify.Replay`)
with the machine's trace on and every site watched, so the recording holds
the patcher's writes and the core's poke events, each sync IPI sent and
taken, stale-line refills, INT3 hits and their handling, oopses -- and what
each CPU executed at each site, as the bytes its own view held (old, new,
an INT3, or a torn mix).  Watching changes nothing in the schedule: same
steps, same verdict (tests/test_verify_pictures.py checks it).

:func:`lanes` turns a recording into drawable items -- spans and marks on a
``patcher`` lane and one lane per CPU, each CPU lane with a row per patched
site -- and places each violation where it happened: an oops at its CPU and
step, a mixed behaviour at the first torn execution of its site, a stale
CPU at its first old execution after the patcher returned.

Two renderings of the same items:

* :func:`svg` -- a hand-written SVG (no plotting dependency): axis in
  scheduler steps, lanes, legend, violations as red rules with a label.
* :func:`chrome_trace` -- the Chrome JSON trace format (``traceEvents``
  with ``ph`` B/E/X/i/M, one ``tid`` per lane), which Perfetto's UI
  (ui.perfetto.dev, "Open trace file") and chrome://tracing both open
  as they are: no protobuf dependency to write Perfetto's native format,
  and people zoom and search in the tool they already use.  One scheduler
  step is written as one microsecond.

Each concern has its module -- the recording (:mod:`._recording`), the
items (:mod:`._lanes`), the SVG (:mod:`._svg`), the Chrome trace
(:mod:`._chrome`); this one writes files for the commands and keeps
every name importable from here.
"""

from __future__ import annotations

import json

from ._chrome import chrome_trace
from ._lanes import Item, classify, lanes
from ._recording import TRACE_CAP, Recording, demo_recording, record_machine, record_schedule, watch
from ._svg import svg

__all__ = ["Recording", "record_schedule", "record_machine", "lanes", "svg", "chrome_trace",
           "write_timeline", "classify", "Item", "watch", "demo_recording", "TRACE_CAP",
           "check_paths", "write_all"]


def write_timeline(rec: Recording, path: str) -> str:
    """Write *rec* to *path*: an SVG for ``.svg``, a Chrome JSON trace for
    ``.json``.  Returns the format written."""
    p = str(path)
    if p.endswith(".svg"):
        text, fmt = svg(rec), "svg"
    elif p.endswith(".json"):
        text, fmt = json.dumps(chrome_trace(rec)), "chrome-json"
    else:
        raise ValueError(f"{p}: a timeline is written as .svg (a picture) or .json "
                         "(a Chrome JSON trace for Perfetto / chrome://tracing)")
    with open(p, "w", encoding="utf-8") as f:
        f.write(text)
    return fmt


# ------------------------------------------------------------------ commands
def check_paths(paths: list[str] | None) -> None:
    """ValueError, for people, unless every path ends in .svg or .json."""
    for p in paths or ():
        if not str(p).endswith((".svg", ".json")):
            raise ValueError(f"--timeline {p}: name a .svg file (a picture) or a .json file "
                             "(a Chrome JSON trace that Perfetto and chrome://tracing open)")


def write_all(rec: Recording, paths: list[str]) -> list[str]:
    """Write *rec* to each path; returns one line per file written."""
    lines = []
    for p in paths:
        fmt = write_timeline(rec, p)
        what = "picture" if fmt == "svg" else "Chrome JSON trace: open it in Perfetto's UI"
        lines.append(f"timeline: {p} ({what})")
    return lines
