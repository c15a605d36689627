# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke verify``: check the protocol under many seeded schedules.

Each schedule is decided by scenario, strategy, mutation, CPUs, line size
and seed; a violation is printed with the one-line command that replays it
(never wrapped, whatever the terminal width) and, with --json, the same
parameters as data.  ``--replay SEED`` runs one schedule and prints its
oops the way the kernel does; ``--trace`` adds the schedule's timeline.

Schedules stream through a process pool (--jobs), so memory stays flat for
any --schedules; the report does not depend on --jobs.  On SIGINT/SIGTERM
the run stops dispatching, lets the schedules in flight finish, prints what
completed (with --json, ``"interrupted": true`` and ``"int3_left"``) and
exits 130 (143).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING

from . import _output as out
from ._args import (Bounds, CPUS, JOBS, LINE_SIZE, SCHEDULES, SEED, UsageError, checked,
                    choice_of, int_in, number, power_of_two)
from ._inputs import output_dir, state_file
from ._signals import Terminated, exit_status, reporting

if TYPE_CHECKING:
    from ..sim._verify import VerifyReport

__all__ = ["add_arguments", "run"]

CHUNK = Bounds(1, 1_000_000)

# A resume or state file is ours (one JSON line per finished chunk or depth);
# anything larger than this is not one, and reading it would only eat memory.
STATE_FILE_LIMIT = 256 << 20

#: --cluster: local, local:N, or a Dask scheduler's [PROTOCOL://]HOST[:PORT]
_CLUSTER = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx|inproc)://)?"
                      r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]{0,252})(?::[0-9]{1,5})?")


def cluster_address(text: str) -> str:
    """--cluster's ADDRESS, checked before anything connects to it."""
    if text == "local":
        return text
    if text.startswith("local:"):
        number(text[6:], JOBS, "--cluster local:N")
        return text
    port = re.search(r":([0-9]{1,5})$", text)
    if not _CLUSTER.fullmatch(text) or (port and not 1 <= int(port.group(1)) <= 65535):
        raise UsageError(f"--cluster {text[:80]!r}: 'local', 'local:N', or a Dask scheduler "
                         "address such as tcp://HOST:8786")
    return text


# The names the options take, repeated from textpoke.sim._verify and
# textpoke._core so that parsing (and --help) imports no machine: the sim
# pulls in Unicorn and iced-x86.  tests/test_cli_startup.py checks they agree.
SCENARIOS = ("nop2-jmp8", "nop5-jmp32", "call", "ret-jmp32", "jcc32", "xline", "multi",
             "int3-entry", "call-xline", "jcc32-xline")
STRATEGIES = ("int3", "naive")
MUTATIONS = ("no-sync-1", "no-sync-2", "no-sync-3", "no-refs-wait", "unordered")

NAME = "verify"
HELP = "check the protocol under many seeded schedules"
DESCRIPTION = ("Check the INT3 protocol under many seeded schedules, with an oracle\n"
               "watching every CPU.  A violation comes with the one-line command that\n"
               "replays it; --replay SEED shows that schedule's oops (and, with --trace,\n"
               "its timeline).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", type=choice_of([*SCENARIOS, "all"], "scenario"), default="all",
                   metavar="NAME", help=f"one of {', '.join(SCENARIOS)}, or 'all' (default)")
    p.add_argument("--schedules", type=int_in(SCHEDULES), default=200, metavar="N",
                   help=f"seeded schedules per scenario, {SCHEDULES} (default 200)")
    p.add_argument("--seed", type=int_in(SEED), default=0, metavar="N",
                   help=f"base seed the schedules' seeds derive from, {SEED} (default 0)")
    p.add_argument("--strategy", type=choice_of(STRATEGIES, "strategy"), default="int3",
                   metavar="NAME", help="int3 (the batch protocol, default) or naive (store the "
                                        "new bytes straight over running code)")
    p.add_argument("--mutation", type=choice_of(MUTATIONS, "mutation"), default=None,
                   metavar="NAME", help=f"remove one step of the int3 protocol: "
                                        f"{', '.join(MUTATIONS)}")
    p.add_argument("--cpus", type=int_in(CPUS), default=3, metavar="N",
                   help=f"virtual CPUs per schedule, {CPUS} (default 3)")
    p.add_argument("--line-size", type=power_of_two(LINE_SIZE), default=64, metavar="BYTES",
                   help=f"fetch-view line size, a power of two in {LINE_SIZE}; 1 is "
                        "byte-granular (default 64)")
    p.add_argument("--jobs", type=int_in(JOBS), default=min(os.cpu_count() or 1, JOBS.hi),
                   metavar="N", help=f"worker processes, {JOBS} (default: all cores); "
                                     "the report does not depend on it")
    p.add_argument("--replay", type=int_in(SEED), default=None, metavar="SEED",
                   help="run the one schedule with this seed (needs one --scenario) and show "
                        "its violations and oops")
    p.add_argument("--trace", action="store_true",
                   help="with --replay (or for a run's first violation): also show the "
                        "schedule's timeline -- patcher phases, pokes, IPIs, line refills, "
                        "INT3 hits -- per CPU")
    p.add_argument("--timeline", action="append", metavar="FILE",
                   help="with --replay (or for a run's first violation): draw the schedule -- "
                        "CPUs as lanes over scheduler steps, the patcher's phases, pokes, "
                        "syncs, IPIs, line refills, INT3 hits, what each CPU ran at each site, "
                        "the violation where it happened -- as FILE.svg, or as FILE.json, a "
                        "Chrome JSON trace that Perfetto's UI and chrome://tracing open; "
                        "may be given twice")
    p.add_argument("--report", metavar="DIR", type=output_dir(),
                   help="run every scenario x variant (int3, each mutation, naive; or int3 and "
                        "the --mutation/--strategy asked for) x --line-sizes and write "
                        "DIR/index.html, DIR/heatmap.svg, DIR/report.json and a timeline of "
                        "each variant's first violation; exit 1 only if int3 itself failed")
    p.add_argument("--line-sizes", default=None, metavar="LIST",
                   help="with --report: fetch-view line sizes, comma-separated powers of two (default 1,64)")
    p.add_argument("--cluster", metavar="ADDRESS", type=checked(cluster_address, "ADDRESS"),
                   help="run the campaign on a Dask distributed scheduler (tcp://HOST:8786), "
                        "or 'local[:N]' for one started here with N (default --jobs) workers; "
                        "needs pip install 'textpoke[cluster]'")
    p.add_argument("--resume", metavar="FILE", type=state_file(STATE_FILE_LIMIT),
                   help="record each finished chunk of seeds in FILE; run the same command "
                        "again to go on where it stopped (no chunk lost or run twice)")
    p.add_argument("--chunk", type=int_in(CHUNK), default=25, metavar="N",
                   help=f"with --cluster/--resume/--report: seeds per chunk, {CHUNK} (default 25)")
    p.add_argument("--list", action="store_true", help="list scenarios, strategies and mutations")
    p.add_argument("--no-reuse", action="store_true",
                   help="boot a new machine for every schedule (the old, slower path; the "
                        "report is the same)")
    p.add_argument("--exhaustive", action="store_true",
                   help="explore every interleaving of one small --scenario within --bound "
                        "(breadth first: the first violation is a shortest one)")
    p.add_argument("--bound", default=None, metavar="SPEC",
                   help="with --exhaustive: cpus=N,execs=N,refills=N,line=N (default "
                        "cpus=2,execs=1,refills=1,line=64): CPUs, site executions per CPU and "
                        "evictions per path, fetch line size")
    p.add_argument("--state", default=None, metavar="FILE", type=state_file(STATE_FILE_LIMIT),
                   help="with --exhaustive: save progress after every depth and resume from it")
    p.add_argument("--path", default=None, metavar="ACTIONS",
                   help="with --exhaustive: replay this path of actions (a counterexample)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args)
    if args.strategy == "naive" and args.mutation:
        raise UsageError("--mutation removes a step of the int3 protocol; it does not apply "
                         "to --strategy naive")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    _check_files_and_modes(args)
    if args.timeline:
        from ..verify._timeline import check_paths
        try:
            check_paths(args.timeline)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.exhaustive:
        from ._exhaustive import run_exhaustive
        return run_exhaustive(args, names)
    if args.replay is not None:
        if len(names) != 1:
            raise UsageError("--replay needs one --scenario")
        return _replay(args, names[0])
    if args.report is not None or args.cluster is not None or args.resume is not None:
        return _campaign(args, names)

    from ..sim._verify import VerifyReport, run_schedule, verify
    rep = VerifyReport()
    interrupted: BaseException | None = None
    try:
        with out.progress(out.progress_enabled(args.json), "schedules") as update:
            verify(names, args.schedules, seed=args.seed, strategy=args.strategy,
                   mutation=args.mutation, ncpus=args.cpus, line_size=args.line_size,
                   jobs=args.jobs, progress=update, report=rep, reuse=not args.no_reuse)
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = e
    finally:
        reporting()
    first = None
    if rep.first is not None and rep.first.replay is not None:
        # Replay it here: the kernel-style oops (and timeline) come from the
        # very schedule, and we learn whether it reproduces.
        f = rep.first
        first = run_schedule(f.scenario, f.seed, **f.replay.kwargs(), trace=args.trace)
        drawn = _timelines(args, f.replay)
    elif args.timeline:
        drawn = ["timeline: no violation to draw (pass --replay SEED to draw a schedule)"]
    else:
        drawn = []
    if args.json:
        d = {"command": "verify", **rep.as_dict()}
        if first is not None:
            fv = d["first_violation"]
            fv["reproduced"] = bool(first.violations) and first.violations[0] == rep.first
            fv["oops"] = first.oopses[0] if first.oopses else None
            if args.trace:
                fv["timeline"] = first.timeline
        out.emit_json(d)
    else:
        _print_report(rep, first, args)
        for line in drawn:
            out.print_plain(line)
    if interrupted is not None:
        print(f"textpoke verify: interrupted after {rep.schedules:,} of {rep.planned:,} "
              f"schedules; INT3s of ours left in the text: {rep.int3_left}", file=sys.stderr)
        return exit_status(interrupted)
    return 1 if (rep.violating_schedules or rep.int3_left) else 0


def _campaign_progress(args: argparse.Namespace):
    """A rich bar with ETA on a terminal; elsewhere a line on stderr every
    10 s with the rate and ETA (unless --json)."""
    import contextlib
    import time
    if out.progress_enabled(args.json):
        return out.progress(True, "schedules")
    state = {"t0": time.monotonic(), "d0": None, "last": 0.0}

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if state["d0"] is None:
            state["d0"] = done          # resumed schedules do not count for the rate
            return
        if now - state["last"] < 10 and done < total:
            return
        state["last"] = now
        rate = (done - state["d0"]) / max(now - state["t0"], 1e-9)
        eta = f"{(total - done) / rate:,.0f} s" if rate > 0 else "?"
        print(f"textpoke verify: {done:,}/{total:,} schedules ({done / max(total, 1):.0%}), "
              f"{rate:,.1f}/s, ETA {eta}", file=sys.stderr, flush=True)
    return contextlib.nullcontext(update if not args.json else (lambda d, t: None))


class _Done:
    """The backend of a campaign with nothing left to run."""
    name = "none (all chunks resumed)"

    def threads(self) -> int:
        return 1

    def stream(self, futures: list) -> list:
        return []

    def cancel(self, futures: list) -> None:
        pass

    def close(self) -> None:
        pass




def _check_files_and_modes(args: argparse.Namespace) -> None:
    """Refuse, before any work, an option given without the mode it belongs
    to and any file argument that cannot be what it should."""
    from ._inputs import check_output_dir, check_state
    for opt, val in (("--bound", args.bound), ("--state", args.state), ("--path", args.path)):
        if val is not None and not args.exhaustive:
            raise UsageError(f"{opt} belongs to --exhaustive")
    if args.line_sizes is not None:
        if args.report is None:
            raise UsageError("--line-sizes belongs to --report")
        _line_sizes(args.line_sizes)
    for opt, path in (("--resume", args.resume), ("--state", args.state)):
        if path is not None:
            check_state(path, STATE_FILE_LIMIT, opt)
    # checked again now (parsing checked them already): the run is about to start
    if args.report is not None:
        check_output_dir(args.report, "--report")


def _line_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--line-sizes {text[:80]!r}: comma-separated powers of two") from None
    if not sizes or any(not (LINE_SIZE.lo <= n <= LINE_SIZE.hi and n & (n - 1) == 0)
                        for n in sizes):
        raise UsageError(f"--line-sizes {text[:80]!r}: powers of two in {LINE_SIZE}")
    return sizes


def _campaign(args: argparse.Namespace, names: list[str]) -> int:
    """--cluster / --resume / --report: the campaign in chunks of seeds on
    Dask (or this machine's pool), recorded chunk by chunk."""
    import time
    from ..sim._verify import run_schedule
    from ..verify._cluster import Campaign, Cell, LocalBackend, ResumeMismatch, connect
    if args.report is not None:
        from ..verify._report import cells_for, variants_for
        sizes = _line_sizes(args.line_sizes or "1,64")
        cells = cells_for(names, variants_for(args.strategy, args.mutation), sizes, args.cpus)
    else:
        cells = [Cell(n, args.strategy, args.mutation, args.cpus, args.line_size) for n in names]
    try:
        camp = Campaign(cells, args.schedules, seed=args.seed, chunk=args.chunk,
                        resume=args.resume)
    except ResumeMismatch as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--resume: {e}") from None
    try:
        if next(camp.chunks(), None) is None:
            backend = _Done()              # every chunk is in the resume file
        else:
            backend = (connect(args.cluster, jobs=args.jobs) if args.cluster is not None
                       else LocalBackend(args.jobs))
    except (RuntimeError, ConnectionError, ValueError) as e:
        raise UsageError(str(e)) from None
    interrupted: BaseException | None = None
    t0 = time.perf_counter()
    try:
        with _campaign_progress(args) as update:
            camp.run(backend, progress=update)
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = e
    finally:
        reporting()
        backend.close()
    engine = {"engine": backend.name, "address": args.cluster or f"local pool of {args.jobs}",
              "chunks_run": camp.ran_chunks, "chunks_resumed": camp.resumed_chunks,
              "workers_used": len(camp.workers), "seconds": round(time.perf_counter() - t0, 3)}
    resume_hint = (f"; run the same command again to resume from {args.resume}"
                   if args.resume else "")
    if args.report is not None:
        from ..verify._report import write_report
        doc = write_report(camp, args.report, engine=engine)
        if args.json:
            out.emit_json(doc)
        else:
            con = out.console()
            for v, st in doc["summary"].items():
                con.print(f"  {v:14} caught in {st['cells_caught']:>3} of {st['cells']:>3} cells,"
                          f" {st['violating']:,} of {st['schedules']:,} schedules")
            out.print_plain(f"report: {args.report}/index.html (heatmap.svg, report.json, "
                            f"{len(doc['pictures'])} timelines); chunks run {camp.ran_chunks}, "
                            f"resumed {camp.resumed_chunks}")
        if interrupted is not None:
            print(f"textpoke verify: interrupted after {camp.completed:,} of {camp.total:,} "
                  f"schedules{resume_hint}", file=sys.stderr)
            return exit_status(interrupted)
        return 0 if doc["int3_clean"] else 1
    rep = camp.verify_report()
    first = None
    if rep.first is not None and rep.first.replay is not None and interrupted is None:
        f = rep.first
        first = run_schedule(f.scenario, f.seed, **f.replay.kwargs(), trace=args.trace)
    drawn = _timelines(args, rep.first.replay) if rep.first is not None else []
    if args.json:
        out.emit_json({"command": "verify", **rep.as_dict(), "engine": engine})
    else:
        _print_report(rep, first, args)
        out.print_plain(f"engine: {engine['engine']} ({engine['address']}), chunks run "
                        f"{camp.ran_chunks}, resumed {camp.resumed_chunks}, on "
                        f"{len(camp.workers)} worker(s)")
        for line in drawn:
            out.print_plain(line)
    if interrupted is not None:
        print(f"textpoke verify: interrupted after {rep.schedules:,} of {rep.planned:,} "
              f"schedules; INT3s of ours left in the text: {rep.int3_left}{resume_hint}",
              file=sys.stderr)
        return exit_status(interrupted)
    return 1 if (rep.violating_schedules or rep.int3_left) else 0


def _timelines(args: argparse.Namespace, replay) -> list[str]:
    """Draw *replay*'s schedule to each --timeline file (replayed once more,
    traced and watched: the same schedule, event for event)."""
    if not args.timeline or replay is None:
        return []
    from ..verify._timeline import record_schedule, write_all
    rec = record_schedule(replay.scenario, replay.seed, strategy=replay.strategy,
                          mutation=replay.mutation, ncpus=replay.cpus, line_size=replay.line_size)
    try:
        return write_all(rec, args.timeline)
    except OSError as e:
        raise UsageError(f"--timeline: {e}") from None


def _list(args: argparse.Namespace) -> int:
    from ..sim._verify import SCENARIOS
    if args.json:
        out.emit_json({"scenarios": {k: v.description for k, v in SCENARIOS.items()},
                       "mutations": list(MUTATIONS), "strategies": list(STRATEGIES)})
        return 0
    con = out.console()
    con.print("[bold]scenarios[/]")
    for k, v in SCENARIOS.items():
        con.print(f"  {k:12} {out.escape(v.description)}")
    con.print("[bold]strategies[/]")
    con.print("  int3         the batch protocol")
    con.print("  naive        store the new bytes straight over running code, then sync")
    con.print("[bold]mutations[/] (each removes one step of the INT3 protocol)")
    for m in MUTATIONS:
        con.print(f"  {m}")
    return 0


def _replay(args: argparse.Namespace, scenario: str) -> int:
    from ..sim._verify import format_oops, format_timeline, run_schedule
    r = run_schedule(scenario, args.replay, strategy=args.strategy, mutation=args.mutation,
                     ncpus=args.cpus, line_size=args.line_size, trace=args.trace)
    drawn = _timelines(args, r.replay)
    reporting()
    if args.json:
        out.emit_json({"command": "verify", **r.as_dict()})
        return 1 if (r.violations or r.int3_left) else 0
    con = out.console()
    p = r.replay
    what = p.strategy + (f" minus {p.mutation}" if p.mutation else "")
    con.print(f"schedule {p.seed} of {p.scenario} ({what}, {p.cpus} vCPUs, line size "
              f"{p.line_size}): {len(r.violations)} violation(s), {r.steps:,} scheduler steps, "
              f"INT3s emulated {r.int3_emulated}, syncs {r.syncs}, INT3s of ours left "
              f"{r.int3_left}")
    for v in r.violations:
        con.print(f"  [red]{v.kind}[/] " + out.escape(v.detail))
    for o in r.oopses:
        out.print_plain(format_oops(o))
    con.print("behaviours (times each variant ran, all CPUs):")
    for site, b in r.behaviours.items():
        if b:
            con.print(f"  {site:14} " + ", ".join(f"{k}={n:,}" for k, n in b.items()))
    if args.trace and r.timeline is not None:
        con.print("[bold]timeline[/]")
        out.print_plain(format_timeline(r.timeline))
    out.print_plain("replay: " + p.command())
    for line in drawn:
        out.print_plain(line)
    return 1 if (r.violations or r.int3_left) else 0


def _print_report(rep: VerifyReport, first, args: argparse.Namespace) -> None:
    from rich.table import Table
    from ..sim._verify import format_oops, format_timeline
    con = out.console()
    what = rep.strategy + (f" minus {rep.mutation}" if rep.mutation else "")
    t = Table(title=f"verify: {what}, {rep.schedules_per_scenario:,} schedules per scenario, "
                    f"{rep.cpus} vCPUs, line size {rep.line_size}, base seed {rep.seed}",
              title_justify="left")
    t.add_column("scenario")
    t.add_column("schedules", justify="right")
    t.add_column("violating", justify="right")
    for k, st in rep.by_scenario.items():
        style = "red" if st["violations"] else "green"
        t.add_row(k, f"{st['schedules']:,}", f"[{style}]{st['violations']:,}[/]")
    con.print(t)
    share = rep.violating_schedules / max(1, rep.schedules)
    kinds = ", ".join(f"{k} {n:,}" for k, n in rep.violations_by_kind.items()) or "none"
    done = f"{rep.schedules:,}" + (f" of {rep.planned:,} (interrupted)" if rep.interrupted else "")
    con.print(f"schedules run {done}; violating {rep.violating_schedules:,} ({share:.1%}), "
              f"by kind: {kinds}; INT3s emulated {rep.int3_emulated:,}, syncs {rep.syncs:,}, "
              f"INT3s of ours left {rep.int3_left}")
    if rep.first:
        f = rep.first
        con.print(f"[red]first violation[/]: {f.kind} in {f.scenario}, seed {f.seed}: "
                  + out.escape(f.detail))
        if first is not None:
            for o in first.oopses[:1]:
                out.print_plain(format_oops(o))
            if args.trace and first.timeline is not None:
                con.print("[bold]timeline[/]")
                out.print_plain(format_timeline(first.timeline))
        out.print_plain("replay: " + f.replay.command())
