# SPDX-License-Identifier: GPL-2.0-only
"""textpoke benchmarks: figures side by side in one run.

    python bench/run_all.py [--quick] [--json]

1. guest speed: 4 vCPUs free-running the workload on the sim machine vs the
   same code on one raw Unicorn instance (both with and without instruction
   counting);
2. patch rate: host time per site for batches of 1, 16, 256 and 10,000 NOP5
   sites that 4 running vCPUs execute while they change;
3. sync broadcasts per batch, in-order and shuffled input, against
   3*ceil(N/256), with the kernel's flush-on-disorder for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc          # noqa: E402
from unicorn import x86_const as X                                    # noqa: E402

from textpoke import RET_INSN_OPCODE, TextPoke, text_gen_insn, x86_nops  # noqa: E402
from textpoke.sim import COARSE, FREE, boot_workload                  # noqa: E402
from textpoke.sim._workload import MODULE_BASE, PERCPU_BASE           # noqa: E402


def _raw_uc(w):
    """One plain Unicorn instance holding the same image and memory."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    keep = []
    for r in w.sim._text + w.sim._data:
        buf = (ctypes.c_ubyte * r.size)()
        ctypes.memmove(buf, r.buf, r.size)
        keep.append(buf)
        uc.mem_map_ptr(r.start, r.size, UC_PROT_ALL, buf)
    uc.reg_write(X.UC_X86_REG_RBX, PERCPU_BASE)
    uc.reg_write(X.UC_X86_REG_RSP, w.sim.stack_base + w.sim.stack_size - 64)
    return uc, keep


def _insns_per_iteration(w) -> float:
    """Count instructions of two loop iterations by single-stepping."""
    uc, _keep = _raw_uc(w)
    top = w.image.sym("workload_main")
    uc.reg_write(X.UC_X86_REG_R15, 1000)
    rip, n, it = top, 0, 0
    while it < 2:
        uc.emu_start(rip, 0, count=1)
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        n += 1
        if rip == top:
            it += 1
    return n / 2


def bench_guest_speed(iters_per_cpu: int) -> dict:
    w = boot_workload(ncpus=4, policy=FREE)
    per_iter = _insns_per_iteration(w)
    quantum = 4096
    w.sim.mem_write(w.image.sym("preempt_iters"), quantum.to_bytes(8, "little"))
    w.start()
    for c in w.sim.vcpus:
        c.set_reg("r15", quantum)
    w.sim.run_until(lambda: all(w.iterations(c) >= quantum for c in w.sim.cpus), 10**6)  # warm up
    start = sum(w.iterations(c) for c in w.sim.cpus)
    t = time.perf_counter()
    w.sim.run_until(lambda: all(w.iterations(c) >= iters_per_cpu for c in w.sim.cpus), 10**9)
    sim_t = time.perf_counter() - t
    sim_insns = (sum(w.iterations(c) for c in w.sim.cpus) - start) * per_iter

    # raw: the same code on one instance, one emu_start for all the work
    uc, _keep = _raw_uc(w)
    top, stop = w.image.sym("workload_main"), w.image.sym("preempt_point")
    uc.reg_write(X.UC_X86_REG_R15, quantum)
    uc.emu_start(top, stop)                                                            # warm up
    total_iters = 4 * iters_per_cpu
    uc.reg_write(X.UC_X86_REG_R15, total_iters)
    t = time.perf_counter()
    uc.emu_start(top, stop)
    raw_t = time.perf_counter() - t
    raw_insns = total_iters * per_iter

    # counted slices (the adversarial scheduler's mode) vs raw counted
    w2 = boot_workload(ncpus=4, policy=COARSE)
    w2.start()
    n_steps = 20000
    t = time.perf_counter()
    w2.sim.run(n_steps)
    cnt_t = time.perf_counter() - t
    cnt_insns = sum(c.instructions for c in w2.sim.vcpus)
    uc2, _k2 = _raw_uc(w2)
    uc2.reg_write(X.UC_X86_REG_R15, 1 << 40)
    t = time.perf_counter()
    uc2.emu_start(w2.image.sym("workload_main"), 0, count=int(cnt_insns))
    rawc_t = time.perf_counter() - t
    return {
        "insns_per_iteration": per_iter,
        "sim_free_ips": sim_insns / sim_t, "raw_free_ips": raw_insns / raw_t,
        "free_ratio": (sim_insns / sim_t) / (raw_insns / raw_t),
        "sim_counted_ips": cnt_insns / cnt_t, "raw_counted_ips": cnt_insns / rawc_t,
        "counted_ratio": (cnt_insns / cnt_t) / (cnt_insns / rawc_t),
    }


#: The demo's coarse interleaving, but the patcher keeps its turn for up to
#: 512 steps (~80 sites) -- as a patching CPU runs on while the others do.
PATCHER_POLICY = dataclasses.replace(COARSE, task_burst=512)


def _sled_machine(n: int, seed: int = 0, hot: bool = True):
    """4 vCPUs running the workload; with *hot* the workload also calls a
    sled of the n NOP5 sites on every iteration, so they run the code that
    is being patched."""
    w = boot_workload(ncpus=4, seed=seed, policy=PATCHER_POLICY, module_size=max(0x10000, n * 5 + 0x1000))
    core = TextPoke(w.sim)
    sled = x86_nops[5] * n + bytes([RET_INSN_OPCODE])
    w.sim.text_write_early(MODULE_BASE, sled)
    if hot:
        w.sim.mem_write(w.image.sym("sled_fn"), MODULE_BASE.to_bytes(8, "little"))
    w.start()
    w.sim.run(200)
    return w, core, [MODULE_BASE + 5 * i for i in range(n)]


def bench_patch_rate(sizes: list[int], repeats: int, hot: bool) -> list[dict]:
    rows = []
    for n in sizes:
        w, core, addrs = _sled_machine(n, hot=hot)
        jmp = {a: text_gen_insn(0xE9, a, a + 5) for a in addrs}
        best = math.inf
        flips = 0
        for r in range(repeats):
            t = time.perf_counter()
            with core.batch():
                for a in addrs:
                    core.smp_text_poke_batch_add(a, jmp[a] if r % 2 == 0 else x86_nops[5])
            best = min(best, time.perf_counter() - t)
            flips += 1
        assert not w.sim.oopses, w.sim.oopses[0]
        rows.append({"sites": n, "seconds_per_batch": best, "us_per_site": best / n * 1e6,
                     "sites_per_s": n / best, "int3_emulated": core.stats.int3_emulated,
                     "cpu_instructions": sum(c.instructions for c in w.sim.vcpus)})
    return rows


def bench_syncs(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        row = {"sites": n, "bound": 3 * math.ceil(n / 256)}
        for order in ("in-order", "shuffled"):
            for mode, sorted_ in (("textpoke", True), ("kernel", False)):
                w = boot_workload(ncpus=4, module_size=max(0x10000, n * 5 + 0x1000))
                core = TextPoke(w.sim, keep_sorted=sorted_)
                addrs = [MODULE_BASE + 5 * i for i in range(n)]
                if order == "shuffled":
                    random.Random(n).shuffle(addrs)
                with core.batch():
                    for a in addrs:
                        core.smp_text_poke_batch_add(a, text_gen_insn(0xE9, a, a + 5))
                row[f"{mode}_{order}"] = core.stats.syncs
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (for a smoke test)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    q = args.quick
    res = {
        "guest_speed": bench_guest_speed(16_000 if q else 80_000),
        "patch_rate": bench_patch_rate([1, 16, 256] if q else [1, 16, 256, 10_000], 2 if q else 6,
                                       hot=False),
        "patch_rate_hot": bench_patch_rate([1, 16, 256] if q else [1, 16, 256, 10_000],
                                           2 if q else 3, hot=True),
        "syncs": bench_syncs([1, 16, 256, 1000] if q else [1, 16, 256, 10_000]),
    }
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
        return 0
    g = res["guest_speed"]
    print("== guest instructions per second, 4 vCPUs (workload: "
          f"{g['insns_per_iteration']:.1f} instructions per loop iteration)")
    print(f"  free-running   sim {g['sim_free_ips'] / 1e6:8.1f} M/s   raw Unicorn {g['raw_free_ips'] / 1e6:8.1f} M/s"
          f"   ratio {g['free_ratio']:.2f}")
    print(f"  counted slices sim {g['sim_counted_ips'] / 1e6:8.1f} M/s   raw Unicorn {g['raw_counted_ips'] / 1e6:8.1f} M/s"
          f"   ratio {g['counted_ratio']:.2f}")
    for key, what in (("patch_rate", "4 vCPUs running the workload, sites in module text"),
                      ("patch_rate_hot", "4 vCPUs executing the very sites being patched")):
        print(f"== host time per patched site: {what} (best of runs)")
        print(f"  {'sites':>7} {'ms/batch':>10} {'us/site':>9} {'sites/s':>10} {'INT3s emulated':>15}")
        for r in res[key]:
            print(f"  {r['sites']:>7} {r['seconds_per_batch'] * 1e3:>10.2f} {r['us_per_site']:>9.1f} "
                  f"{r['sites_per_s']:>10,.0f} {r['int3_emulated']:>15,}")
    print("== sync broadcasts per batch (bound 3*ceil(N/256))")
    print(f"  {'sites':>7} {'bound':>6} {'in-order':>9} {'shuffled':>9} {'kernel in-order':>16} {'kernel shuffled':>16}")
    for r in res["syncs"]:
        print(f"  {r['sites']:>7} {r['bound']:>6} {r['textpoke_in-order']:>9} {r['textpoke_shuffled']:>9} "
              f"{r['kernel_in-order']:>16} {r['kernel_shuffled']:>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
