#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Run a command on a busy machine: N CPU-bound processes spin for as long as
the command runs, then are killed.

    tools/busy.py [--procs 4] [--runs 3] [--fresh-clone] -- make test

This is how the suite is shown to hold on a loaded box, as CI's 2-core
machines may be (other jobs running).  ``--fresh-clone`` runs each time in a
new ``git clone`` of this checkout (its own ``.venv``, so nothing cached in
the working tree helps), as CI does.  Prints one line per run: exit status,
wall time and the load average seen at the end, and exits non-zero if any
run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin() -> None:
    # plain Python arithmetic: holds one CPU, touches no disk and little memory
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def run_busy(cmd: list[str], procs: int, cwd: Path, log: Path | None) -> tuple[int, float, str]:
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(procs)]
    for s in spinners:
        s.start()
    t0 = time.monotonic()
    try:
        with open(log, "w") if log else open(os.devnull, "w") as f:
            rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    finally:
        load = open("/proc/loadavg").read().split()[:3]
        for s in spinners:
            s.terminate()
        for s in spinners:
            s.join()
    return rc, time.monotonic() - t0, " ".join(load)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4, help="CPU-bound processes (default 4)")
    ap.add_argument("--runs", type=int, default=1, help="run the command this many times")
    ap.add_argument("--fresh-clone", action="store_true",
                    help="each run in a fresh clone of this checkout's HEAD")
    ap.add_argument("--logs", metavar="DIR", help="keep each run's output here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd or not 0 <= args.procs <= 64 or not 1 <= args.runs <= 100:
        ap.error("give a command after --, --procs 0..64 and --runs 1..100")
    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    failed = 0
    for i in range(1, args.runs + 1):
        tmp = None
        cwd = ROOT
        if args.fresh_clone:
            tmp = Path(tempfile.mkdtemp(prefix="textpoke-busy-"))
            cwd = tmp / "textpoke"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(cwd)], check=True)
        try:
            rc, secs, load = run_busy(cmd, args.procs, cwd, logs / f"run{i}.log" if logs else None)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        failed += rc != 0
        print(f"run {i}/{args.runs} at {head}: exit {rc}, {secs:.0f} s wall, "
              f"{args.procs} spinners, load {load}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
