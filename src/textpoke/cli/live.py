# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live``: patch a running Linux process with the kernel's protocol.

Subcommands (each takes ``--pid``; those that patch take ``--strategy``):

  poke    write one instruction at ADDR (a number or a name) with the
          INT3 batch protocol, e.g. ``live poke --pid P f00042 e9...``
  sites   list the fentry sites (__mcount_loc, __patchable_function_entries)
          with the bytes found at each, and which ordinary function entries
          can take a JMP (and why the others cannot); ``--check`` exits 1 if
          any holds a stray INT3 (what a SIGKILLed patcher may leave)
  toggle  switch functions to ``call SYMBOL`` / ``jmp SYMBOL`` or back, in one
          batch: at their fentry site, or at any other function's entry
  count   count calls of the matching functions for a while, like bcc's
          funccount, with stubs injected into the process (no trap per hit):
          fentry sites, and any other function's entry through a trampoline
  recover undo what a patcher killed with SIGKILL left (from its journal)
  probe   kprobes on SYMBOL[+OFF] (the kernel's client, as uprobes are; more
          with -a 'SYMBOL[+OFF] FETCHARGS', as perf probe takes them): one
          trace line per hit with fetch-args (%di, +8(%sp), $arg2 ...)
  trace   the ftrace function tracer (the kernel's client, its runtime
          injected): per-thread rings in the process, trace_pipe lines

On SIGINT/SIGTERM the batch in flight is finished or rolled back, the
process is detached and keeps running, and the exit status is 130 (143).
"""

from __future__ import annotations

import argparse

from ._args import Bounds, choice_of, int_in

__all__ = ["add_arguments", "run"]

NAME = "live"
HELP = "patch a running process (ptrace): poke, list fentry sites, toggle, count calls"
DESCRIPTION = (
    "Patch a running Linux x86-64 process from outside, through ptrace and\n"
    "/proc/PID/mem, with the same INT3 batch protocol as the kernel: its threads\n"
    "keep running.  ADDR is a number or a name: symbol, symbol+off (an\n"
    "instruction boundary), lib:symbol (lib may be a glob: libc*).  Needs ptrace\n"
    "permission over the process (same user and kernel.yama.ptrace_scope 0, or\n"
    "CAP_SYS_PTRACE / root).")

PID = Bounds(1, 2**22)
STRATEGIES = ("int3", "stop-machine")
DURATION_MAX = 86_400.0


def _duration(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= v <= DURATION_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to {DURATION_MAX:g} seconds, got {text}")
    return v


def _hex(text: str) -> bytes:
    t = text.replace(" ", "").replace(":", "")
    if t.lower().startswith("0x"):
        t = t[2:]
    try:
        b = bytes.fromhex(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected hex bytes (e.g. e9 00 01 00 00), got {text!r}") from None
    if not b:
        raise argparse.ArgumentTypeError("expected at least one byte")
    return b


def _to(text: str) -> str:
    if text == "nop" or (text.startswith(("call:", "jmp:")) and len(text.split(":", 1)[1]) > 0):
        return text
    raise argparse.ArgumentTypeError(f"expected call:SYMBOL, jmp:SYMBOL or nop, got {text!r}")


class _Once(argparse.Action):
    """An option that takes one value: given twice, the first would be
    dropped without a word (``--functions A --functions B`` counted only
    B), so the second is refused instead."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: give one GLOB (a glob such as "
                         "'Py*' or 'lib:m*' matches many functions)")
        setattr(namespace, self.dest, values)


def _common(p: argparse.ArgumentParser, patches: bool) -> None:
    p.add_argument("--pid", type=int_in(PID), required=True, metavar="PID",
                   help="the process to patch (any of its threads' ids works)")
    if patches:
        p.add_argument("--strategy", type=choice_of(STRATEGIES, "strategy"), default="int3",
                       help="int3: the kernel's INT3 protocol while threads run (default); "
                            "stop-machine: stop every thread, check none is inside a site, "
                            "write, resume")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


#: the subcommands, in the order their options are added below
SUBCOMMANDS = ("poke", "sites", "toggle", "count", "recover", "probe", "trace")


class _Skipped:
    """What a subcommand not on the command line gets instead of its parser:
    its options are not built (a dozen parsers' worth of start-up)."""

    def add_argument(self, *args, **kw) -> None:
        pass

    def set_defaults(self, **kw) -> None:
        pass


class _Only:
    """``add_subparsers()``'s action, adding every subcommand's name but the
    parser (options, help) of *only* alone; None: every one."""

    def __init__(self, sub, only: str | None) -> None:
        self.sub, self.only = sub, only

    def add_parser(self, name: str, **kw):
        if self.only is None or name == self.only:
            return self.sub.add_parser(name, **kw)
        self.sub.add_parser(name, add_help=False)
        return _Skipped()


def add_arguments(p: argparse.ArgumentParser, only: str | None = None) -> None:
    """The subcommands' options; *only*: the one the command line names
    (the others are names only)."""
    from ._args import HelpFormatter
    sub = _Only(p.add_subparsers(dest="live_command", required=True, metavar="SUBCOMMAND"), only)

    q = sub.add_parser("poke", help="write one instruction at ADDR with the INT3 batch protocol",
                       formatter_class=HelpFormatter,
                       description="Write HEX (1-5 bytes, or a 6-byte Jcc.d32) at ADDR with the "
                                   "INT3 batch protocol, while the process runs.")
    _common(q, True)
    q.add_argument("addr", metavar="ADDR", help="a number, symbol, symbol+off or lib:symbol")
    q.add_argument("bytes", metavar="HEX", type=_hex, help="the new instruction, in hex")
    q.add_argument("--emulate", metavar="HEX", type=_hex, default=None,
                   help="the instruction a thread hitting the site mid-patch runs "
                        "(default: the new one)")
    q.add_argument("--force", action="store_true",
                   help="write even what the checks refuse: an INT3 in the new bytes, an "
                        "address no function symbol covers, replaced bytes that are not one "
                        "whole instruction of the new length")
    q.set_defaults(live_run=_poke)

    s = sub.add_parser("sites", help="list fentry sites and which function entries can be patched",
                       formatter_class=HelpFormatter,
                       description=("List the fentry sites of the process (__mcount_loc: gcc -pg "
                                    "-mfentry -mnop-mcount -mrecord-mcount; "
                                    "__patchable_function_entries: -fpatchable-function-entry=5) "
                                    "with the function each belongs to and the bytes found there; "
                                    "for every other function, whether its entry can take a JMP "
                                    "(its first instructions moved to a trampoline) and, per "
                                    "module, why not, counted by reason.\n\n"
                                    "After a patcher was killed with SIGKILL (which no program can "
                                    "catch), run this with --check: it reads every site and exits 1 "
                                    "if any holds a stray INT3, listing them; restore each with "
                                    "'textpoke live poke --pid P ADDR 0f1f440000'."))
    _common(s, False)
    s.add_argument("--functions", metavar="GLOB", default=None, action=_Once,
                   help="only the sites of functions matching GLOB (LIB:GLOB for some modules: LIB a name or a glob, libc*)")
    s.add_argument("--check", action="store_true",
                   help="exit 1 if any site holds a stray INT3 (e.g. after a SIGKILL of the "
                        "patcher), 0 if none")
    s.set_defaults(live_run=_sites)

    t = sub.add_parser("toggle", help="switch functions to a CALL or JMP, or back, in one batch",
                       formatter_class=HelpFormatter,
                       description="Switch every matching function to call SYMBOL first "
                                   "(--to call:SYMBOL), to run SYMBOL instead (--to jmp:SYMBOL), "
                                   "or back (--to nop), in one batch of the INT3 protocol, while "
                                   "the process runs.  A function with an fentry site (gcc -pg "
                                   "-mfentry) is switched there (NOP5 <-> CALL/JMP); any other "
                                   "function at its entry: a JMP over its first instructions, "
                                   "which call: moves to a trampoline mapped in the process "
                                   "(call *SYMBOL, the moved instructions, jmp back) that stays "
                                   "until the function is switched back.  SYMBOL runs as from an "
                                   "fentry call: before the function's prologue, the stack 8 bytes "
                                   "off the ABI's alignment, the arguments in their registers.  A "
                                   "function whose entry cannot be moved is refused with the "
                                   "reason, and nothing is written.")
    _common(t, True)
    t.add_argument("--functions", metavar="GLOB", required=True, action=_Once,
                   help="functions to switch (LIB:GLOB for some modules: LIB a name or a glob, libc*)")
    t.add_argument("--to", type=_to, required=True, metavar="call:SYMBOL|jmp:SYMBOL|nop",
                   help="call:SYMBOL or jmp:SYMBOL (a number or name of executable code; at an "
                        "fentry site, and for jmp: at an entry, within ±2 GiB of it), or nop "
                        "(back: NOP5 at an fentry site, the original instructions at an entry)")
    t.set_defaults(live_run=_toggle)

    c = sub.add_parser("count", help="count calls of the matching functions for a while",
                       formatter_class=HelpFormatter,
                       description="Count the calls of every function matching GLOB: its fentry "
                                   "site becomes a CALL into a counting stub injected into the "
                                   "process; a function without one (any binary: /usr/bin/python3, "
                                   "libc) gets a JMP at its entry to a stub that counts and runs "
                                   "the instructions the JMP replaced, moved out of line (a hit "
                                   "costs nanoseconds, no trap; a function whose entry cannot be "
                                   "moved is listed with the reason); after the window "
                                   "every site is switched back, the stubs are freed, and the "
                                   "counts are printed, most first, like bcc's funccount.  "
                                   "Ctrl-C ends the window early.")
    _common(c, True)
    c.add_argument("--functions", metavar="GLOB", required=True, action=_Once,
                   help="functions to count (LIB:GLOB for some modules: LIB a name or a glob, libc*)")
    c.add_argument("--duration", type=_duration, default=1.0, metavar="S",
                   help=f"seconds to count, 0..{DURATION_MAX:g} (default 1)")
    c.add_argument("--top", type=int_in(Bounds(0, 10**9)), default=0, metavar="N",
                   help="print only the N most called (default all; --json has all)")
    c.set_defaults(live_run=_count)

    r = sub.add_parser("recover", help="undo what a killed patcher left in the process",
                       formatter_class=HelpFormatter,
                       description="A patcher killed with SIGKILL (or by the OOM killer) cannot "
                                   "clean up; its journal says what it had in flight.  Put every "
                                   "site that holds an INT3 of it back whole, switch back the "
                                   "sites that call into its stubs and free them, and remove the "
                                   "SIGTRAP handler it injected (which kept the process alive "
                                   "meanwhile).  Exit 0 when nothing is left, 1 if something had "
                                   "to stay (said why).")
    _common(r, False)
    r.set_defaults(live_run=_recover, strategy="int3")

    pr = sub.add_parser("probe", help="a kprobe on a function of the process: one line per hit",
                        formatter_class=HelpFormatter,
                        description="Put a kprobe on SYMBOL[+OFF] (lib:SYMBOL for one module) "
                                    "through the kernel's kprobes client, as uprobes do: an INT3 "
                                    "at the probe point, the probed instruction emulated or run "
                                    "out of line (boosted: a JMP back, one trap per hit), then, "
                                    "at a function's entry, optimised into a JMP to a buffer "
                                    "that records hits in the process (no trap); each "
                                    "hit prints a trace_pipe-like line 'comm-tid [cpu] timestamp: "
                                    "p_SYMBOL_OFF: (SYMBOL+OFF) name=value ...'.  FETCHARGs in "
                                    "kprobe_events syntax: [NAME=]%REG (%di, %rsi, %ax, %sp, %ip, "
                                    "%flags, %r8..%r15), @ADDR, @SYM[+OFF], $stack, $stackN, $argN "
                                    "(at a function's entry), $comm, \\IMM, +|-OFF(FETCHARG); "
                                    "each with an optional :TYPE (x64 default; u8..u64, s8..s64, "
                                    "x8..x64, string, symbol).  A FETCHARG starting with '-' "
                                    "(-8(%sp)) goes after '--', every option before it.  More "
                                    "probes in the same command, as with perf probe: -a "
                                    "'SYMBOL[+OFF] [FETCHARG...]' (quoted, repeatable; e.g. "
                                    "live probe --pid P libc.so.6:malloc size=%di:u64 -a 'libc.so.6:free %di' -a "
                                    "'libc.so.6:realloc %di %si'): one line per hit of any, named by its "
                                    "event (p_SYMBOL_OFF); the points must lie within 2 GiB of "
                                    "each other (one module, or shared libraries).  Ends after "
                                    "--duration, --max-hits (hits of all probes), or Ctrl-C: the "
                                    "original bytes are put back and the process runs on.")
    _common(pr, True)
    pr.add_argument("point", metavar="SYMBOL[+OFF]", nargs="?",
                    help="the probe point: symbol, symbol+off (an instruction boundary), "
                         "lib:symbol[+off] (may be left out when -a gives the probes)")
    pr.add_argument("fetchargs", nargs="*", metavar="FETCHARG", help="values to print per hit")
    pr.add_argument("-a", "--add", action="append", default=[], metavar="PROBEDEF",
                    help="one more probe: 'SYMBOL[+OFF] [FETCHARG...]' in one quoted "
                         "argument (perf probe's -a); repeatable")
    pr.add_argument("--duration", type=_duration, default=None, metavar="S",
                    help=f"seconds to probe, 0..{DURATION_MAX:g} (default: until Ctrl-C)")
    pr.add_argument("--max-hits", type=int_in(Bounds(1, 10**12)), default=None, metavar="N",
                    help="stop after N hits")
    pr.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                    help="at a function's entry, turn the INT3 into a JMP to an out-of-line "
                         "buffer that records each hit in the process (no stop of the thread; "
                         "the kernel's optprobe rules), as the kernel does by default; where "
                         "refused, the INT3 probe stays and the start line says why "
                         "(default: on; --no-optimize keeps the INT3 probe)")
    pr.add_argument("--allow-single-step", action="store_true",
                    help="probe an instruction the kprobes rules neither emulate nor boost: "
                         "each hit runs its copy out of line and traps again after it; a "
                         "SIGKILL of this command while a thread is between the two kills the "
                         "target (refused without this flag)")
    pr.set_defaults(live_run=_probe)

    tr = sub.add_parser("trace", help="the ftrace function tracer on a process: trace_pipe lines",
                        formatter_class=HelpFormatter,
                        description="Trace every call of the functions matching GLOB with the "
                                    "kernel's ftrace client: its runtime (ftrace_caller, the "
                                    "tracer callbacks) is injected into the process and records "
                                    "each call into a ring of the calling thread, in the process, "
                                    "with no stop per call; fentry sites become CALLs, any other "
                                    "function's entry a JMP to a pad whose NOP5 the client "
                                    "switches.  Lines as trace_pipe prints them: 'comm-tid [ring] "
                                    "timestamp: func <-parent'.  A full ring overwrites its oldest "
                                    "event (counted as an overrun).  --profile counts hits per "
                                    "function instead (the function profiler).  Ends after "
                                    "--duration or Ctrl-C: every site is switched back, the "
                                    "runtime freed, and the process runs on.")
    _common(tr, True)
    tr.add_argument("--functions", metavar="GLOB", required=True, action=_Once,
                    help="functions to trace (LIB:GLOB for some modules: LIB a name or a glob, libc*)")
    tr.add_argument("--duration", type=_duration, default=None, metavar="S",
                    help=f"seconds to trace, 0..{DURATION_MAX:g} (default: until Ctrl-C)")
    tr.add_argument("--profile", action="store_true",
                    help="the function profiler: hits per function, printed at the end")
    tr.add_argument("--buffer-size", type=_pow2, default=4096, metavar="N",
                    help="events per thread's ring, a power of two (default 4096)")
    tr.set_defaults(live_run=_trace)


def run(args: argparse.Namespace) -> int:
    try:
        return args.live_run(args)
    except (ProcessLookupError, FileNotFoundError) as e:
        # the process exited (or exec'd) under us: one line, exit 2
        if not str(getattr(e, "filename", "") or "").startswith("/proc/"):
            raise
        from ..live._errors import NoSuchProcess
        raise NoSuchProcess(args.pid, f"the process exited while we read it ({e.strerror})") from None


# --- each subcommand in its own module, imported only when it runs ------------
def _poke(args: argparse.Namespace) -> int:
    from ._live_poke import run as run_poke
    return run_poke(args)


def _sites(args: argparse.Namespace) -> int:
    from ._live_sites import run as run_sites
    return run_sites(args)


def _toggle(args: argparse.Namespace) -> int:
    from ._live_toggle import run as run_toggle
    return run_toggle(args)


def _count(args: argparse.Namespace) -> int:
    from ._live_count import run as run_count
    return run_count(args)


def _recover(args: argparse.Namespace) -> int:
    from ._live_recover import run as run_recover
    return run_recover(args)


def _pow2(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a power of two, got {text!r}") from None
    if v < 2 or v > 1 << 20 or v & (v - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two from 2 to {1 << 20}, got {text}")
    return v


def _trace(args: argparse.Namespace) -> int:
    from ._live_trace import run as run_trace
    return run_trace(args)


def _probe(args: argparse.Namespace) -> int:
    from ._live_probe import run as run_probe
    return run_probe(args)
