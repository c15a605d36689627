# SPDX-License-Identifier: GPL-2.0-only
"""The cost of a call traced by ``live trace`` (and of one counted by
``live count``) next to a bpftrace uprobe hit on the same function, in the
same run; and ``live trace`` on Debian's python3 from process start to exit.

    python bench/bench_live_trace.py [--repeat R] [--quick] [--json] [--no-bpftrace] [--gs-only]

(--gs-only: plain, trace, trace_unchecked, trace_syscall and gs_check only.)

The target (gcc -O1, no -pg: ``probed`` is an ordinary entry, reached
through a moved-instruction pad as on /usr/bin/python3) waits for a number
N on stdin, calls ``probed`` N times in a loop and prints the loop's own
time (CLOCK_MONOTONIC, ns).  Per run, on one target:

* **plain**: the loop untouched, N = 10,000,000, run again before each
  variant (each is paired with the plain loop just before it);
* **trace**: ``LiveTrace`` armed in the library (the ftrace client's
  function tracer, per-thread rings in the target), the host draining the
  ring while the loop runs, N = 10,000,000; the rings' clock the TSC;
* **trace_bridge**: the same with ``libc.so.6:malloc,libc.so.6:free``
  traced too: the runtime goes near libc and ``probed`` (in the PIE, more
  than 2 GiB away) is entered through a bridge, N = 10,000,000;
* **trace_counter**: the same with the bundled runtime's counter clock
  (a ``lock xadd`` on one shared word), N = 10,000,000;
* **trace_unchecked**: ``trace`` with the runtime's per-CPU loads as first
  written (``mov %gs:0`` followed unchecked), N = 10,000,000; and
  **gs_check** = trace - trace_unchecked per run: the cost of the GS base
  check (RDGSBASE, range, self-pointer; ``live/_gscheck.py``);
* **trace_syscall**: the check reading the base with
  ``arch_prctl(ARCH_GET_GS)``, what a process without FSGSBASE in user
  mode pays, N = 1,000,000;
* **count**: ``live count``'s stubs armed (``Arming``), N = 10,000,000;
* **bpftrace**: ``uprobe:EXE:probed { @n = count(); }``, N = 20,000
  (--quick: 5,000): a trap into the kernel per hit.

ns per call = (loop ns / N) - plain's, per run.  And ``textpoke live trace
--pid PY --functions python3:PyObject_Hash --duration 0`` (its lines to
/dev/null) from process start to exit, PY a /usr/bin/python3 running 4 busy threads.
Figures: median (min-max) of --repeat >= 5 runs (one warm-up first).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import _stats                                                          # noqa: E402

TARGET_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
volatile long sink;
__attribute__((noinline)) long probed(long a, long b, long c)
{
	sink += a ^ b;
	return a + b + c;
}
int main(void)
{
	char line[64];
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		long n = atol(line);
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		for (long i = 0; i < n; i++)
			probed(i, 0x1234, 0xabcdef);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		printf("%ld\n", (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec));
		fflush(stdout);
	}
	return 0;
}
"""

PY_WORK = r"""
import json, threading, time
def work():
    while True:
        d = {str(k): [k, k * 2] for k in range(50)}
        hash(json.dumps(d, sort_keys=True))
        time.sleep(0.001)
for i in range(4):
    threading.Thread(target=work, daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""

N = 10_000_000


def build(d: Path) -> Path:
    (d / "t.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


class Target:
    def __init__(self, argv: list[str]) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def start(self, n: int) -> None:
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()

    def ready(self) -> bool:
        return bool(select.select([self.p.stdout], [], [], 0)[0])

    def result(self) -> int:
        return int(self.p.stdout.readline())

    def loop(self, n: int) -> int:
        self.start(n)
        return self.result()

    def close(self) -> None:
        self.p.kill()
        self.p.wait(timeout=30)


#: ``probed`` with two libc functions: the runtime goes near libc (the
#: bigger group), ``probed`` -- in the PIE, more than 2 GiB below -- is
#: entered through a bridge (two ``jmp *`` more per call)
BRIDGED = "t:probed,libc.so.6:malloc,libc.so.6:free"


def traced(t: Target, n: int, clock: str | None = None,
           pattern: str = "t:probed", gs: str | None = None) -> tuple[float, int]:
    """(loop ns, callbacks run) with the function tracer on ``probed``
    (*clock*: the rings' trace clock, None: live trace's own choice;
    *pattern*: :data:`BRIDGED` for the bridge; *gs*: how the runtime reads
    the GS base, None: live trace's own choice)."""
    from textpoke.live import LiveTrace
    lt = LiveTrace(t.pid, pattern, ring=4096, clock=clock)
    lt.gs_read = gs
    if pattern == BRIDGED:
        assert [s.bridge for s in lt.sites if s.function == "probed"] == [0], \
            "probed is not behind a bridge here"
    try:
        lt.arm()
        t.start(n)
        while not t.ready():
            lt.pump(lambda: t.ready() or time.sleep(0.005) or True)
            lt.take()
    finally:
        left = lt.close()
    assert left["int3_left"] == 0 and left["restored"], left
    hits = lt.final_counts["hits"]
    # (malloc and free, bridged, may run a few times around the loop)
    assert hits == n or (pattern == BRIDGED and n <= hits < n + 100), (hits, n)
    return t.result(), hits


def counted(t: Target, n: int) -> float:
    from textpoke.live._count import Arming
    a = Arming(t.pid, "t:probed")
    try:
        a.arm()
        ns = t.loop(n)
        counters, why = a.disarm()
    finally:
        a.close()
    assert counters == [n] and not why, (counters, why)
    return ns


def bpftrace(t: Target, exe: Path, n: int) -> float:
    bt = subprocess.Popen(["bpftrace", "-e", 'BEGIN { printf("go\\n"); } '
                           f'uprobe:{exe}:probed {{ @n = count(); }}'],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = bt.stdout.readline()
        if line.startswith("Attaching"):
            line = bt.stdout.readline()
        if line.strip() != "go":
            raise RuntimeError(f"bpftrace did not attach: {line!r}")
        ns = t.loop(n)
    finally:
        bt.send_signal(2)
        bt.communicate(timeout=60)
    return ns


def cli_python3(py: Target) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "trace", "--pid", str(py.pid),
                        "--functions", "python3:PyObject_Hash", "--duration", "0"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    dt = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    return dt


def run(args: argparse.Namespace) -> dict:
    n_bt = 5_000 if args.quick else 20_000
    use_bt = not args.no_bpftrace and shutil.which("bpftrace") is not None and os.geteuid() == 0
    have_py = os.path.exists("/usr/bin/python3")
    keys = [("plain", "ns/call"), ("trace", "ns/call"), ("trace_bridge", "ns/call"),
            ("trace_counter", "ns/call"), ("trace_unchecked", "ns/call"),
            ("gs_check", "ns/call"), ("trace_syscall", "ns/call"),
            ("count", "ns/call"),
            ("bpftrace", "ns/hit"), ("cli_python3", "s")]
    s = {k: _stats.Series(k, u) for k, u in keys}
    with tempfile.TemporaryDirectory(prefix="bench-live-trace-") as d:
        exe = build(Path(d))
        (Path(d) / "w.py").write_text(PY_WORK)
        py = Target(["/usr/bin/python3", str(Path(d) / "w.py")]) if have_py else None
        try:
            for r in range(args.repeat + 1):          # the first run is a warm-up
                t = Target([str(exe)])
                try:
                    t.loop(N // 10)            # warm: page faults, frequency
                    # each variant against an untouched loop just before it
                    # (paired: the box's load drifts between them)
                    plain = t.loop(N) / N
                    vals = {"plain": plain}
                    # checked and unchecked take turns going first (the load drifts)
                    for gs in (None, "unchecked")[::1 if r % 2 else -1]:
                        p0 = t.loop(N) / N          # each against a plain loop just before
                        key = "trace_unchecked" if gs else "trace"
                        vals[key] = traced(t, N, gs=gs)[0] / N - p0
                    vals["gs_check"] = vals["trace"] - vals["trace_unchecked"]
                    plain_s = t.loop(N // 10) / (N // 10)
                    vals["trace_syscall"] = (traced(t, N // 10, gs="syscall")[0] / (N // 10)
                                             - plain_s)
                    if args.gs_only:
                        assert t.p.poll() is None
                        raise _GsOnly
                    plain0 = t.loop(N) / N
                    vals["trace_bridge"] = traced(t, N, pattern=BRIDGED)[0] / N - plain0
                    plain1 = t.loop(N) / N
                    vals["trace_counter"] = traced(t, N, "counter")[0] / N - plain1
                    plain2 = t.loop(N) / N
                    vals["count"] = counted(t, N) / N - plain2
                    if use_bt:
                        plain3 = t.loop(N) / N
                        vals["bpftrace"] = bpftrace(t, exe, n_bt) / n_bt - plain3
                    assert t.p.poll() is None
                except _GsOnly:
                    pass
                finally:
                    t.close()
                if py is not None and not args.gs_only:
                    vals["cli_python3"] = cli_python3(py)
                for k, v in vals.items():
                    (s[k].warmup if r == 0 else s[k].samples).append(v)
                print(f"run {r}{' (warm-up)' if r == 0 else ''}: "
                      + ", ".join(f"{k} {v:,.2f}" for k, v in vals.items()), file=sys.stderr)
        finally:
            if py is not None:
                py.close()
    for k in [k for k in s if not s[k].samples]:
        del s[k]
    return {"series": s, "n": {"loop": N, "bpftrace": n_bt}, "bpftrace": use_bt}


class _GsOnly(Exception):
    """--gs-only: the other variants skipped."""


def report(res: dict) -> str:
    s = res["series"]
    rows = [["a call, untouched (ns)", _stats.fmt_range(s["plain"], 2)],
            [f"live trace: a traced call, +ns (N={res['n']['loop']:,})",
             _stats.fmt_range(s["trace"], 1)],
            [f"live trace, the runtime's GS loads unchecked (as first written), +ns "
             f"(N={res['n']['loop']:,})", _stats.fmt_range(s["trace_unchecked"], 1)],
            ["the GS base check (trace - unchecked, per run), +ns",
             _stats.fmt_range(s["gs_check"], 2)],
            [f"live trace, GS base read with arch_prctl (no FSGSBASE), +ns "
             f"(N={res['n']['loop'] // 10:,})", _stats.fmt_range(s["trace_syscall"], 1)]]
    if "trace_bridge" not in s:
        return _stats.table(["figure", "median (min-max, n)"], rows)
    rows += [
            [f"live trace, through a bridge (probed 2 GiB+ from the runtime): +ns "
             f"(N={res['n']['loop']:,})", _stats.fmt_range(s["trace_bridge"], 1)],
            [f"live trace, the counter clock: a traced call, +ns (N={res['n']['loop']:,})",
             _stats.fmt_range(s["trace_counter"], 1)],
            [f"live count: a counted call, +ns (N={res['n']['loop']:,})",
             _stats.fmt_range(s["count"], 1)]]
    if "bpftrace" in s:
        rows.append([f"bpftrace uprobe hit (@n = count()), +ns (N={res['n']['bpftrace']:,})",
                     _stats.fmt_range(s["bpftrace"], 0)])
        rows.append(["bpftrace / live trace (medians)",
                     f"{s['bpftrace'].median / s['trace'].median:,.0f}x"])
    else:
        rows.append(["bpftrace", "not run (absent, not root, or --no-bpftrace)"])
    if "cli_python3" in s:
        rows.append(["live trace --duration 0 on python3 (PyObject_Hash), process start to "
                     "exit (s)", _stats.fmt_range(s["cli_python3"], 3)])
    return _stats.table(["figure", "median (min-max, n)"], rows)


def to_json(res: dict) -> dict:
    return {"n": res["n"], "bpftrace": res["bpftrace"],
            "series": {k: v.as_dict() for k, v in res["series"].items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-bpftrace", action="store_true", help="skip the bpftrace baseline")
    ap.add_argument("--gs-only", action="store_true",
                    help="only the GS base check's variants (plain, trace, unchecked, syscall)")


if __name__ == "__main__":
    if shutil.which("gcc") is None:
        sys.exit("bench_live_trace: needs gcc")
    sys.exit(_stats.script_main(None, __doc__, "live_trace", run, report, to_json, add_args))
