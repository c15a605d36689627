# SPDX-License-Identifier: GPL-2.0-only
"""Getting a signal's exception out of code that cannot take one.

A Python signal handler runs at the next bytecode of the main thread.
While Unicorn emulates, the only Python that runs is a hook callback
called through ctypes -- and an exception raised there is printed and
swallowed ("Exception ignored on calling ctypes callback function"), so a
Ctrl-C would be lost and the program would run on.  The library installs
no signal handler; one that an application installs should call
:func:`deliver_interrupt` instead of raising: outside such code it raises
at once; inside, it stops the emulation (the region's *stop* callback)
and the exception is raised as soon as the region is left, from ordinary
Python code where every ``finally`` and ``except`` sees it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

__all__ = ["deliver_interrupt", "uninterruptible"]

_stops: list[Callable[[], None]] = []
_pending: BaseException | None = None


@contextlib.contextmanager
def uninterruptible(stop: Callable[[], None]) -> Iterator[None]:
    """Mark a region (an ``emu_start``) in which an exception cannot
    propagate; *stop* makes the region end early (``uc.emu_stop``)."""
    global _pending
    _stops.append(stop)
    try:
        yield
    finally:
        _stops.pop()
        if not _stops and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def deliver_interrupt(exc: BaseException) -> None:
    """Raise *exc* (from a signal handler) where it can propagate: now, or
    when the current uninterruptible region ends (which is asked to end
    at once).  A second exception while one is pending is dropped."""
    global _pending
    if not _stops:
        raise exc
    if _pending is None:
        _pending = exc
    _stops[-1]()
