# SPDX-License-Identifier: GPL-2.0-only
"""kprobes, kretprobes and optimised kprobes over :class:`TextPoke`."""

from ._core import Kprobe, KprobeError, Kprobes, Kretprobe, KretprobeInstance

__all__ = ["Kprobes", "Kprobe", "Kretprobe", "KretprobeInstance", "KprobeError"]
