# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live trace`` across modules more than 2 GiB apart, in one
command: Debian's /usr/bin/python3 (non-PIE, low in the address space) and
libc (near the top).  The runtime sits near python3; the libc site goes
through a bridge region near libc (an absolute jump to its pad by the
runtime, whose record the client switches, and back to the bridge for the
moved instructions).  Both functions' events come out, nothing is left
mapped at the end, and a SIGKILLed tracer's bridge is freed by ``live
recover`` with the runtime's region."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_live_trace import (K, LM, NT, PY_WORK, _armed, _Target, _tracer, _window,  # noqa: E402
                             tp)
from test_live_trace import exes  # noqa: E402,F401 (the fixture)

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

PY = "/usr/bin/python3"
FUNCS = "python3:PyObject_Hash,libc.so.6:malloc"


def _maps(pid: int) -> list[tuple[int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            w = line.split()
            lo, hi = (int(x, 16) for x in w[0].split("-"))
            out.append((lo, hi, w[1], w[5] if len(w) > 5 else ""))
    return out


def _module_span(maps, name: str) -> tuple[int, int]:
    xs = [(lo, hi) for lo, hi, _p, path in maps if os.path.basename(path).startswith(name)]
    assert xs, name
    return min(x[0] for x in xs), max(x[1] for x in xs)


def _anon_rx_near(maps, span: tuple[int, int]) -> list[int]:
    """Anonymous r-x mappings within rel32 reach of every byte of *span*."""
    lo, hi = span
    return [a for a, b, prot, path in maps if prot.startswith("r-x") and not path
            and max(b, hi) - min(a, lo) < 1 << 31]


@pytest.fixture
def py_target(tmp_path):
    if not os.path.exists(PY):
        pytest.skip("no /usr/bin/python3")
    (tmp_path / "w.py").write_text(PY_WORK)
    t = _Target([PY, str(tmp_path / "w.py")])
    maps = _maps(t.pid)
    py, libc = _module_span(maps, "python3"), _module_span(maps, "libc.so")
    if max(py[1], libc[1]) - min(py[0], libc[0]) < 1 << 31:
        t.close()
        pytest.skip("python3 and libc lie within 2 GiB of each other here (a PIE python3)")
    try:
        yield t, maps, py, libc
    finally:
        t.close()


def test_python3_and_libc_in_one_command(py_target):
    t, before, py, libc = py_target
    ref = t.go()
    tr = _tracer(t.pid, "--functions", FUNCS, "--json", "--duration", "0.5",
                 "--buffer-size", "256")
    first = _armed(tr)
    assert "2 function(s)" in first and "2 entries" in first, first
    # armed: the runtime's region near python3 and a bridge near libc
    armed = _maps(t.pid)
    new = [m for m in armed if m not in before]
    assert [a for a in _anon_rx_near(new, libc) if a not in _anon_rx_near(new, py)], new
    assert _anon_rx_near(new, py), new
    out, err = tr.communicate(timeout=120)
    assert tr.returncode == 0, err
    doc = json.loads(out)
    assert doc["entries"] == 2 and doc["int3_left"] == 0 and doc["restored"] is True
    assert doc["regions_kept"] == []
    funcs = {e["function"] for e in doc["events"]}
    assert funcs == {"PyObject_Hash", "malloc"}, funcs
    assert doc["hits"] >= doc["events_read"] > 0
    # every region (the runtime's, the bridge, their rescues) unmapped
    assert _maps(t.pid) == before
    assert t.go() == ref                     # the workload's output unchanged
    assert tp("sites", "--pid", str(t.pid), "--check").returncode == 0


def test_sigkill_with_a_bridge_then_recover(py_target):
    t, before, _py, libc = py_target
    ref = t.go()
    tr = _tracer(t.pid, "--functions", FUNCS)
    _armed(tr)
    tr.kill()
    tr.wait()
    assert t.alive() and t.go() == ref       # running the tracer, bridge included
    chk = tp("sites", "--pid", str(t.pid), "--check")
    assert chk.returncode == 1 and "trace stub region" in chk.stdout + chk.stderr
    rec = tp("recover", "--pid", str(t.pid))
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "stub regions freed: 2" in rec.stdout + rec.stderr, rec.stdout + rec.stderr
    left = [m for m in _maps(t.pid) if m not in before]
    assert not _anon_rx_near(left, libc), left
    assert tp("sites", "--pid", str(t.pid), "--check").returncode == 0
    assert t.go() == ref


def test_fentry_sites_through_a_bridge(exes):  # noqa: F811
    """A -mnop-mcount program's NOP5 sites with more libc functions than
    its own: the runtime goes near libc, and the program's NOP5s -- out of
    its reach -- become pads through a bridge near the program (the site a
    JMP to the bridge, the record the pad's NOP5): exact counts, parents."""
    from textpoke.live import LiveTrace
    pattern = f"fentry:{LM},libc.so.6:malloc,libc.so.6:free,libc.so.6:calloc"
    t = _Target([str(exes / "fentry"), str(K)])
    try:
        lt = LiveTrace(t.pid, pattern)           # the plan only
        try:
            assert sorted((s.kind, s.bridge) for s in lt.sites) == \
                [("entry", -1)] * 3 + [("nop5", 0)] * 2
            assert all(s.padded for s in lt.sites)
        finally:
            lt.close()
    finally:
        t.close()
    rc, doc, err = _window(exes / "fentry", pattern)
    assert rc == 130, err
    assert doc["int3_left"] == 0 and doc["restored"] is True and doc["regions_kept"] == []
    assert doc["kinds"] == {"nop5": 2, "entry": 3} and doc["overruns"] == 0, doc["kinds"]
    ev = [e for e in doc["events"] if e["function"] in ("leaf", "mid")]
    assert Counter(e["function"] for e in ev) == {"leaf": 2 * K * NT, "mid": K * NT}
    assert {e["parent"] for e in ev if e["function"] == "leaf"} == {"mid"}
    assert {e["parent"] for e in ev if e["function"] == "mid"} == {"top"}
    assert "2 fentry site(s), 3 entries" in err, err
