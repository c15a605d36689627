# SPDX-License-Identifier: GPL-2.0-only
"""SIGKILL of ``textpoke live probe`` at random moments, then ``live recover``:
does the target survive, and is everything undone?

    python bench/bench_live_probe_survival.py [--runs N] [--seed S] [--lo S] [--hi S]
                                              [--no-optimize] [--json]

Each run starts a fresh 4-thread PIE (built with gcc) whose threads call
``probed()`` in a loop, starts ``live probe --pid P probed %di --json``
(optimised unless --no-optimize), SIGKILLs it after a random delay in
[--lo, --hi] seconds from its start, runs ``live recover``, and checks that
the target is alive, that the probed function's first bytes and the list of
executable mappings are what they were before the probe, and what recover
did (a JMP switched back: the prober was killed while optimised; an INT3
put back; no journal: killed before it existed).  Not part of ``make
test`` (a campaign: minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textpoke.live._process import alive as process_alive  # noqa: E402

TARGET_C = r"""
#include <stdio.h>
#include <pthread.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) long probed(long a, long b, long c) { sink += a ^ b; return a + b + c; }
static void *w(void *x) { long i = 0; for (;;) { probed(i++, 0x1234, 0xabcdef);
	if (!(i & 1023)) usleep(100); } return 0; }
int main(void) { pthread_t t[3]; for (int k = 0; k < 3; k++) pthread_create(&t[k], 0, w, 0);
	printf("ready %p\n", (void *)&probed); fflush(stdout); w(0); }
"""


def _read(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def _exec_maps(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [ln.split()[0] for ln in f if "x" in ln.split()[1]]


def one(exe: Path, delay: float, optimize: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        line = t.stdout.readline().split()
        addr = int(line[1], 16)
        before, maps = _read(t.pid, addr, 8), _exec_maps(t.pid)
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                              str(t.pid), "probed", "%di", "--json",
                              "--optimize" if optimize else "--no-optimize"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(delay)
        p.kill()
        p.wait()
        r = subprocess.run([sys.executable, "-m", "textpoke", "live", "recover", "--pid",
                            str(t.pid), "--json"], capture_output=True, text=True, env=env)
        try:
            rec = json.loads(r.stdout)
        except ValueError:
            rec = {"error": r.stderr.strip().splitlines()[-1:] or ["?"]}
        time.sleep(0.05)            # a thread sent back through a freed page dies now
        alive = process_alive(t.pid)
        clean = alive and _read(t.pid, addr, 8) == before and _exec_maps(t.pid) == maps
        return {"delay": round(delay, 3), "alive": alive, "clean": clean, "recover_rc": r.returncode,
                "jmp_back": rec.get("calls_restored", 0), "int3_back": rec.get("int3_restored", 0),
                "journal": rec.get("journal"), "kept": rec.get("kept", []),
                "error": rec.get("error")}
    finally:
        t.kill()
        t.wait()
        t.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lo", type=float, default=0.0)
    ap.add_argument("--hi", type=float, default=0.9)
    ap.add_argument("--no-optimize", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-probe-survival-") as d:
        (Path(d) / "t.c").write_text(TARGET_C)
        exe = Path(d) / "t"
        subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(Path(d) / "t.c")],
                       check=True)
        for i in range(a.runs):
            row = one(exe, rnd.uniform(a.lo, a.hi), not a.no_optimize)
            rows.append(row)
            if not row["clean"]:
                print(f"run {i}: {row}", file=sys.stderr)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    summary = {"commit": head, "runs": len(rows), "seed": a.seed, "delay": [a.lo, a.hi],
               "optimize": not a.no_optimize,
               "alive": sum(r["alive"] for r in rows), "clean": sum(r["clean"] for r in rows),
               "killed_while_optimised": sum(r["jmp_back"] > 0 for r in rows),
               "killed_with_int3_in": sum(r["int3_back"] > 0 for r in rows),
               "killed_before_journal": sum(r["journal"] is False for r in rows)}
    if a.json:
        print(json.dumps({"summary": summary, "runs": rows}, indent=1))
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0 if summary["alive"] == summary["clean"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
