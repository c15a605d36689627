#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Boot Debian's 6.12 cloud kernel under QEMU for each setup of the matrix,
cache the kernel's own text before and after alternative_instructions(), and
print the table (and textpoke's difference from it, once textpoke boot can
patch real images).  See textpoke.images._qemu."""

import sys

from textpoke.images._qemu import main

if __name__ == "__main__":
    sys.exit(main())
