# SPDX-License-Identifier: GPL-2.0-only
"""Schedules per CPU-second of ``verify`` over the eight original scenarios,
before and after the speed-up, side by side.

    python bench/bench_verify.py [--schedules 50] [--repeat 5] [--baseline REV] [--also REV] [--json]

Each sample is one fresh process running ``verify(8 scenarios, N, seed=0,
jobs=1)``, as ``textpoke verify --schedules N --jobs 1`` does, in one of
three ways, interleaved round by round:

* ``reuse``    -- today's default (one booted machine restored per schedule);
* ``no-reuse`` -- today's code with ``reuse=False`` (a machine booted per
  schedule, as before; the hot-path changes still apply);
* ``baseline`` -- the tree at REV (default dc51117, the commit before the
  speed-up), extracted with ``git archive`` into a temporary directory;
* ``tree REV`` -- with ``--also REV``: any other tree, the same way (an
  intermediate step of the speed-up, say).

Reported per way: schedules per CPU-second inside the library (the verify
call's own process time), the process's CPU seconds from start to exit
(``os.wait4``: what the user pays, imports included), its wall seconds and
its peak RSS (the worker's ru_maxrss); and the machine's load average as
each run started (the box may be shared).  Every way must report the same
verdicts (checked: violating schedules and INT3s emulated agree).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _stats                                                          # noqa: E402

SCENARIOS = ["nop2-jmp8", "nop5-jmp32", "call", "ret-jmp32", "jcc32", "xline", "multi",
             "int3-entry"]
GOAL = 250.0

CHILD = r"""
import json, sys, time
from textpoke.sim._verify import verify
scn, n, reuse = json.loads(sys.argv[1])
kw = {} if reuse is None else {"reuse": reuse}
t = time.process_time()
r = verify(scn, n, seed=0, jobs=1, **kw)
d = time.process_time() - t
print(json.dumps({"cpu": d, "schedules": r.schedules, "violating": r.violating_schedules,
                  "emulated": r.int3_emulated}))
"""


def _extract(rev: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    data = subprocess.run(["git", "-C", str(_stats.REPO), "archive", rev, "src"],
                          check=True, capture_output=True).stdout
    import io
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(into, filter="data")
    return into / "src"


def _one(src: Path, n: int, reuse: bool | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([SCENARIOS, n, reuse])],
                         stdout=subprocess.PIPE, env=env)
    out = p.stdout.read()
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"child failed ({p.returncode})")
    d = json.loads(out)
    d.update(proc_cpu=ru.ru_utime + ru.ru_stime, wall=wall, rss_mb=ru.ru_maxrss / 1024,
             load=load)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", type=int, default=50, help="per scenario (default 50)")
    ap.add_argument("--baseline", default="dc51117", help="git revision of the 'before' tree")
    ap.add_argument("--also", action="append", default=[], metavar="REV",
                    help="another tree to measure side by side (e.g. an intermediate commit); "
                         "repeatable")
    ap.add_argument("--no-baseline", action="store_true", help="measure today's tree only")
    _stats.add_common_args(ap)
    args = ap.parse_args()
    _stats.setup(args)
    n = args.schedules if not args.quick else max(5, args.schedules // 5)
    cur = _stats.REPO / "src"
    with tempfile.TemporaryDirectory() as tmp:
        ways = {"reuse": (cur, True), "no-reuse": (cur, False)}
        if not args.no_baseline:
            ways["baseline"] = (_extract(args.baseline, Path(tmp) / "baseline"), None)
        for rev in args.also:
            ways[f"tree {rev}"] = (_extract(rev, Path(tmp) / rev), None)
        raw: dict[str, list[dict]] = {k: [] for k in ways}

        def runner(k):
            def f() -> float:
                d = _one(*ways[k][:1], n, ways[k][1])
                raw[k].append(d)
                return d["schedules"] / d["cpu"]
            return f
        series = _stats.interleaved({k: runner(k) for k in ways}, args.repeat,
                                    units={k: "schedules/CPU-s" for k in ways})
    verdicts = {(d["violating"], d["emulated"]) for v in raw.values() for d in v}
    rows = []
    for k, s in series.items():
        samples = raw[k][-args.repeat:]
        proc = _stats.Series(k, "s", samples=[d["proc_cpu"] for d in samples])
        wall = _stats.Series(k, "s", samples=[d["wall"] for d in samples])
        rss = max(d["rss_mb"] for d in samples)
        rows.append([k, _stats.fmt_range(s), _stats.fmt_range(proc, 2), _stats.fmt_range(wall, 2),
                     f"{rss:.1f}"])
    total = n * len(SCENARIOS)
    print(f"verify, {len(SCENARIOS)} scenarios x {n} schedules = {total}, jobs 1, "
          f"{args.repeat} runs each, interleaved; goal >= {GOAL:.0f} schedules/CPU-s")
    print(_stats.table(["way", "schedules/CPU-s (library)", "process CPU s", "wall s",
                        "peak RSS MB"], rows))
    if "baseline" in series:
        r = _stats.paired_ratios("reuse/baseline", series["reuse"], series["baseline"])
        print(f"speed-up reuse/baseline per round: {_stats.fmt_range(r, 2)}")
    print("verdicts (violating, INT3s emulated) across every run: "
          + ", ".join(map(str, sorted(verdicts))) + ("" if len(verdicts) == 1 else "  MISMATCH"))
    loads = [d["load"] for v in raw.values() for d in v]
    print(f"1-minute load average as each run started: {min(loads):.1f}\u2013{max(loads):.1f} "
          f"(median {sorted(loads)[len(loads) // 2]:.1f}) on {os.cpu_count()} CPUs")
    print(_stats.meta_line(_stats.meta(args)))
    if args.json:
        print(json.dumps({"series": {k: s.as_dict() for k, s in series.items()}, "raw": raw,
                          "meta": _stats.meta(args)}, indent=1))
    return 0 if len(verdicts) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
