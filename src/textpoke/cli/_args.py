# SPDX-License-Identifier: GPL-2.0-only
"""Typed argument converters with stated bounds, shared by every command.

A bad value is refused by argparse itself: one line naming the option, exit
status 2 (see :mod:`textpoke.cli`).  The bounds are part of each option's
help text, built from the same constants.
"""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["Bounds", "HelpFormatter", "CPUS", "JOBS", "LINE_SIZE", "Parser", "SCHEDULES", "SEED", "TOGGLES",
           "UsageError", "choice_of", "int_in", "power_of_two"]


class UsageError(Exception):
    """A combination of options the command cannot run with (found after
    parsing); reported like an argparse error, exit status 2."""


class Bounds:
    """An inclusive integer range and how to say it in --help."""

    def __init__(self, lo: int, hi: int, text: str | None = None) -> None:
        self.lo, self.hi, self.text = lo, hi, text

    def __str__(self) -> str:
        if self.text:
            return self.text
        return f"{self.lo}..{self.hi:_}" if self.hi >= 100_000 else f"{self.lo}..{self.hi}"


CPUS = Bounds(1, 64)
LINE_SIZE = Bounds(1, 4096)
TOGGLES = Bounds(0, 1_000_000_000)
SCHEDULES = Bounds(1, 10_000_000_000)
JOBS = Bounds(1, 1024)
SEED = Bounds(0, 2**64 - 1, "0..2**64-1")


def _int(text: str) -> int:
    try:
        return int(text, 0) if text.strip().lower().startswith(("0x", "-0x")) else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_in(b: Bounds) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in *b* only."""
    def convert(text: str) -> int:
        v = _int(text)
        if not b.lo <= v <= b.hi:
            raise argparse.ArgumentTypeError(f"must be from {b}, got {text}")
        return v
    convert.__name__ = f"integer in {b}"
    return convert


def power_of_two(b: Bounds) -> Callable[[str], int]:
    def convert(text: str) -> int:
        v = _int(text)
        if not (b.lo <= v <= b.hi and v & (v - 1) == 0):
            raise argparse.ArgumentTypeError(f"must be a power of two from {b}, got {text}")
        return v
    convert.__name__ = f"power of two in {b}"
    return convert


def choice_of(names: list[str] | tuple[str, ...], what: str) -> Callable[[str], str]:
    """An argparse ``type`` that accepts one of *names* (the message lists them)."""
    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r} (choose from {', '.join(names)})")
        return text
    convert.__name__ = what
    return convert


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; option help wrapped without breaking a
    hyphenated name (no-sync-2) across lines."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message`` and exit 2
    (the usage is one ``--help`` away; a wall of usage hides the message)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
