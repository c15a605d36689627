# SPDX-License-Identifier: GPL-2.0-only
"""Shared by tests/test_live_*.py and bench/bench_live.py: build the
counting target, run it, and know whether ptrace is permitted here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gen  # noqa: E402

__all__ = ["gen", "ptrace_skip_reason", "Target"]


def ptrace_skip_reason() -> str | None:
    """Why ptrace cannot be used on a child here, or None when it can."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "the live machine needs Linux on x86-64"
    if shutil.which("gcc") is None:
        return "gcc is not installed: the live targets are built by the tests"
    try:
        scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        scope = 0
    if scope >= 3:
        return "ptrace is disabled (kernel.yama.ptrace_scope = 3)"
    if scope >= 1 and os.geteuid() != 0:
        try:
            caps = int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                            if l.startswith("CapEff:")).split()[1], 16)
        except (StopIteration, ValueError):
            caps = 0
        if not caps & (1 << 19):
            return (f"ptrace of a non-descendant is restricted (kernel.yama.ptrace_scope = {scope}) "
                    "and this process lacks CAP_SYS_PTRACE")
    return None


class Target:
    """A running counting target (see gen.py), killed on exit."""

    def __init__(self, exe: Path, out: Path, mode: str = "window", threads: int = 4,
                 rounds: int = 10) -> None:
        self.out = Path(out)
        self.proc = subprocess.Popen([str(exe), str(out), mode, str(threads), str(rounds)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            raise RuntimeError(f"target did not start: {line!r}")
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_and_read(self, sig: int) -> tuple[str, list[int]]:
        """Send *sig* (SIGUSR1): the target answers one line after writing
        its counts; return the line and the counts."""
        os.kill(self.pid, sig)
        line = self.proc.stdout.readline().strip()
        return line, [int(x) for x in self.out.read_text().split()]

    def stop(self) -> list[int]:
        """SIGTERM: the target joins its threads, writes its totals, exits 0."""
        self.proc.terminate()
        rc = self.proc.wait(timeout=60)
        if rc != 0:
            raise RuntimeError(f"target exited with {rc}")
        return [int(x) for x in self.out.read_text().split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expected_window(n: int, threads: int, rounds: int) -> list[int]:
    """Calls per function in one window (gen.py: thread t calls f_i 1+(i+t)%3 times a round)."""
    return [rounds * sum(1 + (i + t) % 3 for t in range(threads)) for i in range(n)]
