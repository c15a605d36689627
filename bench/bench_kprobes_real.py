# SPDX-License-Identifier: GPL-2.0-only
"""Registering 1,000 kprobes on Debian's real 6.12 image, optimised, offline.

    python bench/bench_kprobes_real.py [--repeat R] [--quick] [--json] [--clock cpu]
                                       [--image VMLINUZ] [--probes N] [--no-process]

The image (the cached ``linux-image-6.12.*-cloud-amd64``, or ``--image``)
is booted once as ``boot --image`` boots it (one CPU, the default CPU
model, the image's own config: PREEMPTION, KPROBES_ON_FTRACE, IBT), then
wrapped in an offline machine with pages for kprobes' instruction slots and
for the optinsn slots (the run-time reference's addresses).  The probe
points are chosen once, untimed: the instruction right after the fentry
NOP of each function in address order (the bare symbol is the NOP itself,
which KPROBES_ON_FTRACE probes through ftrace, never optimised), kept when
the optimizer can optimise it, until there are N (default 1,000).  Then,
interleaved round by round:

* **register + optimise** -- ``register_kprobe`` for each point (its INT3
  armed, every CPU synced: what ``echo p:... >> kprobe_events`` then
  ``enable`` does per probe) and one ``kprobe_optimizer()`` pass over all
  of them (each point's out-of-line buffer built in its optinsn slot, then
  each JMP32 with its own text_poke_bp, as 6.12's arch_optimize_kprobes):
  probes/s of the whole;
* **baseline: register only** -- the same registrations left as INT3
  probes (``Kprobes(auto_optimize=False)``, no optimizer pass);
* **baseline: the core's batch alone** -- the same N JMP32s written by
  ``smp_text_poke_batch_add`` in one ``with core.batch()`` and the
  original bytes put back the same way: the floor of writing those bytes
  (no decoding, no checks, no buffers, and 3 syncs a batch of 256 where
  the kernel's optimizer syncs 3 times a probe).

After every round the probes are unregistered (untimed) and the text must
read exactly as booted.  Batches and syncs of each part are counted and
reported (the optimizer, as the kernel's ``arch_optimize_kprobes``, uses
one ``text_poke_bp`` per probe: N batches of three syncs).

What the user sees, process start to exit (``--no-process`` skips it):
``textpoke kprobe --image IMG vfs_statx+5 --optimize --kprobe-slots ADDR
--optprobe-slots ADDR`` against ``textpoke boot --image`` (the same load
and boot), wall and CPU time of the child, interleaved.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import (Series, command_series, fmt_range, interleaved, now,  # noqa: E402
                    script_main, table)
from bench_real_clients import _child, _image  # noqa: E402

SLOTS = 0xFFFFFFFFC0200000          # kprobe_insn_slots' pages
OPT = 0xFFFFFFFFC0400000            # kprobe_optinsn_slots' pages


def _boot(path: Path, n: int):
    from textpoke._alternative._kearly import read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    from textpoke._kprobes._opt import MAX_OPTINSN_SIZE
    img = load_kernel(str(path))
    cfgp = path.parent / "config"
    cfg = read_config(cfgp) if cfgp.is_file() else None
    slot_pages = -(-n * 2 * 32 // 4096) + 4
    opt_pages = -(-n * 2 // (4096 // MAX_OPTINSN_SIZE)) + 4
    return offline_kernel(img, CpuCaps.from_names(["always"]), BootOptions(ncpus=1), config=cfg,
                          regions=[ExecRegion(SLOTS, slot_pages * 4096, "kprobes"),
                                   ExecRegion(OPT, opt_pages * 4096, "optprobes")])


def _points(kp, n: int) -> list[int]:
    """N addresses the optimizer optimises: the instruction after each
    function's fentry NOP, in address order (untimed)."""
    cands = sorted(kp.fentry)
    chosen: list[int] = []
    i = 0
    while len(chosen) < n and i < len(cands):
        batch = []
        for a in cands[i:i + 2 * (n - len(chosen)) + 16]:
            try:
                batch.append(kp.register_kprobe(a + 5))
            except Exception:
                continue
        i += 2 * (n - len(chosen)) + 16
        done = {p.addr for p in kp.kprobe_optimizer()}
        chosen += [p.addr for p in batch if p.addr in done][:n - len(chosen)]
        kp.unregister_kprobes(batch)
    if len(chosen) < n:
        raise SystemExit(f"bench_kprobes_real: only {len(chosen)} optimisable points found")
    return sorted(chosen)


def library(args) -> tuple[dict[str, Series], dict]:
    n = args.probes if not args.quick else min(args.probes, 200)
    ok = _boot(_image(args), n)
    try:
        from textpoke import JMP32_INSN_OPCODE, text_gen_insn
        kp = ok.kernel.kprobes
        core = ok.kernel.core
        m = ok.machine
        c = m.core
        booted = m.text_read(c.start, c.end - c.start)
        points = _points(kp, n)
        counts: dict[str, list[dict]] = {"opt": [], "int3": [], "batch": []}

        def restored() -> None:
            if m.text_read(c.start, c.end - c.start) != booted:
                raise SystemExit("bench_kprobes_real: the text is not as booted after a round")

        def stats0():
            return core.stats.syncs, core.stats.batches

        def used(s0) -> dict:
            return {"syncs": core.stats.syncs - s0[0], "batches": core.stats.batches - s0[1]}

        def cold() -> None:
            # a fresh process has decoded nothing yet: neither has a round
            kp.__dict__.pop("_decoded", None)

        def register_optimise() -> float:
            cold()
            s0 = stats0()
            t0 = now()
            probes = [kp.register_kprobe(a) for a in points]
            s1 = stats0()
            done = kp.kprobe_optimizer()
            dt = now() - t0
            counts["opt"].append({"register": used(s0) | {"syncs": s1[0] - s0[0],
                                                          "batches": s1[1] - s0[1]},
                                  "optimizer": {"syncs": core.stats.syncs - s1[0],
                                                "batches": core.stats.batches - s1[1]}})
            if len(done) != n or not all(kp.is_optimized(p) for p in probes):
                raise SystemExit("bench_kprobes_real: not every probe was optimised")
            kp.unregister_kprobes(probes)
            restored()
            return n / dt

        def register_only() -> float:
            cold()
            s0 = stats0()
            t0 = now()
            probes = [kp.register_kprobe(a) for a in points]
            dt = now() - t0
            counts["int3"].append(used(s0))
            kp.unregister_kprobes(probes)
            restored()
            return n / dt

        jmps = [(a, text_gen_insn(JMP32_INSN_OPCODE, a, OPT)) for a in points]
        olds = [(a, m.text_read(a, 5)) for a in points]

        def batch_only() -> float:
            s0 = stats0()
            t0 = now()
            with core.batch():
                for a, new in jmps:
                    core.smp_text_poke_batch_add(a, new)
            with core.batch():
                for a, old in olds:
                    core.smp_text_poke_batch_add(a, old, emulate=x86_nop5)
            dt = now() - t0
            counts["batch"].append(used(s0))
            restored()
            return 2 * n / dt

        from textpoke import x86_nops
        x86_nop5 = x86_nops[5]
        names = {"register + optimise": register_optimise,
                 "baseline: register only (INT3 probes)": register_only,
                 "baseline: core batch alone (N JMP32s there and back)": batch_only}
        res = interleaved(names, args.repeat,
                          units={"register + optimise": "probes/s",
                                 "baseline: register only (INT3 probes)": "probes/s",
                                 "baseline: core batch alone (N JMP32s there and back)":
                                     "sites/s"})
        checks = {"probes": n, "version": ok.image.version,
                  "first": hex(points[0]), "last": hex(points[-1]),
                  "register + optimise": counts["opt"][-1], "register only": counts["int3"][-1],
                  "core batch": counts["batch"][-1],
                  "preemption": ok.kernel.config["PREEMPTION"]}
        return res, checks
    finally:
        ok.close()


def processes(args) -> dict[str, Series]:
    img = str(_image(args))
    common = ["--image", img, "--cpus", "1", "--no-early", "--json"]
    cmds = {"textpoke kprobe --image vfs_statx+5 --optimize":
            [sys.executable, "-m", "textpoke", "kprobe", "vfs_statx+5", "--optimize",
             "--kprobe-slots", hex(SLOTS), "--optprobe-slots", hex(OPT), *common],
            "baseline: textpoke boot --image": [sys.executable, "-m", "textpoke", "boot",
                                                *common]}
    return command_series({k: (lambda a=a: _child(a)) for k, a in cmds.items()}, args.repeat)


def run(args):
    res, checks = library(args)
    if not args.no_process:
        res.update(processes(args))
    return res, checks


def report(r) -> str:
    res, checks = r
    rows = [[k, f"{fmt_range(s, 0 if s.unit.endswith('/s') else 2)} {s.unit}"]
            for k, s in res.items()]
    return "\n".join([
        table(["what", "median (min-max)"], rows),
        f"  {checks['version']}: {checks['probes']:,} probes, {checks['first']}..{checks['last']}"
        f" (PREEMPTION={checks['preemption']}: never boosted)",
        f"  register + optimise: {checks['register + optimise']}",
        f"  register only: {checks['register only']}",
        f"  core batch (both ways): {checks['core batch']}"])


def add_args(ap) -> None:
    ap.add_argument("--image", help="a 6.12 bzImage (default: the cached Debian cloud image)")
    ap.add_argument("--probes", type=int, default=1000, help="probes per round (default 1000)")
    ap.add_argument("--no-process", action="store_true",
                    help="skip the process start-to-exit figures")


def main(argv=None) -> int:
    return script_main(argv, __doc__, "kprobes_real", run, report,
                       lambda r: {"series": {k: s.as_dict() for k, s in r[0].items()},
                                  "checks": r[1]}, add_args)


if __name__ == "__main__":
    sys.exit(main())
