# SPDX-License-Identifier: GPL-2.0-only
"""Rebuild the bundled guest images with GNU as/ld (and GCC for C images).

    python -m textpoke.images.build [--out DIR] [--check]

With no --out the images next to this file are replaced; --check rebuilds
into a temporary directory and compares byte for byte with the committed
ones (exit 1 on a difference).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

__all__ = ["build_workload", "main", "have_toolchain"]


def have_toolchain() -> bool:
    return all(shutil.which(t) for t in ("as", "ld"))


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
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


BUILDERS = {"workload.elf": build_workload}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m textpoke.images.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="rebuild and compare with the committed images")
    args = ap.parse_args(argv)
    if not have_toolchain():
        print("GNU as/ld not found; install binutils", file=sys.stderr)
        return 2
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            bad = 0
            for name, fn in BUILDERS.items():
                built = fn(Path(tmp))
                same = filecmp.cmp(built, HERE / name, shallow=False)
                print(f"{name}: {'identical' if same else 'DIFFERS'}")
                bad += not same
            return 1 if bad else 0
    out = args.out or HERE
    for name, fn in BUILDERS.items():
        path = fn(out)
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
