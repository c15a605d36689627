# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live``: patch a running Linux process with the kernel's protocol.

Subcommands (each takes ``--pid``; those that patch take ``--strategy``):

  poke    write one instruction at ADDR (a number or a name) with the
          INT3 batch protocol, e.g. ``live poke --pid P f00042 e9...``
  sites   list the fentry sites (__mcount_loc, __patchable_function_entries)
          with the bytes found at each, and which ordinary function entries
          can take a JMP (and why the others cannot); ``--check`` exits 1 if
          any holds a stray INT3 (what a SIGKILLed patcher may leave)
  toggle  switch fentry sites to ``call SYMBOL`` or back to NOP5, in one batch
  count   count calls of the matching functions for a while, like bcc's
          funccount, with stubs injected into the process (no trap per hit):
          fentry sites, and any other function's entry through a trampoline
  recover undo what a patcher killed with SIGKILL left (from its journal)
  probe   a kprobe on SYMBOL[+OFF] (the kernel's client, as uprobes are):
          one trace line per hit with fetch-args (%di, +8(%sp), $arg2 ...)

On SIGINT/SIGTERM the batch in flight is finished or rolled back, the
process is detached and keeps running, and the exit status is 130 (143).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import _output as out
from ._args import Bounds, UsageError, choice_of, int_in
from . import _contract
from ._signals import arrived as _arrived, exit_status, reporting, Terminated

__all__ = ["add_arguments", "run"]

NAME = "live"
HELP = "patch a running process (ptrace): poke, list fentry sites, toggle, count calls"
DESCRIPTION = (
    "Patch a running Linux x86-64 process from outside, through ptrace and\n"
    "/proc/PID/mem, with the same INT3 batch protocol as the kernel: its threads\n"
    "keep running.  ADDR is a number or a name: symbol, symbol+off (an\n"
    "instruction boundary), lib:symbol.  Needs ptrace permission over the\n"
    "process (same user and kernel.yama.ptrace_scope 0, or CAP_SYS_PTRACE / root).")

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
    if text == "nop" or (text.startswith("call:") and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(f"expected call:SYMBOL or nop, got {text!r}")


def _common(p: argparse.ArgumentParser, patches: bool) -> None:
    p.add_argument("--pid", type=int_in(PID), required=True, metavar="PID",
                   help="the process to patch (any of its threads' ids works)")
    if patches:
        p.add_argument("--strategy", type=choice_of(STRATEGIES, "strategy"), default="int3",
                       help="int3: the kernel's INT3 protocol while threads run (default); "
                            "stop-machine: stop every thread, check none is inside a site, "
                            "write, resume")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._args import HelpFormatter
    sub = p.add_subparsers(dest="live_command", required=True, metavar="SUBCOMMAND")

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
    s.add_argument("--functions", metavar="GLOB", default=None,
                   help="only the sites of functions matching GLOB (lib:GLOB for one module)")
    s.add_argument("--check", action="store_true",
                   help="exit 1 if any site holds a stray INT3 (e.g. after a SIGKILL of the "
                        "patcher), 0 if none")
    s.set_defaults(live_run=_sites)

    t = sub.add_parser("toggle", help="switch fentry sites to a CALL or back to NOP5, in one batch",
                       formatter_class=HelpFormatter,
                       description="Switch every fentry site of the matching functions to "
                                   "'call SYMBOL' (--to call:SYMBOL) or to NOP5 (--to nop), in one "
                                   "batch of the INT3 protocol, while the process runs.")
    _common(t, True)
    t.add_argument("--functions", metavar="GLOB", required=True,
                   help="functions whose fentry sites to switch (lib:GLOB for one module)")
    t.add_argument("--to", type=_to, required=True, metavar="call:SYMBOL|nop",
                   help="call:SYMBOL (a number or name; must be within ±2 GiB) or nop")
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
    c.add_argument("--functions", metavar="GLOB", required=True,
                   help="functions to count (lib:GLOB for one module)")
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
                                    "out of line (boosted: a JMP back, one trap per hit); each "
                                    "hit prints a trace_pipe-like line 'comm-tid [cpu] timestamp: "
                                    "p_SYMBOL_OFF: (SYMBOL+OFF) name=value ...'.  FETCHARGs in "
                                    "kprobe_events syntax: [NAME=]%REG (%di, %rsi, %ax, %sp, %ip, "
                                    "%flags, %r8..%r15), @ADDR, @SYM[+OFF], $stack, $stackN, $argN "
                                    "(at a function's entry), $comm, \\IMM, +|-OFF(FETCHARG); "
                                    "each with an optional :TYPE (x64 default; u8..u64, s8..s64, "
                                    "x8..x64, string, symbol).  A FETCHARG starting with '-' "
                                    "(-8(%sp)) goes after '--', every option before it.  Ends after --duration, --max-hits, or Ctrl-C: the "
                                    "original byte is put back and the process runs on.")
    _common(pr, True)
    pr.add_argument("point", metavar="SYMBOL[+OFF]",
                    help="the probe point: symbol, symbol+off (an instruction boundary), "
                         "lib:symbol[+off]")
    pr.add_argument("fetchargs", nargs="*", metavar="FETCHARG", help="values to print per hit")
    pr.add_argument("--duration", type=_duration, default=None, metavar="S",
                    help=f"seconds to probe, 0..{DURATION_MAX:g} (default: until Ctrl-C)")
    pr.add_argument("--max-hits", type=int_in(Bounds(1, 10**12)), default=None, metavar="N",
                    help="stop after N hits")
    pr.set_defaults(live_run=_probe)


def run(args: argparse.Namespace) -> int:
    try:
        return args.live_run(args)
    except (ProcessLookupError, FileNotFoundError) as e:
        # the process exited (or exec'd) under us: one line, exit 2
        if not str(getattr(e, "filename", "") or "").startswith("/proc/"):
            raise
        from ..live._errors import NoSuchProcess
        raise NoSuchProcess(args.pid, f"the process exited while we read it ({e.strerror})") from None


# ---------------------------------------------------------------------------
def _machine(args: argparse.Namespace):
    from ..live._machine import LiveMachine
    return LiveMachine(args.pid, strategy=args.strategy)


def _symbols(pid: int):
    from ..live._symbols import Symbols
    return Symbols(pid)


def _poke(args: argparse.Namespace) -> int:
    from .._core import TextPoke
    from ..live._checks import check_poke
    from ..live._fentry import read_process
    with _symbols(args.pid) as syms:
        addr = syms.resolve(args.addr)
        name = syms.symbolize(addr)
        read = read_process(args.pid)
        try:
            # refused (one line, exit 2) before anything is attached or written
            check_poke(syms, read, addr, args.bytes, force=args.force)
        finally:
            read.close()  # type: ignore[attr-defined]
    interrupted: BaseException | None = None
    old = new = b""
    with _machine(args) as m:
        old = m.text_read(addr, len(args.bytes))
        core = TextPoke(m)
        try:
            with core.text_mutex:
                core.smp_text_poke_single(addr, args.bytes, emulate=args.emulate)
        except (KeyboardInterrupt, Terminated) as e:
            interrupted = e
        finally:
            left, why = _contract.int3_left_of(core)
            core.close()
            new = m.text_read(addr, len(args.bytes))
    reporting()
    doc = {"pid": args.pid, "addr": f"{addr:#x}", "name": name, "old": old.hex(" "),
           "new": new.hex(" "), "written": new == args.bytes, "strategy": args.strategy,
           "interrupted": interrupted is not None, "int3_left": left}
    if why:
        doc["int3_left_reason"] = why
    if args.json:
        out.emit_json(doc)
    else:
        out.print_plain(f"{name} ({addr:#x}): {doc['old']} -> {doc['new']}")
    if interrupted is not None:
        return exit_status(interrupted)
    return 0 if doc["written"] else 1


def _sites(args: argparse.Namespace) -> int:
    from ..live._entry import entry_sites
    from ..live._fentry import fentry_sites, module_report
    from ..live._recover import check, leftovers
    with _symbols(args.pid) as syms:
        sites = fentry_sites(syms, args.functions)
        if args.check:
            # stray INT3s and a dead patcher's leftovers only: no need to plan
            # every entry (a second on python3 and its libraries)
            entries, refused = [], []
            modules = module_report(syms, sites, args.functions)
        else:
            # every other function: can its entry take a JMP (and why not)?
            entries, refused = entry_sites(syms, args.functions,
                                           skip={s.func_addr for s in sites})
            refused = [r for r in refused if r.reason != "fentry"]
            modules = module_report(syms, sites, args.functions, entries, refused)
    left = check(args.pid)
    dead = leftovers(left)
    reporting()
    stray = [s for s in sites if s.stray_int3]
    if args.json:
        out.emit_json({"pid": args.pid, "functions": args.functions, "sites": [s.as_dict() for s in sites],
                       "stray_int3": len(stray),
                       "kinds": _kinds(sites), "modules": modules, "journal": left,
                       "leftovers": dead, "entries": [e.as_dict() for e in entries],
                       "refused": [r.as_dict() for r in refused],
                       "refused_by_reason": _reasons(refused),
                       # read only: a signal ends it early at most; the INT3s it saw
                       "interrupted": _arrived() is not None, "int3_left": len(stray)})
    else:
        if not args.check or stray:
            from rich.table import Table
            tab = Table(title=f"sites of process {args.pid}"
                        + (f" matching {args.functions}" if args.functions else ""),
                        title_justify="left")
            for col in ("address", "function", "module", "from", "bytes", "kind"):
                tab.add_column(col)
            for s in (stray if args.check else sites):
                kind = f"[red]{s.kind}[/]" if s.kind == "int3" else s.kind
                tab.add_row(f"{s.addr:#x}", s.function, s.module, s.source,
                            out.escape(s.found.hex(" ")), kind)
            if args.functions and not args.check:
                # ordinary entries: listed one by one for a pattern only (a
                # whole process has thousands; the module lines count them)
                for e in entries:
                    tab.add_row(f"{e.addr:#x}", e.function, e.module, "entry",
                                out.escape(e.found.hex(" ")), f"entry (moves {e.plan.length})")
                for r in refused:
                    tab.add_row(f"{r.addr:#x}", r.function, r.module, "entry", "",
                                f"[yellow]refused: {out.escape(r.reason)}[/]")
            if tab.row_count:
                out.console().print(tab)
        if not args.check:
            for md in modules:
                what = ", ".join(f"{k} {n}" for k, n in md["kinds"].items())
                ent = (f"; entries: {md['entries']} can take a JMP, {md['refused']} refused"
                       + (" (" + ", ".join(f"{k} {n}" for k, n in md["reasons"].items()) + ")"
                          if md["reasons"] else ""))
                out.print_plain(f"{md['module']}: {md['functions']} functions, "
                                f"{md['sites']} fentry sites" + (f" ({what})" if what else "")
                                + ent + (f" -- {md['why']}" if md["why"] else ""))
            if args.functions:
                for r in refused[:20]:
                    out.print_plain(f"  {r.function}: {r.reason}: {r.why}")
                if len(refused) > 20:
                    out.print_plain(f"  ... {len(refused) - 20} more refused (--json lists all)")
        summary = ", ".join(f"{k} {n}" for k, n in _kinds(sites).items()) or "no sites"
        out.print_plain(f"{len(sites)} sites: {summary}; ordinary entries: "
                        f"{len(entries)} can take a JMP, {len(refused)} refused")
        if args.check:
            out.print_plain(f"stray INT3s: {len(stray)}" + (
                f" -- run 'textpoke live recover --pid {args.pid}'" if stray else ""))
        if left["journal"]:
            who = (f"textpoke pid {left['patcher']} (running)" if left["patcher_alive"]
                   else f"a dead patcher (pid {left['patcher']})")
            out.print_plain(f"journal of {who}: {left['summary']}; now: "
                            f"{len(left['int3_sites'])} INT3 site(s), {left['calls_into_stubs']} "
                            f"CALL(s) into stubs, {len(left['stub_regions_mapped'])} stub "
                            f"region(s) mapped, SIGTRAP guard "
                            + ("mapped" if left["guard_mapped"] else "gone")
                            + (f" -- run 'textpoke live recover --pid {args.pid}'" if dead else ""))
    return 1 if (args.check and (stray or dead)) else 0


def _recover(args: argparse.Namespace) -> int:
    from ..live._recover import recover
    try:
        rep = recover(args.pid)
    except (KeyboardInterrupt, Terminated) as e:    # sites written whole or not at all
        reporting()
        return _interrupted_report(args, "recover", e)
    reporting()
    if args.json:
        rep = dict(rep, interrupted=_arrived() is not None,
                   int3_left=_int3_sites(args.pid) if rep["kept"] else 0)
    if args.json:
        out.emit_json(rep)
    elif not rep["journal"]:
        out.print_plain(f"process {args.pid}: no journal of a textpoke patcher: nothing to recover")
    else:
        out.print_plain(f"process {args.pid}: found {rep['found']}; INT3 sites put back: "
                        f"{rep['int3_restored']}, CALLs switched back: {rep['calls_restored']}, "
                        f"stub regions freed: {rep['regions_freed']}, SIGTRAP guard removed: "
                        + ("yes" if rep["guard_removed"] else "no"))
        for k in rep["kept"]:
            out.print_plain(f"kept: {k}")
    return 1 if rep["kept"] else 0


def _int3_sites(pid: int) -> int:
    from ..live._fentry import fentry_sites
    with _symbols(pid) as syms:
        return sum(1 for x in fentry_sites(syms, None) if x.kind == "int3")


def _reasons(refused) -> dict[str, int]:
    d: dict[str, int] = {}
    for r in refused:
        d[r.reason] = d.get(r.reason, 0) + 1
    return dict(sorted(d.items(), key=lambda kv: -kv[1]))


def _kinds(sites) -> dict[str, int]:
    d: dict[str, int] = {}
    for s in sites:
        d[s.kind] = d.get(s.kind, 0) + 1
    return d


def _toggle(args: argparse.Namespace) -> int:
    from .._core._insn import CALL_INSN_OPCODE, text_gen_insn
    from ..live._count import switch_sites
    from ..live._fentry import NOP5, QUIESCENT, fentry_sites
    try:
        with _symbols(args.pid) as syms:
            sites = fentry_sites(syms, args.functions)
            target = syms.resolve(args.to[5:]) if args.to.startswith("call:") else None
            if not sites:
                from ..live._count import _why_no_site
                why = _why_no_site(syms, args.functions, args.pid)
    except (KeyboardInterrupt, Terminated) as e:       # nothing written yet
        reporting()
        return _interrupted_report(args, "toggle", e)
    if not sites:
        raise UsageError(why)
    if target is not None:
        from ..live._checks import check_branch_target
        check_branch_target(args.pid, target, f"call target {args.to[5:]}")
    bad = [s for s in sites if s.kind not in ("nop5", "call") and s.kind not in QUIESCENT]
    if bad:
        raise UsageError(f"{len(bad)} site(s) hold no fentry form (NOP5, CALL, five NOP1s, "
                         f"call *__fentry__@GOTPCREL), e.g. {bad[0].function} "
                         f"at {bad[0].addr:#x}: {bad[0].found.hex(' ')} ({bad[0].kind}); "
                         f"see 'textpoke live sites --check --pid {args.pid}' and 'textpoke live "
                         f"recover --pid {args.pid}'")
    writes, quiet = [], []
    for s in sites:
        new = NOP5 if target is None else text_gen_insn(CALL_INSN_OPCODE, s.addr, target)
        new += b"\x90" * (len(s.found) - len(new))     # call-got: 6 bytes, + NOP1
        if new != s.found:
            # not one instruction now: written with every thread stopped
            (quiet if s.kind in QUIESCENT else writes).append((s.addr, new))
    interrupted: BaseException | None = None
    stats: dict[str, Any] = {}
    after: list[bytes] = []
    with _machine(args) as m:
        try:
            if writes:
                with out.progress(out.progress_enabled(args.json) and len(writes) >= 256,
                                  "queueing sites") as update:
                    stats = switch_sites(m, writes, update)
            if quiet:
                m.write_stopped(quiet)
        except (KeyboardInterrupt, Terminated) as e:
            interrupted = e
        after = [m.text_read(s.addr, len(s.found)) for s in sites]
    reporting()
    writes += quiet
    want = {a: b for a, b in writes}
    int3_left = sum(1 for b in after if b[:1] == b"\xcc")
    done = sum(1 for s, b in zip(sites, after) if b == want.get(s.addr, s.found))
    doc = {"pid": args.pid, "functions": args.functions, "to": args.to, "sites": len(sites),
           "switched": len(writes), "now_as_asked": done, "strategy": args.strategy,
           "stats": stats, "interrupted": interrupted is not None, "int3_left": int3_left}
    if args.json:
        out.emit_json(doc)
    else:
        out.print_plain(f"{len(writes)} of {len(sites)} sites switched to {args.to} "
                        f"({len(sites) - len(writes)} already were); {done} read back as asked; "
                        f"syncs {stats.get('syncs', 0)}, INT3 hits {stats.get('int3_hits', 0)}")
    if interrupted is not None:
        print(f"textpoke live toggle: interrupted; INT3s of ours left in the text: {int3_left}",
              file=sys.stderr)
        return exit_status(interrupted)
    return 0 if done == len(sites) else 1


def _count(args: argparse.Namespace) -> int:
    from ..live._count import live_count
    interrupted: list[BaseException] = []

    def window() -> None:
        import time
        # Said once every site is switched on: the window has opened.  Tools
        # (and the tests) wait for this line, not for the bytes in the target,
        # which read CALL before the arming batch has finished.
        try:
            # inside the try: a Ctrl-C right after this line ends the window too
            print(f"textpoke live count: counting for {args.duration:g} s "
                  "(Ctrl-C ends the window early)", file=sys.stderr, flush=True)
            time.sleep(args.duration)
        except (KeyboardInterrupt, Terminated) as e:   # end the window early, then disarm
            interrupted.append(e)

    try:
        with out.progress(out.progress_enabled(args.json), "switching sites") as update:
            res = live_count(args.pid, args.functions, args.duration, strategy=args.strategy,
                             window=window, progress=update)
    except (KeyboardInterrupt, Terminated) as e:
        # before the window (arming) or after it (disarming): the batch was
        # finished or rolled back and live_count switched back what it could;
        # say what every site holds now
        reporting()
        return _interrupted_report(args, "count", e)
    reporting()
    if args.json:
        # int3_left: every counted site read back (fentry sites and entries)
        out.emit_json(dict(res.as_dict(), pid=args.pid, interrupted=bool(interrupted)))
    else:
        _print_count(res, args)
    if interrupted:
        return exit_status(interrupted[0])
    return 0 if res.restored and res.alive else 1


def _interrupted_report(args: argparse.Namespace, what: str, e: BaseException) -> int:
    """A command interrupted outside its own report: read every site of the
    pattern and say what it holds now (and what is left in flight)."""
    doc: dict[str, Any] = {"pid": args.pid, "functions": getattr(args, "functions", None),
                           "command": what, "interrupted": True}
    try:
        from ..live._fentry import fentry_sites
        from ..live._recover import check
        with _symbols(args.pid) as syms:
            sites = fentry_sites(syms, args.functions)
        kinds = _kinds(sites)
        left = check(args.pid)
        # fentry sites holding an INT3, and any journaled site (an entry's)
        ours = {s.addr for s in sites if s.kind == "int3"} | {int(a, 16) for a in left["int3_sites"]}
        doc.update(sites=len(sites), kinds=kinds, int3_left=len(ours), journal=left)
    except Exception as err:          # the process may be gone: still valid JSON
        doc.update(int3_left=None, error=f"{type(err).__name__}: {err}",
                   int3_left_reason=f"the sites could not be read back: {type(err).__name__}")
    if args.json:
        out.emit_json(doc)
    else:
        print(f"textpoke live {what}: interrupted; sites now: "
              + (", ".join(f"{k} {n}" for k, n in doc.get("kinds", {}).items()) or "unknown")
              + f"; INT3s of ours left: {doc.get('int3_left')}", file=sys.stderr)
    return exit_status(e)


def _print_count(res, args: argparse.Namespace) -> None:
    rows = res.counts[:args.top] if args.top else res.counts
    w = max([len("FUNC")] + [len(f) for f, _ in rows])
    out.print_plain(f"Counted {res.sites} functions matching {res.pattern!r} in process "
                    f"{args.pid} for {res.duration:.2f} s ({res.strategy}).")
    out.print_plain(f"{'FUNC':<{w}}  {'COUNT':>12}")
    for f, n in rows:
        out.print_plain(f"{f:<{w}}  {n:>12}")
    if args.top and len(res.counts) > args.top:
        out.print_plain(f"... {len(res.counts) - args.top} more")
    t = res.timings
    attach = t.get("arm_total", 0) + t.get("disarm_total", 0)
    out.print_plain(f"total {sum(n for _, n in res.counts):,} calls; switch on+off {attach:.3f} s "
                    f"attached; sites restored: {'yes' if res.restored else 'NO'}; stubs "
                    + ("freed" if res.freed else "kept mapped: " + "; ".join(res.kept_mapped)))
    if res.skipped:
        by: dict[str, int] = {}
        for k in res.skipped:
            by[k["kind"]] = by.get(k["kind"], 0) + 1
        out.print_plain(f"not counted: {len(res.skipped)} function(s) ("
                        + ", ".join(f"{k} {n}" for k, n in sorted(by.items(), key=lambda kv: -kv[1]))
                        + f"); first: {res.skipped[0]['function']}: {res.skipped[0]['why']}")


# --- live probe ------------------------------------------------------------------
#: hit records kept for --json (the count goes on beyond)
PROBE_JSON_EVENTS = 100_000


def _probe(args: argparse.Namespace) -> int:
    import time
    from ..live._probe import FetchArgError, LiveProbe, alive
    try:
        lp = LiveProbe(args.pid, args.point, args.fetchargs)
    except FetchArgError as e:
        raise UsageError(str(e)) from None
    interrupted: BaseException | None = None
    events: list[dict] = []
    how = ""
    err: str | None = None
    nhit = 0
    emit = None
    cap = args.max_hits
    t0 = time.monotonic()
    try:
        lp.arm(strategy=args.strategy)
        how = lp.how()
        # said once the INT3 is in and every thread synced: tools (and the
        # tests) wait for this line, not for the byte in the target
        print(f"textpoke live probe: {lp.event} at {lp.symbol}+{lp.offset:#x} ({lp.addr:#x}, "
              f"{how}); " + (f"for {args.duration:g} s" if args.duration is not None
                             else "Ctrl-C ends"), file=sys.stderr, flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration

        def emit(hits) -> None:
            nonlocal nhit
            for h in hits:
                if cap is not None and nhit >= cap:
                    break
                if args.json:
                    if len(events) < PROBE_JSON_EVENTS:
                        events.append({"comm": h.comm, "tid": h.tid, "cpu": h.cpu,
                                       "timestamp": round(h.ts, 6),
                                       "args": {a.name: v for a, v in zip(lp.args, h.values)}})
                    nhit += 1
                    if nhit == 1:       # stdout holds the JSON only: say it on stderr
                        print(f"textpoke live probe: first hit (thread {h.tid})",
                              file=sys.stderr, flush=True)
                else:
                    nhit += 1
                    out.print_plain(lp.line(h))

        def enough() -> bool:
            return (cap is not None and lp.nhit >= cap) or (end is not None and
                                                            time.monotonic() >= end)
        while True:
            slice_end = time.monotonic() + 0.02
            lp.pump(lambda: len(lp.hits) >= 64 or time.monotonic() >= slice_end or enough())
            emit(lp.take())
            if enough() or not lp.machine.threads or not alive(args.pid):
                break
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = e
    except Exception as e:
        from .._errors import TextPokeError
        if not isinstance(e, TextPokeError):
            raise
        err = f"{type(e).__name__}: {e}"
    finally:
        # the disarm runs to its end: a signal from now on is only recorded
        # (and still gives 130/143)
        reporting()
        try:
            left = lp.close()
        except Exception as e:          # the process went away under us
            left = {"int3_left": lp.int3_left(), "regions_kept": [],
                    "close_error": f"{type(e).__name__}: {e}"}
    if emit is not None:
        emit(lp.take())             # hits the handler saw before the end
    gone = not alive(args.pid)
    if err is not None and not gone and lp.probe is None:
        # refused before anything stayed written (a kprobe rule): one line, exit 2
        raise UsageError(err.split(": ", 1)[1])
    doc = {"pid": args.pid, "event": lp.event, "symbol": lp.symbol, "offset": lp.offset,
           "addr": f"{lp.addr:#x}", "how": how, "fetchargs": [a.name + "=" + a.text
                                                              for a in lp.args],
           "hits": nhit, "seconds": round(time.monotonic() - t0, 3), "strategy": args.strategy,
           "target_alive": not gone,
           "interrupted": interrupted is not None or _arrived() is not None,
           "int3_left": left["int3_left"] if not gone else 0, "regions_kept": left["regions_kept"]}
    if gone:
        doc["int3_left_reason"] = "the process has exited: no text left to hold an INT3"
    if err is not None:
        doc["error"] = err
    if "close_error" in left:
        doc["close_error"] = left["close_error"]
    if args.json:
        doc["events"] = events
        doc["events_dropped"] = max(0, nhit - len(events))
        out.emit_json(doc)
    else:
        print(f"textpoke live probe: {nhit} hit(s) of {lp.event}; probe point restored: "
              + ("yes" if doc["int3_left"] == 0 else "NO")
              + ("" if not gone else "; the process exited") + (f"; {err}" if err else ""),
              file=sys.stderr)
    if interrupted is not None:
        return exit_status(interrupted)
    from ._signals import status_for
    return status_for(0 if doc["int3_left"] == 0 and err is None else 1)
