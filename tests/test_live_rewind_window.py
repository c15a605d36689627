# SPDX-License-Identifier: GPL-2.0-only
"""A SIGKILL of the patcher between a trap's stop and the thread's rewind
leaves the thread at the site, never mid-instruction.

Once a SIGTRAP stop is reaped its signal is gone: a tracer that dies from
then on has the kernel resume the thread, with no signal, wherever its rip
points -- at site+1 right after the trap, the middle of the instruction
(the tail of a NOP5 under an INT3: 0x1f, SIGILL).  The old code reaped the
stop, then rewound: a kill in between killed the target.  Now, while the
guard is in the target, the stop is peeked (WNOWAIT), the thread's siginfo
marked with the site and its rip set to it, and only then reaped; a kill at
any of those steps leaves either the SIGTRAP to the guard (which sets rip
to the site, from rip-1 or from the mark) or a thread at the site.

The driver toggles 200 fentry sites of a busy 4-thread target and SIGKILLs
itself at one step of the first trap it handles (a test-only hook of
live/_tracer.py, or its trap handler's entry, right after the reap).  Then:
the target lives, ``live recover`` leaves no INT3, the target answers, and
its SIGTERM returns only when every worker thread has left its loop (the
one that trapped included: not spinning at a site, not dead)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, gen, ptrace_skip_reason  # noqa: E402
from livetest import SRC_ENV, live_cli, toggle_driver  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 200

_KILL = """
    import os, signal, sys

    def die(point, tid):
        print("killed", point, tid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""

#: the point -> the driver's patch that kills it there
DRIVERS = {
    # the tracer's steps (live/_tracer.py, _Tracer._reap): stop peeked,
    # siginfo marked with the site (rip still site+1), rip at the site, reaped
    **{p: toggle_driver(_KILL + f"""
    from textpoke.live import _tracer

    def hook(point, tid):
        if point == {p!r}:
            die(point, tid)

    _tracer._test_hook = hook
""") for p in ("peek", "marked", "rewound", "reaped")},
    # the trap handler's entry, the stop reaped: the window of the old code
    # (it rewound only here); the same patch runs against the old tree
    "handler": toggle_driver(_KILL + """
    from textpoke.live import _traps

    def sigtrap_stop(self, t):
        die("handler", t.tid)

    _traps._Traps._sigtrap_stop = sigtrap_stop
"""),
}


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_rewind_window"))


@pytest.mark.parametrize("point", list(DRIVERS))
def test_sigkill_at_each_step_of_a_trap(exe, tmp_path, point):
    with Target(exe, tmp_path / "snap", mode="busy", threads=4) as t:
        d = subprocess.Popen([sys.executable, "-c", DRIVERS[point], str(t.pid)],
                             stdout=subprocess.PIPE, text=True, env=SRC_ENV)
        try:
            out = d.stdout.read()
            rc = d.wait(timeout=120)
        finally:
            if d.poll() is None:
                d.kill()
                d.wait()
        words = out.split()
        assert words[:2] == ["killed", point] and rc == -signal.SIGKILL, (out, rc)
        tid = int(words[2])
        rec = live_cli("recover", "--pid", str(t.pid), "--json", timeout=300)
        assert t.alive(), f"target died ({t.proc.poll()}) after a kill at {point}"
        assert rec.returncode == 0, rec.stdout + rec.stderr
        j = json.loads(rec.stdout)
        assert j["kept"] == [], j
        chk = live_cli("sites", "--pid", str(t.pid), "--check")
        assert chk.returncode == 0 and "stray INT3s: 0" in chk.stdout, chk.stdout + chk.stderr
        answer, _ = t.signal_and_read(signal.SIGUSR1)
        assert answer.startswith("snapshot"), answer
        # the thread that trapped still exists, and every worker returns
        # from its loop when asked: main joins them all and exits 0
        assert Path(f"/proc/{t.pid}/task/{tid}").exists()
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(timeout=60) == 0
        counts = [int(x) for x in (tmp_path / "snap").read_text().split()]
        assert len(counts) == N and all(c > 0 for c in counts)
