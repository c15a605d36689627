# SPDX-License-Identifier: GPL-2.0-only
"""SIGINT and SIGTERM for the command line (the library installs no handler).

SIGINT raises :class:`KeyboardInterrupt` and SIGTERM raises
:class:`Terminated`, both BaseExceptions, so every ``finally`` and ``with``
on the way out runs: a batch in flight is finished or rolled back by the
core, machines are closed, and the command prints what it did so far.
Only the first signal raises; later ones are ignored while that cleanup
runs, so a second Ctrl-C cannot cut the rollback short.  Once the work is
done and a command is writing its report, :func:`reporting` makes signals
ignored too, so that a report is never cut in half.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from ..lowlevel import deliver_interrupt

__all__ = ["EXIT_SIGINT", "EXIT_SIGTERM", "Terminated", "exit_status", "interruptions",
           "reporting"]

EXIT_SIGINT = 128 + signal.SIGINT     # 130
EXIT_SIGTERM = 128 + signal.SIGTERM   # 143


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt, exit 143."""


def exit_status(exc: BaseException) -> int:
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


_quiet = False     # set once a signal has been raised, or while reporting


def reporting() -> None:
    """The work is over (finished or interrupted): ignore further signals
    while the command writes its report."""
    global _quiet
    _quiet = True


@contextlib.contextmanager
def interruptions() -> Iterator[None]:
    """Install the CLI's SIGINT/SIGTERM handlers for the duration (main
    thread only; elsewhere signals stay as they are)."""
    global _quiet
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _quiet = False

    def handler(signum: int, _frame: object) -> None:
        global _quiet
        if _quiet:
            return
        _quiet = True
        # Not a plain raise: inside a Unicorn hook the exception would be
        # swallowed by ctypes; deliver_interrupt stops the emulation and
        # raises once ordinary Python code runs again.
        deliver_interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
