# SPDX-License-Identifier: GPL-2.0-only
"""Output shared by every command: a rich console for people, a JSON
emitter for programs, a progress bar (stderr, terminals only, never with
--json), and escaping so that bytes shown as ``[cc cc ...]`` are not read
as rich markup."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator

__all__ = ["console", "emit_json", "emitted", "escape", "print_plain", "progress", "reset"]


def escape(text: str) -> str:
    """Keep rich from reading '[cc cc ...]' in a message as markup."""
    from rich.markup import escape as _escape
    return _escape(text)


#: Width of a console that is not a terminal (a pipe, a file): wide enough
#: that no table or line is ever cut or wrapped.
PIPE_WIDTH = 10_000

_emitted = False


def reset() -> None:
    global _emitted
    _emitted = False


def emitted() -> bool:
    """Whether this run has written its JSON document already."""
    return _emitted


def console(stderr: bool = False):
    """A rich console; one that does not write to a terminal never cuts a
    line to 80 columns (tables come out whole)."""
    from rich.console import Console as _Console

    class Console(_Console):
        def on_broken_pipe(self) -> None:
            # rich would exit 1 here; the entry point decides (141)
            raise BrokenPipeError(32, "Broken pipe")
    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (ValueError, OSError):
        tty = False
    if tty:
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, width=PIPE_WIDTH, soft_wrap=True)


def print_plain(text: str, *, file=None) -> None:
    """Print *text* as it is: no markup, no wrapping at the terminal width
    (a replay command must stay one line whatever COLUMNS says)."""
    print(text, file=file or sys.stdout, flush=True)


@contextlib.contextmanager
def progress(enabled: bool, label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields the update(done, total)
    callback.  Callers pass ``enabled = not args.json and stderr is a tty``."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def progress_enabled(json_output: bool) -> bool:
    return not json_output and sys.stderr.isatty()


def emit_json(obj: Any) -> None:
    """One JSON document on stdout."""
    global _emitted
    _emitted = True
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()
