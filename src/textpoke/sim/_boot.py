# SPDX-License-Identifier: GPL-2.0-only
"""A sim machine holding the kernel image, before boot-time patching.

Lives in ``sim`` (not ``images``) so that the images package, which only
reads ELF files and tables, never imports a machine backend.
"""

from __future__ import annotations

from ..images import ElfImage, load_bundled
from ..images._kernel import KERNEL_IMAGE, KERNEL_MODULE_BASE, KERNEL_MODULE_SIZE, kernel_regions
from ..images._tables import KernelTables, read_tables
from ._machine import SimMachine

__all__ = ["boot_kernel_image"]


def boot_kernel_image(ncpus: int = 1, image: ElfImage | None = None, *, seed: int = 0,
                      line_size: int = 64, module_size: int = KERNEL_MODULE_SIZE,
                      **machine_kw) -> tuple[SimMachine, ElfImage, KernelTables]:
    """A sim machine holding the kernel image, unpatched, with its tables.

    *image* defaults to the bundled ``kernel.elf``.  Extra keyword
    arguments go to :class:`SimMachine` (``policy``, ...)."""
    image = image or load_bundled(KERNEL_IMAGE)
    tables = read_tables(image)
    regions = kernel_regions(image)
    if module_size:
        regions.append((KERNEL_MODULE_BASE, module_size, "module", "execmem"))
    sim = SimMachine(regions, ncpus=ncpus, seed=seed, line_size=line_size, **machine_kw)
    return sim, image, tables
