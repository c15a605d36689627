# SPDX-License-Identifier: GPL-2.0-only
"""A recording as drawable items: spans and marks on a ``patcher`` lane
and one lane per CPU (a row per patched site), each execution classified
by the bytes the CPU's view held, and each violation placed where it
happened.  Both renderings (:mod:`._svg`, :mod:`._chrome`) draw these."""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass, field

from ._recording import Recording

__all__ = ["Item", "classify", "lanes"]


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
