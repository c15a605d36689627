# SPDX-License-Identifier: GPL-2.0-only
"""A command line naming one live subcommand builds that subcommand's
options only (the others are names): the parser it gets must be the one the
full parser has, and the full parser must list every subcommand."""

from __future__ import annotations

import argparse
import gettext

import pytest

from textpoke.cli import build_parser
from textpoke.cli.live import SUBCOMMANDS


def _sub(ap: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        act = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        ap = act.choices[name]
    return ap


def _shape(ap: argparse.ArgumentParser):
    return [(tuple(a.option_strings), a.dest, a.required, repr(a.default), a.nargs, a.help,
             a.metavar, type(a).__name__) for a in ap._actions]


def test_the_full_parser_has_every_subcommand():
    live = _sub(build_parser("live"), "live")
    act = next(a for a in live._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(act.choices) == SUBCOMMANDS
    assert all(_shape(p)[1:] for p in act.choices.values())   # each with its options


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_one_subcommand_gets_the_same_parser(name):
    full = _sub(build_parser("live"), "live", name)
    argv = ["live", name, "--pid", "1"]
    one = build_parser("live", argv)
    assert _shape(_sub(one, "live", name)) == _shape(full)
    assert _sub(one, "live", name).description == full.description
    # the others are there by name only (their options are never built)
    others = [n for n in SUBCOMMANDS if n != name]
    assert all(len(_sub(one, "live", n)._actions) == 0 for n in others)


def test_parsing_through_the_narrow_parser_gives_the_same_namespace():
    argv = ["live", "toggle", "--pid", "7", "--functions", "f*", "--to", "nop", "--json"]
    a = vars(build_parser("live").parse_args(argv))
    b = vars(build_parser("live", argv).parse_args(argv))
    for d in (a, b):
        d.pop("parser")
    assert a == b


def test_argparse_asks_the_catalog_gettext_would():
    import textpoke.cli._args  # noqa: F401  (installs the one-time lookup)
    for msg in ("usage: ", "the following arguments are required: %s", "options"):
        assert argparse._(msg) == gettext.gettext(msg)
