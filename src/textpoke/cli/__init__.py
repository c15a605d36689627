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

# Nothing slow above main(): the signal handlers go in before argparse,
# rich, iced-x86 or Unicorn are imported, and a command imports only its
# own module (and what that module's run() needs).
import importlib
import sys

from .. import __version__

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FOUND", "EXIT_USAGE", "EXIT_PIPE", "COMMANDS"]

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
#: stdout closed under us (``textpoke ... | head``): 128 + SIGPIPE, as a
#: shell reports a tool killed by SIGPIPE -- never 0, whatever was found.
EXIT_PIPE = 141

#: command name -> (module under textpoke.cli, one-line help).  The help
#: is repeated here so that ``textpoke --help`` imports no command; a test
#: checks it against each module's HELP.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "patch live code on every vCPU, many times over"),
    "verify": ("verify", "check the protocol under many seeded schedules"),
    "boot": ("boot", "boot the bundled kernel image: alternatives, retpolines, returns, SMP "
                     "locks, self-tests"),
    "live": ("live", "patch a running process (ptrace): poke, list fentry sites, toggle, count "
                     "calls"),
    "keys": ("keys", "static keys (jump labels) switched on running vCPUs"),
    "static-call": ("static_call", "static calls retargeted on running vCPUs"),
    "module": ("module", "modules loaded, switched and unloaded on running vCPUs"),
    "kprobe": ("kprobe", "kprobes, kretprobes and optimised kprobes on running vCPUs"),
    "ftrace": ("ftrace", "the function tracer (fentry NOP5 <-> CALL) on running vCPUs"),
}

EPILOG = """\
exit status (every command):
  0    success
  1    the check found a problem (violation, oops, wrong behaviour,
       failed self-test)
  2    usage error (bad option or value, unknown name), or the command
       could not run at all (e.g. an image that cannot be read)
  130  interrupted by SIGINT; 143 terminated by SIGTERM (the partial
       summary is printed; --json says "interrupted": true, "int3_left");
       whenever a signal arrived, even if the work had finished
  141  standard output was closed before the report was written (a pipe
       into head), whatever the run found
"""


def command_module(name: str):
    """The module of command *name* (imported now)."""
    return importlib.import_module(f".{COMMANDS[name][0]}", __name__)


def build_parser(only: str | None = "*", argv: list[str] | None = None):
    """The argument parser.  *only*: the command whose options are added
    (its module imported) -- then the other commands are left out too: a
    command line naming one never reaches them --; ``"*"`` for every
    command, None for none (the names only, for the top-level help).
    *argv*, with *only*: a command with subcommands (``SUBCOMMANDS``) builds
    only the options of the one *argv* names."""
    from ._args import HelpFormatter, Parser
    ap = Parser(prog="textpoke", epilog=EPILOG, formatter_class=HelpFormatter,
                description=("The Linux kernel's x86 text-patching machinery (text_poke, INT3 SMP\n"
                             "batch patching) and its clients, on an emulated SMP x86-64 machine,\n"
                             "on live processes, and on real kernel images."))
    ap.add_argument("--version", action="version", version=f"textpoke {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_mod, help_) in COMMANDS.items():
        if only == "*" or only == name:
            mod = command_module(name)
            p = sub.add_parser(name, help=help_, description=mod.DESCRIPTION, epilog=EPILOG,
                               formatter_class=HelpFormatter)
            word = _subcommand_in(argv, name, getattr(mod, "SUBCOMMANDS", ()))
            if word is not None:
                mod.add_arguments(p, only=word)
            else:
                mod.add_arguments(p)
            p.set_defaults(run=mod.run, parser=p)
        elif only is None:
            sub.add_parser(name, help=help_, add_help=False)
    return ap


def _subcommand_in(argv: list[str] | None, command: str, names) -> str | None:
    """The subcommand of *command* that *argv* names (the first word after
    the command, options having none before it), if it is one of *names*."""
    if not argv or not names or command not in argv:
        return None
    for a in argv[argv.index(command) + 1:]:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a if a in names else None
    return None


def _command_in(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is not
    an option), if it is one; argparse says what is wrong otherwise."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """The ``textpoke`` command.  Called with *argv* (a program or a test
    calling in), the process's previous signal handlers are put back on
    return; as the console script (no *argv*) the process ends here, with
    the exit status, so that a signal arriving at any moment up to the end
    still makes it 130/143."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from . import _signals
        saved = _signals.save() if argv is not None else None
        _signals.install()
    except KeyboardInterrupt as e:  # Ctrl-C while the handlers were going in
        return _interrupted_early(args, e)
    try:
        try:
            code = _main(args)
        except (KeyboardInterrupt, _signals.Terminated) as e:
            code = _interrupted_early(args, e)
        if saved is None:           # the console script: nothing runs after us
            _signals.exit_now(code)
        return _signals.status_for(code)
    except SystemExit as e:         # argparse: --help, a usage error
        if saved is None and isinstance(e.code, int):
            _signals.exit_now(e.code)
        raise
    finally:
        if saved is not None:
            _signals.restore(saved)


def _main(argv: list[str]) -> int:
    if argv == ["--version"]:            # the common probe: no parser at all
        try:
            print(f"textpoke {__version__}", flush=True)
        except BrokenPipeError:
            from ._contract import pipe_closed
            return pipe_closed()
        return EXIT_OK
    from . import _contract
    from ._signals import Terminated, exit_status
    run = _contract.begin(argv)
    try:
        try:
            cmd = _command_in(argv)
            args = build_parser(cmd, argv).parse_args(argv)
            run.command = args.command
            return _dispatch(args)
        except (KeyboardInterrupt, Terminated) as e:
            # A command reports its own partial summary; here only what
            # had nothing to report yet (parsing, imports, a command that
            # let the interrupt through before any machine existed).
            return run.interrupted_fallback(e)
        except BrokenPipeError:
            return _contract.pipe_closed()
    except (KeyboardInterrupt, Terminated) as e:   # a second signal while reporting
        return exit_status(e)


def _interrupted_early(argv: list[str], exc: BaseException) -> int:
    """A signal before _main's own handling was set up (while importing
    its helpers): the same fallback report."""
    from . import _contract
    run = _contract.current()
    if run is None or run.argv is not argv:
        run = _contract.begin(argv)
    return run.interrupted_fallback(exc)


def _dispatch(args) -> int:
    from .._errors import TextPokeError
    from ._args import UsageError
    from ._contract import usage_error
    try:
        return args.run(args)
    except UsageError as e:
        return usage_error(f"{args.parser.prog}: error: {e} (see '{args.parser.prog} --help')")
    except TextPokeError as e:
        # a refusal of what the user typed says it all; other errors are named
        kind = "" if getattr(e, "plain", False) else f"{type(e).__name__}: "
        return usage_error(f"textpoke {args.command}: {kind}{e}")


if __name__ == "__main__":
    raise SystemExit(main())
