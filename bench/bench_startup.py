# SPDX-License-Identifier: GPL-2.0-only
"""Start-up of the ``textpoke`` command: what a user waits for before any
work starts.

    python bench/bench_startup.py [--repeat R] [--json]

Each sample is one process, start to exit, measured from here: wall time
(``perf_counter`` around ``subprocess.run``) and the CPU time it used
(user + system, from ``getrusage(RUSAGE_CHILDREN)``).  Measured side by
side and interleaved round by round (bench/_stats.py), each twice: with
the bytecode caches as they are, and with ``PYTHONDONTWRITEBYTECODE=1``.

* ``textpoke --version`` (the goal: <= 0.10 s of wall and of CPU);
* ``textpoke CMD --help`` for every command (imports only that command's
  module, and what its options need);
* baselines in the same run: ``python -c pass`` with the same interpreter
  (the floor any Python tool pays), and ``gdb --version`` (a native tool
  of the same kind).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import MIN_RUNS, Series, fmt_range, interleaved, script_main, table  # noqa: E402

TEXTPOKE = str(Path(sys.executable).with_name("textpoke"))
COMMANDS = ("demo", "verify", "boot", "live", "keys", "static-call", "module", "kprobe", "ftrace")


def _cases() -> dict[str, list[str]]:
    cases = {"python -c pass": [sys.executable, "-c", "pass"]}
    gdb = shutil.which("gdb")
    if gdb:
        cases["gdb --version"] = [gdb, "-nx", "--version"]
    cases["textpoke --version"] = [TEXTPOKE, "--version"]
    for c in COMMANDS:
        cases[f"textpoke {c} --help"] = [TEXTPOKE, c, "--help"]
    return cases


def _one(argv: list[str], env: dict[str, str], cpu: list[float]):
    def run() -> float:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {p.returncode}")
        cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        return wall
    return run


def run(args) -> dict:
    out = {}
    for label, extra in (("", {}), (" [PYTHONDONTWRITEBYTECODE=1]", {"PYTHONDONTWRITEBYTECODE": "1"})):
        env = {**os.environ, **extra}
        cpus: dict[str, list[float]] = {}
        fns = {}
        for name, argv in _cases().items():
            cpus[name] = []
            fns[name] = _one(argv, env, cpus[name])
        walls = interleaved(fns, args.repeat, units={k: "s" for k in fns}, warmup=1)
        for name, s in walls.items():
            c = cpus[name][-s.n:]          # drop the warm-up round's sample
            out[name + label] = {"wall": s, "cpu": Series(name, "s", c)}
    return out


def report(res: dict) -> str:
    rows = [[name, fmt_range(v["wall"], 3), fmt_range(v["cpu"], 3)] for name, v in res.items()]
    return table(["process, start to exit", "wall s", "CPU s (user+sys)"], rows)


def to_json(res: dict) -> dict:
    return {k: {"wall": v["wall"].as_dict(), "cpu": v["cpu"].as_dict()} for k, v in res.items()}


if __name__ == "__main__":
    assert MIN_RUNS >= 5
    raise SystemExit(script_main(None, __doc__, "startup", run, report, to_json))
