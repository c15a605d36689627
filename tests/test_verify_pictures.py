# SPDX-License-Identifier: GPL-2.0-only
"""Pictures of schedules and campaigns: the timeline SVG and Chrome JSON
trace of a replay, ``demo --timeline`` and the ``verify --report`` page.

Every assertion is derived from the run itself (the oracle's verdict, the
oops report's CPU and step, the demo's own counters), not from fixed
numbers.  The browser test is opt-in (TEXTPOKE_BROWSER_TESTS=1, Debian's
``chromium`` installed): it renders the report page headless and checks
that every picture drew.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from textpoke.sim._verify import run_schedule
from textpoke.verify._timeline import chrome_trace, classify, lanes, record_schedule, svg

SVG = "{http://www.w3.org/2000/svg}"
#: a schedule the mutation is known to fail on (tests/test_verify_replays.py)
CAUGHT = dict(scenario="call", seed=1304602151, mutation="no-sync-3")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True,
                          text=True, timeout=600)


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == cls]


def _marks(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == cls]


def test_watching_the_sites_does_not_change_the_schedule():
    kw = dict(strategy="int3", mutation=CAUGHT["mutation"], ncpus=3, line_size=64)
    plain = run_schedule(CAUGHT["scenario"], CAUGHT["seed"], trace=True, **kw)
    rec = record_schedule(CAUGHT["scenario"], CAUGHT["seed"], **kw)
    assert rec.steps == plain.steps
    assert [v["kind"] for v in rec.violations] == [v.kind for v in plain.violations]
    assert [e for e in rec.entries if e["what"] != "exec"] == plain.timeline
    assert any(e["what"] == "exec" for e in rec.entries)


def test_classify():
    old, new = bytes.fromhex("0f1f440000"), bytes.fromhex("e9c1010000")
    assert classify(old, old, new) == "old" and classify(new, old, new) == "new"
    assert classify(b"\xcc" + old[1:], old, new) == "int3"
    assert classify(b"\xcc" + new[1:], old, new) == "int3"
    assert classify(new[:1] + old[1:], old, new) == "torn"
    # a RET runs as the old RET whatever tail bytes follow it
    ret, jmp = bytes.fromhex("c3cccccccc"), bytes.fromhex("e90b000000")
    assert classify(ret[:1] + jmp[1:], ret, jmp) == "old"
    assert classify(jmp[:1] + ret[1:], ret, jmp) == "torn"


def test_mutation_timeline_marks_the_violation_where_it_happened():
    r = run_schedule(CAUGHT["scenario"], CAUGHT["seed"], mutation=CAUGHT["mutation"])
    assert r.violations and r.oopses, "the fixture schedule must fail"
    oops = r.oopses[0]
    rec = record_schedule(CAUGHT["scenario"], CAUGHT["seed"], mutation=CAUGHT["mutation"])
    root = ET.fromstring(svg(rec))
    assert [g.get("data-lane") for g in _groups(root, "lane")] == \
        ["patcher"] + [f"cpu{c}" for c in range(3)]
    marks = _groups(root, "violation")
    assert [m.get("data-kind") for m in marks] == [v.kind for v in r.violations]
    assert marks[0].get("data-lane") == f"cpu{oops['cpu']}"
    assert float(marks[0].get("data-step")) == oops["step"]
    assert len(_marks(root, "oops")) == len(r.oopses)
    # the patcher's phases are drawn, and the missing sync is missing
    phases = {m.get("data-phase") for m in _marks(root, "phase")}
    assert {"int3", "tail", "first"} <= phases
    n_syncs = len(_marks(root, "sync"))
    clean = record_schedule(CAUGHT["scenario"], CAUGHT["seed"])
    assert len(_marks(ET.fromstring(svg(clean)), "sync")) == n_syncs + 1


def test_int3_timeline_has_no_violation_and_shows_what_each_cpu_ran():
    r = run_schedule("multi", 1)
    assert not r.violations
    rec = record_schedule("multi", 1)
    root = ET.fromstring(svg(rec))
    assert not _groups(root, "violation")
    kinds = {m.get("data-class") for m in _marks(root, "exec")}
    assert "torn" not in kinds and {"old", "new"} <= kinds
    # an INT3 hit in the lanes for each INT3 the core saw (emulated or not)
    assert len(_marks(root, "int3")) >= r.int3_emulated > 0
    # one lane per CPU, a row per patched site in each
    names, items, placed = lanes(rec)
    assert names == ["patcher", "cpu0", "cpu1", "cpu2"] and not placed
    assert {i.row for i in items if i.kind == "exec"} == set(range(7))


def test_naive_timeline_shows_the_torn_instruction():
    # the first naive failure of a short run, whatever it is
    from textpoke.sim._verify import verify
    rep = verify(["nop5-jmp32"], 30, strategy="naive")
    assert rep.first is not None
    f = rep.first
    rec = record_schedule(f.scenario, f.seed, strategy="naive")
    names, items, placed = lanes(rec)
    assert [p["kind"] for p in placed] == [v["kind"] for v in rec.violations]
    torn = [i for i in items if i.kind == "exec" and i.cls == "torn"]
    assert torn, "a naive store that failed must show a CPU running torn bytes"
    assert min(i.start for i in torn) <= placed[0]["step"]


def test_chrome_trace_has_lanes_spans_and_the_violation():
    rec = record_schedule(CAUGHT["scenario"], CAUGHT["seed"], mutation=CAUGHT["mutation"])
    doc = json.loads(json.dumps(chrome_trace(rec)))
    ev = doc["traceEvents"]
    assert {e["ph"] for e in ev} <= {"M", "B", "E", "X", "i"}
    threads = {e["tid"]: e["args"]["name"] for e in ev if e.get("name") == "thread_name"}
    assert sorted(threads.values()) == ["cpu0", "cpu1", "cpu2", "patcher"]
    assert all(e["dur"] >= 0 for e in ev if e["ph"] == "X")
    viol = [e for e in ev if e.get("cat") == "violation"]
    assert len(viol) == len(rec.violations) and viol[0]["s"] == "g"
    assert any(e["ph"] == "X" and e["cat"] == "sync" for e in ev)


def test_cli_replay_writes_svg_and_trace(tmp_path):
    s, j = tmp_path / "t.svg", tmp_path / "t.json"
    p = _cli("verify", "--scenario", CAUGHT["scenario"], "--mutation", CAUGHT["mutation"],
             "--replay", str(CAUGHT["seed"]), "--timeline", str(s), "--timeline", str(j))
    assert p.returncode == 1, p.stderr
    assert f"timeline: {s}" in p.stdout
    root = ET.parse(s).getroot()
    assert len(_groups(root, "violation")) >= 1
    assert json.loads(j.read_text())["traceEvents"]
    bad = _cli("verify", "--scenario", "call", "--replay", "1", "--timeline",
               str(tmp_path / "t.png"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert not (tmp_path / "t.png").exists()


def test_demo_timeline_draws_every_commit(tmp_path):
    s = tmp_path / "demo.svg"
    p = _cli("demo", "--no-boot", "--cpus", "2", "--toggles", "3", "--json", "--timeline", str(s))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    root = ET.parse(s).getroot()
    assert [g.get("data-lane") for g in _groups(root, "lane")] == ["patcher", "cpu0", "cpu1"]
    # one commit mark per site per batch, as the demo counted them
    assert len(_marks(root, "commit")) == r["pokes"] > 0
    assert "torn" not in {m.get("data-class") for m in _marks(root, "exec")}
