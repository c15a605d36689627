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

from typing import Callable

__all__ = ["deliver_interrupt", "uninterruptible"]

_stops: list[Callable[[], None]] = []
_pending: list[BaseException] = []


class uninterruptible:
    """``with uninterruptible(stop):`` marks a region (an ``emu_start``, a
    scheduling decision) in which an exception cannot propagate; *stop*
    makes the region end early (``uc.emu_stop``).  A plain class rather
    than a generator-based context manager: the sim enters one per
    scheduling decision."""

    __slots__ = ("stop",)

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop

    def __enter__(self) -> None:
        _stops.append(self.stop)

    def __exit__(self, *exc: object) -> None:
        _stops.pop()
        if _pending and not _stops:
            raise _pending.pop()


def deliver_interrupt(exc: BaseException) -> None:
    """Raise *exc* (from a signal handler) where it can propagate: now, or
    when the current uninterruptible region ends (which is asked to end
    at once).  A second exception while one is pending is dropped."""
    if not _stops:
        raise exc
    if not _pending:
        _pending.append(exc)
    _stops[-1]()
