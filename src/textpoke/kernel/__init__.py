# SPDX-License-Identifier: GPL-2.0-only
"""The kernel layer, above the clients: a booted kernel as one object.

:class:`Kernel` holds the image, its tables and symbols, the core and the
boot result, and creates the clients on demand (``kernel.keys``,
``.calls``, ``.ftrace``, ``.kprobes``, ``.modules``, ``.bpf``) the same
way over any machine.  :func:`boot_kernel` runs a real image's boot-time
patching in ``start_kernel``'s order (it calls the clients' init passes,
so it lives here, above them).

A real image: :func:`load_kernel` reads it (a bzImage or vmlinux, with its
own symbols), :class:`KernelText` is its memory, :class:`CpuCaps` the boot
CPU's capability words and :class:`BootOptions` the command line's choices
that :func:`boot_kernel` takes; :func:`offline_kernel` makes the booted
image a :class:`Kernel` on a machine with no CPUs (its clients' memory in
:class:`ExecRegion` s), as the clients' ``--image`` commands do."""

from .._alternative._kpasses import BootOptions
from .._alternative._ktext import CpuCaps, KernelBootError, KernelText
from ..images._vmlinux import load_kernel
from ._boot_real import boot_kernel
from ._kernel import KPROBES_EXECMEM, Kernel
from ._offline import ExecRegion, offline_kernel

__all__ = ["Kernel", "KPROBES_EXECMEM", "boot_kernel", "load_kernel", "KernelText", "CpuCaps",
           "BootOptions", "KernelBootError", "offline_kernel", "ExecRegion"]
