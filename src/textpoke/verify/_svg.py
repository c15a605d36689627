# SPDX-License-Identifier: GPL-2.0-only
"""A recording drawn as a hand-written SVG (no plotting dependency): axis
in scheduler steps, lanes, legend, violations as red rules with a label."""

from __future__ import annotations

import html
from typing import Any

from ._lanes import _PHASE_LABEL, Item, lanes
from ._recording import Recording

__all__ = ["svg"]


_COLOURS = {"old": "#8c96a8", "new": "#2e9e5b", "int3": "#f2a900", "torn": "#d7263d",
            "int3-phase": "#f6c667", "tail": "#9ec5fe", "first": "#6ea8fe", "store": "#c9a0dc",
            "rollback": "#adb5bd", "sync": "#c8d3e6", "ipi": "#e2e8f5", "refill": "#5c6b82",
            "handler": "#fde2a6", "oops": "#d7263d", "violation": "#d7263d"}

_LEGEND = [("old", "ran old bytes"), ("new", "ran new bytes"), ("int3", "hit INT3"),
           ("torn", "ran torn bytes"), ("int3-phase", "patcher: write INT3s"),
           ("tail", "patcher: write tails"), ("first", "patcher: write first bytes"),
           ("store", "patcher: naive store"), ("sync", "sync (IPI to every CPU)"),
           ("ipi", "IPI pending on a CPU"), ("handler", "in the INT3 handler"),
           ("refill", "stale line refilled"), ("commit", "site committed (perf record)"),
           ("oops", "oops: the CPU stopped"), ("violation", "violation, where it happened")]


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _clip(text: str, width_px: float) -> str:
    n = max(int(width_px / 6.6), 20)
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _window(rec: Recording, items: list[Item], placed: list[dict],
            max_steps: int) -> tuple[float, float]:
    """The steps to draw: from a little before the patcher's first act to
    the end, or -- when that is longer than *max_steps* -- a window that
    holds the first violation (else the patcher's start)."""
    pat = [i.start for i in items if i.lane == "patcher"]
    lo = max(0, (min(pat) if pat else 0) - 24)
    hi = max(rec.steps, lo + 1) + 2          # room for a mark on the last step
    if hi - lo > max_steps:
        if placed:
            first = min(v["step"] for v in placed)
            lo = max(lo, first - max_steps * 2 // 3)
        hi = lo + max_steps
    return lo, hi


def svg(rec: Recording, *, max_steps: int = 1500, width: int | None = None) -> str:
    """The recording as an SVG document (a string)."""
    names, items, placed = lanes(rec)
    lo, hi = _window(rec, items, placed, max_steps)
    touched = [s for s in rec.sites if s["touched"]] or rec.sites
    nrows = len(touched)
    left, right, top = 150, 30, 78
    plot_w = width or int(min(max((hi - lo) * 3, 900), 2400))
    row_h = 11
    lane_h = {"patcher": 46}
    for n in names[1:]:
        lane_h[n] = 30 + nrows * row_h
    lane_y, y = {}, top
    for n in names:
        lane_y[n] = y
        y += lane_h[n] + 8
    legend_y = y + 30 + 14 * max(len(rec.violations) - 1, 0)
    total_w = left + plot_w + right
    total_h = legend_y + 24 * ((len(_LEGEND) + 3) // 4) + 20

    def x(step: float) -> float:
        return left + (min(max(step, lo), hi) - lo) / (hi - lo) * plot_w

    def inside(i: Item) -> bool:
        end = i.end if i.end is not None else i.start
        return end >= lo and i.start <= hi

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
           f'viewBox="0 0 {total_w} {total_h}" font-family="DejaVu Sans, Helvetica, Arial, '
           f'sans-serif" font-size="11">',
           f"<title>{_esc(rec.title)}</title>",
           f'<rect x="0" y="0" width="{total_w}" height="{total_h}" fill="#ffffff"/>',
           f'<text x="{left}" y="22" font-size="15" font-weight="bold">{_esc(rec.title)}</text>']
    shown = f"steps {lo:g}-{hi:g} of {rec.steps}"
    sub = shown + (f"  |  replay: {rec.replay_command}" if rec.replay_command else "")
    out.append(f'<text x="{left}" y="40" fill="#444">{_esc(sub)}</text>')

    # axis
    ay = top - 10
    out.append(f'<g class="axis"><line x1="{left}" y1="{ay}" x2="{left + plot_w}" y2="{ay}" '
               f'stroke="#333"/>')
    span = hi - lo
    tick = next(t for t in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000,
                            10_000, 20_000, 50_000, 100_000, 10**9) if span / t <= 12)
    t0 = int(lo // tick + (lo % tick > 0)) * tick
    for t in range(t0, int(hi) + 1, tick):
        if x(t) - left < 18:
            continue
        out.append(f'<line x1="{x(t):.1f}" y1="{ay - 4}" x2="{x(t):.1f}" y2="{y - 8}" '
                   f'stroke="#e6e6e6"/><text x="{x(t):.1f}" y="{ay - 7}" text-anchor="middle" '
                   f'fill="#333">{t}</text>')
    out.append(f'<text x="{left - 8}" y="{ay - 7}" text-anchor="end" fill="#333">'
               f'scheduler step</text></g>')

    # lanes
    for n in names:
        ly, h = lane_y[n], lane_h[n]
        out.append(f'<g class="lane" data-lane="{n}">'
                   f'<rect x="{left}" y="{ly}" width="{plot_w}" height="{h}" fill="#fafbfc" '
                   f'stroke="#d0d5dd"/>'
                   f'<text x="{left - 8}" y="{ly + 15}" text-anchor="end" font-weight="bold">'
                   f'{n}</text>')
        if n != "patcher":
            for r, s in enumerate(touched):
                ry = ly + 24 + r * row_h
                out.append(f'<text x="{left - 8}" y="{ry + 8}" text-anchor="end" fill="#555" '
                           f'font-size="9">{_esc(s["name"])}</text>')
        out.append("</g>")

    def tip(i: Item) -> str:
        where = f"step {i.start:g}" + (f"-{i.end:g}" if i.end is not None else "")
        return f"<title>{_esc(i.lane + ', ' + where + ': ' + i.label)}</title>"

    # spans first, marks on top, violations last
    order = {"ipi": 0, "sync": 0, "phase": 1, "int3": 1, "refill": 2, "write": 2, "poke": 2,
             "exec": 3, "oops": 4, "violation": 5}
    for i in sorted((i for i in items if inside(i)), key=lambda i: order.get(i.kind, 3)):
        ly = lane_y[i.lane]
        if i.kind == "sync":
            out.append(f'<rect class="sync" x="{x(i.start):.1f}" y="{ly + 24}" '
                       f'width="{max(x(i.end) - x(i.start), 2):.1f}" height="16" '
                       f'fill="{_COLOURS["sync"]}" stroke="#7d8fb3">{tip(i)}</rect>')
            if x(i.end) - x(i.start) > 40:
                out.append(f'<text x="{x(i.start) + 3:.1f}" y="{ly + 36}" font-size="9">'
                           f'{_esc(i.label.split(":")[0])}</text>')
        elif i.kind == "phase":
            c = _COLOURS.get({"int3": "int3-phase", "poke": "store"}.get(i.cls, i.cls), "#ccc")
            out.append(f'<rect class="phase" data-phase="{_esc(i.cls)}" x="{x(i.start):.1f}" '
                       f'y="{ly + 4}" width="{max(x(i.end) - x(i.start), 3):.1f}" height="16" '
                       f'fill="{c}" stroke="#555">{tip(i)}</rect>')
            if x(i.end) - x(i.start) > 50:
                out.append(f'<text x="{x(i.start) + 3:.1f}" y="{ly + 16}" font-size="9">'
                           f'{_esc(_PHASE_LABEL.get(i.cls, i.cls))}</text>')
        elif i.kind == "write":
            out.append(f'<line class="write" x1="{x(i.start):.1f}" y1="{ly + 20}" '
                       f'x2="{x(i.start):.1f}" y2="{ly + 24}" stroke="#222"/>')
        elif i.kind == "poke":
            out.append(f'<circle class="commit" cx="{x(i.start):.1f}" cy="{ly + 42}" r="2.5" '
                       f'fill="#2e9e5b">{tip(i)}</circle>')
        elif i.kind == "ipi":
            out.append(f'<rect class="ipi" x="{x(i.start):.1f}" y="{ly + 2}" '
                       f'width="{max(x(i.end) - x(i.start), 2):.1f}" height="{lane_h[i.lane] - 4}" '
                       f'fill="{_COLOURS["ipi"]}" stroke="#9fb1d6" stroke-dasharray="3,2">'
                       f'{tip(i)}</rect>')
            out.append(f'<path class="ipi-taken" d="M{x(i.end):.1f},{ly + 3} l4,6 l-8,0 z" '
                       f'fill="#3d5a98">{tip(i)}</path>')
        elif i.kind == "int3":
            out.append(f'<rect class="int3" x="{x(i.start):.1f}" y="{ly + 3}" '
                       f'width="{max(x(i.end) - x(i.start), 3):.1f}" height="12" '
                       f'fill="{_COLOURS["handler"]}" stroke="#c58a00">{tip(i)}</rect>')
        elif i.kind == "refill":
            out.append(f'<line class="refill" x1="{x(i.start):.1f}" y1="{ly + 15}" '
                       f'x2="{x(i.start):.1f}" y2="{ly + 22}" stroke="{_COLOURS["refill"]}" '
                       f'stroke-width="1.5">{tip(i)}</line>')
        elif i.kind == "exec":
            ry = ly + 24 + i.row * row_h
            out.append(f'<rect class="exec" data-class="{i.cls}" x="{x(i.start) - 1.5:.1f}" '
                       f'y="{ry}" width="3" height="{row_h - 2}" fill="{_COLOURS[i.cls]}">'
                       f'{tip(i)}</rect>')
        elif i.kind == "oops":
            cx, cy = x(i.start), ly + 10
            out.append(f'<path class="oops" d="M{cx - 5:.1f},{cy - 5} l10,10 m0,-10 l-10,10" '
                       f'stroke="{_COLOURS["oops"]}" stroke-width="3">{tip(i)}</path>')
    def label(v: dict) -> str:
        return f"violation: {v['kind']} at step {v['step']:g} on {v['lane']}: {v['detail']}"

    for k, v in enumerate(placed):
        if not lo <= v["step"] <= hi:
            out.append(f'<text x="{left}" y="{y + 6 + 14 * k}" fill="{_COLOURS["violation"]}">'
                       f'{_esc(_clip(label(v) + " (outside the steps shown)", plot_w))}'
                       f'</text>')
            continue
        vx = x(v["step"])
        ly = lane_y.get(v["lane"], top)
        out.append(f'<g class="violation" data-kind="{_esc(v["kind"])}" '
                   f'data-lane="{_esc(v["lane"])}" data-step="{v["step"]:g}">'
                   f'<line x1="{vx:.1f}" y1="{top - 4}" x2="{vx:.1f}" y2="{y - 8}" '
                   f'stroke="{_COLOURS["violation"]}" stroke-width="2" stroke-dasharray="6,3"/>'
                   f'<circle cx="{vx:.1f}" cy="{ly + 10}" r="7" '
                   f'fill="none" stroke="{_COLOURS["violation"]}" stroke-width="2.5"/>'
                   f'<text x="{left}" y="{y + 6 + 14 * k}" '
                   f'fill="{_COLOURS["violation"]}" font-weight="bold">'
                   f'{_esc(_clip(label(v), plot_w))}</text></g>')
    if not placed:
        out.append(f'<text x="{left}" y="{y + 6}" fill="#2e9e5b" font-weight="bold">'
                   f'no violation: every CPU ran old or new bytes (or hit an INT3) at every '
                   f'site</text>')

    # legend
    out.append(f'<g class="legend"><text x="{left}" y="{legend_y - 8}" font-weight="bold">'
               f'legend</text>')
    for k, (key, text) in enumerate(_LEGEND):
        lx = left + (k % 4) * 250
        ly = legend_y + (k // 4) * 24
        if key == "refill":
            out.append(f'<line x1="{lx + 6}" y1="{ly}" x2="{lx + 6}" y2="{ly + 12}" '
                       f'stroke="{_COLOURS[key]}" stroke-width="2"/>')
        elif key == "commit":
            out.append(f'<circle cx="{lx + 6}" cy="{ly + 6}" r="3" fill="#2e9e5b"/>')
        elif key == "oops":
            out.append(f'<path d="M{lx + 1},{ly + 1} l10,10 m0,-10 l-10,10" '
                       f'stroke="{_COLOURS[key]}" stroke-width="3"/>')
        elif key == "violation":
            out.append(f'<line x1="{lx + 6}" y1="{ly - 2}" x2="{lx + 6}" y2="{ly + 14}" '
                       f'stroke="{_COLOURS[key]}" stroke-width="2" stroke-dasharray="4,2"/>'
                       f'<circle cx="{lx + 6}" cy="{ly + 6}" r="5" fill="none" '
                       f'stroke="{_COLOURS[key]}" stroke-width="2"/>')
        else:
            out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{_COLOURS[key]}" '
                       f'stroke="#555" stroke-width="0.5"/>')
        out.append(f'<text x="{lx + 18}" y="{ly + 10}">{_esc(text)}</text>')
    out.append("</g></svg>")
    return "\n".join(out) + "\n"
