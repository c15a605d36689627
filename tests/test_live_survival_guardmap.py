# SPDX-License-Identifier: GPL-2.0-only
"""``live recover`` after a patcher killed between the guard region's mmap
and the mprotect that makes its data writable.

The region is mapped r-x as a whole (its code and its rescue final at
once), then its data made writable through its own rescue.  A kill in
between left a guard region whose data page cannot be written: recover's
read of the SIGTRAP action into it failed (EFAULT: "Bad address"), the
guard and the journal stayed and recover exited 1 -- 3 runs of 100 in the
survival campaign.  The action is installed only after the mprotect, so
such a guard was never the process's action: recover unmaps it."""

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

N = 50

DRIVER = toggle_driver("""
    import os, signal, sys
    from textpoke.live import _inject
    orig = _inject.inject_syscall

    def inject(pid, tid, nr, *args, **kw):
        if nr == _inject.SYS_mprotect:        # the guard's data: never made writable
            print("mapped", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(pid, tid, nr, *args, **kw)

    _inject.inject_syscall = inject
""")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_survival_guardmap"))


def test_recover_frees_a_guard_killed_before_its_data_was_writable(exe, tmp_path):
    with Target(exe, tmp_path / "snap", mode="busy", threads=4) as t:
        maps0 = set(Path(f"/proc/{t.pid}/maps").read_text().splitlines())
        d = subprocess.run([sys.executable, "-c", DRIVER, str(t.pid)], capture_output=True,
                           text=True, env=SRC_ENV, timeout=300)
        assert d.stdout.split() == ["mapped"] and d.returncode == -signal.SIGKILL, d.stderr
        extra = set(Path(f"/proc/{t.pid}/maps").read_text().splitlines()) - maps0
        assert [x for x in extra if "r-xp" in x], "the guard region is not left mapped r-x"
        rec = live_cli("recover", "--pid", str(t.pid), timeout=300)
        assert rec.returncode == 0, rec.stdout + rec.stderr
        assert set(Path(f"/proc/{t.pid}/maps").read_text().splitlines()) == maps0
        from textpoke.live import journal_path
        assert not journal_path(t.pid).exists()
        answer, _ = t.signal_and_read(signal.SIGUSR1)
        assert answer.startswith("snapshot") and t.alive()
