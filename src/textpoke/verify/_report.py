# SPDX-License-Identifier: GPL-2.0-only
"""``verify --report DIR``: a campaign over scenario x protocol variant x
line size, written as pictures a person can read.

* ``report.json`` -- every cell (scenario, variant, line size): schedules,
  violating schedules, by kind, the first violation and its replay command;
  per variant, the scenarios that caught it.
* ``heatmap.svg`` -- a hand-written SVG (no plotting dependency): scenarios
  down, variants across (int3, each mutation, naive), a column per line size
  inside each variant; each cell says ``caught/schedules`` and is coloured
  by that share on a square-root scale (the legend shows it) so that a rare
  catch -- 1 in 400 -- still shows.  Clean cells are pale green.
* ``timeline-VARIANT.svg`` (and ``.json``, a Chrome trace) -- the first
  violation of each variant drawn (:mod:`textpoke.verify._timeline`); for
  int3, its first schedule (clean, unless the protocol failed).
* ``index.html`` -- one page showing all of the above, with the replay
  commands; no script, no external resource.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from ._cluster import Campaign, Cell

__all__ = ["variants_for", "cells_for", "write_report", "heatmap_svg"]


def variants_for(strategy: str, mutation: str | None) -> list[tuple[str, str | None]]:
    """(strategy, mutation) pairs a report covers: all of them, or int3
    next to the one asked for."""
    from .._core import MUTATIONS
    if mutation:
        return [("int3", None), ("int3", mutation)]
    if strategy == "naive":
        return [("int3", None), ("naive", None)]
    return [("int3", None)] + [("int3", m) for m in MUTATIONS] + [("naive", None)]


def cells_for(scenarios: list[str], variants: list[tuple[str, str | None]],
              line_sizes: list[int], cpus: int) -> list[Cell]:
    return [Cell(s, st, m, cpus, ls) for s in scenarios for st, m in variants for ls in line_sizes]


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


MISSED = "#fff3cd"      # a variant that should be caught was not
FAILED = "#4a0000"      # the protocol itself was caught


def _colour(share: float | None) -> str:
    """White-to-red on a square-root scale; None (nothing ran) is grey."""
    if share is None:
        return "#eeeeee"
    if share == 0:
        return "#e8f5e9"
    t = math.sqrt(share)
    lo, hi = (255, 224, 178), (183, 28, 28)       # light orange -> deep red
    r, g, b = (round(a + (c - a) * t) for a, c in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}"


def _cell_rows(camp: Campaign) -> list[dict]:
    rows = []
    for c, r in zip(camp.cells, camp.results):
        first = r.first[1] if r.first else None
        rows.append({"scenario": c.scenario, "variant": c.variant, "strategy": c.strategy,
                     "mutation": c.mutation, "cpus": c.cpus, "line_size": c.line_size,
                     "schedules": r.schedules, "violating": r.violating, "by_kind": r.by_kind,
                     "int3_left": r.int3_left, "first_violation": first,
                     "replay_command": first.get("replay_command") if first else None})
    return rows


def heatmap_svg(rows: list[dict], title: str) -> str:
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sizes = sorted({r["line_size"] for r in rows})
    at = {(r["scenario"], r["variant"], r["line_size"]): r for r in rows}
    cw, ch = 62, 26                      # cell
    left, top = 130, 92
    gap = 10                             # between variant groups
    gw = cw * len(sizes)
    width = max(left + len(variants) * (gw + gap) + 40, left + 360 + 30 + 330)  # the legend
    grid_h = ch * len(scenarios)
    legend_y = top + grid_h + 50
    height = legend_y + 70
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
         f'font-size="11">', f"<title>{_esc(title)}</title>",
         f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
         f'<text x="{left}" y="22" font-size="15" font-weight="bold">{_esc(title)}</text>',
         f'<text x="{left}" y="40" fill="#444">each cell: schedules that violated / schedules '
         f'run; colour: that share (square-root scale)</text>']
    for vi, v in enumerate(variants):
        gx = left + vi * (gw + gap)
        o.append(f'<text class="variant" x="{gx + gw / 2}" y="{top - 30}" text-anchor="middle" '
                 f'font-weight="bold">{_esc(v)}</text>')
        for si, ls in enumerate(sizes):
            o.append(f'<text x="{gx + si * cw + cw / 2}" y="{top - 12}" text-anchor="middle" '
                     f'fill="#444">line {ls}</text>')
    o.append(f'<text x="{left - 10}" y="{top - 12}" text-anchor="end" fill="#444" '
             f'font-style="italic">scenario</text>')
    for ri, s in enumerate(scenarios):
        y = top + ri * ch
        o.append(f'<text x="{left - 10}" y="{y + ch / 2 + 4}" text-anchor="end">{_esc(s)}</text>')
        for vi, v in enumerate(variants):
            gx = left + vi * (gw + gap)
            for si, ls in enumerate(sizes):
                r = at.get((s, v, ls))
                x = gx + si * cw
                share = (r["violating"] / r["schedules"]) if r and r["schedules"] else None
                text = f'{r["violating"]}/{r["schedules"]}' if r else "-"
                dark = share is not None and share > 0.3
                # What a share means depends on the variant: the protocol
                # itself must never be caught; a mutation or naive writes
                # never caught means these schedules have no teeth there.
                clean_expected = r is not None and r["strategy"] == "int3" and not r["mutation"]
                fill, stroke, dash = _colour(share), "#ffffff", ""
                if share == 0 and not clean_expected:
                    fill, stroke, dash = MISSED, "#b58900", ' stroke-dasharray="4 2"'
                elif share and clean_expected:
                    fill, stroke, dash, dark = FAILED, "#000000", "", True
                tip = (f"{s}, {v}, line size {ls}: {text} schedules violated"
                       + (f"; first: {r['replay_command']}" if r and r["replay_command"] else ""))
                o.append(f'<g class="cell" data-scenario="{_esc(s)}" data-variant="{_esc(v)}" '
                         f'data-line-size="{ls}" data-caught="{r["violating"] if r else ""}" '
                         f'data-schedules="{r["schedules"] if r else ""}">'
                         f'<title>{_esc(tip)}</title>'
                         f'<rect x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{fill}" '
                         f'stroke="{stroke}" stroke-width="2"{dash}/>'
                         f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" '
                         f'fill="{"#ffffff" if dark else "#222222"}">{_esc(text)}</text></g>')
    # colour scale
    o.append(f'<g class="legend"><text x="{left}" y="{legend_y - 10}" font-weight="bold">'
             f'share of schedules that violated</text>')
    steps = 60
    bar_w = 360
    for k in range(steps):
        t = (k + 0.5) / steps
        o.append(f'<rect x="{left + k * bar_w / steps:.1f}" y="{legend_y}" '
                 f'width="{bar_w / steps + 0.5:.1f}" height="14" fill="{_colour(t * t)}"/>')
    for share in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        x = left + math.sqrt(share) * bar_w
        label = f"{share:.1%}".replace(".0%", "%")
        o.append(f'<line x1="{x:.1f}" y1="{legend_y + 14}" x2="{x:.1f}" y2="{legend_y + 19}" '
                 f'stroke="#333"/><text x="{x:.1f}" y="{legend_y + 31}" text-anchor="middle" '
                 f'font-size="10">{label}</text>')
    cx = left + bar_w + 30
    o.append(f'<rect x="{cx}" y="{legend_y}" width="14" height="14" fill="{_colour(0)}" '
             f'stroke="#bbb"/><text x="{cx + 20}" y="{legend_y + 11}">none caught</text>'
             f'<rect x="{cx + 120}" y="{legend_y}" width="14" height="14" fill="{_colour(None)}" '
             f'stroke="#bbb"/><text x="{cx + 140}" y="{legend_y + 11}">not run</text>'
             f'<rect x="{cx}" y="{legend_y + 22}" width="14" height="14" fill="{MISSED}" '
             f'stroke="#b58900" stroke-dasharray="4 2"/><text x="{cx + 20}" y="{legend_y + 33}">'
             f'a mutation or naive never caught (no teeth)</text>'
             f'<rect x="{cx}" y="{legend_y + 44}" width="14" height="14" fill="{FAILED}" '
             f'stroke="#000"/><text x="{cx + 20}" y="{legend_y + 55}">the int3 protocol '
             f'caught: a failure</text></g>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def _pick_timelines(rows: list[dict]) -> list[tuple[str, dict, bool]]:
    """(variant, replay params, violating) to draw: each variant's first
    violation in cell order; int3's first schedule when it had none."""
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == v]
        hit = next((r for r in mine if r["first_violation"]), None)
        if hit is not None:
            out.append((v, hit["first_violation"]["replay"], True))
        elif v == "int3" and mine:
            r = mine[0]
            from ..sim._verify import schedule_seeds
            seed = next(schedule_seeds(0, 1))
            out.append((v, {"scenario": r["scenario"], "strategy": "int3", "mutation": None,
                            "cpus": r["cpus"], "line_size": r["line_size"], "seed": seed},
                        False))
    return out


def write_report(camp: Campaign, out_dir: str | Path, *, engine: dict | None = None,
                 timelines: bool = True) -> dict:
    """Write report.json, heatmap.svg, the timelines and index.html into
    *out_dir*; return the JSON document."""
    from ._timeline import record_schedule, svg, chrome_trace
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    rows = _cell_rows(camp)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    summary = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        summary[v] = {"schedules": sum(r["schedules"] for r in mine),
                      "violating": sum(r["violating"] for r in mine),
                      "cells_caught": sum(1 for r in mine if r["violating"]),
                      "cells": len(mine)}
    int3_clean = summary.get("int3", {}).get("violating", 0) == 0 and \
        all(r["int3_left"] == 0 for r in rows)
    c0 = camp.cells[0]
    title = (f"textpoke verify: {camp.schedules} schedules per cell, {c0.cpus} vCPUs, "
             f"base seed {camp.seed}")
    (d / "heatmap.svg").write_text(heatmap_svg(rows, title), encoding="utf-8")
    pictures = []
    if timelines and not camp.interrupted:
        for v, p, bad in _pick_timelines(rows):
            rec = record_schedule(p["scenario"], p["seed"], strategy=p["strategy"],
                                  mutation=p["mutation"], ncpus=p["cpus"],
                                  line_size=p["line_size"])
            (d / f"timeline-{v}.svg").write_text(svg(rec), encoding="utf-8")
            (d / f"timeline-{v}.json").write_text(json.dumps(chrome_trace(rec)), encoding="utf-8")
            pictures.append({"variant": v, "svg": f"timeline-{v}.svg",
                             "trace": f"timeline-{v}.json", "title": rec.title,
                             "violating": bad, "replay_command": rec.replay_command})
    doc = {"command": "verify", "report": True, "params": camp.params() | {"cells": len(rows)},
           "interrupted": camp.interrupted, "int3_clean": int3_clean,
           "int3_left": sum(r["int3_left"] for r in rows),
           "planned": camp.total, "schedules": camp.completed, "summary": summary,
           "cells": rows, "pictures": pictures, "engine": engine or {},
           "files": {"heatmap": "heatmap.svg", "page": "index.html", "json": "report.json"}}
    (d / "report.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    (d / "index.html").write_text(_page(doc, title), encoding="utf-8")
    return doc


def _page(doc: dict, title: str) -> str:
    rows = "".join(
        f"<tr><td>{_esc(v)}</td><td>{s['violating']:,} / {s['schedules']:,}</td>"
        f"<td>{s['cells_caught']} of {s['cells']}</td></tr>"
        for v, s in doc["summary"].items())
    verdict = ("the INT3 protocol was clean in every cell" if doc["int3_clean"]
               else "the INT3 protocol itself VIOLATED -- see its timeline")
    pics = "".join(
        f'<figure><figcaption><b>{_esc(p["variant"])}</b>: {_esc(p["title"])}<br>'
        f'<code>{_esc(p["replay_command"] or "")}</code> &middot; '
        f'<a href="{_esc(p["trace"])}">Chrome JSON trace</a> (open in Perfetto)</figcaption>'
        f'<img src="{_esc(p["svg"])}" alt="timeline of {_esc(p["variant"])}"></figure>'
        for p in doc["pictures"])
    note = " (interrupted: partial counts, no timelines)" if doc["interrupted"] else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>
body {{ font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 24px 0; overflow-x: auto; }}
img {{ display: block; max-width: none; border: 1px solid #ddd; }}
code {{ font-size: 12px; }}
</style></head><body>
<h1>{_esc(title)}</h1>
<p>{doc['schedules']:,} of {doc['planned']:,} schedules run{note}; {_esc(verdict)}.
Data: <a href="report.json">report.json</a>.</p>
<table><tr><th>variant</th><th>violating / schedules</th><th>cells that caught it</th></tr>
{rows}</table>
<h2>Caught / schedules, by scenario, variant and line size</h2>
<img src="heatmap.svg" alt="heatmap of violations">
<h2>Timelines</h2>
<p>CPUs as lanes over scheduler steps: the patcher's phases and syncs, pending IPIs, line
refills, INT3 handling, what each CPU ran at each site; a violation where it happened.</p>
{pics}
</body></html>
"""
