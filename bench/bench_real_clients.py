# SPDX-License-Identifier: GPL-2.0-only
"""ftrace over every traceable function of Debian's real 6.12 image, offline.

    python bench/bench_real_clients.py [--repeat R] [--quick] [--json] [--clock cpu]
                                       [--image VMLINUZ] [--no-process] [--qemu-rounds R]

The image (the cached ``linux-image-6.12.*-cloud-amd64``, or ``--image``)
is booted once as ``boot --image`` boots it (one CPU, the default CPU
model), then wrapped in an offline machine (``textpoke.kernel._offline``)
with the tracer's trampoline page given.  One sample of each:

* **ftrace enable** -- ``Ftrace.start("function")`` with an empty filter:
  every record of core text (~40,000 fentry sites) checked and switched
  NOP5 -> CALL to the ops' trampoline through the SMP batch, plus the two
  ``ftrace_call``/``ftrace_regs_call`` updates around it;
* **ftrace disable** -- ``Ftrace.stop()``: every site back to NOP5;
* **baseline: the core's batch alone** -- the same sites switched NOP5 ->
  the same CALLs and back with ``smp_text_poke_batch_add`` in one ``with
  core.batch()``: the work the batch protocol does with nothing of ftrace
  (no records, no verification, no callback updates) -- the floor ftrace
  stands on.

Figures are sites/s (median, min-max of ``--repeat`` >= 5, interleaved
round by round).  Exact counts: batches and syncs of each enable/disable
(a batch per 256 sites, at most three syncs each), checked, and the text
must read exactly as booted after every round.

**The kernel's own time for the same step** (``--qemu-rounds R``, R >= 5;
one QEMU boot, ``images/_qemu_runtime_timing.py``): Debian's kernel under
QEMU/TCG (qemu64, ``mitigations=off``: the run-time reference's first
setup) times ``echo function > current_tracer`` with an empty filter and
``echo nop > current_tracer``, R rounds each, by its own clock (printk
timestamps of kmsg markers around each ``echo``); sites/s is the number
``enabled_functions`` lists over that time.  That time is the whole
write (the tracer's init, its trampoline, every site through
``text_poke_bp_batch``, the ``ftrace_call`` updates, the RCU waits) on an
emulated CPU: TCG is much slower than hardware, so it bounds the
kernel's time on hardware from above.

What the user sees, process start to exit (``--no-process`` skips it):
``textpoke ftrace --image IMG --functions '*' --trampoline ADDR --cpus 1
--no-early`` against ``textpoke boot --image IMG --cpus 1 --no-early``
(the same load and boot without the tracer), wall and CPU time
(user+sys of the child), interleaved.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import (REPO, Series, child_times, command_series, fmt_range,  # noqa: E402
                    interleaved, now, script_main, table)

TRAMP = 0xFFFFFFFFC0000000


def _image(args) -> Path:
    if args.image:
        return Path(args.image)
    cached = sorted((Path.home() / ".cache/textpoke/kernel").glob("6.12.*-cloud-amd64"))
    for d in cached[::-1]:
        if (d / "vmlinuz").is_file():
            return d / "vmlinuz"
    raise SystemExit("bench_real_clients: Debian's 6.12 cloud image is not cached "
                     "(make test-kernel fetches it) and no --image given")


def _boot(path: Path):
    from textpoke._alternative._kearly import read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    img = load_kernel(str(path))
    cfgp = path.parent / "config"
    cfg = read_config(cfgp) if cfgp.is_file() else None
    return offline_kernel(img, CpuCaps.from_names(["always"]), BootOptions(ncpus=1), config=cfg,
                          regions=[ExecRegion(TRAMP, 4096, "ftrace")])


def library(args) -> tuple[dict[str, Series], dict]:
    ok = _boot(_image(args))
    try:
        core = ok.kernel.core
        ft = ok.kernel.ftrace
        m = ok.machine
        c = m.core
        booted = m.text_read(c.start, c.end - c.start)
        n = len(ft.records)
        ups, dns, base = [], [], []

        def restored() -> None:
            if m.text_read(c.start, c.end - c.start) != booted:
                raise SystemExit("bench_real_clients: the text is not as booted after a round")

        state = {"on": False}

        def off() -> None:
            if state["on"]:
                ft.stop()                       # untimed: back to the booted text
                state["on"] = False
                restored()

        def enable() -> float:
            off()
            t0 = now()
            up = ft.start("function")
            dt = now() - t0
            ups.append(up.as_dict())
            state["on"] = True
            return n / dt

        def disable() -> float:
            if not state["on"]:
                ft.start("function")            # untimed: something to disable
            t0 = now()
            dn = ft.stop()
            dt = now() - t0
            dns.append(dn.as_dict())
            state["on"] = False
            restored()
            return n / dt

        tramp = None

        def batch_only() -> float:
            nonlocal tramp
            off()
            if tramp is None:
                ft.start("function")
                tramp = ft.trampolines["function"].addr
                ft.stop()
            calls = [(r.ip, ft.call_insn(r.ip, tramp)) for r in ft.records]
            s0, b0 = core.stats.syncs, core.stats.batches
            t0 = now()
            with core.batch():
                for ip, new in calls:
                    core.smp_text_poke_batch_add(ip, new)
            with core.batch():
                for ip, _new in calls:
                    core.smp_text_poke_batch_add(ip, b"\x0f\x1f\x44\x00\x00")
            dt = now() - t0
            base.append({"syncs": core.stats.syncs - s0, "batches": core.stats.batches - b0})
            restored()
            return 2 * n / dt

        res = interleaved({"ftrace enable": enable, "ftrace disable": disable,
                           "baseline: core batch alone (both ways)": batch_only},
                          args.repeat, units={k: "sites/s" for k in
                                              ("ftrace enable", "ftrace disable",
                                               "baseline: core batch alone (both ways)")})
        want = -(-n // 256)
        bad = [u for u in ups + dns if u["batches"] != want or u["syncs"] > 3 * u["batches"]]
        if bad:
            raise SystemExit(f"bench_real_clients: unexpected batches/syncs: {bad[:3]}")
        checks = {"records": n, "batches_per_update": want,
                  "enable": ups[-1], "disable": dns[-1], "baseline": base[-1],
                  "version": ok.image.version}
        off()
        return res, checks
    finally:
        ok.close()


def _child(argv: list[str]) -> tuple[float, float]:
    wall, cpu, p = child_times(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if p.returncode != 0:
        raise SystemExit(f"bench_real_clients: {' '.join(argv)} exited {p.returncode}: "
                         f"{p.stderr[-300:]}")
    return wall, cpu


def processes(args) -> dict[str, Series]:
    img = str(_image(args))
    common = ["--image", img, "--cpus", "1", "--no-early", "--json"]
    cmds = {"textpoke ftrace --image --functions '*'":
            [sys.executable, "-m", "textpoke", "ftrace", "--functions", "*", "--trampoline",
             hex(TRAMP), *common],
            "baseline: textpoke boot --image": [sys.executable, "-m", "textpoke", "boot",
                                                *common]}
    return command_series({k: (lambda a=a: _child(a)) for k, a in cmds.items()}, args.repeat)


def kernel_under_qemu(args) -> tuple[dict[str, Series], dict]:
    """The kernel's own time for the same step, under QEMU/TCG (one boot)."""
    from textpoke.images._qemu import resolve_kernel
    from textpoke.images._qemu_runtime_timing import ftrace_timing
    from textpoke.images import ensure_debian_kernel
    kernel = ensure_debian_kernel(resolve_kernel("6.12-cloud"))
    t = ftrace_timing(kernel, reps=args.qemu_rounds,
                      progress=lambda m: print(f"  qemu: {m}", file=sys.stderr, flush=True))
    if any(n != t.sites for n in t.enabled):
        raise SystemExit(f"bench_real_clients: the guest enabled {t.enabled} of {t.sites} "
                         "functions")
    k = "kernel under QEMU/TCG: echo function > current_tracer"
    j = "kernel under QEMU/TCG: echo nop > current_tracer"
    out = {k: Series(k, "sites/s", [t.sites / x for x in t.on]),
           j: Series(j, "sites/s", [t.sites / x for x in t.off]),
           f"{k} (guest clock)": Series(f"{k} (guest clock)", "s", list(t.on)),
           f"{j} (guest clock)": Series(f"{j} (guest clock)", "s", list(t.off))}
    return out, t.as_dict()


def run(args):
    res, checks = library(args)
    if not args.no_process:
        res.update(processes(args))
    if args.qemu_rounds:
        q, checks["qemu"] = kernel_under_qemu(args)
        res.update(q)
    return res, checks


def report(r) -> str:
    res, checks = r
    rows = []
    for k, s in res.items():
        digits = 0 if s.unit == "sites/s" else 2
        rows.append([k, f"{fmt_range(s, digits)} {s.unit}"])
    lines = [table(["what", "median (min-max)"], rows),
             f"  {checks['version']}: {checks['records']:,} fentry sites of core text; "
             f"{checks['batches_per_update']} batches per update",
             f"  enable: {checks['enable']}",
             f"  disable: {checks['disable']}",
             f"  baseline (both ways): {checks['baseline']}"]
    q = checks.get("qemu")
    if q:
        lines.append(f"  kernel: {q['release']}, {q['setup']}, {q['qemu']}; {q['sites']:,} "
                     f"functions enabled per round; one boot of {q['wall']:.0f} s (TCG: an "
                     "emulated CPU, slower than hardware)")
    return "\n".join(lines)


def add_args(ap) -> None:
    ap.add_argument("--image", help="a 6.12 bzImage (default: the cached Debian cloud image)")
    ap.add_argument("--no-process", action="store_true",
                    help="skip the process start-to-exit figures")
    ap.add_argument("--qemu-rounds", type=int, default=0, metavar="R",
                    help="also time the kernel's own step under QEMU/TCG, R rounds in one boot "
                         "(R >= 5 for a figure; needs qemu-system-x86_64 and busybox-static)")


def main(argv=None) -> int:
    return script_main(argv, __doc__, "real_clients", run, report,
                       lambda r: {"series": {k: s.as_dict() for k, s in r[0].items()},
                                  "checks": r[1]}, add_args)


if __name__ == "__main__":
    sys.exit(main())
