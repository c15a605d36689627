# SPDX-License-Identifier: GPL-2.0-only
"""The live machine against GDB: switching fentry sites of a running
4-thread process, counting calls, and what a counted call costs.

    python bench/bench_live.py [--repeat R] [--quick] [--json] [--no-gdb]

Target: tests/live_targets/count (10,000 functions built with gcc -pg
-mfentry -mnop-mcount -mrecord-mcount; 4 threads calling every function
in a hot loop, "busy" mode), one process for the whole run.

* **switch N sites** (N = 1, 100, 10,000), attach to detach: attach a
  LiveMachine, switch the fentry sites of the first N functions from NOP5
  to ``call fentry_ret`` in one batch, switch them back in another, detach
  -- for ``--strategy int3`` and ``stop-machine``.  The peer, side by side
  and interleaved round by round: ``gdb -nx -p PID -batch -x FILE`` where
  FILE is ``break fNNNNN`` for the same N functions, then ``detach`` -- the
  issue's GDB figure.  Note what GDB does there: it stops every thread,
  resolves the N locations and detaches; it writes an INT3 only when the
  inferior resumes, which it never does, so its figure is a lower bound of
  GDB inserting breakpoints.  (With ``set breakpoint always-inserted on``
  it writes each at once, but re-inserts all of them after every ``break``:
  one observation here, 10,000 breakpoints, took 162 s.)  The ratio is per
  round.
* **live count** on 10,000 functions, attach to detach: the time attached
  (map the stubs, switch on, detach; attach, switch off, free, detach),
  the window (0.2 s) excluded.
* **a counted call**: a one-thread program calling one instrumented
  function in a loop, reporting ns per call for 2,000,000-call rounds;
  rounds unpatched and rounds with the site switched to its counting stub,
  alternated.

The host has few cores and the target's 4 busy threads compete with the
patcher for them (as they would in production); every figure is the
median of >= 5 runs with min-max.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests" / "live_targets" / "count"))

import _stats                                                  # noqa: E402
from helpers import Target, gen, ptrace_skip_reason            # noqa: E402

CALL_BENCH_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <time.h>
__attribute__((noinline)) void hot(void) { __asm__ volatile(""); }
__attribute__((no_instrument_function)) static double now(void)
{ struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
__attribute__((no_instrument_function)) int main(void)
{
	printf("ready\n"); fflush(stdout);
	for (;;) {
		double t0 = now();
		for (int i = 0; i < 2000000; i++)
			hot();
		printf("%.3f\n", (now() - t0) * 1e9 / 2000000); fflush(stdout);
	}
}
"""


def _switch_once(pid: int, addrs: list[int], target: int, strategy: str) -> float:
    from textpoke import CALL_INSN_OPCODE, text_gen_insn
    from textpoke.live._count import switch_sites
    from textpoke.live._fentry import NOP5
    from textpoke.live import LiveMachine
    on = [(a, text_gen_insn(CALL_INSN_OPCODE, a, target)) for a in addrs]
    off = [(a, NOP5) for a in addrs]
    t0 = time.perf_counter()
    with LiveMachine(pid, strategy=strategy) as m:
        switch_sites(m, on)
        switch_sites(m, off)
    return time.perf_counter() - t0


def _gdb_once(pid: int, names: list[str], cmdfile: Path) -> float:
    cmdfile.write_text("set confirm off\n"
                       + "".join(f"break {n}\n" for n in names) + "detach\n")
    t0 = time.perf_counter()
    r = subprocess.run(["gdb", "-nx", "-q", "-p", str(pid), "-batch", "-x", str(cmdfile)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"gdb failed: {r.stderr[-500:]}")
    return dt


def _check_clean(pid: int, addrs: list[int]) -> None:
    from textpoke.live._fentry import NOP5
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        for a in addrs:
            f.seek(a)
            if f.read(5) != NOP5:
                raise RuntimeError(f"site {a:#x} was not restored")


def bench_switch(t: Target, sizes: list[int], repeat: int, gdb: bool, tmp: Path) -> dict:
    from textpoke.live import Symbols, fentry_sites
    with Symbols(t.pid) as s:
        sites = fentry_sites(s, "f0*")
        target = s.resolve("fentry_ret")
    out = {}
    for n in sizes:
        addrs = [x.addr for x in sites[:n]]
        names = [x.function for x in sites[:n]]
        fns = {"int3": lambda: _switch_once(t.pid, addrs, target, "int3"),
               "stop-machine": lambda: _switch_once(t.pid, addrs, target, "stop-machine")}
        if gdb:
            fns["gdb"] = lambda: _gdb_once(t.pid, names, tmp / "gdb.cmd")
        res = _stats.interleaved(fns, repeat, units={k: "s" for k in fns})
        _check_clean(t.pid, addrs)
        if not t.alive():
            raise RuntimeError("the target died")
        row = dict(res)
        if gdb:
            row["ratio_int3"] = _stats.paired_ratios("gdb/int3", res["gdb"], res["int3"])
            row["ratio_stop"] = _stats.paired_ratios("gdb/stop-machine", res["gdb"], res["stop-machine"])
        out[n] = row
    return out


def bench_count(t: Target, repeat: int) -> dict:
    from textpoke.live import live_count
    samples, windows = [], []
    for _ in range(1 + repeat):
        r = live_count(t.pid, "f0*", 0.2)
        if not (r.restored and r.freed and r.alive) or len(r.counts) != 10_000:
            raise RuntimeError(f"live count went wrong: restored={r.restored} freed={r.freed}")
        samples.append(r.timings["arm_total"] + r.timings["disarm_total"])
        windows.append(r.timings["window"])
    s = _stats.Series("live count attached", "s", samples[1:], samples[:1])
    return {"attached": s, "window": _stats.Series("window", "s", windows[1:], windows[:1]),
            "min_count": min(n for _, n in r.counts)}


def bench_call(tmp: Path, repeat: int) -> dict:
    from textpoke.live._count import Arming
    src = tmp / "callbench.c"
    src.write_text(CALL_BENCH_C)
    exe = tmp / "callbench"
    subprocess.run(["gcc", "-O2", "-no-pie", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount",
                    "-mrecord-mcount", "-o", str(exe), str(src)], check=True)
    p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"

        def rounds(k: int) -> list[float]:
            p.stdout.readline()                      # a round that straddled the switch
            return [float(p.stdout.readline()) for _ in range(k)]

        plain, counted = [], []
        for _ in range(repeat):
            plain.append(min(rounds(3)))
            a = Arming(p.pid, "hot")
            try:
                a.arm()
                counted.append(min(rounds(3)))
                a.disarm()
            finally:
                a.close()
        s_plain = _stats.Series("unpatched call", "ns", plain)
        s_count = _stats.Series("counted call", "ns", counted)
        return {"plain": s_plain, "counted": s_count,
                "extra": _stats.Series("extra per call", "ns",
                                       [c - q for c, q in zip(counted, plain)])}
    finally:
        p.kill()
        p.wait()


def run(args: argparse.Namespace) -> dict:
    why = ptrace_skip_reason()
    if why:
        raise SystemExit(f"bench_live: {why}")
    gdb = not args.no_gdb and shutil.which("gdb") is not None
    sizes = [1, 100, 1000] if args.quick else [1, 100, 10_000]
    with tempfile.TemporaryDirectory(prefix="bench-live-") as d:
        tmp = Path(d)
        exe = gen.build(10_000, Path(args.build_dir or tmp))
        res: dict = {"gdb": gdb, "cpus": os.cpu_count()}
        with Target(exe, tmp / "busy.out", mode="busy", threads=4) as t:
            res["switch"] = bench_switch(t, sizes, args.repeat, gdb, tmp)
            res["count"] = bench_count(t, args.repeat)
            if not t.alive():
                raise RuntimeError("the target died")
        res["call"] = bench_call(tmp, args.repeat)
    return res


def report(res: dict) -> str:
    lines = [f"== switching N fentry sites of a live 4-thread process to call and back, "
             f"attach to detach, s ({res['cpus']} CPUs; goal for 10,000: <= 0.25 s)"]
    rows = []
    for n, r in res["switch"].items():
        row = [f"{n:,}", _stats.fmt_range(r["int3"], 3), _stats.fmt_range(r["stop-machine"], 3)]
        if res["gdb"]:
            row += [_stats.fmt_range(r["gdb"], 3), _stats.fmt_range(r["ratio_int3"], 1),
                    _stats.fmt_range(r["ratio_stop"], 1)]
        rows.append(row)
    heads = ["sites", "textpoke int3", "textpoke stop-machine"]
    if res["gdb"]:
        heads += ["gdb -p -batch (break x N)", "gdb / int3", "gdb / stop-machine"]
    lines.append(_stats.table(heads, rows))
    c = res["count"]
    lines.append("== live count, 10,000 functions, attached time (window 0.2 s excluded; "
                 "goal <= 0.5 s)")
    lines.append(_stats.table(["attached", "window"],
                              [[_stats.fmt_range(c["attached"], 3), _stats.fmt_range(c["window"], 3)]]))
    k = res["call"]
    lines.append("== one call of an instrumented function, ns (one thread, 2,000,000-call rounds)")
    lines.append(_stats.table(["unpatched (NOP5)", "counted (call stub)", "extra"],
                              [[_stats.fmt_range(k["plain"], 2), _stats.fmt_range(k["counted"], 2),
                                _stats.fmt_range(k["extra"], 2)]]))
    return "\n".join(lines)


def to_json(res: dict):
    return _stats.as_json(res)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-gdb", action="store_true", help="skip the GDB side")
    ap.add_argument("--build-dir", default=None, help="where to build (and cache) the target")


def main(argv: list[str] | None = None) -> int:
    return _stats.script_main(argv, __doc__, "live", run, report, to_json, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
