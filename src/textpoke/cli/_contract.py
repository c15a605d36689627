# SPDX-License-Identifier: GPL-2.0-only
"""The CLI contract in one place: the exit status from what a command
found, the partial summary of an interrupted command, refusals.

* 0 ok, 1 a check found a problem, 2 usage/refusal (one line on stderr),
  130/143 a signal arrived (:func:`textpoke.cli._signals.status_for` has
  the last word: a signal that arrived is never hidden by a finished run),
  141 stdout was closed under us (see :data:`textpoke.cli.EXIT_PIPE`).
* An interrupted command prints what it did so far; with ``--json`` one
  document with ``"interrupted": true`` and ``"int3_left"`` -- the INT3s of
  the core's batches that the text still holds, read back from the
  machine, or ``null`` with ``"int3_left_reason"`` where no machine text
  was touched yet.
"""

from __future__ import annotations

import os
import sys
from ._signals import exit_status, reporting

__all__ = ["Run", "begin", "current", "exit_status", "finish", "int3_left_of", "interrupted_tail",
           "pipe_closed", "usage_error"]

NOT_STARTED = ("interrupted before the command had a machine: no text was touched, so no "
               "INT3 can be left")


class Run:
    """What the entry point knows of the command being run."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.json = "--json" in argv
        self.command: str | None = None

    def interrupted_fallback(self, exc: BaseException) -> int:
        """A signal that reached the entry point: the command had nothing
        to report yet (or let the interrupt through).  Say so, in JSON if
        asked -- unless the command already wrote its document."""
        reporting()
        from . import _output as out
        if self.json and not out.emitted():
            out.emit_json({"command": self.command, "interrupted": True, "int3_left": None,
                           "int3_left_reason": NOT_STARTED})
        print(f"textpoke{' ' + self.command if self.command else ''}: interrupted before "
              "any work was done", file=sys.stderr)
        return exit_status(exc)


_current: Run | None = None


def begin(argv: list[str]) -> Run:
    global _current
    from . import _output
    _output.reset()
    _current = Run(argv)
    return _current


def current() -> Run | None:
    return _current


def usage_error(line: str) -> int:
    """One line on stderr, exit 2."""
    from ._args import one_line
    print(one_line(line, 600), file=sys.stderr)
    return 2


def pipe_closed() -> int:
    """stdout was closed by the reader: nothing more can be said there.
    Exit 141 (128 + SIGPIPE), whatever the run found."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    return 141


def int3_left_of(core: object) -> tuple[int | None, str | None]:
    """(INT3s of the core's batches the text still holds, read back; or
    None and why it could not be read)."""
    if core is None:
        return None, NOT_STARTED
    try:
        return core.int3_left(), None
    except Exception as e:          # the machine is gone: say so, do not guess
        return None, f"the text could not be read back: {type(e).__name__}: {e}"


def finish(args: object, d: dict, lines: list[str], failed: bool, core: object = None) -> int:
    """The tail of a command that ran to its end: int3_left read back, the
    report, exit 0 or 1 from what was found."""
    left, why = int3_left_of(core) if core is not None else (0, None)
    reporting()
    d["interrupted"] = False
    d["int3_left"] = left
    if why:
        d["int3_left_reason"] = why
    failed = failed or bool(left)
    _emit(args, d, lines)
    return 1 if failed else 0


def interrupted_tail(args: object, d: dict, lines: list[str], exc: BaseException,
                     core: object = None, reason: str | None = None) -> int:
    """The partial summary of an interrupted command; exit 130/143."""
    reporting()
    if core is not None:
        left, why = int3_left_of(core)
    else:
        left, why = None, reason or NOT_STARTED
    reporting()
    d["interrupted"] = True
    d["int3_left"] = left
    if why:
        d["int3_left_reason"] = why
    _emit(args, d, lines)
    name = d.get("command") or getattr(args, "command", "")
    said = "no machine text was touched" if left is None else f"INT3s left in the text: {left}"
    print(f"textpoke {name}: interrupted; {said}", file=sys.stderr)
    return exit_status(exc)


def _emit(args: object, d: dict, lines: list[str]) -> None:
    from . import _output as out
    if getattr(args, "json", False):
        out.emit_json(d)
    else:
        for ln in lines:
            out.print_plain(ln)
