# SPDX-License-Identifier: GPL-2.0-only
"""Time the boot-time passes on Debian's 6.12 cloud kernel: the median of
>= 5 runs (each on a fresh copy of the image's memory; loading the image
is not counted), for a CPU with no mitigations and for a call-depth
tracking CPU (retbleed=stuff: ~190,000 call sites redirected).

    python bench/bench_real_boot.py [IMAGE SYSTEM_MAP] [--runs N] [--clock cpu]

Without IMAGE/SYSTEM_MAP it uses the Debian kernel cached by
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
from textpoke.kernel import boot_kernel                                 # noqa: E402
from textpoke._alternative._kpasses import BootOptions                 # noqa: E402
from textpoke._alternative._ktext import CpuCaps                       # noqa: E402
from textpoke.images._vmlinux import ensure_debian_kernel, load_kernel  # noqa: E402

SETUPS = {
    "no mitigations, 1 CPU": (["always"], "__x86_return_thunk", 1),
    "retpoline+rethunk+call depth, 2 CPUs": (
        ["always", "retpoline", "rethunk", "call_depth"], "call_depth_return_thunk", 2),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", nargs="?")
    ap.add_argument("system_map", nargs="?")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock (default) or this process's CPU time (on a loaded machine)")
    a = ap.parse_args()
    if a.runs < 5:
        ap.error("--runs must be >= 5 (medians of at least 5)")
    if (a.image is None) != (a.system_map is None):
        ap.error("give both IMAGE and SYSTEM_MAP, or neither (the cached Debian kernel)")
    if a.image is None:
        k = ensure_debian_kernel()
        a.image, a.system_map = k.vmlinuz, k.system_map
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
