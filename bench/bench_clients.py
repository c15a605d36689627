# SPDX-License-Identifier: GPL-2.0-only
"""Static-key flip rate on running vCPUs.

    python bench/bench_clients.py [--repeat R] [--quick] [--json] [--clock cpu]

For keys of 1, 100 and 1,000 jump-label sites (jl_key_many_N in the
bundled image), a sim machine with 4 vCPUs runs the image's probe loop,
which passes through every site of the key all the time; each flip is one
static_key_enable or static_key_disable (all sites checked, queued and
applied with the SMP batch: ceil(N/256) batches of <= 3 syncs) while the
vCPUs keep running between the protocol's steps.  Figures: flips per
second, median and min-max of --repeat >= 5 rounds, the three sizes
interleaved piece by piece.  After the run, every CPU must return the
key's final state and no CPU may have oopsed.

Not measured (not implemented): module load time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import fmt, fmt_range, interleaved_rates, now, script_main, table  # noqa: E402

from textpoke.sim._clients_demo import ClientMachine  # noqa: E402

SIZES = (1, 100, 1000)


def run(args):
    flips = 2 if args.quick else 6
    machines = {}
    fns = {}
    for n in SIZES:
        cm = ClientMachine(cpus=4, seed=n)
        i = cm.add_probe(f"jl_many_{n}", allow=[0, n])
        cm.allow(i, [0, n], rng=(0, n))
        cm.start()
        cm.wait_passes(1)
        machines[n] = (cm, i)

        def piece(cm=cm, key=f"jl_key_many_{n}"):
            t0 = now()
            for _ in range(flips):
                if cm.keys.static_key_enabled(key):
                    cm.keys.static_key_disable(key)
                else:
                    cm.keys.static_key_enable(key)
            return flips, now() - t0
        fns[f"{n} sites"] = piece
    try:
        res = interleaved_rates(fns, args.repeat, chunks=4, units={k: "flips/s" for k in fns})
        checks = {}
        for n, (cm, i) in machines.items():
            want = n if cm.keys.static_key_enabled(f"jl_key_many_{n}") else 0
            wrong = cm.expect({i: want})
            checks[n] = {"oopses": cm.oopses, "bad": cm.bad(), "wrong": bool(wrong),
                         "batches": cm.core.stats.batches, "syncs": cm.core.stats.syncs}
            if cm.oopses or wrong or cm.bad():
                raise SystemExit(f"bench_clients: key of {n} sites misbehaved: {checks[n]}")
    finally:
        for cm, _ in machines.values():
            cm.close()
    return res, checks


def report(r) -> str:
    res, checks = r
    rows = [[k, fmt(s.median), fmt_range(s), f"{checks[int(k.split()[0])]['batches']}",
             f"{checks[int(k.split()[0])]['syncs']}"] for k, s in res.items()]
    return ("static-key flips on 4 running vCPUs (median, min-max):\n"
            + table(["key", "flips/s", "range", "batches (all)", "syncs (all)"], rows))


def to_json(r):
    res, checks = r
    return {"flip_rate": {k: s.as_dict() for k, s in res.items()}, "checks": checks}


def main(argv=None) -> int:
    return script_main(argv, __doc__, "clients", run, report, to_json)


if __name__ == "__main__":
    raise SystemExit(main())
