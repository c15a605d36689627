# SPDX-License-Identifier: GPL-2.0-only
"""SIGINT and SIGTERM for the command line (the library installs no handler).

One signal path for every command.  :func:`install` is the first thing the
entry point does -- before argparse, rich, iced-x86 or Unicorn are imported
-- so a signal in the first milliseconds is handled like any other.

SIGINT raises :class:`KeyboardInterrupt` and SIGTERM raises
:class:`Terminated`, both BaseExceptions, so every ``finally`` and ``with``
on the way out runs: a batch in flight is finished or rolled back by the
core, machines are closed, and the command prints what it did so far.
Inside emulation (a Unicorn hook, a scheduling decision) the exception is
handed to :func:`textpoke._core._signals.deliver_interrupt`, which stops
the emulation and raises it as soon as ordinary Python code runs again.

Only the first signal raises; later ones are recorded and ignored while
that clean-up runs, so a second Ctrl-C cannot cut the rollback short.
Once the work is done and a command is writing its report,
:func:`reporting` makes signals ignored too (but recorded: the exit status
still says one arrived), so that a report is never cut in half.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["EXIT_SIGINT", "EXIT_SIGTERM", "Terminated", "arrived", "exit_status", "install",
           "interruptions", "reporting", "restore", "resume", "save", "status_for"]

EXIT_SIGINT = 128 + signal.SIGINT     # 130
EXIT_SIGTERM = 128 + signal.SIGTERM   # 143


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt, exit 143."""


def exit_status(exc: BaseException) -> int:
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


_quiet = False            # set once a signal has been raised, or while reporting
_arrived: int | None = None   # the first signal that arrived (recorded even when quiet)
_installed = False
_final = False            # the exit status is decided: a signal now changes only it


def arrived() -> int | None:
    """The first signal (SIGINT/SIGTERM) that arrived since :func:`install`."""
    return _arrived


def status_for(code: int) -> int:
    """The exit status: 130/143 whenever a signal arrived, whatever the
    command found; else *code*."""
    if _arrived is None:
        return code
    return EXIT_SIGTERM if _arrived == signal.SIGTERM else EXIT_SIGINT


def reporting() -> None:
    """The work is over (finished or interrupted): ignore further signals
    while the command writes its report."""
    global _quiet
    _quiet = True


def resume() -> None:
    """After a report that ignored signals, more work follows (demo's
    clients): signals raise again, and one that arrived meanwhile raises
    here -- never forgotten, as :func:`install` (which starts afresh)
    would."""
    global _quiet
    _quiet = False          # first: a signal from now on raises in the handler
    if _arrived is not None:
        _quiet = True
        raise Terminated() if _arrived == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, _frame: object) -> None:
    global _quiet, _arrived
    if _arrived is None:
        _arrived = signum
    if _final:
        exit_now(0)       # on the way out: the report is complete, the status says it
    if _quiet:
        return
    _quiet = True
    exc: BaseException = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    # Not a plain raise once the core is loaded: inside a Unicorn hook the
    # exception would be swallowed by ctypes.  Before that, nothing can be
    # emulating, and raising here is right.
    core = sys.modules.get("textpoke._core._signals")
    if core is None:
        raise exc
    core.deliver_interrupt(exc)


def exit_now(code: int) -> None:
    """End the process with *code* (130/143 if a signal arrived) at once:
    no interpreter finalisation, during which Python puts the default
    handlers back and a late SIGTERM would kill the process silently."""
    global _final
    _final = True
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    os._exit(status_for(code))


def install() -> None:
    """Install the CLI's SIGINT/SIGTERM handlers (main thread only).  Cheap:
    imports nothing.  Idempotent; resets the record of arrived signals."""
    global _quiet, _arrived, _installed, _final
    _quiet, _arrived, _final = False, None, False
    if _installed:
        return
    try:
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
        _installed = True
    except ValueError:          # not the main thread: signals stay as they are
        pass


def save() -> dict | None:
    """The current SIGINT/SIGTERM handlers (None off the main thread)."""
    try:
        return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        return None


def restore(saved: dict | None) -> None:
    global _installed
    if not saved:
        return
    for s, h in saved.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)
    _installed = False


class interruptions:
    """``with interruptions():`` -- the handlers for the duration (kept for
    callers of the old API; :func:`main` installs them once instead)."""

    def __enter__(self) -> None:
        self._old = save() if not _installed else None
        install()

    def __exit__(self, *exc: object) -> None:
        restore(self._old)
