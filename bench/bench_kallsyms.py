# SPDX-License-Identifier: GPL-2.0-only
"""The CPU cost of a real kernel's symbols: from the image's own kallsyms
tables against from a ``System.map``, in the library and for the user.

    python bench/bench_kallsyms.py [--kernel 6.12-cloud] [--repeat N]
                                   [--baseline REV] [--json]

Every sample is a fresh Python process (nothing warm is shared but the
bytecode cache, as an installed package has one; the first round is a
warm-up), its CPU time (user+sys); the rows run interleaved, round by
round:

* ``load, kallsyms``: ``load_kernel(IMAGE)`` -- decompression, sections,
  kallsyms found and decoded, tables checked -- timed inside the process;
* ``load, System.map``: ``load_kernel(IMAGE, MAP)`` -- the same plus the
  map parsed and checked against the image's own symbols;
* ``decode kallsyms`` / ``parse System.map``: those two steps alone (in the
  decompressed ELF's ``.rodata``, as the loader searches / the map's bytes),
  inside the process;
* ``boot --image``: the whole ``textpoke boot --image IMAGE --no-progress
  --json`` command, process start to exit (the CPU an interactive user
  pays); ``... --system-map`` the same given the map;
* with ``--baseline REV``: ``boot --image`` (and ``... --system-map``)
  from the tree at git revision REV (e.g. the one before kallsyms, or
  before a speed-up), the same commands in the same run.

The kernel is Debian's (cached by ``make kernel-images``; the map comes from
the -dbg package, fetched once if it is not cached).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats  # noqa: E402

from textpoke.images import ensure_debian_kernel  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
#: children cache their bytecode (as an installed package has it), in a
#: directory of their own rather than in the tree
_PYC = tempfile.mkdtemp(prefix="bench-kallsyms-pyc-")


def _env(src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, PYTHONPYCACHEPREFIX=_PYC)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env

_INNER = r"""
import json, sys, time
T = time.process_time
what, image, smap = sys.argv[1], sys.argv[2], sys.argv[3] or None
if what == "load":
    from textpoke.images._vmlinux import load_kernel
    t = T(); load_kernel(image, smap); print(json.dumps(T() - t))
elif what == "decode":
    from textpoke.images._bzimage import extract_elf
    from textpoke.images._kallsyms import decode_kallsyms
    from textpoke.images._elf import ElfFile
    _, elf, _ = extract_elf(open(image, "rb").read(), image)
    ro = ElfFile(elf, image).section(".rodata")
    t = T(); decode_kallsyms(elf, lo=ro.offset, hi=ro.offset + ro.size)
    print(json.dumps(T() - t))
elif what == "map":
    from textpoke.images._system_map import parse_system_map
    raw = open(smap, "rb").read()
    t = T(); parse_system_map(raw, smap); print(json.dumps(T() - t))
"""


def _inner(what: str, image: Path, smap: Path | None) -> float:
    r = subprocess.run([sys.executable, "-c", _INNER, what, str(image), str(smap or "")],
                       capture_output=True, text=True, env=_env(SRC))
    if r.returncode:
        raise SystemExit(f"bench_kallsyms: {what} failed: {r.stderr.strip()[-300:]}")
    return float(json.loads(r.stdout))


def _command(argv: list[str], src: str) -> float:
    """CPU seconds (user+sys) of a child process, start to exit."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, capture_output=True, env=_env(src))
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"bench_kallsyms: {' '.join(argv[3:6])} failed: "
                         f"{r.stderr.decode()[-300:]}")
    return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default=None,
                    help="a kernel name (6.12-cloud, 6.1-cloud, 6.12-rt, ...) or a release; "
                         "default: the newest cached 6.12 cloud kernel")
    ap.add_argument("--baseline", metavar="REV",
                    help="also time boot --image (and --system-map) from the tree at this git revision")
    ap.add_argument("--no-map", action="store_true", help="skip the System.map rows")
    _stats.add_common_args(ap)
    a = ap.parse_args(argv)
    rel = None
    if a.kernel:
        from textpoke.images._qemu import resolve_kernel
        rel = resolve_kernel(a.kernel)
    k = ensure_debian_kernel(rel, with_system_map=not a.no_map)
    img, smap = k.vmlinuz, k.system_map
    boot = [sys.executable, "-m", "textpoke", "boot", "--image", str(img), "--no-progress",
            "--json"]
    fns = {
        "load, kallsyms": lambda: _inner("load", img, None),
        "decode kallsyms": lambda: _inner("decode", img, None),
        "boot --image": lambda: _command(boot, SRC),
    }
    if smap is not None:
        fns["load, System.map"] = lambda: _inner("load", img, smap)
        fns["parse System.map"] = lambda: _inner("map", img, smap)
        fns["boot --image --system-map"] = lambda: _command(boot + ["--system-map", str(smap)],
                                                            SRC)
    tmp = None
    if a.baseline:
        tmp = tempfile.TemporaryDirectory(prefix="bench-kallsyms-")
        root = Path(SRC).parent
        tar = subprocess.run(["git", "-C", str(root), "archive", a.baseline, "src"],
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=tar, check=True)
        old = str(Path(tmp.name) / "src")
        fns[f"baseline {a.baseline}: boot --image"] = lambda: _command(boot, old)
        if smap is not None:
            fns[f"baseline {a.baseline}: boot --image --system-map"] = \
                lambda: _command(boot + ["--system-map", str(smap)], old)
    print(f"kernel: Debian {k.release} ({k.package_version}); CPU seconds (user+sys) per "
          f"fresh process")
    res = _stats.interleaved(fns, a.repeat, units=dict.fromkeys(fns, "s"))
    m = _stats.meta(a)
    print(_stats.table(["", "CPU s median (min-max, n)"],
                       [[name, _stats.fmt_range(s, 3)] for name, s in res.items()]))
    print(_stats.meta_line(m))
    if a.json:
        print(json.dumps({"meta": m, "kernel": k.release,
                          "series": {n: s.as_dict() for n, s in res.items()}}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    shutil.rmtree(_PYC, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
