# SPDX-License-Identifier: GPL-2.0-only
"""Public names a package loads when first used (PEP 562), so that
importing the package costs only what it imports itself: ``textpoke.live``,
``textpoke.sim`` and ``textpoke.images`` name their tools, rigs and readers
this way.  (The ``textpoke`` façade keeps its own copy of the hook: it may
import nothing at all, not even this package, for ``textpoke --version``.)"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any],
                                                              Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for *package*, whose public *names* map
    each to the module (relative to the package) that defines it.  A name,
    once loaded, is kept in the package's namespace."""
    def getattr_(name: str) -> Any:
        mod = names.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        pkg = importlib.import_module(package)
        value = getattr(importlib.import_module(mod, package), name)
        setattr(pkg, name, value)         # next time: a plain attribute
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return getattr_, dir_
