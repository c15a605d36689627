# SPDX-License-Identifier: GPL-2.0-only
"""Modules of a Debian kernel package, for the run-time reference
(:mod:`._qemu_runtime`) to load in its guest: a ``.ko`` extracted once from
the cached ``linux-image-<release>-unsigned`` package (decompressed when it
is ``.ko.xz``, as 6.12's are; 6.1's are plain ``.ko``), and the executable sections that stay once it is loaded."""

from __future__ import annotations

import lzma
import subprocess
import tempfile
from pathlib import Path

from ._elf import SHF_ALLOC, SHF_EXECINSTR, ElfFile
from ._qemu import cache_root
from ._qemu_vm import ReferenceError

__all__ = ["module_file", "module_exec_sections"]


def _deb_of(release: str) -> Path:
    debs = cache_root() / "kernel" / "debs"
    found = sorted(debs.glob(f"linux-image-{release}-unsigned_*_amd64.deb"))
    if not found:
        raise ReferenceError(f"no linux-image-{release}-unsigned .deb in {debs} "
                             f"(tools/kernel_reference.py --kernel {release} --fetch-only)")
    return found[-1]


def module_file(release: str, name: str, source: str) -> Path:
    """The decompressed ``.ko`` of module *name* (``source``: its path under
    ``/lib/modules/<release>/`` in the image package), extracted once."""
    d = cache_root() / "modules" / release
    out = d / f"{name}.ko"
    if out.exists():
        return out
    d.mkdir(parents=True, exist_ok=True)
    # 6.12's packages compress their modules (.ko.xz), 6.1's do not (.ko)
    alt = source.removesuffix(".xz") if source.endswith(".xz") else source + ".xz"
    data = err = None
    for src in (source, alt):
        member = f"./lib/modules/{release}/{src}"
        with tempfile.TemporaryDirectory(prefix="textpoke-ko-") as td:
            deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(_deb_of(release))],
                                   stdout=subprocess.PIPE)
            r = subprocess.run(["tar", "-x", "-C", td, member], stdin=deb.stdout,
                               capture_output=True, text=True, check=False)
            deb.stdout.close()
            deb.wait()
            got = Path(td) / member
            if r.returncode or not got.exists():
                err = err or (f"./lib/modules/{release}/{source} is not in "
                              f"{_deb_of(release).name}: {r.stderr.strip()[-200:]}")
                continue
            data = got.read_bytes()
        if src.endswith(".xz"):
            data = lzma.decompress(data)
        break
    if data is None:
        raise ReferenceError(err)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(out)
    return out


def module_exec_sections(path: Path) -> dict[str, int]:
    """name -> size of a ``.ko``'s executable sections that stay after init."""
    elf = ElfFile(path.read_bytes(), str(path))
    return {s.name: s.size for s in elf.sections
            if s.flags & SHF_ALLOC and s.flags & SHF_EXECINSTR and s.size
            and not s.name.startswith(".init")}
