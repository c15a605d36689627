# SPDX-License-Identifier: GPL-2.0-only
"""textpoke benchmarks: every figure as the median of >= 5 runs with its
min-max range, baselines measured side by side in the same run.

    python bench/run_all.py [--repeat N] [--quick] [--json] [--clock cpu] [--no-rss]

1. guest speed (bench_guest.py): the sim's 4 vCPUs vs 4 raw Unicorn
   instances with the sim's own protections, hook and emu_start slices,
   interleaved; free-running and counted slices; ratio sim/raw per round;
2. the core's own cost per site (bench_core.py) on the in-memory
   textpoke.testing.MemoryMachine: 10,000-site batches, add and finish
   steps alone;
3. patch rate (bench_patch.py) with 4 vCPUs running the workload: batches
   of 1, 256 and 10,000 sites, cold and hot; sync broadcasts per batch
   (exact counts);
4. unless --no-rss, verify's peak RSS per worker (bench_verify_rss.py: 2,000
   schedules, 2 jobs), in a fresh process.

--quick lowers the work per run (shorter guest runs, 2,000-site batches),
never the number of runs.  --json prints every raw sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats                                                          # noqa: E402
import bench_core                                                      # noqa: E402
import bench_guest                                                     # noqa: E402
import bench_patch                                                     # noqa: E402
import bench_verify_rss                                                # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _stats.add_common_args(ap)
    bench_core.add_args(ap)
    bench_patch.add_args(ap)
    ap.add_argument("--no-rss", dest="rss", action="store_false",
                    help="skip verify's peak RSS per worker (2,000 schedules, 2 jobs, ~30 s)")
    ap.add_argument("--only", choices=["guest", "core", "patch"], action="append",
                    help="run only these parts (repeatable)")
    args = ap.parse_args(argv)
    _stats.setup(args)
    parts = args.only or ["guest", "core", "patch"]
    if args.only:
        args.rss = False
    m = _stats.meta(args)
    if not args.json:
        print(_stats.meta_line(m), flush=True)
    res: dict = {"meta": m}
    took = {}
    for name, mod, key in (("guest", bench_guest, "guest_speed"), ("core", bench_core, "core_cost"),
                           ("patch", bench_patch, "patch")):
        if name not in parts:
            continue
        t = time.perf_counter()
        r = mod.run(args)
        took[name] = time.perf_counter() - t
        res[key] = mod.to_json(r)
        if not args.json:
            print(mod.report(r), flush=True)
    if args.rss:
        t = time.perf_counter()
        # in a fresh process: forked workers would inherit (and count in
        # their RSS) every machine the benchmarks above left in this one
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_verify_rss.py")),
                              "--schedules", str(400 if args.quick else 2000), "--jobs", "2", "--json"],
                             capture_output=True, text=True, check=False)
        if not out.stdout.strip():
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout)["verify_rss"]
        took["rss"] = time.perf_counter() - t
        res["verify_rss"] = r
        if not args.json:
            print(bench_verify_rss.report(r), flush=True)
    res["seconds_per_part"] = took
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        print("(" + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
