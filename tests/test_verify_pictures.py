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

from textpoke.sim import run_schedule
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
    from textpoke.sim import verify
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
    assert sorted(threads.values()) == ["cpu0", "cpu0 IPIs", "cpu1", "cpu1 IPIs", "cpu2",
                                        "cpu2 IPIs", "patcher", "patcher syncs"]
    assert all(e["dur"] >= 0 for e in ev if e["ph"] == "X")
    # slices nest on every track, as the format requires
    for t in threads:
        spans = sorted((e["ts"], -(e["ts"] + e["dur"]), e["ts"] + e["dur"]) for e in ev
                       if e["ph"] == "X" and e["tid"] == t)
        stack: list[float] = []
        for start, _, end in spans:
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], (threads[t], start, end, stack)
            stack.append(end)
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


def _report(tmp_path) -> tuple[Path, dict]:
    d = tmp_path / "rep"
    p = _cli("verify", "--scenario", "call", "--mutation", "no-sync-3", "--schedules", "6",
             "--line-sizes", "1,64", "--jobs", "2", "--report", str(d), "--json")
    assert p.returncode in (0, 1), p.stderr
    doc = json.loads(p.stdout)
    assert doc == json.loads((d / "report.json").read_text())
    return d, doc


def test_report_heatmap_json_and_page_agree(tmp_path):
    d, doc = _report(tmp_path)
    rows = doc["cells"]
    assert {(r["variant"], r["line_size"]) for r in rows} == \
        {(v, ls) for v in ("int3", "no-sync-3") for ls in (1, 64)}
    assert all(r["schedules"] == 6 for r in rows)
    root = ET.parse(d / "heatmap.svg").getroot()
    cells = _groups(root, "cell")
    assert len(cells) == len(rows)
    drawn = {(c.get("data-variant"), int(c.get("data-line-size"))):
             (int(c.get("data-caught")), int(c.get("data-schedules"))) for c in cells}
    assert drawn == {(r["variant"], r["line_size"]): (r["violating"], r["schedules"])
                     for r in rows}
    assert _groups(root, "legend")
    # a mutation never caught is drawn as missed (no teeth there), never in the
    # colour of a clean int3 cell; a clean int3 cell never as missed
    from textpoke.verify._report import MISSED
    for c in cells:
        rect = next(e for e in c if e.tag.endswith("rect"))
        caught, variant = int(c.get("data-caught")), c.get("data-variant")
        assert (rect.get("fill") == MISSED) == (caught == 0 and variant != "int3"), \
            (variant, caught, rect.get("fill"))
    # the page shows the heatmap and one timeline per variant, each a real SVG
    page = (d / "index.html").read_text()
    srcs = [s.split('"', 1)[0] for s in page.split('<img src="')[1:]]
    assert srcs[0] == "heatmap.svg" and len(srcs) == 1 + len(doc["pictures"])
    assert {p["variant"] for p in doc["pictures"]} == {"int3"} | (
        {"no-sync-3"} if doc["summary"]["no-sync-3"]["violating"] else set())
    for s in srcs:
        ET.parse(d / s)
    int3 = next(p for p in doc["pictures"] if p["variant"] == "int3")
    assert not _groups(ET.parse(d / int3["svg"]).getroot(), "violation")


_CHECK = """<script>
window.addEventListener("load", () => {
  const bad = [];
  document.querySelectorAll("img").forEach(i => {
    if (!i.complete || i.naturalWidth === 0 || i.naturalHeight === 0) bad.push(i.src);
  });
  document.body.setAttribute("data-pictures", document.images.length + " " + bad.join(","));
});
</script>"""


@pytest.mark.skipif(os.environ.get("TEXTPOKE_BROWSER_TESTS") != "1",
                    reason="opt-in: TEXTPOKE_BROWSER_TESTS=1 (needs Debian's chromium)")
def test_report_page_renders_every_picture_in_a_headless_browser(tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("TEXTPOKE_BROWSER_TESTS=1 but no chromium: apt-get install -y chromium")
    d, doc = _report(tmp_path)
    # the page as shipped, plus a probe that reads each image's natural size
    probe = d / "probe.html"
    probe.write_text((d / "index.html").read_text().replace("</body>", _CHECK + "</body>"))
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
                        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    marker = p.stdout.split('data-pictures="', 1)
    assert len(marker) == 2, "the page's load event never ran"
    count, _, bad = marker[1].split('"', 1)[0].partition(" ")
    assert int(count) == 1 + len(doc["pictures"]) and bad == "", bad
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'ud2'}", f"--screenshot={shot}",
                    "--window-size=1200,900", (d / "index.html").as_uri()],
                   capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_a_long_demo_trace_is_capped_and_says_so():
    from textpoke.sim._demo import Demo
    from textpoke.verify._timeline import demo_recording, watch
    with Demo(cpus=2, boot=False) as d:
        watch(d.w, cap=500)
        d.toggle(20)
        d.result()
        assert len(d.w.sim.trace) == 500 and d.w.sim.trace.dropped > 0
        rec = demo_recording(d)
    last = rec.steps
    assert "first" in rec.title and rec.params["trace_entries_dropped"] > 0
    assert all(e["step"] <= last for e in rec.entries if e["step"] is not None)
    assert ET.fromstring(svg(rec)).tag == f"{SVG}svg"
