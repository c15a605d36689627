#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Boot Debian's x86-64 kernels under QEMU for each setup of the matrix,
cache each kernel's own text before and after alternative_instructions(),
and print ONE table: per kernel x setup, textpoke's differing bytes in the
executable sections, with the kernel's memory (--data) and, with --no-data,
without it.

    tools/kernel_reference.py [--kernel 6.12-cloud,6.12-rt,6.1-cloud | all | RELEASE]
                              [--no-data] [--cpu MODEL --cmdline ... --smp N]

See textpoke.images._qemu."""

import sys

from textpoke.images._qemu import main

if __name__ == "__main__":
    sys.exit(main())
