# SPDX-License-Identifier: GPL-2.0-only
"""The kernel layer: a booted kernel as one object, above the clients.

:func:`boot_kernel` runs a real image's boot-time patching in
``start_kernel``'s order (it calls the clients' init passes, so it lives
here, above them)."""

from ._boot_real import boot_kernel

__all__ = ["boot_kernel"]
