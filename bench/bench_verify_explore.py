# SPDX-License-Identifier: GPL-2.0-only
"""Exhaustive exploration: time to catch each mutation (to its shortest
counterexample) and states per second of a complete clean exploration.

    python bench/bench_verify_explore.py [--repeat 5] [--json]

Each case runs in this process, interleaved round by round (``_stats``);
the explorer boots its machine once per case and restores it for every
path it replays.  The figures are the library's (explore() start to
return); ``textpoke verify --exhaustive`` adds the CLI's start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import _stats                                                          # noqa: E402

from textpoke.verify import Bound, explore  # noqa: E402

ONE = Bound(cpus=2, execs=1, refills=1)
NO_EVICT = Bound(cpus=2, execs=1, refills=0)
CASES = {
    "no-sync-1 @ call-xline": ("call-xline", "int3", "no-sync-1", ONE),
    "no-sync-2 @ call-xline": ("call-xline", "int3", "no-sync-2", ONE),
    "no-sync-3 @ nop5-jmp32": ("nop5-jmp32", "int3", "no-sync-3", NO_EVICT),
    "unordered @ xline": ("xline", "int3", "unordered", NO_EVICT),
    "no-refs-wait @ int3-entry (1 CPU, 2 execs)": ("int3-entry", "int3", "no-refs-wait",
                                                   Bound(cpus=1, execs=2, refills=0)),
    "naive @ call-xline": ("call-xline", "naive", None, ONE),
    "int3 clean @ nop5-jmp32": ("nop5-jmp32", "int3", None, NO_EVICT),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _stats.add_common_args(ap)
    args = ap.parse_args()
    _stats.setup(args)
    last: dict[str, object] = {}

    def case(name):
        scn, strat, mut, b = CASES[name]

        def f() -> float:
            t = time.perf_counter()
            r = explore(scn, strategy=strat, mutation=mut, bound=b)
            d = time.perf_counter() - t
            last[name] = r
            return d
        return f
    series = _stats.interleaved({k: case(k) for k in CASES}, args.repeat,
                                units=dict.fromkeys(CASES, "s"))
    rows = []
    for k, s in series.items():
        r = last[k]
        rate = _stats.Series(k, "states/s", samples=[r.states / t for t in s.samples])
        found = (f"{r.violation['kind']} after {len(r.path) - 1} actions" if r.violation
                 else ("clean, complete" if r.complete else "incomplete"))
        rows.append([k, _stats.fmt_range(s, 2), _stats.fmt_range(rate, 0), f"{r.states:,}",
                     f"{r.interleavings:,}", found])
    print("exhaustive exploration (bound: 2 CPUs, 1 site execution per CPU, unless named; "
          "refills as set in CASES; line 64)")
    print(_stats.table(["case", "seconds", "states/s", "states", "interleavings", "result"], rows))
    print(_stats.meta_line(_stats.meta(args)))
    if args.json:
        print(json.dumps({"series": {k: s.as_dict() for k, s in series.items()},
                          "meta": _stats.meta(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
