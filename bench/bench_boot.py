# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time patch rate: apply_alternatives over an image with >= 10,000
alternative sites, and the time to build that image.

    python bench/bench_boot.py [--sites N] [--repeat R] [--quick] [--json] [--clock cpu]

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
  as sites per second (median, min-max of --repeat >= 5 fresh machines);
* a check: a random sample of the probes is run on the sim machine and
  must return the variant their entries imply.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats                                                          # noqa: E402

from textpoke import TextPoke                                          # noqa: E402
from textpoke import alternative_instructions, apply_alternatives  # noqa: E402
from textpoke.images import load_elf  # noqa: E402
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
    t = _stats.now()
    src.write_text(generate(n))
    gen = _stats.now() - t
    obj, elf = work / "bench_alts.o", work / "bench_alts.elf"
    t = _stats.now()
    subprocess.run(["gcc", "-c", f"-I{KERNEL_DIR}", "-o", str(obj), str(src)], check=True,
                   capture_output=True)
    subprocess.run(["ld", "-T", str(KERNEL_DIR / "kernel.ld"), "--build-id=none", "-z",
                    "noexecstack", "-z", "max-page-size=4096", "-o", str(elf), str(obj)],
                   check=True, capture_output=True)
    return elf, gen, _stats.now() - t


def bundled_build_time(work: Path) -> float | None:
    try:
        from textpoke.images.build import build_kernel
    except ImportError:
        return None
    t = _stats.now()
    build_kernel(work / "bundled")
    return _stats.now() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _stats.add_common_args(ap)
    ap.add_argument("--sites", type=int, default=None,
                    help="alternative sites in the generated image (default 10,000; --quick: 2,000)")
    args = ap.parse_args(argv)
    _stats.setup(args)
    n_sites = args.sites or (2_000 if args.quick else 10_000)
    if not all(shutil.which(t) for t in ("gcc", "ld")):
        print("bench_boot: needs gcc and GNU ld", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="textpoke-bench-boot-") as tmp:
        work = Path(tmp)
        built: dict = {}

        def gen_build() -> float:
            elf, gen, b = build(n_sites, work)
            built["elf"] = elf
            built.setdefault("gen", []).append(gen)
            return b

        def bundled_build() -> float:
            return bundled_build_time(work) or 0.0

        fns = {"build": gen_build}
        try:
            from textpoke.images.build import build_kernel  # noqa: F401
            fns["bundled_build"] = bundled_build
        except ImportError:
            pass
        builds = _stats.interleaved(fns, args.repeat, units={k: "s" for k in fns})
        elf = built["elf"]
        size = elf.stat().st_size

        loads: list[float] = []

        def load() -> float:
            t = _stats.now()
            img = load_elf(elf)
            boot_kernel_image(1, img)
            dt = _stats.now() - t
            loads.append(dt)
            return dt

        load_s = _stats.repeated("load", load, args.repeat, unit="s")
        image = load_elf(elf)
        sim, image, tables = boot_kernel_image(1, image)
        entries = len(tables.alt_instructions)
        sites = len(tables.alt_groups())

        last: dict = {}
        full: list[dict] = []

        def apply_once() -> float:
            s, _img, _t = boot_kernel_image(1, image)
            core = TextPoke(s)
            t = _stats.now()
            recs = apply_alternatives(core, tables.alt_instructions, FEATURES, image=image)
            dt = _stats.now() - t
            last["sim"], last["recs"] = s, recs
            return dt

        def full_once() -> float:
            # the same through alternative_instructions, for its phase split
            s2, _, _ = boot_kernel_image(1, image)
            r = alternative_instructions(TextPoke(s2), image, tables, FEATURES, selftests=False)
            full.append(r.timings)
            return sum(r.timings.get(k, 0.0) for k in ("apply_alternatives", "commit"))

        runs = _stats.interleaved({"apply_alternatives": apply_once, "alternative_instructions": full_once},
                                  args.repeat, units={"apply_alternatives": "s",
                                                      "alternative_instructions": "s"})
        apply_s = runs["apply_alternatives"]
        full = full[1:]          # the warm-up round's split is kept out
        sim, recs = last["sim"], last["recs"]

        # check a sample of the probes on the last machine
        feats = feature_set(FEATURES)
        probes = alt_probes(image, tables)
        sample = random.Random(7).sample(probes, min(300, len(probes)))
        wrong = [p.name for p in sample if sim.call(p.addr) != p.expected(feats)]
        written = sum(a.written for a in recs)
        taken = sum(a.taken for a in recs)

    site_rate = apply_s.scaled("sites_per_s", "sites/s", lambda x: sites / x)
    entry_rate = apply_s.scaled("entries_per_s", "entries/s", lambda x: entries / x)
    split = {k: _stats.Series(k, "s (wall, the core's own timer)", [t[k] for t in full if k in t])
             for k in ("apply_alternatives", "commit")}
    split = {k: v for k, v in split.items() if v.n}
    m = _stats.meta(args)
    fig = {
        "meta": m,
        "sites": sites, "entries": entries, "taken": taken, "written": written,
        "image_bytes": size, "generate_s": built["gen"],
        "build_s": builds["build"].as_dict(),
        "bundled_kernel_build_s": builds["bundled_build"].as_dict() if "bundled_build" in builds else None,
        "load_s": load_s.as_dict(),
        "apply_alternatives_s": apply_s.as_dict(),
        "sites_per_s": site_rate.as_dict(),
        "entries_per_s": entry_rate.as_dict(),
        "phase_split_s": {k: v.as_dict() for k, v in split.items()},
        "probes_checked": len(sample), "probes_wrong": len(wrong),
    }
    if args.json:
        json.dump(fig, sys.stdout, indent=2)
        print()
    else:
        ms = 1e-3
        print(_stats.meta_line(m))
        print(f"== boot-time patching: generated image of {sites:,} alternative sites "
              f"({entries:,} .altinstructions entries), {size / 1024:.0f} KiB")
        rows = [["gcc + ld, generated image (ms)", _stats.fmt_range(builds["build"], 0, ms)]]
        if "bundled_build" in builds:
            rows.append(["bundled kernel.elf build (ms)", _stats.fmt_range(builds["bundled_build"], 0, ms)])
        rows += [["load: ELF + tables + sim machine (ms)", _stats.fmt_range(load_s, 0, ms)],
                 ["apply_alternatives (ms)", _stats.fmt_range(apply_s, 0, ms)],
                 ["  sites/s", _stats.fmt_range(site_rate, 0)],
                 ["  entries/s", _stats.fmt_range(entry_rate, 0)]]
        for k, v in split.items():
            rows.append([f"  alternative_instructions: {k} (ms)", _stats.fmt_range(v, 0, ms)])
        print(_stats.table(["what", "median (min\u2013max, n)"], rows))
        print(f"  {taken:,} taken, {written:,} written; a fresh machine per run; runs interleaved")
        print(f"check: {len(sample)} probes run on the sim machine, {len(wrong)} wrong"
              + (f" ({', '.join(wrong[:5])})" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
