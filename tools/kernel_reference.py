#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Boot Debian's x86-64 kernels under QEMU for each setup of the matrix,
cache each kernel's own text before and after alternative_instructions(),
and print ONE table: per kernel x setup, textpoke's differing bytes in the
executable sections, with the kernel's memory (--data) and, with --no-data,
without it -- and beside it, on the same rows, the run-time column: where
the setup has a cached run-time reference (tools/kernel_runtime_reference.py
builds them), textpoke's differing bytes after each client step
(--no-runtime leaves the column out).

    tools/kernel_reference.py [--kernel 6.12-cloud,6.12-rt,6.1-cloud | all | RELEASE]
                              [--no-data] [--no-runtime] [--cpu MODEL --cmdline ... --smp N]

See textpoke.images._qemu and textpoke.kernel._runtime_table."""

import sys

from textpoke.kernel._runtime_table import main

if __name__ == "__main__":
    sys.exit(main())
