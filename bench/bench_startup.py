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
  (the floor any Python tool pays), ``gdb --version`` and ``gdb -batch``
  (a native tool of the same kind, starting and doing nothing);
* ``textpoke live toggle`` of one fentry site of a running 4-thread
  program (tests/live_targets/count, 10,000 functions, busy), process start
  to exit -- symbols read, every thread attached, one INT3 batch, detached;
  alternately to ``call:fentry_ret`` and back to ``nop`` (the goal: <= 0.25
  s) -- against ``gdb -nx -p PID -batch`` on the same target (attach every
  thread, read the symbols, detach: what gdb pays before it could write
  anything).  ``--no-live`` skips these.
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
        cases["gdb -batch"] = [gdb, "-nx", "-batch"]
    cases["textpoke --version"] = [TEXTPOKE, "--version"]
    for c in COMMANDS:
        cases[f"textpoke {c} --help"] = [TEXTPOKE, c, "--help"]
    return cases


def _one(argv, env: dict[str, str], cpu: list[float]):
    def run() -> float:
        a = argv() if callable(argv) else argv
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(a)} exited {p.returncode}: {p.stderr.decode()[-500:]}")
        cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        return wall
    return run


LIVE_N = 10_000


def _live_cases(pid: int) -> dict[str, object]:
    """name -> argv, or a callable giving the next argv (the toggle alternates)."""
    cases: dict[str, object] = {}
    gdb = shutil.which("gdb")
    if gdb:
        cases["gdb -nx -p PID -batch (attach, detach)"] = [gdb, "-nx", "-p", str(pid), "-batch"]
    state = {"to": "nop"}

    def toggle() -> list[str]:
        state["to"] = "call:fentry_ret" if state["to"] == "nop" else "nop"
        return [TEXTPOKE, "live", "toggle", "--pid", str(pid), "--functions", "f00000",
                "--to", state["to"]]
    cases["textpoke live toggle (1 site)"] = toggle
    return cases


def run(args) -> dict:
    out = {}
    target = None
    if not args.no_live:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "live_targets"
                               / "count"))
        from helpers import Target, gen, ptrace_skip_reason
        why = ptrace_skip_reason()
        if why:
            print(f"live cases skipped: {why}", file=sys.stderr)
        else:
            import tempfile
            build = Path(args.build_dir or tempfile.gettempdir()) / "textpoke-bench-startup"
            build.mkdir(parents=True, exist_ok=True)
            exe = gen.build(LIVE_N, build)
            target = Target(exe, build / "counts", mode="busy", threads=4)
    try:
        # the bytecode caches as Python keeps them (written on the warm-up run
        # when missing or stale), then as an environment that sets
        # PYTHONDONTWRITEBYTECODE=1 (as some CI and container images do) sees them
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for label, extra in (("", {}),
                             (" [PYTHONDONTWRITEBYTECODE=1]", {"PYTHONDONTWRITEBYTECODE": "1"})):
            out.update(_run_env(args, label, {**base, **extra}, target))
    finally:
        if target is not None:
            target.close()
    return out


def _run_env(args, label: str, env: dict, target) -> dict:
    out = {}
    cpus: dict[str, list[float]] = {}
    fns = {}
    cases: dict[str, object] = dict(_cases())
    if target is not None:
        cases.update(_live_cases(target.pid))
    for name, argv in cases.items():
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


def add_args(ap) -> None:
    ap.add_argument("--no-live", action="store_true",
                    help="skip live toggle and gdb -p (they need gcc and ptrace)")
    ap.add_argument("--build-dir", default=None, help="where to build (and cache) the target")


if __name__ == "__main__":
    assert MIN_RUNS >= 5
    raise SystemExit(script_main(None, __doc__, "startup", run, report, to_json, add_args))
