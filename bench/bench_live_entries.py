# SPDX-License-Identifier: GPL-2.0-only
"""``live count`` on ~1,000 ordinary function entries of Debian's own
``/usr/bin/python3`` while it runs a multithreaded workload.

    python bench/bench_live_entries.py [--repeat R] [--json] [--functions GLOB]

Target: ``/usr/bin/python3`` (stripped: only ``.dynsym``; no fentry site
anywhere) running 4 threads that hash, JSON-encode and sort without pause;
the main thread prints one digest line per round, each a function of the
round number only (``PYTHONHASHSEED=0``).  One process for the whole run.

* **library, attach to detach**: :func:`live_count` on every function
  matching GLOB (default ``python3:*[a-t]``: 1,152 functions whose entry
  can take a JMP; the others are refused with their reason and not
  counted), window 0.2 s; the figure is the time attached (plan the
  trampolines and map them, switch on, detach; attach, switch off, free,
  detach), the window excluded.
* **CLI, process start to exit**: ``textpoke live count --pid P
  --functions GLOB --duration 0.2 --json`` as a user runs it, wall clock
  (it includes the interpreter's start, reading the ELF symbols and
  planning every entry, and the window).
* **baseline**: then a second program runs beside the workload, 4 busy
  threads with as many fentry sites (``-mnop-mcount``,
  tests/live_targets/count), and ``live count`` (library, attached time) on
  it is interleaved with the library figure again -- what the trampolines
  cost beyond fentry's CALL, under the same load (8 busy threads).

Check: every digest line the workload printed from the first run to the
last equals the line an unpatched ``python3`` prints for the same round
(computed afterwards); every run restored every entry and freed its
stubs; the workload is alive at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _stats  # noqa: E402

sys.path.insert(0, str(_stats.REPO / "tests" / "live_targets" / "count"))
from helpers import Target, gen, ptrace_skip_reason  # noqa: E402

PY = "/usr/bin/python3"
WORKLOAD = r"""
import hashlib, json, sys, threading
def work(seed, out, i):
    d = {}
    for k in range(1500):
        s = f"{seed}-{k}"
        d[s] = len(json.dumps([k, s, {"a": k}])) + (hash(s) & 0xff)
    out[i] = hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:16]
def rounds(first, last):
    for n in range(first, last):
        out = [None] * 4
        ts = [threading.Thread(target=work, args=(n * 10 + i, out, i)) for i in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(n, " ".join(out), flush=True)
if len(sys.argv) > 1:
    rounds(0, int(sys.argv[1]))
else:
    print("ready", flush=True)
    rounds(0, 10**9)
"""
ENV = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


class Workload:
    def __init__(self) -> None:
        self.p = subprocess.Popen([PY, "-c", WORKLOAD], stdout=subprocess.PIPE, text=True,
                                  env=ENV)
        assert self.p.stdout.readline().strip() == "ready"
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line.strip())

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def run(args: argparse.Namespace) -> dict:
    why = ptrace_skip_reason()
    if why or not os.path.exists(PY):
        raise SystemExit(f"bench_live_entries: {why or 'no ' + PY}")
    from textpoke.live import live_count
    w = Workload()
    res: dict = {"functions": args.functions, "cpus": os.cpu_count()}
    try:
        sizes: list[int] = []
        refused: list[int] = []

        def lib() -> float:
            r = live_count(w.p.pid, args.functions, 0.2)
            if not (r.restored and r.freed and r.alive):
                raise RuntimeError(f"live count went wrong: restored={r.restored} "
                                   f"freed={r.freed} kept={r.kept_mapped}")
            sizes.append(r.sites)
            refused.append(len(r.skipped))
            return r.timings["arm_total"] + r.timings["disarm_total"]

        def cli() -> float:
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "textpoke", "live", "count", "--pid",
                                str(w.p.pid), "--functions", args.functions, "--duration", "0.2",
                                "--json"], capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(f"the CLI failed ({p.returncode}): {p.stderr.strip()}")
            return dt

        # 1. the workload alone: the library and the CLI, interleaved
        s = _stats.interleaved({"library": lib, "cli": cli}, args.repeat)
        res["library"], res["cli"] = s["library"], s["cli"]
        # the baseline: as many fentry sites of a 4-busy-thread program, both
        # targets running (the same load for both figures)
        from textpoke.live import Symbols, entry_sites
        with Symbols(w.p.pid) as syms:
            n = len(entry_sites(syms, args.functions)[0])
        with tempfile.TemporaryDirectory(prefix="bench-entries-") as d:
            exe = gen.build(n, Path(args.build_dir or d))
            with Target(exe, Path(d) / "busy.out", mode="busy", threads=4) as t:
                def fentry() -> float:
                    r = live_count(t.pid, "f0*", 0.2)
                    if not (r.restored and r.freed and r.sites == n):
                        raise RuntimeError("the fentry baseline went wrong")
                    return r.timings["arm_total"] + r.timings["disarm_total"]
                # 2. beside the baseline: 8 busy threads on the box
                s2 = _stats.interleaved({"library": lib, "fentry": fentry}, args.repeat)
        res["library_beside"], res["fentry"] = s2["library"], s2["fentry"]
        res["sites"], res["refused"] = sizes[-1], refused[-1]
        res["alive"] = w.p.poll() is None
    finally:
        w.close()
    # the workload's output, round by round, against an unpatched run
    lines = [x for x in w.lines if x]
    last = int(lines[-1].split()[0]) + 1 if lines else 0
    ref = subprocess.run([PY, "-c", WORKLOAD, str(last)], capture_output=True, text=True,
                         env=ENV, check=True).stdout.split("\n")
    ref = [x.strip() for x in ref if x.strip()]
    res["rounds"] = len(lines)
    res["output_unchanged"] = lines == ref[:len(lines)] and len(lines) == last
    if not res["output_unchanged"]:
        raise RuntimeError("the workload's output changed under live count")
    return res


def report(res: dict) -> str:
    lines = [f"== live count on {res['sites']:,} function entries of Debian's /usr/bin/python3 "
             f"({res['functions']}; {res['refused']} more refused with a reason), 4 busy threads, "
             f"{res['cpus']} CPUs; goal: attach to detach <= 1 s"]
    lines.append("  the workload alone:")
    lines.append(_stats.table(
        ["library: attach to detach (s)", "CLI: process start to exit, window 0.2 s (s)"],
        [[_stats.fmt_range(res["library"], 3), _stats.fmt_range(res["cli"], 3)]]))
    lines.append(f"  beside a 4-busy-thread fentry program, interleaved with its own count:")
    lines.append(_stats.table(
        ["library: attach to detach (s)",
         f"baseline: {res['sites']:,} fentry sites, attach to detach (s)"],
        [[_stats.fmt_range(res["library_beside"], 3), _stats.fmt_range(res["fentry"], 3)]]))
    lines.append(f"  workload: {res['rounds']} rounds printed during the run, every one equal to "
                 f"an unpatched run's: {res['output_unchanged']}; alive: {res['alive']}")
    return "\n".join(lines)


def to_json(res: dict):
    return {k: (v.as_dict() if isinstance(v, _stats.Series) else v) for k, v in res.items()}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--functions", default="python3:*[a-t]",
                    help="the glob to count (default: python3:*[a-t], 1,152 entries)")
    ap.add_argument("--build-dir", default=None, help="where to build (and cache) the baseline")


def main(argv: list[str] | None = None) -> int:
    return _stats.script_main(argv, __doc__, "live_entries", run, report, to_json, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
