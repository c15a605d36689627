# SPDX-License-Identifier: GPL-2.0-only
"""Rebuild the bundled guest images with GNU as/ld (and GCC for C images).

    python -m textpoke.images.build [--out DIR] [--check] [--only NAME]

With no --out the images next to this file are replaced; --check rebuilds
into a temporary directory and compares byte for byte with the committed
ones (exit 1 on a difference).

kernel.elf is built from kernel/ with GCC and GNU ld in two links: the
first keeps its relocations (--emit-relocs) so that objtool-lite
(_objtool.py) can find the retpoline, return and static-call sites; the
second adds those tables, which the linker script places last in the
read-only block so that nothing else moves (checked).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._elf import SHF_ALLOC, ElfFile

HERE = Path(__file__).resolve().parent

__all__ = ["build_workload", "build_kernel", "main", "have_toolchain", "have_gcc",
           "KERNEL_CFLAGS", "KERNEL_LDFLAGS"]

KERNEL_DIR = HERE / "kernel"

#: Code generation in the spirit of the kernel's: freestanding, no red
#: zone, no SSE, NOP5 fentry sites recorded in __mcount_loc, retpoline and
#: return thunks, no jump tables (they would be indirect jumps).
KERNEL_CFLAGS = [
    "-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-nostdlib",
    "-mno-red-zone", "-fcf-protection=none",
    "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount",
    "-mindirect-branch=thunk-extern", "-mindirect-branch-register",
    "-mfunction-return=thunk-extern",
    "-fno-jump-tables", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-common", "-fno-strict-aliasing",
    "-mno-sse", "-mno-mmx", "-mno-sse2", "-mno-avx", "-Wall",
]
KERNEL_LDFLAGS = ["--emit-relocs", "--build-id=none", "-z", "noexecstack",
                  "-z", "max-page-size=4096"]
#: the tables the second link adds
OBJTOOL_SECTIONS = (".static_call_sites", ".retpoline_sites", ".return_sites")


def have_toolchain() -> bool:
    return all(shutil.which(t) for t in ("as", "ld"))


def have_gcc() -> bool:
    return have_toolchain() and shutil.which("gcc") is not None


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")


def build_workload(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "workload.o"
    elf = out / "workload.elf"
    _run(["as", "--64", "-o", str(obj), str(HERE / "workload.S")])
    _run(["ld", "-T", str(HERE / "workload.ld"), "--build-id=none", "-z", "noexecstack",
          "-o", str(elf), str(obj)])
    obj.unlink()
    return elf


def _kernel_sources() -> list[str]:
    return sorted(p.name for p in KERNEL_DIR.iterdir() if p.suffix in (".c", ".S"))


def _alloc_sections(raw: bytes) -> dict[str, tuple[int, bytes]]:
    elf = ElfFile(raw, "<kernel.elf>")
    return {s.name: (s.addr, elf.data(s)) for s in elf.sections if s.flags & SHF_ALLOC}


def build_kernel(out: Path) -> Path:
    """Compile kernel/*.c and kernel/*.S, link, run objtool-lite, relink."""
    from ._objtool import objtool_scan, sites_asm

    out.mkdir(parents=True, exist_ok=True)
    elf = out / "kernel.elf"
    with tempfile.TemporaryDirectory(prefix="textpoke-kernel-") as tmp:
        work = Path(tmp)
        objs = []
        for src in _kernel_sources():
            obj = work / (src.rsplit(".", 1)[0] + ".o")
            # Relative source names from the source directory: nothing in the
            # objects depends on where the tree or the build directory is.
            _run(["gcc", *KERNEL_CFLAGS, "-I.", "-c", src, "-o", str(obj)], cwd=KERNEL_DIR)
            objs.append(str(obj))
        # The demo's guest workload runs on the booted kernel: link it in.
        _run(["as", "--64", "-o", str(work / "workload.o"), "workload.S"], cwd=HERE)
        objs.append(str(work / "workload.o"))
        link = ["ld", "-T", str(KERNEL_DIR / "kernel.ld"), *KERNEL_LDFLAGS]
        first = work / "kernel.pass1.elf"
        _run([*link, "-o", str(first), *objs])
        raw1 = first.read_bytes()
        sites = objtool_scan(raw1, "kernel.pass1.elf")
        (work / "objtool_sites.s").write_text(sites_asm(sites))
        _run(["as", "--64", "-o", "objtool_sites.o", "objtool_sites.s"], cwd=work)
        _run([*link, "-o", str(elf), *objs, str(work / "objtool_sites.o")])
    before, after = _alloc_sections(raw1), _alloc_sections(elf.read_bytes())
    moved = [n for n in sorted(set(before) | set(after))
             if n not in OBJTOOL_SECTIONS and before.get(n) != after.get(n)]
    if moved:
        elf.unlink()
        raise SystemExit(f"objtool-lite tables moved other sections ({', '.join(moved)}); "
                         "they must come last in the read-only block of kernel.ld")
    return elf


BUILDERS = {"workload.elf": build_workload, "kernel.elf": build_kernel}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m textpoke.images.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="rebuild and compare with the committed images")
    ap.add_argument("--only", choices=sorted(BUILDERS), action="append",
                    help="build only this image (repeatable)")
    args = ap.parse_args(argv)
    builders = {n: f for n, f in BUILDERS.items() if not args.only or n in args.only}
    if not have_toolchain():
        print("GNU as/ld not found; install binutils", file=sys.stderr)
        return 2
    if "kernel.elf" in builders and not have_gcc():
        print("gcc not found; it is needed for kernel.elf", file=sys.stderr)
        return 2
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            bad = 0
            for name, fn in builders.items():
                built = fn(Path(tmp))
                same = filecmp.cmp(built, HERE / name, shallow=False)
                print(f"{name}: {'identical' if same else 'DIFFERS'}")
                bad += not same
            return 1 if bad else 0
    out = args.out or HERE
    for fn in builders.values():
        path = fn(out)
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
