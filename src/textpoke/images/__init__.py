# SPDX-License-Identifier: GPL-2.0-only
"""Guest images: sources, the committed builds, and the loader."""

import functools
from pathlib import Path

from .._core._lazy import lazy_names
from ._elf import ElfImage, ElfSection, ImageError, load_elf

#: public name -> the module that defines it, imported when first used
#: (PEP 562): a real kernel image (Debian's, fetched and cached, or a vmlinux)
_LAZY = {n: "._vmlinux" for n in ("load_kernel", "ensure_debian_kernel", "DebianKernel",
                                  "KernelUnavailable", "RealKernelImage")}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = ["ElfImage", "ElfSection", "ImageError", "load_elf", "image_path", "load_bundled",
           *_LAZY]


def image_path(name: str) -> Path:
    """Path of a bundled, prebuilt image (e.g. ``"workload.elf"``)."""
    return Path(__file__).resolve().parent / name     # a plain directory: no importlib.resources


@functools.cache
def load_bundled(name: str) -> ElfImage:
    """A bundled image, loaded once per process (images are immutable)."""
    return load_elf(image_path(name))
