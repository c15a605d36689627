# SPDX-License-Identifier: GPL-2.0-only
"""The assembly target of the entry tests (entries.c): built once per
module, started with N threads, driven over its stdin (``go K``: every
thread calls each movable function K times)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["Entries", "build_entries", "HERE"]

HERE = Path(__file__).parent


def build_entries(d: Path) -> Path:
    """entries.c built as a PIE in *d*."""
    exe = d / "entries"
    subprocess.run(["gcc", "-O1", "-pthread", "-fpie", "-pie", "-o", str(exe),
                    str(HERE / "entries.c")], check=True)
    return exe


class Entries:
    """The target running with *threads* threads, ready."""

    def __init__(self, exe: Path, threads: int = 4) -> None:
        self.proc = subprocess.Popen([str(exe), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def ask(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def go(self, k: int) -> tuple[int, list[int]]:
        """4 threads call every movable function k times: (checksum, hits)."""
        r = self.ask(f"go {k}")
        assert r[0] == "done", r
        return int(r[1]), [int(x) for x in r[2:]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
