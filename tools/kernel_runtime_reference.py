#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Build the run-time reference of Debian's kernel under QEMU: an init
script drives ftrace, kprobes, a static-key sysctl and insmod/rmmod step
by step; after each step the kernel's text (_text.._end) and its run-time
regions (module text, ftrace trampolines, kprobe instruction pages) are
saved with a JSON manifest under ~/.cache/textpoke/reference/<release>/.

    tools/kernel_runtime_reference.py [--kernel 6.12-cloud] [--setup nomit|retpoline|calldepth|all]
                                      [--cpu MODEL --cmdline ...] [--no-cache]

The manifest's format: textpoke.images._qemu_runtime's docstring."""

import sys

from textpoke.images._qemu_runtime_cli import main

if __name__ == "__main__":
    sys.exit(main())
