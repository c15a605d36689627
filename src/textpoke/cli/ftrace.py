# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke ftrace``: the function tracer on running vCPUs.

Boots the kernel image, sets every vCPU running the ftrace workload (a
loop calling ft_open -> ft_lookup -> ft_hash, ft_permission, ft_read and a
self-test function, checking every result), then -- while they run --
enables the function tracer on the functions that ``--functions`` selects
and ``--notrace`` does not (every fentry site of the image by default),
lets them run ``--duration`` scheduler steps, disables it again and prints
what the guest's per-CPU ring buffers held, as ``trace_pipe`` prints it,
or with ``--profile`` the function profiler's hit counts.  ``--selftest``
redoes the kernel's startup test of the function tracer first.

Exit 1 when a self-test fails, a CPU oopses or a traced function returned
a wrong value; 2 for a glob that matches no function.  The rings are in
the kernel's default overwrite mode: events overwritten because a ring was
full are reported (``overruns``), never silently lost.
"""

from __future__ import annotations

import argparse

from ._args import SEED, Bounds, UsageError, int_in, power_of_two
from ._real_clients import add_image_arguments, refuse_image_only, run_on_image
from .keys import on_clients, report_selftest

__all__ = ["add_arguments", "run", "NAME", "HELP", "DESCRIPTION"]

NAME = "ftrace"
HELP = "the function tracer (fentry NOP5 <-> CALL) on running vCPUs"
DESCRIPTION = ("Boot the kernel image, run the ftrace workload on every vCPU and, while\n"
               "they run, enable the function tracer on the selected functions (one batch\n"
               "per 256 sites), read the guest's per-CPU ring buffers and print them as\n"
               "trace_pipe does -- or the function profiler's hit counts.")
#: textpoke._ftrace._ring.FTRACE_CPUS, repeated so that --help imports no
#: machine (a test checks they agree)
FTRACE_CPUS = 8
CPU_BOUNDS = Bounds(1, FTRACE_CPUS)
DURATION = Bounds(1, 10_000_000)
BUFFER = Bounds(1, 1 << 20)
#: the rings of every CPU share 64 MiB of guest memory (32-byte entries)
BUFFER_TOTAL = 2_000_000
#: a --functions/--notrace value longer than this is refused before any
#: matching (fnmatch compiles a glob to a regex: 50,000 '[' took 79 s)
GLOB_MAX = 256
GLOBS_MAX = 1024
#: scheduler steps --tracer function_graph waits, after the stop, for the
#: frames it hooked to return
GRAPH_DRAIN_STEPS = 200_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--functions", metavar="GLOB", action="append", default=[],
                   help="set_ftrace_filter: trace only functions matching GLOB (repeatable; "
                        "space- or comma-separated globs; default every function)")
    p.add_argument("--notrace", metavar="GLOB", action="append", default=[],
                   help="set_ftrace_notrace: never trace functions matching GLOB (repeatable)")
    p.add_argument("--duration", type=int_in(DURATION), default=1000, metavar="STEPS",
                   help=f"scheduler steps to trace for, {DURATION} (default 1000)")
    p.add_argument("--tracer", choices=("function", "function_graph"), default="function",
                   help="current_tracer: function (default; entries as trace_pipe prints them) "
                        "or function_graph (entries and returns with their durations, the "
                        "return addresses hooked through return_to_handler)")
    p.add_argument("--profile", action="store_true",
                   help="the function profiler: print hits per function instead of the trace")
    p.add_argument("--then-stop", action="store_true",
                   help="with --image: stop the tracer again after starting it (the step "
                        "'echo nop > current_tracer'), so --dump/--reference see the text after "
                        "both")
    p.add_argument("--selftest", action="store_true",
                   help="the kernel's startup test of the --tracer (function or "
                        "function_graph) on the running CPUs first")
    p.add_argument("--buffer-size", type=power_of_two(BUFFER), default=4096, metavar="ENTRIES",
                   help=f"ring-buffer entries per CPU, a power of two from {BUFFER}, with "
                        f"ENTRIES x --cpus at most {BUFFER_TOTAL:,} (default 4096)")
    p.add_argument("--cpus", type=int_in(CPU_BOUNDS), default=4, metavar="N",
                   help=f"virtual CPUs, {CPU_BOUNDS} (default 4)")
    p.add_argument("--seed", type=int_in(SEED), default=0, metavar="N",
                   help=f"scheduler seed, {SEED} (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_image_arguments(p, ("ftrace",))


def _profile_lines(prof: dict[str, int]) -> list[str]:
    """trace_stat/function<N>'s columns (without the time columns)."""
    lines = [f"  {'Function':<40} {'Hit':>10}", f"  {'--------':<40} {'---':>10}"]
    for name, hits in sorted(prof.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {name:<40} {hits:>10}")
    return lines


def _check(args: argparse.Namespace) -> None:
    """Refusals before anything is built: the rings must fit, globs must be
    globs of a sane size."""
    if args.profile and args.tracer != "function":
        raise UsageError("--profile is the function profiler: not with --tracer "
                         f"{args.tracer}")
    if args.buffer_size * args.cpus > BUFFER_TOTAL:
        most = 1 << ((BUFFER_TOTAL // args.cpus).bit_length() - 1)
        raise UsageError(f"--buffer-size {args.buffer_size} x --cpus {args.cpus} entries do not "
                         f"fit the rings' 64 MiB (at most {BUFFER_TOTAL:,} entries in all: "
                         f"--buffer-size {most} with --cpus {args.cpus})")
    for opt, values in (("--functions", args.functions), ("--notrace", args.notrace)):
        globs = [g for v in values for g in v.replace(",", " ").split()]
        if values and not globs:
            raise UsageError(f"{opt}: an empty glob list")
        if len(globs) > GLOBS_MAX:
            raise UsageError(f"{opt}: {len(globs)} globs; at most {GLOBS_MAX}")
        for g in globs:
            if len(g) > GLOB_MAX:
                raise UsageError(f"{opt}: a glob of {len(g):,} characters; at most {GLOB_MAX}")


def run_image(args: argparse.Namespace) -> int:
    """``ftrace --image``: the tracer started on the selected functions of
    the real image, offline (no CPU runs; nothing is traced)."""
    if args.selftest:
        raise UsageError("--selftest runs on the sim's CPUs: not with --image")
    if args.then_stop and args.profile:
        raise UsageError("--then-stop: the profiler has no stop step here")

    def step(ok, d: dict, lines: list[str]) -> bool:
        from .._ftrace._ops import FtraceFilterError
        ft = ok.kernel.ftrace
        try:
            ft.set_ftrace_filter(args.functions or None)
            ft.set_ftrace_notrace(args.notrace or None)
        except FtraceFilterError as e:
            raise UsageError(str(e)) from None
        if args.tracer == "function_graph":
            return _graph_image(args, ok, d, lines)
        tracer = "profile" if args.profile else "function"
        if tracer not in ft.callbacks:
            raise UsageError(f"{args.image}: no {tracer} tracer in this build (its callback "
                             f"{'function_profile_call' if args.profile else ''} is absent)")
        sel = len(ft.selected())
        up = ft.start(tracer)
        # as `echo function > current_tracer`: the tracer also records
        # command lines, through probes on the scheduler's tracepoints
        from ..kernel._offline import tracing_cmdline_record
        try:
            d["tracepoints"] = tracing_cmdline_record(ok.kernel, True)
        except ValueError as e:
            d["tracepoints_refused"] = str(e)
        d.update(tracer=tracer, functions=sel, records=len(ft.records), enable=up.as_dict(),
                 trampolines={o: {"addr": hex(t.addr), "size": t.size}
                              for o, t in ft.trampolines.items()},
                 trampoline_errors=dict(ft.tramp_errors))
        where = ", ".join(f"{o}'s trampoline at {t.addr:#x}" for o, t in ft.trampolines.items())
        lines.append(f"# {tracer} tracer on {sel} of {len(ft.records)} fentry sites: "
                     f"{up.enabled} enabled in {up.batches} batches ({up.syncs} syncs), "
                     f"{up.func_updates} ftrace_call updates; sites call "
                     f"{where or 'ftrace_caller (no --trampoline)'}")
        if args.then_stop:
            # `echo nop > current_tracer` (function_trace_reset): the sites, then
            # the cmdline probes
            dn = ft.stop()
            if "tracepoints" in d:
                tracing_cmdline_record(ok.kernel, False)
            d["disable"] = dn.as_dict()
            lines.append(f"# stopped: {dn.disabled} sites back to NOP5 in {dn.batches} batches "
                         f"({dn.syncs} syncs)")
        return False

    return run_on_image(args, ("ftrace",), step)


def _graph_image(args: argparse.Namespace, ok, d: dict, lines: list[str]) -> bool:
    """``--tracer function_graph --image``: graph_trace_init on the
    selected functions (fgraph's static calls, its sched_switch probe, the
    sites through graph_ops' trampoline, the cmdline probes)."""
    from .._ftrace._graph import FunctionGraph, GraphError
    ft = ok.kernel.ftrace
    g = FunctionGraph(ok.kernel)
    try:
        up = g.start()
    except (GraphError, ValueError) as e:
        raise UsageError(f"{args.image}: {e}") from None
    sel = len(ft.selected())
    d.update(tracer="function_graph", functions=sel, records=len(ft.records),
             enable=up.as_dict(), tracepoints=g.tracepoints,
             trampolines={o: {"addr": hex(t.addr), "size": t.size}
                          for o, t in ft.trampolines.items()},
             trampoline_errors=dict(ft.tramp_errors))
    if args.then_stop:
        dn = g.stop()
        d["disable"] = dn.as_dict()
    where = ", ".join(f"{o}'s trampoline at {t.addr:#x}" for o, t in ft.trampolines.items())
    lines.append(f"# function_graph tracer on {sel} of {len(ft.records)} fentry sites: "
                 f"{up.enabled} enabled in {up.batches} batches ({up.syncs} syncs), "
                 f"{up.func_updates} ftrace_call updates; sites call "
                 f"{where or 'ftrace_caller (no --trampoline)'}; probes on "
                 f"{', '.join(dict.fromkeys(g.tracepoints)) or 'no tracepoint'}")
    if args.then_stop:
        lines.append(f"# stopped: {d['disable']['disabled']} sites back to NOP5, fgraph's "
                     "static calls and probes off")
    return False


def run(args: argparse.Namespace) -> int:
    _check(args)
    if getattr(args, "image", None):
        return run_image(args)
    refuse_image_only(args, ("ftrace",))
    if args.then_stop:
        raise UsageError("--then-stop applies to a real kernel image: give --image too "
                         "(on the sim the tracer always stops at the end)")
    if args.tracer == "function_graph":
        return _run_graph(args)
    from ..sim._ftrace_work import ftrace_selftest

    def body(fm, d: dict, lines: list[str]) -> bool:
        ft = fm.ftrace
        failed = _start_work(args, fm, d, lines, ftrace_selftest, "ftrace")
        if args.selftest:
            # the self-test overran a ring on purpose; this run starts afresh
            fm.pause()
            fm.read_trace()
            fm.ring.reset()
            fm.resume()
        selected = len(ft.selected())
        mark = len(fm.trace)
        fm.ring.reset_profile()
        fm.ring.reset()
        d["tracer"] = "profile" if args.profile else "function"
        d["functions"] = selected
        up = ft.start("profile" if args.profile else "function")
        d["enable"] = up.as_dict()
        dn = _run_then_stop(fm, args.duration, ft.stop)
        d["disable"] = dn.as_dict()
        fm.read_trace()
        trace = fm.trace[mark:]
        overruns = fm.ring.overruns
        d["entries"] = len(trace)
        d["overruns"] = overruns
        d["overruns_per_cpu"] = {str(c): n for c, n in fm.ring.overruns_per_cpu().items()}
        if args.profile:
            prof = {ft.name(a): n for a, n in fm.ring.profile().items() if n}
            d["profile"] = prof
            lines += _profile_lines(prof)
        else:
            tl = fm.lines(trace)
            d["trace"] = tl
            lines.append("# tracer: function")
            lines.append(f"# entries-in-buffer/entries-written: {len(trace)}/"
                         f"{len(trace) + overruns}   #P:{args.cpus}")
            lines += tl
        bad = fm.bad()
        d["bad"] = bad
        lines.append(f"# {selected} functions traced: enabled in {up.batches} batches "
                     f"({up.syncs} syncs), disabled in {dn.batches} ({dn.syncs} syncs); "
                     f"{len(trace)} entries, {overruns} overruns")
        if overruns:
            lines.append(f"# WARNING: {overruns} oldest events overwritten (a ring buffer was "
                         "full); "
                         "try a larger --buffer-size")
        lines += _wrong_results(bad)
        return failed or bool(bad)

    return _on_ftrace_machine(args, body)


def _run_graph(args: argparse.Namespace) -> int:
    """``--tracer function_graph`` on the sim's running vCPUs."""
    from .._ftrace._graph import FunctionGraph, format_graph
    from ..selftests._fgraph import graph_selftest

    def body(fm, d: dict, lines: list[str]) -> bool:
        ft = fm.ftrace
        failed = _start_work(args, fm, d, lines, graph_selftest, "function_graph")
        if args.selftest:
            fm.resume()
        g = FunctionGraph(fm.kernel)
        d["tracer"] = "function_graph"
        d["functions"] = len(ft.selected())
        up = g.start()
        d["enable"] = up.as_dict()
        # (interrupted, frames still hooked are data, not text: no INT3 left)
        dn = _run_then_stop(fm, args.duration, g.stop)
        d["disable"] = dn.as_dict()
        # frames hooked before the stop still return through return_to_handler:
        # wait for them, then leave the trap chain (a bounded wait: a function
        # that never returns -- a CPU's loop -- stays hooked, and is reported)
        fm.run_until(lambda: g.in_flight == 0 or g.dead, GRAPH_DRAIN_STEPS, read=False)
        g.close()
        ev = g.drain()
        entries = sum(e.kind == "entry" for e in ev)
        returns = len(ev) - entries
        d.update(entries=entries, returns=returns, overruns=g.overruns, dead=g.why_dead,
                 in_flight=g.in_flight)
        d["events"] = [{"kind": e.kind, "cpu": e.cpu, "depth": e.depth,
                        "function": ft.name(e.func), "ts": e.ts,
                        **({"duration": e.duration, "retval": e.retval}
                           if e.kind == "return" else {})} for e in ev]
        lines.append("# tracer: function_graph (times: the tracer's event counter)")
        lines += format_graph(ev, ft.name)
        bad = fm.bad()
        d["bad"] = bad
        lines.append(f"# {d['functions']} functions traced: {entries} entries, {returns} "
                     f"returns, {g.overruns} not hooked (return stack full), "
                     f"{g.in_flight} still hooked")
        if g.dead:
            lines.append(f"# GRAPH TRACING STOPPED: {g.why_dead}")
        lines += _wrong_results(bad)
        return failed or bool(bad) or g.dead

    return _on_ftrace_machine(args, body)


# -- what the function and function_graph tracers on the sim share ------------
def _on_ftrace_machine(args: argparse.Namespace, body) -> int:
    from ..sim._ftrace_work import FtraceMachine
    return on_clients(args, lambda: FtraceMachine(cpus=args.cpus, seed=args.seed,
                                                  ring_size=args.buffer_size), body,
                      prefix="# ")


def _start_work(args: argparse.Namespace, fm, d: dict, lines: list[str], selftest,
                tracer: str) -> bool:
    """Set the filters (globs first: one that matches nothing is a usage
    error before anything runs), start the workload on every vCPU and, with
    --selftest, run *selftest* and set the filters again; the vCPUs are left
    paused after a self-test.  Returns whether the self-test failed."""
    from ..sim._ftrace_work import DEMO_FUNCTIONS
    ft = fm.ftrace
    ft.set_ftrace_filter(args.functions or None)
    ft.set_ftrace_notrace(args.notrace or None)
    filt, notrace = list(ft.filter), list(ft.notrace)
    fm.set_work(DEMO_FUNCTIONS)
    fm.start()
    fm.wait_passes(1)
    if not args.selftest:
        return False
    r = selftest(fm)
    report_selftest(d, lines, f"{tracer} startup self-test on {args.cpus} running vCPUs",
                    r.cases, r.passed, r.bad, prefix="# ")
    ft.set_ftrace_filter(filt or None)
    ft.set_ftrace_notrace(notrace or None)
    return not r.passed


def _run_then_stop(fm, duration: float, stop):
    """Run the vCPUs for *duration*, then *stop* the tracer and return its
    report.  Interrupted, the tracer is stopped first (every CALL back to
    its NOP) before the partial report, so int3_left is read after that."""
    try:
        fm.run(duration)
    except BaseException:
        try:
            stop()
        except Exception:
            pass
        raise
    return stop()


def _wrong_results(bad: list[dict]) -> list[str]:
    return [f"# WRONG RESULT: cpu{b['cpu']} {b['function']} ({b['count']} times)" for b in bad]
