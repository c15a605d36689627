# SPDX-License-Identifier: GPL-2.0-only
"""The ftrace client: ``ftrace_init`` turns every ``__mcount_loc`` call into
the ideal NOP5; run-time enabling builds on it."""

from ._boot import ftrace_init

__all__ = ["ftrace_init"]
