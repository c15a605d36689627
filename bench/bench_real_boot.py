# SPDX-License-Identifier: GPL-2.0-only
"""Time the boot-time passes on Debian's 6.12 cloud kernel: the median of
>= 5 runs (each on a fresh copy of the image's memory; loading the image
is not counted), for a CPU with no mitigations and for a call-depth
tracking CPU (retbleed=stuff: ~190,000 call sites redirected).

    python bench/bench_real_boot.py [IMAGE [SYSTEM_MAP]] [--runs N] [--clock cpu]
    python bench/bench_real_boot.py --kernels 6.12-cloud,6.12-rt,6.1-cloud [--runs N]

``--kernels``: the whole ``textpoke boot --image`` command on each kernel (a
new process each run: interpreter start, image load and decompression, the
passes, the JSON report), its CPU time (user+sys of the child) and wall
time, median and min-max of >= 5 runs.

The image's own symbols are used (a SYSTEM_MAP is only checked against
them).  Without IMAGE it uses the Debian kernel cached by
``make kernel-images`` (fetching it once if apt can).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from textpoke._alternative._kboot import kernel_text_of                # noqa: E402
from textpoke.kernel import BootOptions, CpuCaps, boot_kernel, load_kernel  # noqa: E402
from textpoke.images import ensure_debian_kernel  # noqa: E402

SETUPS = {
    "no mitigations, 1 CPU": (["always"], "__x86_return_thunk", 1),
    "retpoline+rethunk+call depth, 2 CPUs": (
        ["always", "retpoline", "rethunk", "call_depth"], "call_depth_return_thunk", 2),
}


def bench_kernels(names: list[str], runs: int) -> int:
    """CPU and wall time of ``textpoke boot --image`` per kernel (qemu64's
    capability words: retpolines, no return thunk; one CPU)."""
    import os
    import resource
    import subprocess
    from textpoke.images._qemu import resolve_kernel
    caps = "0x78bfbfd,0x2193fbfd,0,0x6354010,0x80002001,0,0x105,0x82000,0x8000,0,0,0x1020"
    print(f"{'kernel':28} {'CPU s median':>12} {'(min-max)':>15} {'wall s median':>13} "
          f"{'(min-max)':>15}  n")
    for name in names:
        k = ensure_debian_kernel(resolve_kernel(name))
        argv = [sys.executable, "-m", "textpoke", "boot", "--image", str(k.vmlinuz),
                "--cpu-caps", caps, "--cpus", "1",
                "--no-progress", "--json"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
        cpu, wall = [], []
        for _ in range(runs):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            r = subprocess.run(argv, capture_output=True, env=env, check=False)
            wall.append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r.returncode:
                print(f"{k.release}: textpoke boot failed: {r.stderr.decode()[-200:]}")
                return 1
            cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        print(f"{k.release:28} {statistics.median(cpu):12.2f} "
              f"{f'({min(cpu):.2f}-{max(cpu):.2f})':>15} {statistics.median(wall):13.2f} "
              f"{f'({min(wall):.2f}-{max(wall):.2f})':>15}  {runs}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", nargs="?")
    ap.add_argument("system_map", nargs="?")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock (default) or this process's CPU time (on a loaded machine)")
    ap.add_argument("--kernels", help="time the whole boot --image command on these kernels "
                                      "(6.12-cloud,6.12-rt,6.1-cloud or releases)")
    a = ap.parse_args()
    if a.runs < 5:
        ap.error("--runs must be >= 5 (medians of at least 5)")
    if a.kernels:
        return bench_kernels([n for n in a.kernels.split(",") if n], a.runs)
    if a.image is None and a.system_map is not None:
        ap.error("SYSTEM_MAP without IMAGE")
    if a.image is None:
        k = ensure_debian_kernel()
        a.image = k.vmlinuz
        print(f"kernel: Debian {k.release} ({k.package_version})")
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    print(f"clock: {a.clock}")
    t0 = time.perf_counter()
    img = load_kernel(a.image, a.system_map)
    print(f"load: {time.perf_counter() - t0:.2f} s (not counted)")
    for name, (feats, rt, ncpus) in SETUPS.items():
        samples = []
        for _ in range(a.runs):
            kt = kernel_text_of(img)
            t = clock()
            boot_kernel(kt, CpuCaps.from_names(feats), BootOptions(return_thunk=rt, ncpus=ncpus))
            samples.append(clock() - t)
        print(f"{name:40} median {statistics.median(samples):.3f} s "
              f"(min {min(samples):.3f}, max {max(samples):.3f}, n={len(samples)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
