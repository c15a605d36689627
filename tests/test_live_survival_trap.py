# SPDX-License-Identifier: GPL-2.0-only
"""A thread that trapped on one of our INT3s survives a SIGKILL of the
patcher while the patcher handles that trap.

Once the tracer has reaped the trap's stop (its SIGTRAP consumed), a dying
tracer leaves the kernel to resume the thread wherever its rip points.  The
trap leaves rip at site+1, the middle of the instruction: a kill while the
handler chain ran (Python, milliseconds under load) resumed the thread
there, into the bytes of the tail -- SIGILL, SIGSEGV, or SIGTRAP from a
0xcc among them.  The rip is now put back at the site before the chain
runs, so the guard takes the INT3 again and the thread waits there.

The driver toggles 200 fentry sites of a busy 4-thread target and blocks
in the handler chain of the first trap; the test kills it there, runs
``live recover`` and asks the target for a snapshot."""

from __future__ import annotations

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

DRIVER = toggle_driver("""
    import sys
    from textpoke.live import _traps
    orig = _traps._Traps._run_chain

    def run_chain(self, t, regs, site):
        print("trap", hex(site), flush=True)
        sys.stdin.readline()              # SIGKILLed here
        return orig(self, t, regs, site)

    _traps._Traps._run_chain = run_chain
""")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_survival_trap"))


def test_sigkill_while_the_patcher_handles_a_trap(exe, tmp_path):
    with Target(exe, tmp_path / "snap", mode="busy", threads=4) as t:
        d = subprocess.Popen([sys.executable, "-c", DRIVER, str(t.pid)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=SRC_ENV)
        try:
            line = d.stdout.readline().split()
            assert line[:1] == ["trap"], f"driver said {line!r} (exit {d.wait()})"
            d.kill()
            d.wait(timeout=60)
        finally:
            if d.poll() is None:
                d.kill()
                d.wait()
        rec = live_cli("recover", "--pid", str(t.pid), timeout=300)
        assert t.alive(), f"target died ({t.proc.poll()})"
        assert rec.returncode == 0, rec.stdout + rec.stderr
        answer, _ = t.signal_and_read(signal.SIGUSR1)
        assert answer.startswith("snapshot"), answer
        assert t.alive()
