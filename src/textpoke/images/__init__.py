# SPDX-License-Identifier: GPL-2.0-only
"""Guest images: sources, the committed builds, and the loader."""

import functools
from pathlib import Path

from ._elf import ElfImage, ElfSection, ImageError, load_elf

__all__ = ["ElfImage", "ElfSection", "ImageError", "load_elf", "image_path", "load_bundled"]


def image_path(name: str) -> Path:
    """Path of a bundled, prebuilt image (e.g. ``"workload.elf"``)."""
    return Path(__file__).resolve().parent / name     # a plain directory: no importlib.resources


@functools.cache
def load_bundled(name: str) -> ElfImage:
    """A bundled image, loaded once per process (images are immutable)."""
    return load_elf(image_path(name))
