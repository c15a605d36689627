# SPDX-License-Identifier: GPL-2.0-only
"""Loadable modules for the bundled kernel image: sources, the committed
relocatable objects and their build helper (:mod:`.build`).

``mod_clients.o`` uses two of the image's static keys and its ``sc_op``
static call, and carries an alternative, a retpoline site and return-thunk
sites.  ``bad_*.o`` are the loader's refusals: an unknown relocation type,
a relocation out of range, an unknown symbol, a jump entry whose key is
not a static key, a static-call site whose key is not a static call's.
"""

from importlib import resources
from pathlib import Path

__all__ = ["module_path", "MODULES", "REFUSALS"]

MODULES = ("mod_clients.o",)
REFUSALS = ("bad_reloc.o", "bad_range.o", "bad_sym.o", "bad_key.o", "bad_call.o")


def module_path(name: str) -> Path:
    """Path of a committed module object (e.g. ``"mod_clients.o"``)."""
    return Path(str(resources.files(__name__).joinpath(name)))
