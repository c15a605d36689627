# SPDX-License-Identifier: GPL-2.0-only
"""Old home of :class:`SymbolMap`, which is now a view of the one
symbolizer (:mod:`textpoke.images._kallsyms`); re-exported here only for
callers not yet switched.  The clients' tables are read by
:mod:`textpoke.images._tables`."""

from ._kallsyms import SymbolMap  # noqa: F401

__all__ = ["SymbolMap"]
