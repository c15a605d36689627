# SPDX-License-Identifier: GPL-2.0-only
"""``live trace`` on a process whose threads turned RDTSC off
(``prctl(PR_SET_TSC, PR_TSC_SIGSEGV)``, a per-thread flag): the runtime's
TSC clock and the profiler's return hook would give it a SIGSEGV at its
first traced call.  Every thread is asked (an injected
``prctl(PR_GET_TSC)``) before anything is mapped: the trace falls back to
the counter clock and says so, ``--profile`` is refused in one line (exit
2).  Without the check the same target dies of SIGSEGV (the test's teeth)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402
from notsc import NoTscTarget, build_notsc  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_live_trace import _armed, _tracer, tp  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_notsc(tmp_path_factory.mktemp("live_trace_tsc"))


@pytest.mark.parametrize("mode", ["one", "all"])
def test_counter_clock_when_rdtsc_is_off(exe, mode):
    t = NoTscTarget(exe, mode)
    try:
        tr = _tracer(t.pid, "--functions", "notsc:leaf", "--json", "--duration", "0.3")
        first = _armed(tr)
        assert "timestamps: the event counter" in first and "RDTSC disabled" in first, first
        out, err = tr.communicate(timeout=120)
        assert tr.returncode == 0, err
        doc = json.loads(out)
        assert doc["trace_clock"] == "counter" and doc["tsc_hz"] is None
        assert doc["events_read"] > 0 and doc["restored"] is True and doc["int3_left"] == 0
        # the counter's integers, and the thread that turned RDTSC off traced too
        assert all(e["ts"] is None and isinstance(e["timestamp"], int) for e in doc["events"])
        assert len({e["tid"] for e in doc["events"]}) >= 2
        assert t.p.poll() is None and t.ping() == "ok"
    finally:
        t.close()


def test_profile_refused_when_rdtsc_is_off(exe):
    t = NoTscTarget(exe, "one")
    try:
        before = t.maps()
        r = tp("trace", "--pid", str(t.pid), "--functions", "notsc:leaf", "--profile",
               "--duration", "0.3")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "RDTSC" in lines[0] and "PR_TSC_SIGSEGV" in lines[0], lines
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert t.maps() == before                # nothing mapped, nothing left
        assert tp("sites", "--pid", str(t.pid), "--check").returncode == 0
        assert t.p.poll() is None and t.ping() == "ok"
    finally:
        t.close()


_UNCHECKED = r"""
import sys, time
from textpoke.live import _trace as T
T.tsc_disabled = lambda m, tids: None           # the check taken away
lt = T.LiveTrace(int(sys.argv[1]), "notsc:leaf", clock="tsc")
print("planned", flush=True)
end = time.monotonic() + 30
try:
    lt.arm()          # the target may die before this returns
    while T.alive(lt.pid) and time.monotonic() < end:
        lt.pump(lambda: True)
        lt.take()
finally:
    try:
        lt.close()
    except Exception:
        pass
"""


def test_without_the_check_the_target_dies(exe):
    """The teeth: the same target, the check replaced by "allowed", dies
    of SIGSEGV at the first RDTSC of the runtime's copy."""
    from textpoke.live._trace import tsc_variant_reason
    if tsc_variant_reason():
        pytest.skip("the TSC is not the trace clock here")
    t = NoTscTarget(exe, "all")
    try:
        drv = subprocess.Popen([sys.executable, "-c", _UNCHECKED, str(t.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert drv.stdout.readline().strip() == "planned", drv.stderr.read()
        assert t.p.wait(timeout=60) == -signal.SIGSEGV
        drv.communicate(timeout=60)
    finally:
        if t.p.poll() is None:
            t.close()
