# SPDX-License-Identifier: GPL-2.0-only
"""Patch rate on the sim machine with 4 vCPUs running the workload, and
the sync broadcasts per batch.

    python bench/bench_patch.py [--repeat R] [--quick] [--json] [--clock cpu]

Patch rate: host time of ``with core.batch(): smp_text_poke_batch_add(...)``
for batches of 1, 256 and 10,000 NOP5 <-> JMP32 sites in module text while
4 vCPUs run the workload, reported as sites per second (median, min-max of
the runs; every run flips every site).  Two cases:

* cold: the CPUs run the workload loop, not the sites being patched;
* hot: the workload also calls the sled of sites on every iteration, so
  the CPUs execute the very sites being patched (and trap on their INT3s);
* for comparison, the same batches on textpoke.testing.MemoryMachine (no
  CPU running: the core's own cost), interleaved with the two above.

A run of the 1-site case is several batches (--small-batches), so that
one run is long enough to time.  One untimed warm-up run comes first;
its sample is kept apart in the JSON.

Sync broadcasts (exact counts, not timings): per batch of N sites added in
order and shuffled, against the bound 3*ceil(N/256), with the kernel's
flush-on-disorder (keep_sorted=False) for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from textpoke import JMP32_INSN_OPCODE, RET_INSN_OPCODE, TextPoke, text_gen_insn, x86_nops  # noqa: E402
from textpoke.sim import COARSE, boot_workload                        # noqa: E402
from textpoke.sim._workload import MODULE_BASE                        # noqa: E402
from textpoke.testing import MemoryMachine                             # noqa: E402

import _stats                                                          # noqa: E402

#: The demo's coarse interleaving, but the patcher keeps its turn for up to
#: 512 steps (~80 sites) -- as a patching CPU runs on while the others do.
PATCHER_POLICY = dataclasses.replace(COARSE, task_burst=512)
NCPUS = 4


def _sled_machine(n: int, seed: int = 0, hot: bool = True):
    """4 vCPUs running the workload; with *hot* the workload also calls a
    sled of the n NOP5 sites on every iteration."""
    w = boot_workload(ncpus=NCPUS, seed=seed, policy=PATCHER_POLICY,
                      module_size=max(0x10000, n * 5 + 0x1000))
    core = TextPoke(w.sim)
    sled = x86_nops[5] * n + bytes([RET_INSN_OPCODE])
    w.sim.text_write_early(MODULE_BASE, sled)
    if hot:
        w.sim.mem_write(w.image.sym("sled_fn"), MODULE_BASE.to_bytes(8, "little"))
    w.start()
    w.sim.run(200)
    return w, core, [MODULE_BASE + 5 * i for i in range(n)]


class _Patcher:
    """One machine + TextPoke flipping n NOP5 sites; each run times
    *k* batches of ``with core.batch(): smp_text_poke_batch_add(...)``."""

    def __init__(self, n: int, k: int, case: str) -> None:
        if case == "memory":
            text = x86_nops[5] * n + bytes([RET_INSN_OPCODE])
            self.m = MemoryMachine({MODULE_BASE: text}, ncpus=NCPUS)
            self.w = None
            self.core = TextPoke(self.m)
            addrs = [MODULE_BASE + 5 * i for i in range(n)]
        else:
            self.w, self.core, addrs = _sled_machine(n, hot=(case == "hot"))
            self.m = self.w.sim
        self.forms = ([(a, text_gen_insn(JMP32_INSN_OPCODE, a, a + 5)) for a in addrs],
                      [(a, x86_nops[5]) for a in addrs])
        self.n, self.k, self.i = n, k, 0
        self.int3: list[int] = []
        self.syncs: list[int] = []
        self.insns: list[int] = []

    def _insns(self) -> int:
        return sum(c.instructions for c in self.w.sim.vcpus) if self.w else 0

    def run(self) -> float:
        s = self.core.stats
        i3, sy, ins = s.int3_emulated, s.syncs, self._insns()
        add = self.core.smp_text_poke_batch_add
        total = 0.0
        for _ in range(self.k):
            todo = self.forms[self.i % 2]
            self.i += 1
            t = _stats.now()
            with self.core.batch():
                for a, data in todo:
                    add(a, data)
            total += _stats.now() - t
        self.int3.append(s.int3_emulated - i3)
        self.syncs.append(s.syncs - sy)
        self.insns.append(self._insns() - ins)
        return self.n * self.k / total

    def check(self) -> None:
        if self.w is not None:
            assert not self.w.sim.oopses, self.w.sim.oopses[0]
        last = self.forms[(self.i - 1) % 2]
        assert all(self.m.text_read(a, 5) == d for a, d in last), "text does not hold the last form"


CASES = ("cold", "hot", "memory")


def bench_patch_rate(sizes: list[int], repeat: int, small_batches: int) -> dict:
    """Per size, the three cases interleaved run by run: the sim cold, the
    sim hot, and the same batches on MemoryMachine (the core alone)."""
    out: dict = {c: [] for c in CASES}
    for n in sizes:
        k = small_batches if n == 1 else 1
        ps = {c: _Patcher(n, k, c) for c in CASES}
        series = _stats.interleaved({c: p.run for c, p in ps.items()}, repeat,
                                    units=dict.fromkeys(CASES, "sites/s"))
        for c, p in ps.items():
            p.check()
            out[c].append({"sites": n, "batches_per_run": k, "rate": series[c],
                           "int3_emulated_per_run": p.int3[1:], "syncs_per_run": p.syncs[1:],
                           "guest_instructions_per_run": p.insns[1:]})
    return out


def bench_syncs(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        row = {"sites": n, "bound": 3 * math.ceil(n / 256)}
        for order in ("in-order", "shuffled"):
            for mode, sorted_ in (("textpoke", True), ("kernel", False)):
                w = boot_workload(ncpus=NCPUS, module_size=max(0x10000, n * 5 + 0x1000))
                core = TextPoke(w.sim, keep_sorted=sorted_)
                addrs = [MODULE_BASE + 5 * i for i in range(n)]
                if order == "shuffled":
                    random.Random(n).shuffle(addrs)
                with core.batch():
                    for a in addrs:
                        core.smp_text_poke_batch_add(a, text_gen_insn(JMP32_INSN_OPCODE, a, a + 5))
                row[f"{mode}_{order}"] = core.stats.syncs
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict:
    sizes = [1, 256, 2_000] if args.quick else [1, 256, 10_000]
    sb = getattr(args, "small_batches", None) or (10 if args.quick else 40)
    return {
        **bench_patch_rate(sizes, args.repeat, small_batches=sb),
        "syncs": bench_syncs([1, 16, 256, 1000] if args.quick else [1, 16, 256, 10_000]),
    }


def to_json(res: dict) -> dict:
    out = {k: [dict(r, rate=r["rate"].as_dict()) for r in res[k]] for k in CASES}
    out["syncs"] = res["syncs"]
    return out


def report(res: dict) -> str:
    lines = [f"== patch rate on the sim, {NCPUS} vCPUs running the workload, sites/s (goal >= 50,000)"]
    rows = []
    for case, label in (("cold", "sim, cold"), ("hot", "sim, hot (CPUs run the sites)"),
                        ("memory", "MemoryMachine (core alone)")):
        for r in res[case]:
            rows.append([label, f"{r['sites']:,}", _stats.fmt_range(r["rate"], 0),
                         f"{1e6 / r['rate'].median:,.1f}",
                         f"{sum(r['int3_emulated_per_run']) / max(1, len(r['int3_emulated_per_run'])):,.0f}"])
    lines.append(_stats.table(["case", "sites/batch", "sites/s", "us/site (median)",
                               "INT3s emulated/run"], rows))
    k = res["cold"][0]["batches_per_run"]
    lines.append(f"  a run of the 1-site case is {k} batches; NOP5 <-> JMP32 sites in module text; "
                 "per size the three cases' runs are interleaved")
    lines.append("== sync broadcasts per batch (exact counts; bound 3*ceil(N/256))")
    lines.append(_stats.table(
        ["sites", "bound", "in-order", "shuffled", "kernel in-order", "kernel shuffled"],
        [[f"{r['sites']:,}", r["bound"], r["textpoke_in-order"], r["textpoke_shuffled"],
          r["kernel_in-order"], f"{r['kernel_shuffled']:,}"] for r in res["syncs"]]))
    return "\n".join(lines)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--small-batches", type=int, default=None,
                    help="batches per run in the 1-site case (default 40; --quick: 10)")


def main(argv: list[str] | None = None) -> int:
    return _stats.script_main(argv, __doc__, "patch", run, report, to_json, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
