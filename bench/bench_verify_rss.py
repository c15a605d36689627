# SPDX-License-Identifier: GPL-2.0-only
"""Peak RSS per worker of ``verify`` over every scenario.

    python bench/bench_verify_rss.py [--schedules 2000] [--jobs 2] [--json]

Runs ``textpoke.sim._verify.verify(all scenarios, ...)`` with *jobs* worker
processes over --schedules schedules in total (spread evenly over the
scenarios: verify's own ``schedules`` argument is per scenario) and
reports the peak resident set of each worker: VmHWM from
/proc/<pid>/status, polled while the pool runs (the last reading before a
worker exits; it can only miss growth in its last poll interval), and the
exact maximum over all workers from getrusage(RUSAGE_CHILDREN) once the
pool is gone.  The goal is < 150 MB per worker.

This is one run (a memory figure, not a timing); the wall time of the
run is printed for information.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from textpoke.sim import SCENARIOS, verify  # noqa: E402

import _stats                                                          # noqa: E402

GOAL_MB = 150


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class HwmPoller(threading.Thread):
    """Polls VmHWM (peak RSS) and VmRSS of this process's children."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.hwm: dict[int, int] = {}
        self.rss_last: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            for pid in _children(me):
                h = _status_kb(pid, "VmHWM")
                r = _status_kb(pid, "VmRSS")
                if h is not None:
                    self.hwm[pid] = max(h, self.hwm.get(pid, 0))
                if r is not None:
                    self.rss_last[pid] = r
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def bench_verify_rss(schedules: int, jobs: int, seed: int = 0) -> dict:
    scenarios = list(SCENARIOS)
    per = max(1, schedules // len(scenarios))
    parent_before = _status_kb(os.getpid(), "VmRSS")
    poller = HwmPoller()
    poller.start()
    t = time.perf_counter()
    rep = verify(scenarios, per, seed=seed, jobs=jobs)
    wall = time.perf_counter() - t
    poller.stop()
    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # KiB on Linux
    workers = sorted(poller.hwm.items())
    return {
        "scenarios": scenarios, "schedules_per_scenario": per, "schedules": rep.schedules,
        "violating_schedules": rep.violating_schedules, "jobs": jobs, "wall_s": wall,
        "parent_rss_before_fork_mb": (parent_before or 0) / 1024,
        "parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": {str(pid): kb / 1024 for pid, kb in workers},
        "worker_last_rss_mb": {str(pid): kb / 1024 for pid, kb in sorted(poller.rss_last.items())},
        "children_max_rss_mb": children_max / 1024,
        "goal_mb": GOAL_MB,
    }


def report(r: dict) -> str:
    peaks = list(r["worker_peak_rss_mb"].values())
    lines = [f"== verify peak RSS per worker: {r['schedules']:,} schedules "
             f"({len(r['scenarios'])} scenarios x {r['schedules_per_scenario']}), jobs={r['jobs']} "
             f"(goal < {GOAL_MB} MB)"]
    lines.append("  " + ", ".join(f"worker {pid}: {mb:.1f} MB" for pid, mb in r["worker_peak_rss_mb"].items()))
    lines.append(f"  max over workers (getrusage RUSAGE_CHILDREN): {r['children_max_rss_mb']:.1f} MB"
                 + ("" if not peaks else f"; polled VmHWM max {max(peaks):.1f} MB")
                 + f"; parent before fork {r['parent_rss_before_fork_mb']:.1f} MB")
    lines.append(f"  {r['violating_schedules']} violating schedules; wall {r['wall_s']:.1f} s")
    return "\n".join(lines)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--schedules", type=int, default=2000, help="schedules in total (default 2,000)")
    ap.add_argument("--jobs", type=int, default=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = bench_verify_rss(args.schedules, args.jobs)
    m = _stats.meta(args)
    if args.json:
        json.dump({"meta": m, "verify_rss": r}, sys.stdout, indent=2)
        print()
    else:
        print(_stats.meta_line(m).split("; median")[0])
        print(report(r))
    return 1 if r["violating_schedules"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
