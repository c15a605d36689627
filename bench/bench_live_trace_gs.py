# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``'s runtime alone: what the GS base check costs a traced
call, without ptrace, the host's reads or a traced loop around it.

    python bench/bench_live_trace_gs.py [--repeat R] [--json]

The runtime ``live trace`` injects (:func:`textpoke.live._trace_runtime.
build_runtime`, the TSC clock) is built once per variant for fixed
addresses; a small C harness (gcc) maps each variant's code and data there
(a record initialised as the ring's ``add_cpu`` does: its own address, a
ring of 1024 entries that overwrites), sets its GS base
(``arch_prctl(ARCH_SET_GS)``) and calls ``function_trace_call(ip,
parent)`` -- what ``ftrace_caller`` calls per traced call -- in blocks of
N / 200 calls that the variants take in turns (one process per run), each
block timed (CLOCK_MONOTONIC); a variant's figure of a run is its median
block.  Variants:

* **checked**: the per-CPU load a CALL to the checked read (RDGSBASE, the
  range check, the self-pointer: ``live/_gscheck.py``);
* **unchecked**: ``mov %gs:0`` as first written -- the baseline;
* **syscall**: the checked read with ``arch_prctl(ARCH_GET_GS)`` (a
  process without FSGSBASE in user mode);
* **own GS**: the checked runtime in a thread whose GS base is the
  program's own: the sink, the missed count (the harness checks the
  program's buffer is untouched and the count exact).

ns per call = median block ns / calls per block.  Figures: median (min-max)
of --repeat >= 5 runs, and the median of the per-run differences checked -
unchecked.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import _stats                                                          # noqa: E402
from _harness import C_PRELUDE                                          # noqa: E402

#: each variant's code at BASE + v * STEP, its data 1 MiB above
BASE, STEP, DATA_OFF = 0x300000000, 0x400000, 0x100000
ENTRIES = 1024
N = 2_000_000
BLOCKS = 200

HARNESS_C = C_PRELUDE + r"""
static void *load(const char *path, unsigned long at, int prot)
{
	FILE *f = fopen(path, "rb");
	long n;
	void *p;
	fseek(f, 0, SEEK_END); n = ftell(f); fseek(f, 0, SEEK_SET);
	p = mmap((void *)at, (n + 4095) & ~4095L, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (p != (void *)at) { perror("mmap"); exit(2); }
	fread(p, 1, n, f);
	fclose(f);
	mprotect(p, (n + 4095) & ~4095L, prot);
	return p;
}
int main(int argc, char **argv)
{
	/* argv: blocks, calls a block, then per variant: code file, code at,
	 * data file, data at, function_trace_call, GS base (0: our own buffer),
	 * missed counter (0: none) */
	long blocks = strtol(argv[1], 0, 0), per = strtol(argv[2], 0, 0);
	int nv = (argc - 3) / 7;
	void (*call[8])(unsigned long, unsigned long);
	unsigned long gs[8], *missed[8];
	static unsigned long mine[64], copy[64];
	for (int i = 0; i < 64; i++) mine[i] = copy[i] = 0x5a5a5a5a00000000UL + i;
	mine[0] = copy[0] = (unsigned long)mine;          /* a header-like buffer */
	for (int v = 0; v < nv && v < 8; v++) {
		char **a = argv + 3 + 7 * v;
		load(a[0], strtoul(a[1], 0, 0), PROT_READ | PROT_EXEC);
		load(a[2], strtoul(a[3], 0, 0), PROT_READ | PROT_WRITE);
		call[v] = (void *)strtoul(a[4], 0, 0);
		gs[v] = strtoul(a[5], 0, 0);
		if (!gs[v]) gs[v] = (unsigned long)mine;
		missed[v] = (unsigned long *)strtoul(a[6], 0, 0);
	}
	long *ns = calloc(nv * blocks, sizeof *ns);
	for (long b = -2; b < blocks; b++)
		for (int v = 0; v < nv; v++) {
			struct timespec t0, t1;
			syscall(SYS_arch_prctl, ARCH_SET_GS, gs[v]);
			clock_gettime(CLOCK_MONOTONIC, &t0);
			for (long i = 0; i < per; i++)
				call[v](0x401000 + (i & 7), 0x402000);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			if (b >= 0)
				ns[v * blocks + b] = (t1.tv_sec - t0.tv_sec) * 1000000000L +
						     (t1.tv_nsec - t0.tv_nsec);
		}
	if (memcmp(mine, copy, sizeof mine)) { puts("own GS memory written"); return 3; }
	for (int v = 0; v < nv; v++)
		if (missed[v] && *missed[v] != (unsigned long)(blocks + 2) * per) {
			printf("missed %lu of %ld\n", *missed[v], (blocks + 2) * per);
			return 4;
		}
	report_medians(ns, nv, blocks, per);
	return 0;
}
"""

VARIANTS = (("checked", "rdgsbase", True), ("unchecked", "unchecked", True),
            ("syscall", "syscall", True), ("own_gs", "rdgsbase", False))


def _variant(d: Path, v: int, gs: str, ours: bool) -> list[str]:
    """The harness's arguments for variant *v*: the runtime built for its
    addresses, record 0 set up as RingBuffer.add_cpu does."""
    from textpoke.live._trace_runtime import SINK_MISSED, build_runtime
    code_at = BASE + v * STEP
    data_at = code_at + DATA_OFF
    rt = build_runtime(code_at, data_at, 16, "tsc", gs=gs)
    data = bytearray(rt.data)
    ring = data_at + len(data)
    data += bytes(32 * ENTRIES)
    rec = rt.symbols["ftrace_percpu"]
    o = rec - data_at
    # self, cpu, pid, buf, mask; overwrite at 80
    struct.pack_into("<QQQQQ", data, o, rec, 0, 1, ring, ENTRIES - 1)
    struct.pack_into("<Q", data, o + 80, 1)
    (d / f"c{v}").write_bytes(rt.code)
    (d / f"d{v}").write_bytes(bytes(data))
    sink = rt.symbols.get("trace_gs_sink")
    return [str(d / f"c{v}"), hex(code_at), str(d / f"d{v}"), hex(data_at),
            hex(rt.symbols["function_trace_call"]), hex(rec if ours else 0),
            hex(sink + SINK_MISSED) if sink is not None and not ours else "0"]


def run(args: argparse.Namespace) -> dict:
    from textpoke.live._probe_opt import fsgsbase
    import os
    if not fsgsbase(os.getpid()):
        raise SystemExit("bench_live_trace_gs: no FSGSBASE in user mode here")
    with tempfile.TemporaryDirectory(prefix="bench-trace-gs-") as dd:
        d = Path(dd)
        (d / "h.c").write_text(HARNESS_C)
        subprocess.run(["gcc", "-O1", "-o", str(d / "h"), str(d / "h.c")], check=True)
        argv = [str(d / "h"), str(BLOCKS), str(N // BLOCKS)]
        for v, (_k, gs, ours) in enumerate(VARIANTS):
            argv += _variant(d, v, gs, ours)
        s = {k: _stats.Series(k, "ns/call") for k, _g, _o in VARIANTS}
        for r in range(args.repeat + 1):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stdout + p.stderr
            vals = dict(zip((k for k, _g, _o in VARIANTS), map(float, p.stdout.split())))
            for k, v in vals.items():
                (s[k].warmup if r == 0 else s[k].samples).append(v)
            print(f"run {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()), file=sys.stderr)
    return {"series": s, "n": N}


def _diff(a, b) -> str:
    d = sorted(x - y for x, y in zip(a.samples, b.samples))
    m = d[len(d) // 2] if len(d) % 2 else (d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
    return f"{m:+.2f} ({d[0]:+.2f} to {d[-1]:+.2f}, n={len(d)})"


def report(res: dict) -> str:
    s = res["series"]
    rows = [[f"function_trace_call, checked load (RDGSBASE + range + self-pointer), ns a call "
             f"(N={res['n']:,})", _stats.fmt_range(s["checked"], 2)],
            ["function_trace_call as first written (mov %gs:0 unchecked), ns a call",
             _stats.fmt_range(s["unchecked"], 2)],
            ["the check: checked - unchecked, median of the per-run differences (ns)",
             _diff(s["checked"], s["unchecked"])],
            ["checked load read with arch_prctl (no FSGSBASE), ns a call",
             _stats.fmt_range(s["syscall"], 2)],
            ["checked, the thread's GS base its own (sink + missed count), ns a call",
             _stats.fmt_range(s["own_gs"], 2)]]
    return _stats.table(["figure", "median (min-max, n)"], rows)


def to_json(res: dict) -> dict:
    return {"n": res["n"], "series": {k: v.as_dict() for k, v in res["series"].items()}}


if __name__ == "__main__":
    if shutil.which("gcc") is None:
        sys.exit("bench_live_trace_gs: needs gcc")
    sys.exit(_stats.script_main(None, __doc__, "live_trace_gs", run, report, to_json))
