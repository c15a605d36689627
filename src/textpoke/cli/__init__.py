# SPDX-License-Identifier: GPL-2.0-only
"""The ``textpoke`` command: rich output for people, --json for programs.

One module per command (:mod:`.demo`, :mod:`.verify`, :mod:`.boot`), each
with ``add_arguments(parser)``, ``run(args) -> int`` and ``HELP``; shared
output helpers in :mod:`._output`, typed converters in :mod:`._args`,
signal handling in :mod:`._signals`.

Exit status, the same for every command:

  0    success
  1    the check found a problem: a violation, an oops, a wrong behaviour,
       a self-test that failed
  2    usage error (a bad option or value, an unknown name), or the command
       could not run at all -- e.g. an image that cannot be read: one line
       on stderr, no verdict, never a traceback
  130  interrupted by SIGINT (Ctrl-C): what ran so far is reported, and with
       --json the document says "interrupted": true and "int3_left"
  143  terminated by SIGTERM, reported the same way
"""

from __future__ import annotations

import os
import sys

from .. import __version__
from .._errors import TextPokeError
from . import boot, demo, live, verify
from . import keys, static_call
from . import module
from . import kprobe
from . import ftrace
from ._args import HelpFormatter, Parser, UsageError
from ._signals import Terminated, exit_status, interruptions

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FOUND", "EXIT_USAGE"]

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2

_COMMANDS = (demo, verify, boot, live)
_COMMANDS += (keys, static_call)
_COMMANDS += (module,)
_COMMANDS += (kprobe,)
_COMMANDS += (ftrace,)

EPILOG = """\
exit status (every command):
  0    success
  1    the check found a problem (violation, oops, wrong behaviour,
       failed self-test)
  2    usage error (bad option or value, unknown name), or the command
       could not run at all (e.g. an image that cannot be read)
  130  interrupted by SIGINT; 143 terminated by SIGTERM (the partial
       summary is printed; --json says "interrupted": true, "int3_left")
"""


def build_parser() -> Parser:
    ap = Parser(prog="textpoke", epilog=EPILOG, formatter_class=HelpFormatter,
                description=("The Linux kernel's x86 text-patching machinery (text_poke, INT3 SMP\n"
                             "batch patching) and its clients, on an emulated SMP x86-64 machine,\n"
                             "on live processes, and on real kernel images."))
    ap.add_argument("--version", action="version", version=f"textpoke {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMANDS:
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.DESCRIPTION, epilog=EPILOG,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run, parser=p)
    return ap


def main(argv: list[str] | None = None) -> int:
    with interruptions():
        try:
            args = build_parser().parse_args(argv)
            try:
                return args.run(args)
            except UsageError as e:
                print(f"{args.parser.prog}: error: {e} (see '{args.parser.prog} --help')",
                      file=sys.stderr)
                return EXIT_USAGE
            except TextPokeError as e:
                print(f"textpoke {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
                return EXIT_USAGE
            except BrokenPipeError:   # e.g. piped into head: not an error of ours
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return EXIT_OK
        except (KeyboardInterrupt, Terminated) as e:
            # demo and verify report their partial results themselves; here
            # only what had nothing to report yet (parsing, boot).
            print("textpoke: interrupted", file=sys.stderr)
            return exit_status(e)


if __name__ == "__main__":
    raise SystemExit(main())
