# SPDX-License-Identifier: GPL-2.0-only
"""The optimised ``live probe``'s recorder alone: what its GS base check
costs a hit, without ptrace, the host's reads or the probed loop around it.

    python bench/bench_live_probe_recorder.py [--repeat R] [--json]

A small C harness (built with gcc) maps the recorder's bytes executable
and a ring at a fixed address, sets its own GS base to the ring's header
(``arch_prctl(ARCH_SET_GS)``, as the live machine does with ptrace), and
calls the recorder as the optimised probe's template does -- ``call
recorder(op, &pt_regs)`` -- N times per variant, in blocks of N / 200
calls that the variants take in turns (one process per run, the same
ring), each block timed (CLOCK_MONOTONIC); a variant's figure of a run
is its median block (a preemption costs one block, dropped).  Variants:

* **checked**: the recorder live probe injects (RDGSBASE, the range check
  against the rings' headers, the self-pointer, then the ring);
* **unchecked**: the recorder as first written (``mov %gs:0,%r10``: the
  base followed without a check) -- the baseline;
* **spare**: the recorder without FSGSBASE (every hit on the spare ring,
  ``gettid`` per hit);
* **own GS**: the checked recorder in a thread whose GS base is the
  program's own (outside the rings): the spare ring and ``gettid``.

ns per hit = median block ns / calls per block.  Figures: median (min-max) of --repeat >= 5 runs,
and the median of the per-run differences checked - unchecked.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import _stats                                                          # noqa: E402
from _harness import C_PRELUDE                                          # noqa: E402

#: where the harness maps its rings (MAP_FIXED_NOREPLACE)
RINGS = 0x200000000
RING_ENTRIES = 1024
N = 2_000_000
#: blocks the calls of a run are timed in (the variants take turns)
BLOCKS = 200

HARNESS_C = C_PRELUDE + r"""
int main(int argc, char **argv)
{
	/* argv: rings address, stride, entries, blocks, calls a block, then
	 * per variant: code file, own-GS (0/1) */
	unsigned long at = strtoul(argv[1], 0, 0), stride = strtoul(argv[2], 0, 0);
	unsigned long entries = strtoul(argv[3], 0, 0);
	long blocks = strtol(argv[4], 0, 0), per = strtol(argv[5], 0, 0);
	int nv = (argc - 6) / 2;
	void (*call[8])(unsigned long, void *);
	int own[8];
	for (int v = 0; v < nv && v < 8; v++) {
		FILE *f = fopen(argv[6 + 2 * v], "rb");
		unsigned char *rec = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		fread(rec, 1, 4096, f);
		fclose(f);
		call[v] = (void *)rec;
		own[v] = atoi(argv[7 + 2 * v]);
	}
	unsigned long *r = mmap((void *)at, 2 * stride, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (r != (void *)at) { perror("mmap"); return 2; }
	unsigned long *spare = (unsigned long *)(at + stride);
	r[0] = at; r[1] = syscall(SYS_gettid); r[2] = 0; r[3] = entries - 1;
	spare[0] = at + stride; spare[1] = 0; spare[2] = 0; spare[3] = entries - 1;
	static unsigned long mine[64];
	unsigned long regs[21] = {0}, stack[16] = {0};
	regs[19] = (unsigned long)stack;            /* pt_regs.sp */
	long *ns = calloc(nv * blocks, sizeof *ns);
	/* the variants take turns, block by block: a preemption or a busy
	 * neighbour costs one block of one variant, and the median drops it */
	for (long b = -2; b < blocks; b++)
		for (int v = 0; v < nv; v++) {
			struct timespec t0, t1;
			syscall(SYS_arch_prctl, ARCH_SET_GS, own[v] ? (unsigned long)mine : at);
			clock_gettime(CLOCK_MONOTONIC, &t0);
			for (long i = 0; i < per; i++)
				call[v](i, regs);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			if (b >= 0)
				ns[v * blocks + b] = (t1.tv_sec - t0.tv_sec) * 1000000000L +
						     (t1.tv_nsec - t0.tv_nsec);
		}
	if (mine[0] | mine[1] | mine[2]) { puts("own GS memory written"); return 3; }
	report_medians(ns, nv, blocks, per);
	return 0;
}
"""


def _codes(d: Path) -> tuple[dict[str, Path], int]:
    import struct
    from textpoke.live import _probe_opt as O
    from textpoke.live._probe_rings import ProbeRing
    stride = -(-ProbeRing.data_bytes(RING_ENTRIES) // 4096) * 4096
    spare = RINGS + stride
    body = bytearray(O._REC_BODY)
    struct.pack_into("<I", body, O._REC_WORDS, 0)
    codes = {
        "checked": O.recorder_code(0, spare=spare, rings=(RINGS, spare + O.RING_HDR)),
        "unchecked": O._REC_HEAD + bytes.fromhex("654c8b142500000000") + bytes(body),
        "spare": O.recorder_code(0, spare=spare, rings=None),
    }
    out = {}
    for k, c in codes.items():
        (d / k).write_bytes(c)
        out[k] = d / k
    return out, stride


def run(args: argparse.Namespace) -> dict:
    from textpoke.live._probe_opt import cpu_refusal, fsgsbase
    import os
    if cpu_refusal() or not fsgsbase(os.getpid()):
        raise SystemExit(f"bench_live_probe_recorder: {cpu_refusal() or 'no FSGSBASE here'}")
    with tempfile.TemporaryDirectory(prefix="bench-recorder-") as dd:
        d = Path(dd)
        (d / "h.c").write_text(HARNESS_C)
        subprocess.run(["gcc", "-O1", "-o", str(d / "h"), str(d / "h.c")], check=True)
        codes, stride = _codes(d)
        variants = [("checked", "checked", 0), ("unchecked", "unchecked", 0),
                    ("spare", "spare", 0), ("own_gs", "checked", 1)]
        s = {k: _stats.Series(k, "ns/hit") for k, _c, _o in variants}
        argv = [str(d / "h"), hex(RINGS), str(stride), str(RING_ENTRIES), str(BLOCKS),
                str(N // BLOCKS)]
        for _k, c, own in variants:
            argv += [str(codes[c]), str(own)]
        for r in range(args.repeat + 1):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
            vals = dict(zip((k for k, _c, _o in variants), map(float, p.stdout.split())))
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
    rows = [[f"recorder, checked (RDGSBASE + range + self-pointer), ns a hit (N={res['n']:,})",
             _stats.fmt_range(s["checked"], 2)],
            ["recorder as first written (mov %gs:0, unchecked), ns a hit",
             _stats.fmt_range(s["unchecked"], 2)],
            ["the check: checked - unchecked, median of the per-run differences (ns)",
             _diff(s["checked"], s["unchecked"])],
            ["recorder without FSGSBASE (spare ring + gettid), ns a hit",
             _stats.fmt_range(s["spare"], 2)],
            ["checked recorder, the thread's GS base its own (spare + gettid), ns a hit",
             _stats.fmt_range(s["own_gs"], 2)]]
    return _stats.table(["figure", "median (min-max, n)"], rows)


def to_json(res: dict) -> dict:
    return {"n": res["n"], "series": {k: v.as_dict() for k, v in res["series"].items()}}


if __name__ == "__main__":
    if shutil.which("gcc") is None:
        sys.exit("bench_live_probe_recorder: needs gcc")
    sys.exit(_stats.script_main(None, __doc__, "live_probe_recorder", run, report, to_json))
