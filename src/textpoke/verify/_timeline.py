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
"""

from __future__ import annotations

import bisect
import functools
import html
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["Recording", "record_schedule", "record_machine", "lanes", "svg", "chrome_trace",
           "write_timeline", "classify"]


@dataclass(slots=True)
class Recording:
    """What one traced run left: its timeline entries (``sim._report.timeline``
    form, plus ``exec`` entries), the sites, CPUs and the oracle's verdict."""

    title: str
    cpus: list[int]
    sites: list[dict]               # name, addr, len, old, new (hex), touched
    entries: list[dict]
    steps: int
    violations: list[dict] = field(default_factory=list)   # kind, detail
    params: dict = field(default_factory=dict)
    replay_command: str | None = None

    def as_dict(self) -> dict:
        return {"title": self.title, "cpus": self.cpus, "sites": self.sites,
                "steps": self.steps, "violations": self.violations, "params": self.params,
                "replay_command": self.replay_command, "entries": self.entries}


def _site_rows(w: Any, touched: Iterable[str]) -> list[dict]:
    touched = set(touched)
    return [{"name": s.name, "addr": s.addr, "len": s.length, "old": s.old.hex(),
             "new": s.new.hex(), "touched": s.name in touched} for s in w.sites]


def record_schedule(scenario: str, seed: int, *, strategy: str = "int3",
                    mutation: str | None = None, ncpus: int = 3,
                    line_size: int = 64) -> Recording:
    """Replay one schedule, traced and watched, and return its recording."""
    from ..sim._scenarios import SCENARIOS
    from ..sim._schedule import _Schedule
    with _Schedule(scenario, seed, strategy=strategy, mutation=mutation, ncpus=ncpus,
                   line_size=line_size, trace=True) as s:
        s.w.watch_sites()
        r = s.run()
        touched = {n for b in SCENARIOS[scenario].batches for n in b}
        sites = _site_rows(s.w, touched)
        cpus = list(s.w.sim.cpus)
    what = strategy + (f" minus {mutation}" if mutation else "")
    title = (f"{scenario}, {what}, seed {seed}, {ncpus} vCPUs, line size {line_size}: "
             + (", ".join(sorted({v.kind for v in r.violations})) + " violation"
                if r.violations else "no violation"))
    return Recording(title, cpus, sites, r.timeline or [], r.steps,
                     [{"kind": v.kind, "detail": v.detail} for v in r.violations],
                     r.replay.as_dict() if r.replay else {},
                     r.replay.command() if r.replay else None)


def record_machine(title: str, w: Any, core: Any, touched: Iterable[str], *,
                   violations: list[dict] | None = None, params: dict | None = None) -> Recording:
    """A recording of a workload whose machine ran with its trace on (for
    example the demo's): its timeline merged with the core's event log."""
    import heapq
    import types
    from ..sim._report import timeline
    sim = w.sim
    # site executions are most of a long trace: written here directly (the
    # generic timeline symbolizes every entry), merged in by step
    trace = sim.trace or []
    execs = [{"step": ev[1], "cpu": ev[2], "what": "exec", "addr": ev[3],
              "detail": f"ran {ev[3]:#x}: {bytes(ev[4]).hex(' ')}"}
             for ev in trace if ev[0] == "exec"]
    rest = timeline(types.SimpleNamespace(trace=[ev for ev in trace if ev[0] != "exec"]),
                    core, w.image)
    entries = list(heapq.merge(rest, execs, key=lambda e: e["step"] if e["step"] is not None
                               else -1))
    return Recording(title, list(sim.cpus), _site_rows(w, touched), entries, sim.steps,
                     violations or [], params or {})


# ------------------------------------------------------------------ model
def _insn_len(code: bytes) -> int:
    from .._core._insn import insn_decode_kernel
    try:
        return insn_decode_kernel(code).length
    except Exception:
        return len(code)


@functools.lru_cache(maxsize=4096)
def classify(data: bytes, old: bytes, new: bytes) -> str:
    """What a CPU ran at a site: ``old`` or ``new`` when the instruction it
    executes there is the old or the new one (a RET followed by new tail
    bytes still runs as the old RET), ``int3`` (an INT3 of the protocol),
    or ``torn`` (an instruction that is neither: a mix no CPU may run)."""
    n = _insn_len(new)
    if data[:n] == new[:n]:
        return "new"
    n = _insn_len(old)
    if data[:n] == old[:n]:
        return "old"
    if data[:1] == b"\xcc":
        return "int3"
    return "torn"


_PHASE_LABEL = {"int3": "INT3s", "tail": "tails", "first": "first bytes", "poke": "store",
                "rollback": "rollback", "set": "set", "copy": "copy", "kgdb": "kgdb",
                "early": "early"}


@dataclass(slots=True)
class Item:
    lane: str              # "patcher" or "cpuN"
    kind: str              # phase, sync, write, poke, refill, ipi, int3, exec, oops, violation
    start: float
    end: float | None      # None: an instant
    label: str
    row: int = 0           # CPU lanes: the site row (exec marks)
    cls: str = ""          # exec: old/new/int3/torn; phase: the phase name
    args: dict = field(default_factory=dict)


def _ipi_spans(entries: list[dict]) -> list[tuple[int, float, float]]:
    """(cpu, sent, taken) for every sync IPI."""
    out, pending = [], {}
    for e in entries:
        if e["what"] == "ipi-send":
            pending.setdefault(e["cpu"], []).append(e["step"])
        elif e["what"] == "ipi" and pending.get(e["cpu"]):
            for sent in pending.pop(e["cpu"]):
                out.append((e["cpu"], sent, e["step"]))
    for cpu, sents in pending.items():
        for sent in sents:
            out.append((cpu, sent, None))
    return out


def _write_phases(entries: list[dict]) -> list[tuple[dict, str]]:
    """Each patcher byte write with the phase of the poke event it belongs
    to: the first event logged at or after it that covers its address
    (entries are in step order; the search starts at the write's step)."""
    pokes = [(p["step"], p["addr"], max(len(p["detail"].split("->")[-1].split()), 1),
              p["what"].split("/", 1)[1])
             for p in entries if p["what"].startswith("poke/") and p["what"] != "poke/batch"]
    steps = [p[0] for p in pokes]
    out = []
    for e in entries:
        if e["what"] != "write" or e["cpu"] is not None:
            continue
        phase = "store"
        for step, addr, n, ph in itertools.islice(pokes, bisect.bisect_left(steps, e["step"]),
                                                  None):
            if addr <= e["addr"] < addr + n:
                phase = ph
                break
        out.append((e, phase))
    return out


def lanes(rec: Recording) -> tuple[list[str], list[Item], list[dict]]:
    """The lane names, the items to draw and the violations placed:
    ``[{"kind", "detail", "step", "lane"}]``."""
    entries = rec.entries
    names = ["patcher"] + [f"cpu{c}" for c in rec.cpus]
    touched = [s for s in rec.sites if s["touched"]] or rec.sites
    row_of = {s["addr"]: i for i, s in enumerate(touched)}
    site_of = {s["addr"]: s for s in rec.sites}
    items: list[Item] = []

    # patcher: runs of writes of one phase, cut by syncs; each sync a span
    syncs: dict[float, float | None] = {}
    for cpu, sent, taken in _ipi_spans(entries):
        end = syncs.get(sent, sent)
        syncs[sent] = None if taken is None or end is None else max(end, taken)
    sync_starts = sorted(syncs)
    run: list[tuple[dict, str]] = []

    def close_run() -> None:
        if run:
            phase = run[0][1]
            label = _PHASE_LABEL.get(phase, phase)
            items.append(Item("patcher", "phase", run[0][0]["step"], run[-1][0]["step"] + 1,
                              f"{label} ({len(run)} byte write{'s' * (len(run) != 1)})",
                              cls=phase))
            run.clear()

    for e, phase in _write_phases(entries):
        # a sync started after the run's last write and by this one cuts the run
        cut = bool(run) and bisect.bisect_right(sync_starts, e["step"]) > \
            bisect.bisect_right(sync_starts, run[-1][0]["step"])
        if run and (phase != run[-1][1] or cut):
            close_run()
        run.append((e, phase))
        items.append(Item("patcher", "write", e["step"], None, e["detail"], cls=phase,
                          args={"addr": hex(e["addr"])}))
    close_run()
    for k, s in enumerate(sync_starts, 1):
        end = syncs[s]
        items.append(Item("patcher", "sync", s, end if end is not None else rec.steps,
                          f"sync #{k}: IPI to every CPU" + ("" if end is not None
                                                           else " (never all taken)")))
    for e in entries:
        if e["what"] == "poke/batch":
            items.append(Item("patcher", "poke", e["step"], None,
                              "site committed (perf text_poke record): " + e["detail"]))

    # CPUs; executions of one site on one CPU within one step, of one kind,
    # are one mark (a coarse scheduler runs many loop iterations per step)
    open_trap: dict[int, dict] = {}
    last_exec: dict[tuple, Item] = {}
    for e in entries:
        cpu, what = e.get("cpu"), e["what"]
        if cpu is None:
            continue
        lane = f"cpu{cpu}"
        if what == "exec":
            s = site_of.get(e["addr"])
            if s is None or e["addr"] not in row_of:
                continue
            data = bytes.fromhex(e["detail"].rsplit(":", 1)[1].replace(" ", ""))
            cls = classify(data, bytes.fromhex(s["old"]), bytes.fromhex(s["new"]))
            key = (lane, e["addr"], e["step"], cls)
            prev = last_exec.get(key)
            if prev is not None:
                prev.args["times"] += 1
                prev.label = f"{s['name']}: ran {cls} ({data.hex(' ')}) x{prev.args['times']}"
                continue
            it = Item(lane, "exec", e["step"], None, f"{s['name']}: ran {cls} ({data.hex(' ')})",
                      row=row_of[e["addr"]], cls=cls,
                      args={"site": s["name"], "bytes": data.hex(" "), "times": 1})
            last_exec[key] = it
            items.append(it)
        elif what == "refill":
            items.append(Item(lane, "refill", e["step"], None, e["detail"],
                              cls=e["detail"].rsplit("(", 1)[-1].rstrip(")")))
        elif what == "int3":
            open_trap[cpu] = e
        elif what in ("iret", "unhandled") and cpu in open_trap:
            t = open_trap.pop(cpu)
            items.append(Item(lane, "int3", t["step"], max(e["step"], t["step"] + 1),
                              f"{t['detail']}; {e['detail']}"))
        elif what == "oops":
            items.append(Item(lane, "oops", e["step"], None, e["detail"]))
    for cpu, t in open_trap.items():
        items.append(Item(f"cpu{cpu}", "int3", t["step"], rec.steps, t["detail"] + " (unfinished)"))
    for cpu, sent, taken in _ipi_spans(entries):
        items.append(Item(f"cpu{cpu}", "ipi", sent, taken if taken is not None else rec.steps,
                          "sync IPI pending" + (f", taken at step {taken} (sync_core)"
                                                if taken is not None else ", never taken")))
    placed = _place_violations(rec, items)
    for v in placed:
        items.append(Item(v["lane"], "violation", v["step"], None,
                          f"{v['kind']}: {v['detail']}"))
    return names, items, placed


def _place_violations(rec: Recording, items: list[Item]) -> list[dict]:
    patcher_end = max((i.end or i.start for i in items if i.lane == "patcher"), default=0)
    out = []
    for v in rec.violations:
        kind, detail = v["kind"], v["detail"]
        where: tuple[float, str] | None = None
        if kind == "oops":
            oops = [i for i in items if i.kind == "oops"]
            for i in oops:
                if i.lane.removeprefix("cpu") in detail.split("oops on cpu", 1)[-1][:4]:
                    where = (i.start, i.lane)
                    break
            if where is None and oops:
                where = (oops[0].start, oops[0].lane)
        elif kind == "mixed":
            site = detail.split(" ", 1)[0]
            torn = [i for i in items if i.kind == "exec" and i.cls == "torn"
                    and i.args.get("site") == site]
            torn = torn or [i for i in items if i.kind == "exec" and i.cls == "torn"]
            if torn:
                where = (torn[0].start, torn[0].lane)
        elif kind == "stale":
            cpu = detail.split(" ", 1)[0]
            old = [i for i in items if i.kind == "exec" and i.lane == cpu and i.cls == "old"
                   and i.start > patcher_end]
            if old:
                where = (old[0].start, cpu)
            else:
                where = (rec.steps, cpu if cpu.startswith("cpu") else "patcher")
        if where is None:
            where = (patcher_end if kind == "error" else rec.steps, "patcher")
        out.append({"kind": kind, "detail": detail, "step": where[0], "lane": where[1]})
    return out


# ------------------------------------------------------------------ SVG
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


# ------------------------------------------------------------------ Chrome trace
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


#: trace entries a long run keeps for its picture (about 150 toggles of the
#: demo on 4 vCPUs; some 100 MB); later ones are counted, not kept
TRACE_CAP = 200_000


class _CappedTrace(list):
    """The machine's trace list, keeping the first *cap* entries."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.dropped = cap, 0

    def append(self, ev: Any) -> None:
        if len(self) < self.cap:
            super().append(ev)
        else:
            self.dropped += 1


def watch(w: Any, cap: int = TRACE_CAP) -> None:
    """Turn a running workload's trace on from now, with every site watched
    (``demo --timeline``: after boot-time patching, before the toggles),
    keeping the first *cap* entries."""
    if w.sim.trace is None:
        w.sim.trace = _CappedTrace(cap)
    w.watch_sites()


def demo_recording(d: Any) -> Recording:
    """The recording of a :class:`~textpoke.sim._demo.Demo` that ran watched."""
    sim = d.w.sim
    violations = [{"kind": "oops", "detail": str(o)} for o in sim.oopses]
    dropped = getattr(sim.trace, "dropped", 0)
    rec = record_machine(
        f"demo: {sim.ncpus} vCPUs, {d.toggles_done} toggle(s) of every site, seed {d.seed}, "
        f"line size {sim.line_size}", d.w, d.core, [s.name for s in d.sites],
        violations=violations, params={"cpus": sim.ncpus, "seed": d.seed,
                                       "toggles": d.toggles_done, "line_size": sim.line_size,
                                       "trace_entries_dropped": dropped})
    if dropped and sim.trace:
        last = sim.trace[-1][1]          # keep the core's events of the traced part only
        rec.entries = [e for e in rec.entries if e["step"] is None or e["step"] <= last]
        rec.steps = last
        rec.title += f" (first {last:,} steps traced)"
    return rec
