# SPDX-License-Identifier: GPL-2.0-only
"""The live machine: traps serviced in the tracer, and toggling a hot site.

    python bench/bench_live_traps.py [--repeat R] [--quick] [--json] [--toggles N]

Every run starts a fresh copy of tests/live_targets/hot.c (built with gcc)
with 4 threads calling 8 patch sites in a hot loop, attaches a LiveMachine
and measures:

* **traps/s** and **us per trapped hit** (emulate): an INT3 is left on the
  hot NOP5 site ``j0`` for a window; a handler on the machine's trap chain
  emulates the NOP (resume at site+5) for every hit.  traps/s = hits
  serviced / window; us/hit = window / hits (the tracer is the bottleneck:
  this is its whole cost per hit: waitid, GETREGS, GETSIGINFO, the chain,
  SETREGS, CONT);
* **toggle time of one hot site**, ``park`` vs ``emulate``: the time of one
  batch switching ``j0`` (NOP5 <-> JMP32) while the 4 threads hammer it,
  per toggle, over --toggles toggles per run;
* **10,000 toggles of all 8 hot sites** (the survival figure; --quick:
  1,000): time per toggle, and the target's counters must show both
  variants ran at every site and the target exits 0.

Figures: median (min-max) of --repeat >= 5 runs, park and emulate
interleaved run by run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import _stats                                                          # noqa: E402
from textpoke import TextPoke, TrapPriority                            # noqa: E402
from textpoke.lowlevel import WaitUntil                                # noqa: E402
from textpoke.live import LiveMachine                                  # noqa: E402
from test_live_machine import Target, live_skip_reason                 # noqa: E402


def trap_rate(window: float) -> tuple[float, float]:
    t = Target(4)
    try:
        with LiveMachine(t.pid, trap_policy="emulate") as m, TextPoke(m) as core:
            site = t.sites["j0"][0]

            def nop5(regs):                     # a kprobe-like handler: run the NOP
                if regs.ip - 1 != site:
                    return False
                regs.ip = site + 5
                return True
                yield
            m.register_trap_handler(nop5, priority=TrapPriority.KPROBES)
            with core.text_mutex:
                core.text_poke(site, b"\xcc")
            n0 = m.stats.traps
            t0 = time.perf_counter()
            end = t0 + window

            def wait():
                yield WaitUntil(lambda: time.perf_counter() >= end, "the window")
            m.run_task(wait())
            dt = time.perf_counter() - t0
            hits = m.stats.traps - n0
            with core.text_mutex:
                core.smp_text_poke_single(site, t.old("j0"))
        rc, _, _ = t.finish()
        assert rc == 0, rc
        return hits / dt, dt / max(hits, 1) * 1e6
    finally:
        t.kill()


def hot_toggles(policy: str, names: list[str] | None, n: int) -> tuple[float, dict]:
    """Seconds per toggle; the target's counters afterwards."""
    t = Target(4)
    try:
        names = names or t.hot()
        with LiveMachine(t.pid, trap_policy=policy) as m, TextPoke(m) as core:
            t0 = time.perf_counter()
            for i in range(n):
                with core.batch():
                    for s in names:
                        core.smp_text_poke_batch_add(t.sites[s][0], t.new(s) if i % 2 == 0 else t.old(s))
            dt = time.perf_counter() - t0
        rc, counts, _ = t.finish()
        assert rc == 0, rc
        return dt / n, {"counts": counts, "stats": m.stats.as_dict()}
    finally:
        t.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _stats.add_common_args(ap)
    ap.add_argument("--toggles", type=int, default=None, help="toggles of the hot site per run")
    args = ap.parse_args(argv)
    _stats.setup(args)
    reason = live_skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    window = 0.25 if args.quick else 1.0
    toggles = args.toggles or (100 if args.quick else 500)
    big = 1000 if args.quick else 10_000
    rates, costs = _stats.Series("traps/s", "1/s"), _stats.Series("us per trapped hit", "us")
    for r in range(1 + args.repeat):
        rate, us = trap_rate(window)
        if r:
            rates.samples.append(rate)
            costs.samples.append(us)
    extra: dict = {}

    def one(policy):
        def f():
            sec, info = hot_toggles(policy, ["j0"], toggles)
            extra.setdefault(policy, []).append(info["stats"])
            return sec * 1e3
        return f
    tog = _stats.interleaved({"park": one("park"), "emulate": one("emulate")}, args.repeat,
                             units={"park": "ms", "emulate": "ms"})
    survive = {}
    for policy in ("park", "emulate"):
        sec, info = hot_toggles(policy, None, big)
        both = all(o > 0 and nw > 0 for o, nw in info["counts"].values())
        survive[policy] = {"ms_per_toggle": sec * 1e3, "toggles": big, "both_variants": both,
                           "stats": info["stats"]}
    m = _stats.meta(args)
    if args.json:
        print(json.dumps({"meta": m, "traps_per_s": rates.samples, "us_per_hit": costs.samples,
                          "toggle_ms": {k: v.samples for k, v in tog.items()},
                          "survive": survive}, indent=1))
        return 0
    print("live machine: traps and hot-site toggles (4 busy threads; " + _stats.meta_line(m) + ")")
    rows = [["traps serviced (emulate)", _stats.fmt_range(rates, 0), "/s"],
            ["cost of a trapped, emulated hit", _stats.fmt_range(costs, 1), "us"]]
    for k in ("park", "emulate"):
        rows.append([f"toggle of one hot site, {k}", _stats.fmt_range(tog[k], 2), "ms"])
    print(_stats.table(["figure", "median (min-max, n)", "unit"], rows))
    for k, v in survive.items():
        print(f"  {big} toggles of 8 hot sites, {k}: {v['ms_per_toggle']:.2f} ms/toggle, "
              f"both variants ran at every site: {v['both_variants']}, "
              f"traps parked {v['stats']['traps_parked']}, emulated {v['stats']['traps_emulated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
