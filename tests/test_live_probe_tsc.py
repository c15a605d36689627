# SPDX-License-Identifier: GPL-2.0-only
"""``live probe`` (optimised by default) on a process whose threads turned
RDTSC off (``prctl(PR_SET_TSC, PR_TSC_SIGSEGV)``, per thread, inherited):
the optimised probe's recorder stamps each hit with ``rdtscp``, which such
a thread takes as a SIGSEGV at its first hit.  ``live trace``'s check
(every thread asked with an injected ``prctl(PR_GET_TSC)``) runs before
anything is mapped, and the INT3 probe is kept with the reason in the
start line and ``not_optimized_reason``.  The same target with RDTSC on
is optimised, and without the check it dies of SIGSEGV (the teeth)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402
from livetest import live_cli as tp  # noqa: E402
from notsc import NoTscTarget, build_notsc  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    # the RDTSC-off target live trace's check is tested on (notsc.py: modes
    # "one", "all", "none")
    return build_notsc(tmp_path_factory.mktemp("live_probe_tsc"))


_T = NoTscTarget


def _tids(pid: int) -> set[int]:
    return {int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()}


def _probe(t: _T, n: int = 20) -> tuple[dict, str]:
    r = tp("probe", "--pid", str(t.pid), "notsc:leaf", "v=%di", "--max-hits", str(n), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr.splitlines()[0]


@pytest.mark.parametrize("mode", ["one", "all"])
def test_int3_probe_kept_when_rdtsc_is_off(exe, mode):
    t = _T(exe, mode)
    try:
        maps = t.maps()
        doc, start = _probe(t)
        why = doc["not_optimized_reason"]
        assert doc["optimized"] is False and "PR_TSC_SIGSEGV" in why and "rdtscp" in why, doc
        # the reason names a thread of the target; in "one" mode not main
        tid = int(why.split("thread ", 1)[1].split()[0])
        assert tid in _tids(t.pid) and (tid != t.pid) == (mode == "one")
        assert "not optimised: " in start and why in start, start
        assert "not optimised: " in doc["how"]
        assert doc["hits"] == 20 and doc["int3_left"] == 0 and doc["regions_kept"] == []
        # the workers' leaf(1), the thread that turned RDTSC off among them
        assert {e["args"]["v"] for e in doc["events"]} == {"0x1"}
        assert len({e["tid"] for e in doc["events"]}) == 2
        assert t.p.poll() is None and t.ping() == "ok" and t.maps() == maps
    finally:
        t.close()


def test_optimised_when_rdtsc_is_on(exe):
    """The control: the same function of the same program, nobody turned
    RDTSC off -- the check lets the optimised probe run."""
    from textpoke.live._probe_opt import cpu_refusal
    if cpu_refusal():
        pytest.skip(f"not optimised here: {cpu_refusal()}")
    t = _T(exe, "none")
    try:
        doc, start = _probe(t)
        assert doc["optimized"] is True and doc["not_optimized_reason"] is None, doc["how"]
        assert "optimised: a JMP" in start and "not optimised" not in start, start
        assert doc["hits"] == 20 and doc["int3_left"] == 0 and doc["regions_kept"] == []
        assert t.p.poll() is None and t.ping() == "ok"
    finally:
        t.close()


_UNCHECKED = r"""
import sys, time
from textpoke.live import _probe as P
P.LiveProbe._tsc_refusal = lambda self, m: None     # the check taken away
lp = P.LiveProbe(int(sys.argv[1]), "notsc:leaf", ["%di"])
print("planned", flush=True)
end = time.monotonic() + 30
try:
    lp.arm(optimize=True)   # the target may die before this returns
    print("optimized" if lp.optimized else "not optimized: " + str(lp.opt_reason), flush=True)
    while P.alive(lp.pid) and time.monotonic() < end:
        lp.pump(lambda: True)
        lp.take()
finally:
    try:
        lp.close()
    except Exception:
        pass
"""


def test_without_the_check_the_target_dies(exe):
    """The teeth: the same target, the check replaced by "allowed", takes
    the optimised path and dies of SIGSEGV at its first hit."""
    from textpoke.live._probe_opt import cpu_refusal
    if cpu_refusal():
        pytest.skip(f"not optimised here: {cpu_refusal()}")
    t = _T(exe, "one")
    try:
        drv = subprocess.Popen([sys.executable, "-c", _UNCHECKED, str(t.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert drv.stdout.readline().strip() == "planned", drv.stderr.read()
        assert t.p.wait(timeout=60) == -signal.SIGSEGV
        out, _err = drv.communicate(timeout=60)
        assert "not optimized" not in out
    finally:
        if t.p.poll() is None:
            t.close()
