# SPDX-License-Identifier: GPL-2.0-only
"""Guest speed: the sim's 4 vCPUs against raw Unicorn doing the same work
under the same conditions, interleaved in one run.

    python bench/bench_guest.py [--repeat N] [--quick] [--json]

The fair baseline ("raw, same set-up") is what the sim would be with its
scheduler and bookkeeping taken out:

* 4 Unicorn instances, one per vCPU, run round-robin;
* the sim's own memory layout and protections: each instance has a private
  copy of text mapped read+exec (the sim's per-vCPU views), and the data
  regions (rodata read-only, data/percpu/stacks read-write) are one buffer
  mapped into every instance, as in the sim;
* the same hook: a ``UC_HOOK_INTR`` hook on every instance;
* the same ``emu_start`` calls: free-running, run to the guest's preemption
  point (``until``) and, when sitting on it, one counted instruction; in
  the counted-slice modes (COARSE: 20-400 instructions per slice, the
  demo's; FINE: 1-8, verify's) the very same sequence of (vCPU, count)
  slices the sim's seeded scheduler draws, replayed (and checked: per-CPU
  instruction totals must match).

The previous baseline is kept as a third column for comparison ("raw, old
set-up"): one instance, every page mapped UC_PROT_ALL (data executable --
which costs raw Unicorn about a quarter), no hook, one emu_start for all
the work.  It is not a fair baseline; it is what the README's 1.45 was
measured against.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from unicorn import (UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC,  # noqa: E402
                     UC_PROT_READ, UC_PROT_WRITE, Uc)
from unicorn import x86_const as X                                    # noqa: E402

from textpoke.sim import COARSE, FINE, FREE, boot_workload                 # noqa: E402
from textpoke.sim._workload import PERCPU_BASE, PERCPU_STRIDE         # noqa: E402

import _stats                                                          # noqa: E402

NCPUS = 4
QUANTUM = 4096          # guest iterations between preemption points (free-running)
SEED = 1


class RawCpus:
    """*n* plain Unicorn instances holding the memory of *w* (a booted,
    never-started workload machine) as the sim maps it."""

    def __init__(self, w, n: int = NCPUS, *, fair: bool = True) -> None:
        self.w = w
        self.ucs: list[Uc] = []
        self.keep: list = []
        self.pending = [None] * n
        sim = w.sim
        for cpu in range(n):
            uc = Uc(UC_ARCH_X86, UC_MODE_64)
            for r in sim._text:
                view = (ctypes.c_ubyte * r.size)()
                ctypes.memmove(view, r.buf, r.size)
                self.keep.append(view)
                uc.mem_map_ptr(r.start, r.size, (UC_PROT_READ | UC_PROT_EXEC) if fair else UC_PROT_ALL,
                               view)
            for r in sim._data:
                if fair:
                    prot = UC_PROT_READ | (UC_PROT_WRITE if r.writable else 0)
                    uc.mem_map_ptr(r.start, r.size, prot, r.buf)
                else:   # the old baseline: a private copy, everything RWX
                    buf = (ctypes.c_ubyte * r.size)()
                    ctypes.memmove(buf, r.buf, r.size)
                    self.keep.append(buf)
                    uc.mem_map_ptr(r.start, r.size, UC_PROT_ALL, buf)
            if fair:
                uc.hook_add(UC_HOOK_INTR, self._on_intr, cpu)
            uc.reg_write(X.UC_X86_REG_RSP, sim.stack_base + (cpu + 1) * sim.stack_size - 64)
            uc.reg_write(X.UC_X86_REG_RBX, PERCPU_BASE + cpu * PERCPU_STRIDE)
            uc.reg_write(X.UC_X86_REG_R12, 0)
            uc.reg_write(X.UC_X86_REG_R15, 16)
            uc.reg_write(X.UC_X86_REG_RIP, w.loop_top)
            self.ucs.append(uc)
        self.instructions = [0] * n

    def _on_intr(self, uc: Uc, intno: int, cpu: int) -> None:   # as VCpu._on_intr
        self.pending[cpu] = intno
        uc.emu_stop()

    def iterations(self, cpu: int) -> int:
        if self.ucs[cpu].reg_read(X.UC_X86_REG_RBX) != PERCPU_BASE + cpu * PERCPU_STRIDE:
            raise AssertionError("rbx clobbered")
        return self.w.iterations(cpu)

    def run_free(self, iters: int) -> int:
        """Round-robin slices to the preemption point until every instance
        has run *iters* more iterations; returns the iterations done."""
        pp = self.w.sim.preempt_addr
        start = [self.w.iterations(c) for c in range(len(self.ucs))]
        goal = [s + iters for s in start]
        rip_reg = X.UC_X86_REG_RIP
        ucs = self.ucs
        it = self.w.iterations
        while True:
            for uc in ucs:
                rip = uc.reg_read(rip_reg)
                until, count = (pp, 0) if rip != pp else (0, 1)
                uc.emu_start(rip, until, count=count)
            if all(it(c) >= goal[c] for c in range(len(ucs))):
                break
        return sum(it(c) for c in range(len(ucs))) - sum(start)

    def run_slices(self, slices: list[tuple[int, int]]) -> None:
        """The given (cpu, count) slices, in order."""
        rip_reg = X.UC_X86_REG_RIP
        ucs = self.ucs
        for cpu, count in slices:
            uc = ucs[cpu]
            uc.emu_start(uc.reg_read(rip_reg), 0, count=count)
        for cpu, count in slices:
            self.instructions[cpu] += count
        if any(p is not None for p in self.pending):
            raise AssertionError(f"raw baseline took an interrupt: {self.pending}")


class CoarseSchedule:
    """The (cpu, count) slices the sim's scheduler draws under *policy* with
    every vCPU running, no task, no stale line and no IPI: per decision
    ``random() < refresh_prob`` (no stale line: nothing refilled), then
    ``randrange(ncpus)``, then ``randint(slice_min, slice_max)``.  A replay
    of SimMachine.step(); checked against the sim's per-CPU counts."""

    def __init__(self, seed: int, policy=COARSE, n: int = NCPUS) -> None:
        self.rng = random.Random(seed)
        self.p, self.n = policy, n

    def next(self, steps: int) -> list[tuple[int, int]]:
        rng, p = self.rng, self.p
        out = []
        for _ in range(steps):
            if p.refresh_prob:
                rng.random()
            cpu = rng.randrange(self.n)
            out.append((cpu, p.slice_min if p.slice_min == p.slice_max
                        else rng.randint(p.slice_min, p.slice_max)))
        return out


def _insns_per_iteration(w) -> float:
    """Instructions of one loop iteration (mean of two: the Jcc site goes
    the other way on odd iterations), by single-stepping a private copy."""
    raw = RawCpus(w, 1, fair=False)
    uc = raw.ucs[0]
    uc.reg_write(X.UC_X86_REG_R15, 1000)
    top = w.loop_top
    rip, n, it = top, 0, 0
    while it < 2:
        uc.emu_start(rip, 0, count=1)
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        n += 1
        if rip == top:
            it += 1
    return n / 2


def _free_machine():
    w = boot_workload(ncpus=NCPUS, policy=FREE)
    w.sim.mem_write(w.image.sym("preempt_iters"), QUANTUM.to_bytes(8, "little"))
    return w


def bench_guest_speed(repeat: int, iters_per_cpu: int, counted_steps: int, chunks: int = 8) -> dict:
    """Each run: *chunks* pieces per side, alternated piece by piece, of
    iters_per_cpu/chunks iterations per vCPU (free-running) and
    counted_steps/chunks scheduler decisions (counted)."""
    iters_per_chunk = max(1, iters_per_cpu // chunks)
    steps_per_chunk = max(1, counted_steps // chunks)
    # ---------------------------------------------------- free-running
    w = _free_machine()
    per_iter = _insns_per_iteration(w)
    w.start()
    for c in w.sim.vcpus:
        c.set_reg("r15", QUANTUM)
    wr = _free_machine()                      # the baselines' memory: never started as a sim
    fair = RawCpus(wr)
    for uc in fair.ucs:
        uc.reg_write(X.UC_X86_REG_R15, QUANTUM)
    wo = _free_machine()
    old = RawCpus(wo, 1, fair=False)
    old_uc = old.ucs[0]
    top, stop = wo.loop_top, wo.sim.preempt_addr

    def sim_free() -> tuple[float, float]:
        sim = w.sim
        start = [w.iterations(c) for c in sim.cpus]
        goal = [s + iters_per_chunk for s in start]
        t = _stats.now()
        ok = sim.run_until(lambda: all(w.iterations(c) >= goal[c] for c in sim.cpus), 10**9)
        dt = _stats.now() - t
        assert ok and not sim.oopses
        return (sum(w.iterations(c) for c in sim.cpus) - sum(start)) * per_iter, dt

    def raw_fair_free() -> tuple[float, float]:
        t = _stats.now()
        n = fair.run_free(iters_per_chunk)
        return n * per_iter, _stats.now() - t

    def raw_old_free() -> tuple[float, float]:
        total = NCPUS * iters_per_chunk
        old_uc.reg_write(X.UC_X86_REG_R15, total)
        t = _stats.now()
        old_uc.emu_start(top, stop)
        return total * per_iter, _stats.now() - t

    free = _stats.interleaved_rates({"sim": sim_free, "raw_same_setup": raw_fair_free,
                                     "raw_old_setup": raw_old_free}, repeat, chunks=chunks,
                                    units={k: "instructions/s" for k in ("sim", "raw_same_setup", "raw_old_setup")})
    slices_free = {"sim_slices": sum(c.slices for c in w.sim.vcpus)}

    counted = _counted(COARSE, steps_per_chunk, repeat, chunks)
    fine = _counted(FINE, steps_per_chunk, repeat, chunks)

    def ratios(series: dict) -> dict:
        return {"sim/raw_same_setup": _stats.paired_ratios("sim/raw_same_setup", series["sim"],
                                                            series["raw_same_setup"]),
                "sim/raw_old_setup": _stats.paired_ratios("sim/raw_old_setup", series["sim"],
                                                           series["raw_old_setup"])}

    return {
        "insns_per_iteration": per_iter,
        "free": {"work": f"{iters_per_chunk * chunks} iterations per vCPU per run in {chunks} pieces "
                         f"alternated with the baselines', preemption point every {QUANTUM} iterations", "series": free, "ratios": ratios(free), **slices_free},
        "counted": dict(counted, ratios=ratios(counted["series"])),
        "fine": dict(fine, ratios=ratios(fine["series"])),
    }


def _counted(policy, steps_per_chunk: int, repeat: int, chunks: int) -> dict:
    """Counted slices under *policy* (the scheduler draws every slice's
    length): the sim, the same slices replayed on the raw instances, and
    the old baseline (one emu_start of the same number of instructions,
    on average)."""
    w2 = boot_workload(ncpus=NCPUS, policy=policy, seed=SEED)
    w2.start()
    wr2 = boot_workload(ncpus=NCPUS, policy=policy, seed=SEED)
    fair2 = RawCpus(wr2)
    sched = CoarseSchedule(SEED, policy)
    wo2 = boot_workload(ncpus=NCPUS, policy=policy, seed=SEED)
    old2 = RawCpus(wo2, 1, fair=False)
    old2.ucs[0].reg_write(X.UC_X86_REG_R15, 1 << 40)

    def sim_counted() -> tuple[float, float]:
        before = sum(c.instructions for c in w2.sim.vcpus)
        t = _stats.now()
        w2.sim.run(steps_per_chunk)
        dt = _stats.now() - t
        assert not w2.sim.oopses
        return sum(c.instructions for c in w2.sim.vcpus) - before, dt

    def raw_fair_counted() -> tuple[float, float]:
        slices = sched.next(steps_per_chunk)
        t = _stats.now()
        fair2.run_slices(slices)
        return sum(n for _, n in slices), _stats.now() - t

    old_n = steps_per_chunk * (policy.slice_min + policy.slice_max) // 2   # the same work, on average

    def raw_old_counted() -> tuple[float, float]:
        uc = old2.ucs[0]
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        t = _stats.now()
        uc.emu_start(rip, 0, count=old_n)
        return old_n, _stats.now() - t

    series = _stats.interleaved_rates({"sim": sim_counted, "raw_same_setup": raw_fair_counted,
                                       "raw_old_setup": raw_old_counted}, repeat, chunks=chunks,
                                      units={k: "instructions/s" for k in ("sim", "raw_same_setup", "raw_old_setup")})
    sim_per_cpu = [c.instructions for c in w2.sim.vcpus]
    return {"work": f"{steps_per_chunk * chunks} scheduler decisions per run in {chunks} pieces "
                    f"(slices of {policy.slice_min}-{policy.slice_max} instructions)",
            "series": series,
            "slice_pattern_matches": sim_per_cpu == fair2.instructions,
            "sim_instructions_per_cpu": sim_per_cpu,
            "raw_instructions_per_cpu": list(fair2.instructions)}


MODES = {"free": "free-running", "counted": "counted, COARSE", "fine": "counted, FINE"}


def to_json(res: dict) -> dict:
    out = {"insns_per_iteration": res["insns_per_iteration"]}
    for mode in MODES:
        m = dict(res[mode])
        m["series"] = {k: s.as_dict() for k, s in m["series"].items()}
        m["ratios"] = {k: s.as_dict() for k, s in m["ratios"].items()}
        out[mode] = m
    return out


def report(res: dict) -> str:
    lines = [f"== guest speed, {NCPUS} vCPUs, M instructions/s (workload: "
             f"{res['insns_per_iteration']:.1f} instructions per iteration); runs interleaved"]
    rows = []
    for mode, label in MODES.items():
        s, r = res[mode]["series"], res[mode]["ratios"]
        rows.append([label, _stats.fmt_range(s["sim"], 2, 1e6),
                     _stats.fmt_range(s["raw_same_setup"], 2, 1e6),
                     _stats.fmt_range(r["sim/raw_same_setup"], 3),
                     _stats.fmt_range(s["raw_old_setup"], 1, 1e6),
                     _stats.fmt_range(r["sim/raw_old_setup"], 2)])
    lines.append(_stats.table(["mode", "sim", "raw, same set-up", "sim/raw (fair)",
                               "raw, old set-up", "sim/old"], rows))
    for mode, label in MODES.items():
        lines.append(f"  {label}: {res[mode]['work']}")
        if mode != "free" and not res[mode]["slice_pattern_matches"]:
            lines.append("  WARNING: the replayed slice pattern does not match the sim's per-CPU "
                         f"counts ({res[mode]['sim_instructions_per_cpu']} vs "
                         f"{res[mode]['raw_instructions_per_cpu']}): the sim's scheduler draws "
                         "changed; update CoarseSchedule")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    q = args.quick
    return bench_guest_speed(args.repeat, 8_000 if q else 32_000, 4_000 if q else 16_000)


def main(argv: list[str] | None = None) -> int:
    return _stats.script_main(argv, __doc__, "guest_speed", run, report, to_json)


if __name__ == "__main__":
    raise SystemExit(main())
