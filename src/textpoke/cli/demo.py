# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke demo``: boot the kernel image on N vCPUs, run the workload on
all of them and toggle every patch site through the batch API while they
run; show what every CPU executed at every site.

On SIGINT/SIGTERM the toggling stops (the batch in flight is finished or
rolled back by the core), the partial summary is printed -- with --json a
document with ``"interrupted": true`` and ``"int3_left"``, the sites whose
text still reads an INT3 of ours, counted by reading the text back -- and
the exit status is 130 (143).
"""

from __future__ import annotations

import argparse
import sys

from . import _output as out
from ._args import CPUS, LINE_SIZE, SEED, TOGGLES, UsageError, int_in, power_of_two
from ._signals import Terminated, exit_status, reporting
from .keys import CLIENT_CPUS

__all__ = ["add_arguments", "run"]

NAME = "demo"
HELP = "patch live code on every vCPU, many times over"
DESCRIPTION = ("Boot the kernel image on N vCPUs, run the workload on all of them and toggle\n"
               "every patch site through the batch API while they run; show what every CPU\n"
               "executed at every site.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=int_in(CPUS), default=4, metavar="N",
                   help=f"virtual CPUs, {CPUS} (default 4)")
    p.add_argument("--toggles", type=int_in(TOGGLES), default=1000, metavar="N",
                   help=f"batches, each flipping every site, {TOGGLES} (default 1000)")
    p.add_argument("--seed", type=int_in(SEED), default=0, metavar="N",
                   help=f"scheduler seed, {SEED} (default 0)")
    p.add_argument("--line-size", type=power_of_two(LINE_SIZE), default=64, metavar="BYTES",
                   help=f"fetch-view line size, a power of two in {LINE_SIZE}; 1 is "
                        "byte-granular (default 64)")
    p.add_argument("--no-boot", action="store_true",
                   help="run the bare workload image instead of booting the kernel image first")
    p.add_argument("--machine", choices=("sim", "live"), default="sim",
                   help="sim (default), or live: the same workload built with gcc at run time "
                        "(needs gcc) as a real process of --cpus threads, patched through ptrace; "
                        "--seed, --line-size and the boot do not apply")
    p.add_argument("--timeline", action="append", metavar="FILE",
                   help="draw the toggles (sim only; after boot) as FILE.svg -- CPUs as lanes, "
                        "the first ~1500 steps -- or all of them as FILE.json, a Chrome JSON "
                        "trace for Perfetto; may be given twice")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args: argparse.Namespace) -> int:
    if args.timeline:
        from ..verify._timeline import check_paths
        try:
            check_paths(args.timeline)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.machine == "live":
            raise UsageError("--timeline draws the sim machine; it does not apply to --machine live")
    interrupted: BaseException | None = None
    d = None
    try:
        if args.machine == "live":
            from ..live._demo import LiveDemo
            d = LiveDemo(threads=args.cpus)
            _state(f"workload running: pid {d.pid}, {args.cpus} threads")
            d.attach()
            _state(f"attached to pid {d.pid}")
        else:
            from ..sim._demo import Demo
            d = Demo(cpus=args.cpus, seed=args.seed, line_size=args.line_size,
                     boot=not args.no_boot)
            _state(f"machine built: {args.cpus} vCPUs")
            d.boot()
            _state("booted" if not args.no_boot else "no boot (--no-boot)")
            if args.timeline:
                from ..verify._timeline import watch
                watch(d.w)
        with out.progress(out.progress_enabled(args.json), "toggling sites") as bar:
            def update(done: int, total: int) -> None:
                bar(done, total)
                if done & (done - 1) == 0 or done == total:     # 1, 2, 4, 8, ... and the last
                    _state(f"toggled {done} of {total}")
            _state(f"toggling every site {args.toggles} times")
            d.toggle(args.toggles, update)
        _state("checking that every CPU runs the final text")
        d.check_final()
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = e
    except BaseException:
        if d is not None:
            d.close()
        raise
    finally:
        reporting()
    if d is None:                 # stopped before the machine existed: no text to check
        from ._contract import NOT_STARTED
        if args.json:
            out.emit_json({"command": NAME, "cpus": args.cpus, "toggles": args.toggles,
                           "seed": args.seed, "line_size": args.line_size, "toggles_done": 0,
                           "interrupted": True, "int3_left": None,
                           "int3_left_reason": NOT_STARTED})
        print("textpoke demo: interrupted before the machine was built", file=sys.stderr)
        return exit_status(interrupted)
    drawn: list[str] = []
    try:
        r = d.result(interrupted=interrupted is not None)
        if args.timeline:
            from ..verify._timeline import demo_recording, write_all
            drawn = write_all(demo_recording(d), args.timeline)
    finally:
        d.close()
    found = not (not r.oopses and r.misbehaviours == 0 and r.final_ok and not r.int3_left)
    if args.json:
        out.emit_json(r.as_dict())
    else:
        _print(r)
    for line in drawn:
        print(line, file=sys.stderr if args.json else sys.stdout)
    if interrupted is not None:
        print(f"textpoke demo: interrupted after {r.toggles_done} of {r.toggles} toggles; "
              f"INT3s of ours left in the text: {r.int3_left}", file=sys.stderr)
        return exit_status(interrupted)
    if not args.json and args.machine == "sim":
        from ._signals import arrived, status_for
        _state("report written; the clients next")
        if arrived() is not None:
            # a signal came while the report was written (signals were only
            # recorded then): stop here, do not start the clients
            print("textpoke demo: interrupted after the toggling report; the clients did not "
                  "run", file=sys.stderr)
            return status_for(1 if found else 0)
        try:
            found |= _clients(args)
        except _Interrupted as i:
            return i.args[0]
    return 1 if found else 0


def _print(r) -> None:
    from rich.table import Table

    from ..sim._verify import format_oops
    con = out.console()
    if r.boot:
        b = r.boot
        p = b["patched"]
        tests = ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in b["selftests"].items())
        con.print(f"[bold]boot[/] {b['image']} on {r.cpus} vCPUs, features {','.join(b['features'])}: "
                  f"alternatives {p['.altinstructions']['taken']}/{p['.altinstructions']['entries']} taken, "
                  f"retpoline sites {p['.retpoline_sites']['patched']}, return sites "
                  f"{p['.return_sites']['patched']} patched; {tests}")
    done = (f"{r.toggles}" if not r.interrupted
            else f"{r.toggles_done} of {r.toggles} (interrupted)")
    if not r.line_size:           # the live machine: threads of a real process
        con.print(f"[bold]textpoke demo --machine live[/] — {r.cpus} threads of a real process "
                  f"ran the workload while every site was toggled {done} times through "
                  "smp_text_poke_batch_*() over ptrace")
    else:
        con.print(f"[bold]textpoke demo[/] — {r.cpus} vCPUs ran the workload while every site was "
                  f"toggled {done} times through smp_text_poke_batch_*() (seed {r.seed})")
    t = Table(title="sites (bytes now; times each variant ran, all CPUs)", title_justify="left")
    for col in ("site", "kind", "len", "bytes now"):
        t.add_column(col)
    for col in ("old", "new", "not-taken", "wrong"):
        t.add_column(col, justify="right")
    for s in r.sites:
        b = s["behaviours"]
        wrong = f"[red]{s['misbehaviours']:,}[/]" if s["misbehaviours"] else "0"
        t.add_row(s["name"], s["kind"], str(s["len"]), s["now"], f"{b.get('old', 0):,}",
                  f"{b.get('new', 0):,}", f"{b.get('not-taken', 0):,}", wrong)
    con.print(t)
    c = Table(title="CPUs", title_justify="left")
    for col in ("cpu", "instructions ≥", "loop iterations"):
        c.add_column(col, justify="right")
    for i, (n, it) in enumerate(zip(r.instructions, r.iterations)):
        c.add_row(str(i), f"{n:,}", f"{it:,}")
    con.print(c)
    con.print(f"batches {r.batches:,}  site pokes {r.pokes:,}  byte writes {r.writes:,}  "
              f"syncs {r.syncs:,}  IPIs taken {r.ipis:,}  stale-line refills {r.line_refills:,}")
    con.print(f"INT3 hits {r.int3_hits:,}  emulated {r.int3_emulated:,}  "
              f"scheduler steps {r.steps:,}  host time {r.elapsed:.2f} s")
    oops = len(r.oopses)
    final = {True: "yes", False: "NO", None: "not checked"}[r.final_ok]
    colour = "green" if not oops and not r.misbehaviours and r.final_ok and not r.int3_left else "red"
    con.print(f"[{colour}]oopses {oops}  wrong behaviours {r.misbehaviours}  "
              f"INT3s of ours left {r.int3_left}  every CPU runs the final code: {final}[/]")
    for o in r.oopses[:5]:
        out.print_plain(format_oops(o["report"]))
    con.print("(instructions count slices that ran to their budget; a slice cut short by "
              "a trap is not counted)", style="dim")


def _state(text: str) -> None:
    """Where the demo is, a line on stderr at each step -- unless stderr is
    a terminal, which has the progress bar instead.  Logs (``make demo >
    log 2>&1``) show how far a run got, and tools (and the tests) wait for
    a step instead of for time."""
    if not sys.stderr.isatty():
        print(f"textpoke demo: {text}", file=sys.stderr, flush=True)


def _clients(args) -> bool:
    """The clients at work, a line each (static keys, static calls, a
    module loaded, switched and unloaded, ftrace and kprobes, each on
    running vCPUs).  True when any check failed or a CPU oopsed: the exit
    status says so.  An interrupt stops the line in progress; each line is
    printed when done, so what ran is on the screen."""
    from ._contract import interrupted_tail
    from ._signals import resume
    from .keys import settle
    failed = False
    cpus = min(args.cpus, CLIENT_CPUS)
    hold: list = []         # the machine of the step in progress
    try:
        resume()    # the toggling part's report ignored signals; these run on
        for step in _CLIENT_STEPS:
            _state(f"client {step.__name__.strip('_').replace('_', ' ')}")
            line, ok = step(cpus, args.seed, hold)
            while hold:
                hold.pop().close()
            failed |= not ok
            out.print_plain(line + ("" if ok else "  [FAILED]"))
    except (KeyboardInterrupt, Terminated) as e:
        try:
            code = interrupted_tail(args, {"command": NAME}, [], e,
                                    core=settle(hold[-1]) if hold else None,
                                    reason="interrupted while a client machine was being built "
                                           "(the boot writes no INT3)")
        finally:
            for m in hold:
                m.close()
        raise _Interrupted(code) from None
    except BaseException:
        for m in hold:
            m.close()
        raise
    finally:
        reporting()
    return failed


class _Interrupted(Exception):
    pass


def _checks(cases: list[dict]) -> str:
    return f"{sum(c['passed'] for c in cases)}/{len(cases)} checks passed"


def _ok(r, oopses: int) -> bool:
    return bool(r.passed) and not oopses and all(c["passed"] for c in r.cases)


def _static_keys(cpus: int, seed: int, hold: list):
    from ..sim._clients_demo import ClientMachine, many_key_flip, static_keys_selftest
    cm = ClientMachine(cpus=cpus, seed=seed)
    hold.append(cm)
    r = static_keys_selftest(cm)
    m = many_key_flip(cm, 1000, flips=2)
    c = m.cases[-1]
    line = (f"static keys: lib/test_static_keys.c on {cpus} running vCPUs: "
            f"{_checks(r.cases)}, {r.batches} batches, {r.syncs} syncs, {r.oopses} oopses; "
            f"a key of {c['entries']} sites switched twice while the CPUs run them: "
            f"{m.batches} batches, {m.syncs} syncs, {'ok' if m.passed else 'FAILED'}")
    return line, _ok(r, r.oopses) and _ok(m, m.oopses) and not cm.core.int3_left()


def _static_calls(cpus: int, seed: int, hold: list):
    from ..sim._clients_demo import ClientMachine, static_call_selftest
    cm = ClientMachine(cpus=cpus, seed=seed)
    hold.append(cm)
    r = static_call_selftest(cm)
    line = (f"static calls: static_call_selftest and every site kind on {cpus} running "
            f"vCPUs: {_checks(r.cases)}, {r.syncs} syncs, {r.oopses} oopses")
    return line, _ok(r, r.oopses) and not cm.core.int3_left()


def _modules(cpus: int, seed: int, hold: list):
    from ..sim._clients_demo import ClientMachine
    from ..sim._module_selftest import module_selftest
    cm = ClientMachine(cpus=cpus, seed=seed)
    hold.append(cm)
    r = module_selftest(cm)
    refused = sum(c["name"].startswith("refused") and c["passed"] for c in r.cases)
    line = (f"modules: a GCC-built module loaded into execmem on {cpus} running vCPUs, its "
            f"key and static call switched both ways, unloaded, reloaded; {refused} bad "
            f"objects refused with the text unchanged: {_checks(r.cases)}, {r.syncs} syncs, "
            f"{r.oopses} oopses")
    return line, _ok(r, r.oopses) and not cm.core.int3_left()


def _ftrace(cpus: int, seed: int, hold: list):
    from ..sim._ftrace_work import FtraceMachine, ftrace_selftest
    from .ftrace import FTRACE_CPUS
    n = min(cpus, FTRACE_CPUS)
    fm = FtraceMachine(cpus=n, seed=seed)
    hold.append(fm)
    r = ftrace_selftest(fm)
    line = (f"ftrace: startup self-test on {n} running vCPUs (trace counts == the "
            f"workload's own, filters, profiler, overruns counted): {_checks(r.cases)}, "
            f"{r.entries:,} trace entries, {r.batches} batches, {r.syncs} syncs, "
            f"{r.oopses} oopses")
    return line, _ok(r, r.oopses) and not fm.core.int3_left()


def _kprobes(cpus: int, seed: int, hold: list):
    from .._kprobes._guest import build_guest_functions
    from ..sim._clients_demo import ClientMachine
    from ..sim._kprobes_selftest import kprobes_selftest
    cm = ClientMachine(cpus=cpus, seed=seed)
    hold.append(cm)
    kp = cm.kernel.kprobes
    g = build_guest_functions(kp, cm.sim)
    s0 = cm.core.stats.syncs
    r = kprobes_selftest(cm, kp, g)
    oopses = len(cm.sim.oopses)
    line = (f"kprobes: lib/test_kprobes.c, kretprobes and an optimised probe on {cpus} "
            f"running vCPUs: {_checks(r.cases)}, {cm.core.stats.syncs - s0} syncs, "
            f"{oopses} oopses")
    return line, _ok(r, oopses) and not cm.core.int3_left()


_CLIENT_STEPS = (_static_keys, _static_calls, _modules, _ftrace, _kprobes)
