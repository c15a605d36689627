# SPDX-License-Identifier: GPL-2.0-only
"""The cost of a kprobe hit on a live process (``textpoke live probe``),
next to a bpftrace uprobe on the same function, in the same run.

    python bench/bench_live_probe.py [--repeat R] [--quick] [--json] [--no-bpftrace]

Every run starts a fresh copy of a small C program (built with gcc) that,
for each line "N [T]" it reads on stdin, calls ``probed(i, 0x1234, 0xabcdef)``
N times in a loop (over T threads made for it, N / T each) and prints the
loop's own time (CLOCK_MONOTONIC, ns).
Per run, in this order:

* **plain**: the loop without any probe (N = 1,000,000 calls);
* **textpoke**: a kprobe on ``probed`` through :class:`LiveProbe` (the
  kprobes client over a LiveMachine, as ``live probe`` uses it), fetching
  ``%di`` and formatting the hit as ``live probe`` does (thread name, CPU,
  the value), while the loop runs N = 2,000 calls (--quick: 500); the
  tracer services the stops until the program prints its time;
* **textpoke --optimize**: the same with ``arm(optimize=True)`` (the JMP
  to the client's buffer, hits recorded in the thread's ring in the target,
  drained every 5 ms), N = 200,000 calls (--quick: 20,000); hits the loop's
  writers lapped before a read count as hits (overruns), not formatted;
  then the same with the recorder as first written (``mov %gs:0,%r10``:
  it follows the GS base unchecked, no RDGSBASE and range check; the
  baseline for the check's cost, injected by the bench only); then the
  same with ``ring_slots=0``: every thread on the one shared
  ring, whose thread id 0 makes the recorder call ``gettid`` per hit (the
  recorder's path before per-thread rings: the baseline for them); and
  both again with the loop split over 2 threads made for it, side by side
  (+ns a hit costs its thread: (loop ns - plain loop ns) / calls per
  thread);
* **bpftrace**: ``uprobe:EXE:probed { printf("%lx\\n", arg0) }`` on the same
  program (a per-hit line with one argument, as ours), and the same with
  ``@n = count()`` (the bare uprobe), N = 10,000 calls (--quick: 2,000);
  the loop starts once bpftrace's BEGIN probe printed (every probe
  attached).  Needs root and tracefs (mount -t tracefs nodev
  /sys/kernel/tracing).

ns per hit = (loop ns with the probe / N) - (plain loop ns / N), per run.
Also the probe's attach-to-detach time (arm + close) inside the library,
and what the user sees: ``textpoke live probe --duration 0`` from process
start to exit (optimised, the default, and ``--no-optimize``).
Figures: median (min-max) of --repeat >= 5 runs.
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
#include <pthread.h>
volatile long sink;
__attribute__((noinline)) long probed(long a, long b, long c)
{
	sink += a ^ b;
	return a + b + c;
}
static void *loop(void *arg)
{
	long n = (long)arg;
	for (long i = 0; i < n; i++)
		probed(i, 0x1234, 0xabcdef);
	return 0;
}
int main(void)
{
	char line[64];
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		long n = 0, nt = 1;
		sscanf(line, "%ld %ld", &n, &nt);
		struct timespec t0, t1;
		pthread_t t[16];
		clock_gettime(CLOCK_MONOTONIC, &t0);
		if (nt <= 1)
			loop((void *)n);
		else {
			/* nt threads made for the loop, n / nt calls each, side by side */
			for (long k = 0; k < nt && k < 16; k++)
				pthread_create(&t[k], 0, loop, (void *)(n / nt));
			for (long k = 0; k < nt && k < 16; k++)
				pthread_join(t[k], 0);
		}
		clock_gettime(CLOCK_MONOTONIC, &t1);
		printf("%ld\n", (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec));
		fflush(stdout);
	}
	return 0;
}
"""

PLAIN_N = 1_000_000
#: threads of the multithreaded rows (the box has two CPUs)
MT = 2


def build(d: Path) -> Path:
    (d / "t.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


class Target:
    def __init__(self, exe: Path) -> None:
        self.p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def start(self, n: int, threads: int = 1) -> None:
        self.p.stdin.write(f"{n} {threads}\n")
        self.p.stdin.flush()

    def ready(self) -> bool:
        return bool(select.select([self.p.stdout], [], [], 0)[0])

    def result(self) -> int:
        return int(self.p.stdout.readline())

    def loop(self, n: int, threads: int = 1) -> int:
        self.start(n, threads)
        return self.result()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)
        self.p.stdout.close()


def _unchecked(words: int = 14, **_kw) -> bytes:
    """The recorder as first written: ``mov %gs:0,%r10`` (the base followed
    unchecked) in place of RDGSBASE, the range check and the spare; the
    same body, copying the same *words* stack words."""
    import struct
    from textpoke.live import _probe_opt as O
    body = bytearray(O._REC_BODY)
    struct.pack_into("<I", body, O._REC_WORDS, words)
    return O._REC_HEAD + bytes.fromhex("654c8b142500000000") + bytes(body)


def ours(t: Target, n: int, optimize: bool = False,
         ring_slots: int | None = None, threads: int = 1,
         unchecked: bool = False) -> tuple[float, float, int]:
    """(loop ns, attach-to-detach s, hits) with our kprobe (*optimize*: the
    JMP to the client's buffer and the recorder, ``--optimize``;
    *ring_slots* 0: every thread on the one shared ring, a ``gettid`` per
    hit -- the recorder's path before per-thread rings; *unchecked*: the
    recorder without its GS base check, :func:`_unchecked`)."""
    from textpoke.live import LiveProbe
    from textpoke.live import _probe_opt
    t0 = time.perf_counter()
    lp = LiveProbe(t.pid, "probed", ["%di"])
    made = _probe_opt.recorder_code
    if unchecked:
        _probe_opt.recorder_code = _unchecked
    try:
        lp.arm(optimize=optimize, ring_slots=ring_slots)
        _probe_opt.recorder_code = made
        arm = time.perf_counter() - t0
        assert lp.optimized == optimize, lp.how()
        t.start(n, threads)
        while not t.ready():
            lp.pump(lambda: len(lp.hits) >= 256 or t.ready())
            lp.take()
    finally:
        _probe_opt.recorder_code = made
        t1 = time.perf_counter()
        left = lp.close()
        close = time.perf_counter() - t1
    assert left["int3_left"] == 0 and (not optimize or left["regions_kept"] == []), left
    ns = t.result()
    lp.take()
    # optimised: hits the ring's writers lapped before a read are counted,
    # not formatted (the host reads every 5 ms; the loop outruns it)
    lost = lp.ring.overruns + lp.ring.dropped if optimize else 0
    assert lp.nhit + lost == n // threads * threads, (lp.nhit, lost, n)
    return ns, arm + close, lp.nhit


def cli(t: Target, *extra: str) -> float:
    """``textpoke live probe --duration 0``: process start to exit (attach,
    arm, disarm, detach, the import of the package)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "probe", "--pid", str(t.pid),
                        "probed", "%di", "--duration", "0", "--json", *extra], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    dt = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    return dt


def bpftrace(t: Target, exe: Path, n: int, action: str) -> float:
    # BEGIN runs once every probe is attached ("Attaching N probes..." is
    # printed before): the loop starts after its line
    bt = subprocess.Popen(["bpftrace", "-e", f'BEGIN {{ printf("go\\n"); }} '
                           f'uprobe:{exe}:probed {{ {action} }}'],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = bt.stdout.readline()
        if line.startswith("Attaching"):
            line = bt.stdout.readline()
        if line.strip() != "go":
            raise RuntimeError(f"bpftrace did not attach: {line!r}")
        # drain its per-hit lines while the loop runs (a full pipe would
        # stall bpftrace, not the probe)
        import threading
        got = [0]

        def drain() -> None:
            for _ in bt.stdout:
                got[0] += 1
        th = threading.Thread(target=drain, daemon=True)
        th.start()
        ns = t.loop(n)
    finally:
        bt.send_signal(2)
        try:
            bt.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # its exit (the map printed, the uprobes detached) stalled under
            # load: the figure is taken, bpftrace is not left behind
            bt.kill()
            bt.wait(timeout=60)
    th.join(timeout=30)
    return ns


def run(args: argparse.Namespace) -> dict:
    n_ours = 500 if args.quick else 2_000
    n_opt = 20_000 if args.quick else 200_000
    n_bt = 2_000 if args.quick else 10_000
    use_bt = not args.no_bpftrace and shutil.which("bpftrace") is not None and os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="bench-live-probe-") as d:
        exe = build(Path(d))
        s = {k: _stats.Series(k, u) for k, u in (("plain", "ns/call"), ("textpoke", "ns/hit"),
                                                 ("textpoke_opt", "ns/hit"),
                                                 ("textpoke_opt_unchecked", "ns/hit"),
                                                 ("textpoke_opt_mt_unchecked", "ns/hit"),
                                                 ("textpoke_opt_shared", "ns/hit"),
                                                 ("textpoke_opt_mt", "ns/hit"),
                                                 ("textpoke_opt_mt_shared", "ns/hit"),
                                                 ("bpftrace", "ns/hit"),
                                                 ("bpftrace_count", "ns/hit"),
                                                 ("attach", "s"), ("attach_opt", "s"),
                                                 ("cli", "s"), ("cli_opt", "s"))}
        for r in range(args.repeat + 1):          # the first run is a warm-up
            t = Target(exe)
            try:
                plain = t.loop(PLAIN_N) / PLAIN_N
                ns, att, _ = ours(t, n_ours)
                ns_o, att_o, _ = ours(t, n_opt, optimize=True)
                ns_u, _att, _ = ours(t, n_opt, optimize=True, unchecked=True)
                ns_s, _att, _ = ours(t, n_opt, optimize=True, ring_slots=0)
                # MT threads made for the loop, side by side (on two CPUs,
                # while the host reads): the added time a hit costs its thread
                plain_mt = t.loop(PLAIN_N, MT) / (PLAIN_N // MT)
                ns_m, _att, _ = ours(t, n_opt, optimize=True, threads=MT)
                ns_mu, _att, _ = ours(t, n_opt, optimize=True, threads=MT, unchecked=True)
                ns_ms, _att, _ = ours(t, n_opt, optimize=True, ring_slots=0, threads=MT)
                vals = {"plain": plain, "textpoke": ns / n_ours - plain,
                        "textpoke_opt": ns_o / n_opt - plain,
                        "textpoke_opt_unchecked": ns_u / n_opt - plain,
                        "textpoke_opt_mt_unchecked": ns_mu / (n_opt // MT) - plain_mt,
                        "textpoke_opt_shared": ns_s / n_opt - plain,
                        "textpoke_opt_mt": ns_m / (n_opt // MT) - plain_mt,
                        "textpoke_opt_mt_shared": ns_ms / (n_opt // MT) - plain_mt,
                        "attach": att,
                        "attach_opt": att_o, "cli": cli(t, "--no-optimize"), "cli_opt": cli(t)}
                if use_bt:
                    vals["bpftrace"] = bpftrace(t, exe, n_bt, 'printf("%lx\\n", arg0);') \
                        / n_bt - plain
                    vals["bpftrace_count"] = bpftrace(t, exe, n_bt, "@n = count();") / n_bt - plain
                assert t.p.poll() is None
            finally:
                t.close()
            for k, v in vals.items():
                (s[k].warmup if r == 0 else s[k].samples).append(v)
            print(f"run {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{k} {v:,.1f}" for k, v in vals.items()), file=sys.stderr)
    if not use_bt:
        del s["bpftrace"], s["bpftrace_count"]
    return {"series": s, "n": {"plain": PLAIN_N, "textpoke": n_ours, "textpoke_opt": n_opt,
                               "bpftrace": n_bt},
            "bpftrace": use_bt}


def report(res: dict) -> str:
    s = res["series"]
    rows = [["a call, no probe (ns)", _stats.fmt_range(s["plain"], 2)],
            [f"textpoke live probe hit, +ns (N={res['n']['textpoke']:,})",
             _stats.fmt_range(s["textpoke"], 0)],
            [f"textpoke live probe --optimize hit, +ns (N={res['n']['textpoke_opt']:,})",
             _stats.fmt_range(s["textpoke_opt"], 0)],
            [f"  the same, the recorder without its GS base check (mov %gs:0 followed "
             f"unchecked), +ns (N={res['n']['textpoke_opt']:,})",
             _stats.fmt_range(s["textpoke_opt_unchecked"], 0)],
            ["  the GS base check (RDGSBASE, range, self-pointer), +ns a hit: median of "
             "the per-run differences", _diff(s["textpoke_opt"], s["textpoke_opt_unchecked"])],
            [f"  the same, one shared ring + gettid per hit (the recorder before per-thread "
             f"rings), +ns (N={res['n']['textpoke_opt']:,})",
             _stats.fmt_range(s["textpoke_opt_shared"], 0)],
            [f"textpoke --optimize, {MT} threads side by side, per-thread rings: +ns a hit "
             f"costs its thread (N={res['n']['textpoke_opt']:,} in all)",
             _stats.fmt_range(s["textpoke_opt_mt"], 0)],
            [f"  the same, {MT} threads, the recorder without its GS base check",
             _stats.fmt_range(s["textpoke_opt_mt_unchecked"], 0)],
            [f"  the GS base check, {MT} threads: median of the per-run differences",
             _diff(s["textpoke_opt_mt"], s["textpoke_opt_mt_unchecked"])],
            [f"  the same, {MT} threads on one shared ring + gettid per hit",
             _stats.fmt_range(s["textpoke_opt_mt_shared"], 0)]]
    if "bpftrace" in s:
        rows.append([f"bpftrace uprobe hit (printf arg0), +ns (N={res['n']['bpftrace']:,})",
                     _stats.fmt_range(s["bpftrace"], 0)])
        rows.append([f"bpftrace uprobe hit (@n = count()), +ns (N={res['n']['bpftrace']:,})",
                     _stats.fmt_range(s["bpftrace_count"], 0)])
        rows.append(["ratio textpoke / bpftrace printf (medians)",
                     f"{s['textpoke'].median / s['bpftrace'].median:,.1f}x"])
        rows.append(["ratio textpoke --optimize / bpftrace printf (medians)",
                     f"{s['textpoke_opt'].median / s['bpftrace'].median:,.3f}x"])
    else:
        rows.append(["bpftrace", "not run (absent, not root, or --no-bpftrace)"])
    rows.append(["textpoke probe arm + close, in the library (s)",
                 _stats.fmt_range(s["attach"], 3)])
    rows.append(["textpoke probe --optimize arm + close, in the library (s)",
                 _stats.fmt_range(s["attach_opt"], 3)])
    rows.append(["textpoke live probe --no-optimize --duration 0, process start to exit (s)",
                 _stats.fmt_range(s["cli"], 3)])
    rows.append(["textpoke live probe --duration 0 (optimised), process start to exit (s)",
                 _stats.fmt_range(s["cli_opt"], 3)])
    return _stats.table(["figure", "median (min-max, n)"], rows)


def _diff(a, b) -> str:
    """Median (min-max) of a run's *a* minus the same run's *b*."""
    d = sorted(x - y for x, y in zip(a.samples, b.samples))
    if not d:
        return "-"
    m = d[len(d) // 2] if len(d) % 2 else (d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
    return f"{m:+,.0f} ({d[0]:+,.0f} to {d[-1]:+,.0f}, n={len(d)})"


def to_json(res: dict) -> dict:
    return {"n": res["n"], "bpftrace": res["bpftrace"],
            "series": {k: v.as_dict() for k, v in res["series"].items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-bpftrace", action="store_true", help="skip the bpftrace baseline")


if __name__ == "__main__":
    if shutil.which("gcc") is None:
        sys.exit("bench_live_probe: needs gcc")
    sys.exit(_stats.script_main(None, __doc__, "live_probe", run, report, to_json, add_args))
