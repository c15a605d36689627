# SPDX-License-Identifier: GPL-2.0-only
"""The kernel layer, above the clients: a booted kernel as one object.

:class:`Kernel` holds the image, its tables and symbols, the core and the
boot result, and creates the clients on demand (``kernel.keys``,
``.calls``, ``.ftrace``, ``.kprobes``, ``.modules``, ``.bpf``) the same
way over any machine.  :func:`boot_kernel` runs a real image's boot-time
patching in ``start_kernel``'s order (it calls the clients' init passes,
so it lives here, above them)."""

from ._boot_real import boot_kernel
from ._kernel import KPROBES_EXECMEM, Kernel

__all__ = ["Kernel", "KPROBES_EXECMEM", "boot_kernel"]
