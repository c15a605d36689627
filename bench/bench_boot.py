# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time patch rate: apply_alternatives over an image with >= 10,000
alternative sites, and the time to build that image.

    python bench/bench_boot.py [--sites N] [--repeat R] [--json]

The image is generated: N small probe functions in assembly, each holding
one ALTERNATIVE site of a rotating kind (plain, ALT_FLAG_NOT, a longer
replacement padded with NOPs, a shorter one leaving a NOP run longer than
11 bytes, a nested ALTERNATIVE_2, a CALL, a RIP-relative load, a JMP out of
the replacement that shrinks to JMP8), built with the bundled image's
alternative.h by gcc and GNU ld with the bundled kernel.ld, loaded with the
images loader and booted on the sim machine.  Figures:

* build: gcc + ld wall time for the generated image (and for the bundled
  kernel.elf, through its own build command);
* load: ELF parse + table parse + sim machine set-up;
* apply_alternatives: host time for every entry (decide, relocate,
  optimise NOPs, stage) and the commit through text_poke_early, reported
  as sites per second (best and median of --repeat fresh machines);
* a check: a random sample of the probes is run on the sim machine and
  must return the variant their entries imply.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from textpoke import TextPoke                                          # noqa: E402
from textpoke._alternative import alternative_instructions, apply_alternatives  # noqa: E402
from textpoke.images._elf import load_elf                              # noqa: E402
from textpoke.images._kernel import alt_probes                         # noqa: E402
from textpoke.sim._boot import boot_kernel_image                      # noqa: E402
from textpoke.images._tables import feature_set                        # noqa: E402
from textpoke.images.build import HERE as IMAGES_DIR                   # noqa: E402

KERNEL_DIR = IMAGES_DIR / "kernel"
FEATURES = ["xmm2", "rdtscp", "lfence_rdtsc", "popcnt", "avx2", "bmi2", "erms", "fsrm",
            "smap", "clflushopt"]
#: features the sites test, present and absent under FEATURES
SITE_FEATURES = ["X86_FEATURE_ALWAYS", "X86_FEATURE_ERMS", "X86_FEATURE_XENPV",
                 "X86_FEATURE_AVX2", "X86_FEATURE_HYPERVISOR", "X86_FEATURE_POPCNT",
                 "X86_FEATURE_RETPOLINE", "X86_FEATURE_SMAP"]

_KINDS = (
    # (original, replacement) -- probes return 1 for the original, 2 for
    # the replacement
    ('"mov $1, %eax"', '"mov $2, %eax"'),
    ('"push $1; pop %rax"', '"xor %eax, %eax; inc %eax; inc %eax; add $0, %ecx"'),
    ('"mov $1, %eax; mov $1, %ecx; mov $1, %edx; mov $1, %esi"', '"mov $2, %eax"'),
    ('"call bench_ret1"', '"call bench_ret2"'),
    ('"mov $1, %eax"', '"mov bench_two(%rip), %eax"'),
)


def generate(n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    out = ['#include "alternative.h"', '#include "cpufeatures.h"', "", "\t.text",
           "\t.globl start_kernel", "start_kernel:", "\tret",
           "\t.globl bench_ret1", "bench_ret1:", "\tmov $1, %eax", "\tret",
           "\t.globl bench_ret2", "bench_ret2:", "\tmov $2, %eax", "\tret", ""]
    for i in range(n):
        feat = rng.choice(SITE_FEATURES)
        if rng.random() < 0.2:
            feat = f"ALT_NOT({feat})"
        kind = i % 7
        name = f"alt_probe_bench_{i}"      # the images' probe convention: 1 + variant
        out.append(f"\t.p2align 4\n\t.globl {name}\n\t.type {name}, @function\n{name}:")
        if kind < len(_KINDS):
            old, new = _KINDS[kind]
            out.append(f"\tALTERNATIVE {old}, {new}, {feat}")
        elif kind == 5:
            feat2 = rng.choice(SITE_FEATURES)
            out.append(f'\tALTERNATIVE_2 "mov $1, %eax", "push $2; pop %rax", {feat}, '
                       f'"xor %eax, %eax; mov $3, %al; nop", {feat2}')
        else:
            out.append("\tmov $2, %eax")
            out.append(f'\tALTERNATIVE "", "jmp 1f", {feat}')
            out.append("\tmov $1, %eax")
            out.append("1:")
        out.append(f"\tret\n\t.size {name}, . - {name}")
    out += ["", "\t.section .rodata", "\t.p2align 2", "\t.globl bench_two", "bench_two:",
            "\t.long 2", ""]
    return "\n".join(out) + "\n"


def build(n: int, work: Path) -> tuple[Path, float, float]:
    src = work / "bench_alts.S"
    t = time.perf_counter()
    src.write_text(generate(n))
    gen = time.perf_counter() - t
    obj, elf = work / "bench_alts.o", work / "bench_alts.elf"
    t = time.perf_counter()
    subprocess.run(["gcc", "-c", f"-I{KERNEL_DIR}", "-o", str(obj), str(src)], check=True,
                   capture_output=True)
    subprocess.run(["ld", "-T", str(KERNEL_DIR / "kernel.ld"), "--build-id=none", "-z",
                    "noexecstack", "-z", "max-page-size=4096", "-o", str(elf), str(obj)],
                   check=True, capture_output=True)
    return elf, gen, time.perf_counter() - t


def bundled_build_time(work: Path) -> float | None:
    try:
        from textpoke.images.build import build_kernel
    except ImportError:
        return None
    t = time.perf_counter()
    build_kernel(work / "bundled")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not all(shutil.which(t) for t in ("gcc", "ld")):
        print("bench_boot: needs gcc and GNU ld", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="textpoke-bench-boot-") as tmp:
        work = Path(tmp)
        elf, gen_s, build_s = build(args.sites, work)
        bundled_s = bundled_build_time(work)
        size = elf.stat().st_size

        t = time.perf_counter()
        image = load_elf(elf)
        sim, image, tables = boot_kernel_image(1, image)
        load_s = time.perf_counter() - t
        entries = len(tables.alt_instructions)
        sites = len(tables.alt_groups())

        rates, runs, full = [], [], []
        for _ in range(max(1, args.repeat)):
            sim, image, tables = boot_kernel_image(1, image)
            core = TextPoke(sim)
            t = time.perf_counter()
            recs = apply_alternatives(core, tables.alt_instructions, FEATURES, image=image)
            dt = time.perf_counter() - t
            runs.append(dt)
            rates.append(entries / dt)
            # the same through alternative_instructions, for its phase split
            sim2, _, _ = boot_kernel_image(1, image)
            r = alternative_instructions(TextPoke(sim2), image, tables, FEATURES, selftests=False)
            full.append(r.timings)

        # check a sample of the probes on the last machine
        feats = feature_set(FEATURES)
        probes = alt_probes(image, tables)
        sample = random.Random(7).sample(probes, min(300, len(probes)))
        wrong = [p.name for p in sample if sim.call(p.addr) != p.expected(feats)]
        written = sum(a.written for a in recs)
        taken = sum(a.taken for a in recs)

    best = min(runs)
    fig = {
        "sites": sites, "entries": entries, "taken": taken, "written": written,
        "image_bytes": size,
        "generate_s": round(gen_s, 4), "build_s": round(build_s, 4),
        "bundled_kernel_build_s": None if bundled_s is None else round(bundled_s, 4),
        "load_s": round(load_s, 4),
        "apply_alternatives_best_s": round(best, 4),
        "apply_alternatives_median_s": round(statistics.median(runs), 4),
        "entries_per_s_best": round(entries / best),
        "entries_per_s_median": round(statistics.median(rates)),
        "sites_per_s_best": round(sites / best),
        "phase_split_s": {k: round(statistics.median(t[k] for t in full), 4)
                          for k in ("apply_alternatives", "commit")},
        "probes_checked": len(sample), "probes_wrong": len(wrong),
    }
    if args.json:
        json.dump(fig, sys.stdout, indent=2)
        print()
    else:
        print(f"generated image: {sites:,} alternative sites ({entries:,} .altinstructions "
              f"entries), {size / 1024:.0f} KiB")
        print(f"  generate sources {gen_s * 1000:.0f} ms, gcc + ld {build_s * 1000:.0f} ms"
              + (f"; bundled kernel.elf build (2 links + objtool-lite) {bundled_s * 1000:.0f} ms"
                 if bundled_s is not None else ""))
        print(f"  load (ELF + tables + sim machine) {load_s * 1000:.0f} ms")
        print(f"apply_alternatives, {len(runs)} fresh machines: best {best * 1000:.0f} ms, "
              f"median {statistics.median(runs) * 1000:.0f} ms")
        print(f"  {entries / best:,.0f} entries/s ({sites / best:,.0f} sites/s) best, "
              f"{statistics.median(rates):,.0f} entries/s median; "
              f"{taken:,} taken, {written:,} written")
        ps = fig["phase_split_s"]
        print(f"  split (median): decide+relocate+stage {ps['apply_alternatives'] * 1000:.0f} ms, "
              f"commit via text_poke_early {ps['commit'] * 1000:.0f} ms")
        print(f"check: {len(sample)} probes run on the sim machine, {len(wrong)} wrong"
              + (f" ({', '.join(wrong[:5])})" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
