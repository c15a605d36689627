# SPDX-License-Identifier: GPL-2.0-only
"""Generated guest images, built on demand where gcc is present."""

from .ftrace_many import build_many_image, generate_many, many_image

__all__ = ["build_many_image", "generate_many", "many_image"]
