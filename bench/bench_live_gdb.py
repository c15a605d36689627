# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live toggle`` against ``gdb -p PID -batch``, through their
command lines: what a user waits for, process start to exit.

    python bench/bench_live_gdb.py [--repeat R] [--sizes 100,1000,10000] [--json]

Target: tests/live_targets/count (10,000 functions built with gcc -pg
-mfentry -mnop-mcount -mrecord-mcount; 4 threads calling every function in
a hot loop, "busy" mode), one process for the whole run.

For N = 100, 1,000, 10,000 fentry sites (the functions f00000..), side by
side and interleaved round by round (bench/_stats.py), each sample one
process from start to exit:

* **textpoke**: ``textpoke live toggle --pid P --functions GLOB --to
  call:fentry_ret`` (or ``--to nop``) ``--json`` -- read the symbols and
  the sites, attach every thread, one batch of the INT3 protocol while the
  threads run, detach; its JSON's ``timings.attached`` is the part inside
  the attach (quoted next to the process's figure);
* **textpoke, no symbol cache**: the same with
  ``TEXTPOKE_LIVE_SYMBOL_CACHE=0`` -- every run parses the symbol tables
  of the program and its libraries, as the first run after a binary
  changed does (the plain runs find them in the cache under
  ``cache_root()/live-symbols``, filled by the warm-up round);
* **gdb**: ``gdb -nx -q -p P -batch -x FILE`` where FILE writes the same
  bytes at the same N addresses, ``set {unsigned char[5]}ADDR = {...}``
  per site, then ``detach`` -- gdb stops every thread (all-stop), reads the
  symbols of every module, writes, resumes.

The two share the target, so each run switches the sites from whatever
the previous run (of either tool) left: a run of one tool switches N
NOP5s to CALLs, the next run (of the other tool) switches them back, and
so on -- every run writes N sites, and each tool runs both directions
about as often.  After each run, outside the timing, every site is read
back (CALL fentry_ret or NOP5, as that run asked) and the target must be
alive.  Wall time (``perf_counter`` around ``subprocess.run``) and the CPU
the process used (user + system, ``RUSAGE_CHILDREN``) are both reported:
on a shared box the wall clock includes waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

TEXTPOKE = str(Path(sys.executable).with_name("textpoke"))
NOP5 = bytes.fromhex("0f1f440000")
GLOBS = {100: "f000[0-9][0-9]", 1000: "f00[0-9][0-9][0-9]", 10_000: "f0[0-9][0-9][0-9][0-9]"}


def _glob(n: int) -> str:
    if n not in GLOBS:
        raise SystemExit(f"--sizes: one of {', '.join(map(str, GLOBS))}")
    return GLOBS[n]


class Side:
    """The shared state of the sites (NOP5 or CALL) and the runs of both tools."""

    def __init__(self, pid: int, addrs: list[int], target: int, glob: str, tmp: Path) -> None:
        self.pid, self.addrs, self.target, self.glob, self.tmp = pid, addrs, target, glob, tmp
        self.on = False                       # the sites hold CALLs now
        self.cpu: dict[str, list[float]] = {"textpoke": [], "textpoke_nocache": [], "gdb": []}
        self.inside: list[float] = []

    def _call(self, a: int) -> bytes:
        return b"\xe8" + (self.target - (a + 5)).to_bytes(4, "little", signed=True)

    def _run(self, name: str, argv: list[str], env: dict | None = None) -> tuple[float, str]:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise RuntimeError(f"{name} exited {p.returncode}: {p.stderr[-800:]}")
        self.cpu[name].append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        return wall, p.stdout

    def textpoke(self, name: str = "textpoke", env: dict | None = None) -> float:
        to = "nop" if self.on else "call:fentry_ret"
        wall, out = self._run(name, [TEXTPOKE, "live", "toggle", "--pid", str(self.pid),
                                     "--functions", self.glob, "--to", to, "--json"], env)
        doc = json.loads(out)
        if doc["switched"] != len(self.addrs) or doc["now_as_asked"] != len(self.addrs):
            raise RuntimeError(f"textpoke switched {doc['switched']} of {len(self.addrs)}")
        if name == "textpoke":
            self.inside.append(doc["timings"]["attached"])
        self._flip()
        return wall

    def textpoke_nocache(self) -> float:
        return self.textpoke("textpoke_nocache", {**os.environ, "TEXTPOKE_LIVE_SYMBOL_CACHE": "0"})

    def gdb(self) -> float:
        cmd = self.tmp / "gdb.cmd"
        lines = []
        for a in self.addrs:
            new = NOP5 if self.on else self._call(a)
            lines.append(f"set {{unsigned char[5]}}{a:#x} = {{{', '.join(f'{b:#04x}' for b in new)}}}\n")
        cmd.write_text("".join(lines) + "detach\n")
        wall, _ = self._run("gdb", ["gdb", "-nx", "-q", "-p", str(self.pid), "-batch", "-x", str(cmd)])
        self._flip()
        return wall

    def _flip(self) -> None:
        self.on = not self.on
        want = (lambda a: self._call(a)) if self.on else (lambda a: NOP5)
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            for a in self.addrs:
                f.seek(a)
                if f.read(5) != want(a):
                    raise RuntimeError(f"site {a:#x} does not read as asked")


def run(args: argparse.Namespace) -> dict:
    why = ptrace_skip_reason()
    if why:
        raise SystemExit(f"bench_live_gdb: {why}")
    if shutil.which("gdb") is None:
        raise SystemExit("bench_live_gdb: gdb is not installed")
    sizes = [int(x) for x in args.sizes.split(",")]
    for n in sizes:
        _glob(n)
    out: dict = {"cpus": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-live-gdb-") as d:
        tmp = Path(d)
        exe = gen.build(10_000, Path(args.build_dir or tmp))
        with Target(exe, tmp / "busy.out", mode="busy", threads=4) as t:
            from textpoke.live import Symbols, fentry_sites
            for n in sizes:
                with Symbols(t.pid) as s:
                    sites = fentry_sites(s, _glob(n))
                    target = s.resolve("fentry_ret")
                if len(sites) != n or any(x.kind != "nop5" for x in sites):
                    raise RuntimeError(f"{_glob(n)}: {len(sites)} sites, not {n} NOP5s")
                side = Side(t.pid, [x.addr for x in sites], target, _glob(n), tmp)
                walls = _stats.interleaved({"textpoke": side.textpoke,
                                            "textpoke_nocache": side.textpoke_nocache,
                                            "gdb": side.gdb}, args.repeat,
                                           units=dict.fromkeys(side.cpu, "s"))
                if side.on:                    # leave the sites as found
                    side.textpoke()
                if not t.alive():
                    raise RuntimeError("the target died")
                row = {k: walls[k] for k in walls}
                for k in side.cpu:
                    c = side.cpu[k][1:1 + args.repeat]        # the warm-up round's first
                    row[f"{k}_cpu"] = _stats.Series(f"{k} cpu", "s", c)
                row["textpoke_inside"] = _stats.Series("textpoke attached", "s",
                                                       side.inside[1:1 + args.repeat])
                row["ratio"] = _stats.paired_ratios("gdb/textpoke", walls["gdb"], walls["textpoke"])
                row["ratio_nocache"] = _stats.paired_ratios("gdb/textpoke no cache", walls["gdb"],
                                                            walls["textpoke_nocache"])
                out["sizes"][n] = row
            if not t.alive():
                raise RuntimeError("the target died")
    return out


def report(res: dict) -> str:
    f = _stats.fmt_range
    rows = [[f"{n:,}", f(r["textpoke"], 3), f(r["textpoke_cpu"], 3), f(r["textpoke_inside"], 3),
             f(r["gdb"], 3), f(r["gdb_cpu"], 3), f(r["ratio"], 2)]
            for n, r in res["sizes"].items()]
    cold = [[f"{n:,}", f(r["textpoke_nocache"], 3), f(r["textpoke_nocache_cpu"], 3),
             f(r["ratio_nocache"], 2)] for n, r in res["sizes"].items()]
    return (f"== toggling N fentry sites of a busy 4-thread process through the command line, "
            f"process start to exit, s ({res['cpus']} CPUs)\n"
            + _stats.table(["sites", "textpoke live toggle", "its CPU", "its attached part",
                            "gdb -p -batch (set x N)", "gdb CPU", "gdb / textpoke (wall)"], rows)
            + "\n== the same runs of textpoke with the symbol cache off "
              "(TEXTPOKE_LIVE_SYMBOL_CACHE=0: every run parses the tables)\n"
            + _stats.table(["sites", "textpoke, no cache", "its CPU", "gdb / it (wall)"], cold))


def to_json(res: dict):
    def conv(v):
        if isinstance(v, _stats.Series):
            return v.as_dict()
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v
    return conv(res)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes", default="100,1000,10000", help="site counts (of 100, 1000, 10000)")
    ap.add_argument("--build-dir", default=None, help="where to build (and cache) the target")


def main(argv: list[str] | None = None) -> int:
    return _stats.script_main(argv, __doc__, "live_gdb", run, report, to_json, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
