# SPDX-License-Identifier: GPL-2.0-only
"""Cost of a kprobe hit: INT3 kprobe (boosted, and single-stepped with a
post-handler) vs an optimised kprobe, and a kretprobe.

    python bench/bench_kprobes.py [--repeat R] [--quick] [--json] [--clock cpu]

On the bundled image booted with 4 vCPUs, cpu0 calls the generated
function ``kp_opt_target(3)`` (xor; RIP-relative load; call; lock inc;
add; ret) CALLS times with ``SimMachine.call`` for each configuration:

* guest instructions per hit: instructions executed per call (counted by a
  Unicorn code hook) minus those of the unprobed function, and the INT3
  traps per hit (each one a round trip into the host);
* host µs per hit: wall time per call minus the unprobed call's, median and
  min-max of --repeat >= 5 rounds, the configurations interleaved.

Afterwards every configuration must have returned 3 + 1007 on every call
and the handler must have run once per call.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import fmt, fmt_range, interleaved, now, script_main, table  # noqa: E402
from unicorn import UC_HOOK_CODE  # noqa: E402

from textpoke._kprobes._guest import HELPER_ADD, OPT_K, build_guest_functions  # noqa: E402
from textpoke.sim import ClientMachine  # noqa: E402

CONFIGS = ("none", "int3 (boosted)", "int3 + post (single-step)", "optimised", "kretprobe")


class Rig:
    def __init__(self) -> None:
        self.cm = ClientMachine(cpus=4, seed=1)
        self.kp = self.cm.kernel.kprobes
        self.g = build_guest_functions(self.kp, self.cm.sim)
        self.fn = self.g.addr("kp_opt_target")
        self.handled = 0
        self.wrong = 0
        self.probe = None
        self.rp = None

    def _h(self, *a) -> None:
        self.handled += 1

    def arm(self, cfg: str) -> None:
        kp = self.kp
        if cfg == "int3 (boosted)":
            self.probe = kp.register_kprobe("kp_opt_target", self._h)
        elif cfg == "int3 + post (single-step)":
            self.probe = kp.register_kprobe("kp_opt_target", self._h, lambda *a: None)
        elif cfg == "optimised":
            self.probe = kp.register_kprobe("kp_opt_target", self._h)
            kp.optimize_kprobe(self.probe)
        elif cfg == "kretprobe":
            self.rp = kp.register_kretprobe("kp_opt_target", self._h)

    def disarm(self) -> None:
        if self.probe is not None:
            self.kp.unregister_kprobe(self.probe)
        if self.rp is not None:
            self.kp.unregister_kretprobe(self.rp)
        self.probe = self.rp = None

    def calls(self, n: int) -> None:
        sim = self.cm.sim
        for _ in range(n):
            if sim.call(self.fn, 3) != 3 + OPT_K + HELPER_ADD:
                self.wrong += 1

    def count_insns(self, n: int) -> tuple[float, float]:
        """(guest instructions per call, traps per call) on cpu0."""
        c = self.cm.sim.vcpus[0]
        cnt = [0]

        def hook(uc, addr, size, user):
            cnt[0] += 1
        traps0 = self.kp.stats.hits + self.kp.stats.single_stepped + \
            self.kp.stats.detour_hits + self.kp.stats.ret_hits
        h = c.uc.hook_add(UC_HOOK_CODE, hook)
        try:
            self.calls(n)
        finally:
            c.uc.hook_del(h)
        traps = self.kp.stats.hits + self.kp.stats.single_stepped + self.kp.stats.detour_hits \
            + self.kp.stats.ret_hits - traps0
        return cnt[0] / n, traps / n


def run(args):
    ncalls = 50 if args.quick else 200
    rig = Rig()
    try:
        insns = {}
        for cfg in CONFIGS:
            rig.arm(cfg)
            insns[cfg] = rig.count_insns(20)
            rig.disarm()

        def piece(cfg):
            def f():
                rig.arm(cfg)
                t0 = now()
                rig.calls(ncalls)
                dt = now() - t0
                rig.disarm()
                return dt / ncalls
            return f
        res = interleaved({cfg: piece(cfg) for cfg in CONFIGS}, args.repeat,
                          units={c: "s/call" for c in CONFIGS})
        expected_handled = (len(CONFIGS) - 1) * (20 + ncalls * (args.repeat + 1))   # + the warm-up round
        checks = {"wrong_results": rig.wrong, "handled": rig.handled,
                  "expected_handled": expected_handled, "oopses": rig.cm.oopses}
        if rig.wrong or rig.cm.oopses or rig.handled != expected_handled:
            raise SystemExit(f"bench_kprobes: misbehaved: {checks}")
    finally:
        rig.kp.close()
        rig.cm.close()
    return insns, res, checks


def report(r) -> str:
    insns, res, checks = r
    base_i = insns["none"][0]
    base_t = res["none"].median
    rows = []
    for cfg in CONFIGS:
        i, traps = insns[cfg]
        s = res[cfg]
        rows.append([cfg, f"{i:.0f}", f"{i - base_i:+.0f}" if cfg != "none" else "-",
                     f"{traps:.0f}", fmt(s.median * 1e6), fmt_range(s, scale=1e-6),
                     fmt((s.median - base_t) * 1e6) if cfg != "none" else "-"])
    return ("kprobe hit cost, kp_opt_target(3) called by cpu0 (median, min-max):\n"
            + table(["probe", "guest insns/call", "per hit", "traps/hit", "host µs/call",
                     "range (µs)", "host µs/hit"], rows)
            + f"\n  checks: {checks}")


def to_json(r):
    insns, res, checks = r
    return {"guest_insns_per_call": {k: v[0] for k, v in insns.items()},
            "traps_per_hit": {k: v[1] for k, v in insns.items()},
            "host_s_per_call": {k: s.as_dict() for k, s in res.items()}, "checks": checks}


def main(argv=None) -> int:
    return script_main(argv, __doc__, "kprobes", run, report, to_json)


if __name__ == "__main__":
    raise SystemExit(main())
