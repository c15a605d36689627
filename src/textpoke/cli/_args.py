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
           "U32", "U64", "UsageError", "checked", "choice_of", "int_in", "number", "power_of_two"]


def _catalog_once() -> None:
    """argparse looks every message up in the gettext catalogs each time it
    builds one (``_("usage: ")``...): a few ``stat()`` of catalog paths per
    message, ~80 per command line parsed (a millisecond).  The answer
    cannot change within a process (nothing here binds a text domain), so
    the catalog is found once and argparse asks it: the same translations,
    or none, as before."""
    import gettext
    t = gettext.translation(gettext.textdomain(), fallback=True)
    argparse._ = t.gettext               # type: ignore[attr-defined]
    argparse.ngettext = t.ngettext       # type: ignore[attr-defined]


_catalog_once()


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
U32 = Bounds(0, 2**32 - 1, "0..0xffffffff")
U64 = Bounds(0, 2**64 - 1, "0..0xffffffffffffffff")


def number(text: str, b: Bounds, what: str = "value") -> int:
    """THE integer parser of the command line: decimal, or hexadecimal
    with 0x; nothing else (no empty string, no 1,,2, no 80-bit value when
    the range is 64-bit).  Refusals are :class:`UsageError` (one line,
    exit 2)."""
    t = text.strip() if isinstance(text, str) else ""
    neg = t.startswith("-")
    body = t[1:] if neg else t
    try:
        if body[:2].lower() == "0x":
            if not body[2:] or not all(c in "0123456789abcdefABCDEF_" for c in body[2:]):
                raise ValueError
            v = int(body, 16)
        else:
            if not body or not body.replace("_", "").isdigit() or not body.isascii():
                raise ValueError
            if len(body) > 40:          # int() of a 100,000-digit string is slow
                raise ValueError
            v = int(body, 10)
    except ValueError:
        raise UsageError(f"{what}: expected an integer (decimal or 0x hex), got {text!r}") from None
    v = -v if neg else v
    if not b.lo <= v <= b.hi:
        raise UsageError(f"{what}: must be from {b}, got {text}")
    return v


def _int(text: str) -> int:
    try:
        return number(text, Bounds(-(1 << 128), 1 << 128))
    except UsageError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_in(b: Bounds) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in *b* only."""
    def convert(text: str) -> int:
        try:
            return number(text, b)
        except UsageError:
            pass
        v = _int(text)
        raise argparse.ArgumentTypeError(f"must be from {b}, got {v if text.strip() else text!r}")
    convert.__name__ = f"integer in {b}"
    convert.bounds = b            # type: ignore[attr-defined]  (for tests: the declared range)
    return convert


def checked(check: Callable[[str], object], name: str) -> Callable[[str], str]:
    """An argparse ``type`` that runs *check* (raising UsageError) on the
    text and keeps the text as it is."""
    def convert(text: str) -> str:
        try:
            check(text)
        except UsageError as e:
            msg = str(e)
            if msg.startswith("--") and ": " in msg:    # argparse names the option already
                msg = msg.split(": ", 1)[1]
            raise argparse.ArgumentTypeError(msg) from None
        return text
    convert.__name__ = name
    convert.checked = True        # type: ignore[attr-defined]
    return convert


def power_of_two(b: Bounds) -> Callable[[str], int]:
    def convert(text: str) -> int:
        v = _int(text)
        if not (b.lo <= v <= b.hi and v & (v - 1) == 0):
            raise argparse.ArgumentTypeError(f"must be a power of two from {b}, got {text}")
        return v
    convert.__name__ = f"power of two in {b}"
    convert.bounds = b            # type: ignore[attr-defined]
    convert.power_of_two = True   # type: ignore[attr-defined]
    return convert


def choice_of(names: list[str] | tuple[str, ...], what: str) -> Callable[[str], str]:
    """An argparse ``type`` that accepts one of *names* (the message lists them)."""
    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r} (choose from {', '.join(names)})")
        return text
    convert.__name__ = what
    convert.choices = tuple(names)  # type: ignore[attr-defined]
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
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def one_line(message: str, limit: int = 400) -> str:
    """A refusal as one line of bounded length (a 100,000-character value
    is not echoed back whole)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + f"... ({len(message):,} chars)"
