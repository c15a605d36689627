# SPDX-License-Identifier: GPL-2.0-only
"""The bundled kernel-like image (kernel.elf) on a sim machine.

:func:`kernel_regions` lays the image out as the kernel would be -- core
text, the executable replacement block, read-only tables, data -- for a
machine to map (``textpoke.sim._boot.boot_kernel_image`` does so).

The image's *probe* functions (``alt_probe_*``) each hold one alternative
site, possibly nested, and return 1 when the original instructions ran or
1 + i when the i-th table entry of the site was patched in.  Since later
entries of a site overwrite earlier ones, the correct answer for a CPU
feature set is 1 + the index of the last entry whose condition holds
(:meth:`AltProbe.expected`) -- an oracle for tests of apply_alternatives
that does not depend on how the patcher works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .._core._machine import PAGE_SIZE
from ._elf import ElfImage, ImageError
from ._tables import AltInstr, KernelTables

__all__ = ["kernel_regions", "AltProbe", "alt_probes",
           "KERNEL_IMAGE", "KERNEL_MODULE_BASE", "KERNEL_MODULE_SIZE"]

KERNEL_IMAGE = "kernel.elf"
#: an executable, non-core region (execmem: detours, JIT buffers)
KERNEL_MODULE_BASE = 0x0200_0000
KERNEL_MODULE_SIZE = 0x10_0000
_SIM_KIND = {"text": "text", "rodata": "rodata", "data": "data", "bss": "data"}


def kernel_regions(image: ElfImage) -> list[tuple[int, bytes, str, str]]:
    """SimMachine regions for *image*: sections of one kind that share or
    touch a page are merged (a page has one protection); ``.text`` comes
    first as the core kernel text."""
    secs = sorted(image.sections.values(), key=lambda s: s.addr)
    groups: list[list] = []
    for s in secs:
        kind = _SIM_KIND[s.kind]
        if groups and groups[-1][2] == kind and s.addr <= (groups[-1][1] + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE:
            g = groups[-1]
            if s.addr < g[1]:
                raise ImageError(f"{image.path}: section {s.name} overlaps {g[3][-1]}")
            g[4] += bytes(s.addr - g[1]) + s.data
            g[1] = s.end
            g[3].append(s.name)
        else:
            if groups and s.addr < (groups[-1][1] + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE:
                raise ImageError(f"{image.path}: section {s.name} ({s.kind}) shares a page with "
                                 f"{groups[-1][3][-1]} ({groups[-1][2]})")
            groups.append([s.addr, s.end, kind, [s.name], bytearray(s.data)])
    regions = []
    for start, _end, kind, names, data in groups:
        if ".text" in names:
            # sim.call() returns through the last byte of the first text
            # region; make sure that byte is INT3 padding, not code.
            if len(data) % PAGE_SIZE == 0:
                data += b"\xcc"
        regions.append((start, bytes(data), kind, "+".join(names)))
    regions.sort(key=lambda r: (".text" not in r[3].split("+"), r[0]))
    if not regions or ".text" not in regions[0][3].split("+"):
        raise ImageError(f"{image.path}: no .text section")
    return regions


@dataclass(frozen=True, slots=True)
class AltProbe:
    """A probe function and the entries of its one alternative site."""

    name: str
    addr: int
    size: int
    entries: tuple[AltInstr, ...]

    def expected(self, features: Iterable[int]) -> int:
        """The value a correctly patched probe returns on a CPU with
        *features* (include ``always``: see ``feature_set``)."""
        feats = frozenset(features)
        result = 1
        for i, a in enumerate(self.entries, start=1):
            if a.wanted(feats):
                result = 1 + i
        return result


def alt_probes(image: ElfImage, tables: KernelTables) -> list[AltProbe]:
    """Every ``alt_probe_*`` function with the table entries of its site."""
    groups = tables.alt_groups()
    out = []
    for name in sorted(n for n in image.symbols if n.startswith("alt_probe_")):
        start, size = image.symbols[name], image.sizes.get(name, 0)
        mine = [g for g in groups if start <= g[0].instr < start + size]
        if len(mine) != 1:
            raise ImageError(f"{image.path}: probe {name} holds {len(mine)} alternative sites, "
                             "expected exactly one")
        out.append(AltProbe(name, start, size, mine[0]))
    return out
