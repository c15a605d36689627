# SPDX-License-Identifier: GPL-2.0-only
"""Where the kprobes self-test used to live; it needs only capabilities and
is now :func:`textpoke.selftests.kprobes_selftest` (this name stays for the
demo's command)."""

from ..selftests import RAND1, kprobes_selftest

__all__ = ["kprobes_selftest", "RAND1"]
