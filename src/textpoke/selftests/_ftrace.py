# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's startup test of the function tracer
(``trace_selftest_startup_function`` and its dynamic part) redone on running
CPUs, with the profiler, notrace, overruns and restoring the text added.

It acts through an :class:`FtraceRig`: a kernel with ``ftrace`` and the
guest's ring buffers, whose CPUs run a workload loop over a table of
functions, counting each call themselves (so the trace is checked against
counts that do not come from the tracer), and that can be paused at the end
of a pass.  On the sim that is :class:`textpoke.sim._ftrace_work.FtraceMachine`.
No backend is imported here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from .._ftrace._ops import MCOUNT_INSN_SIZE, Ftrace
from .._ftrace._ring import format_trace_line
from ._result import SelfTestResult

__all__ = ["FtraceRig", "FtraceRigViews", "FtraceSelfTest", "ftrace_selftest", "expected_hits", "DEMO_FUNCTIONS",
           "start_demo_work",
           "CALLEES", "DYN_FTRACE_TEST_NAME", "DYN_FTRACE_TEST_NAME2"]

DYN_FTRACE_TEST_NAME = "trace_selftest_dynamic_test_func"
DYN_FTRACE_TEST_NAME2 = "trace_selftest_dynamic_test_func2"
#: what the bundled image's workload calls (ft_open calls ft_lookup, which
#: calls ft_hash, and ft_permission)
DEMO_FUNCTIONS = ("ft_open", "ft_read", "ft_hash", DYN_FTRACE_TEST_NAME2)
#: the static call graph of those functions: callee counts follow callers
CALLEES = {"ft_open": ("ft_lookup", "ft_permission"), "ft_lookup": ("ft_hash",)}


class FtraceRig(Protocol):
    """What :func:`ftrace_selftest` uses (see the sim's FtraceMachine)."""

    ftrace: Ftrace
    ring: object                    # the RingBuffer of every CPU
    trace: list                     # entries read so far
    sites_at_boot: dict[int, bytes]
    started: bool

    @property
    def core(self): ...
    @property
    def oopses(self) -> int: ...
    def set_work(self, functions) -> list[int]: ...
    def start(self) -> None: ...
    def live_cpus(self) -> list[int]: ...
    def wait_passes(self, n: int = 1, max_steps: int = ...) -> bool: ...
    def run_until(self, pred, max_steps: int = ..., chunk: int = ..., **kw) -> bool: ...
    def pause(self, max_steps: int = ..., *, read: bool = True) -> bool: ...
    def resume(self) -> None: ...
    def call_once(self, cpu: int, func, max_steps: int = ...) -> bool: ...
    def window(self, passes: int = 2) -> tuple[Counter, list]: ...
    def read_trace(self) -> list: ...
    def hit_counts(self, entries) -> Counter: ...
    def lines(self, entries) -> list[str]: ...
    def sites_now(self) -> dict[int, bytes]: ...
    def call_sites(self) -> int: ...
    def bad(self) -> list[dict]: ...


class FtraceRigViews:
    """The views of an :class:`FtraceRig` that only read its tracer
    (``ftrace``) and rings (``ring``): the same on every backend."""

    ftrace: Ftrace
    ring: Any

    def hit_counts(self, entries) -> Counter:
        """Trace entries per function address."""
        return Counter(e.ip for e in entries)

    def lines(self, entries) -> list[str]:
        return [format_trace_line(e, self.ftrace.name, self.ring.comms) for e in entries]

    def sites_now(self) -> dict[int, bytes]:
        return {r.ip: self.ftrace.machine.text_read(r.ip, MCOUNT_INSN_SIZE)
                for r in self.ftrace.records}

    def call_sites(self) -> int:
        """fentry sites holding the CALL now, read from the text."""
        return sum(self.ftrace.site_state(r) == "call" for r in self.ftrace.records)


def expected_hits(work_counts: Counter, ftrace: Ftrace, traced: set[str]) -> Counter:
    """Entries a complete trace of *traced* functions holds, given the
    workload's direct calls and the static call graph (:data:`CALLEES`)."""
    calls: Counter = Counter()
    for a, n in work_counts.items():
        calls[ftrace.name(a)] += n
    # callers before callees (the graph is a small DAG)
    for caller in ("ft_open", "ft_lookup"):
        for callee in CALLEES.get(caller, ()):
            calls[callee] += calls[caller]
    return Counter({n: c for n, c in calls.items() if n in traced and c})


@dataclass
class FtraceSelfTest(SelfTestResult):
    """The startup self-test's result: a SelfTestResult with the trace's
    own figures."""

    name: str = "ftrace_startup"
    entries: int = 0
    overruns: int = 0


def start_demo_work(fm: FtraceRig) -> tuple[int, int]:
    """Set *fm*'s CPUs to the demo functions' loop, start them if they are
    not running and wait for one pass; the core's sync and batch counts
    before (a self-test reports what it added to them)."""
    core = fm.core
    s0, b0 = core.stats.syncs, core.stats.batches
    fm.set_work(DEMO_FUNCTIONS)
    if not fm.started:
        fm.start()
    fm.wait_passes(1)
    return s0, b0


def ftrace_selftest(fm: FtraceRig) -> FtraceSelfTest:
    """The kernel's function-tracer startup test on the running CPUs."""
    r = FtraceSelfTest()
    ft, core = fm.ftrace, fm.core
    s0, b0 = start_demo_work(fm)
    cpus = fm.live_cpus()

    def names(counter: Counter) -> Counter:
        return Counter({ft.name(a): n for a, n in counter.items() if n})

    # 1. the function tracer on every function: the trace equals the calls
    ft.set_ftrace_filter(None)
    ft.set_ftrace_notrace(None)
    up = ft.start("function")
    work, trace = fm.window(2)
    got = names(fm.hit_counts(trace))
    want = expected_hits(work, ft, {rec.name for rec in ft.records})
    r.case("function tracer: every call of every function traced once", got == want and
           fm.ring.overruns == 0, sites=up.enabled, batches=up.batches, syncs=up.syncs,
           entries=len(trace), differ={n: (got[n], want[n]) for n in set(got) | set(want)
                                       if got[n] != want[n]})
    callers = {(ft.name(e.ip), ft.name(e.parent_ip)) for e in trace}
    r.case("callers: ft_hash <-ft_lookup, ft_lookup <-ft_open, ft_open <-ftrace_work_loop",
           {("ft_hash", "ft_lookup"), ("ft_lookup", "ft_open"),
            ("ft_open", "ftrace_work_loop")} <= callers and
           all(p in ("ftrace_work_loop", "ft_open", "ft_lookup") for _f, p in callers),
           callers=sorted(callers))
    r.case("every CPU traced, each entry stamped with its CPU and task",
           {e.cpu for e in trace} == set(cpus) and
           all(fm.ring.tasks[e.cpu][1] == e.pid for e in trace))
    # Each CPU's entries are in clock order and no two events share a tick.
    # Across CPUs only one drain is merged in order: an event whose CPU took
    # its tick but had not yet published it when the ring was read comes
    # with the next read (trace_pipe has the same property).
    ts = [e.ts for e in trace]
    per_cpu = {c: [e.ts for e in trace if e.cpu == c] for c in {e.cpu for e in trace}}
    r.case("timestamps unique, each CPU's in order",
           len(set(ts)) == len(ts) and all(v == sorted(v) for v in per_cpu.values()))
    fm.resume()
    dn = ft.stop()
    r.case("disabled: every site holds its boot-time bytes",
           fm.sites_now() == fm.sites_at_boot and fm.call_sites() == 0,
           batches=dn.batches, syncs=dn.syncs)

    # 2. the dynamic test: a filter on one function the workload never calls
    n = ft.set_ftrace_filter(DYN_FTRACE_TEST_NAME)
    up = ft.start("function")
    r.case(f"set_ftrace_filter {DYN_FTRACE_TEST_NAME}: one site patched",
           n == 1 and up.enabled == 1 and fm.call_sites() == 1, selected=n)
    work, trace = fm.window(3)
    r.case("a filter really filters: no entries while every CPU calls other traced functions",
           len(trace) == 0 and sum(work.values()) > 0, calls=sum(work.values()),
           entries=len(trace))
    fm.resume()
    cpu = cpus[-1]
    fm.read_trace()
    mark = len(fm.trace)
    ok = fm.call_once(cpu, DYN_FTRACE_TEST_NAME)
    fm.pause()
    fm.read_trace()
    one = fm.trace[mark:]
    r.case("one call gives one entry", ok and len(one) == 1 and ft.name(one[0].ip) ==
           DYN_FTRACE_TEST_NAME and one[0].cpu == cpu and
           ft.name(one[0].parent_ip) == "ftrace_work_loop",
           entries=fm.lines(one))
    fm.resume()
    ft.stop()

    # 3. filter + notrace, and a filter changed while tracing
    ft.set_ftrace_filter("ft_*")
    ft.set_ftrace_notrace("ft_hash")
    up = ft.start("function")
    work, trace = fm.window(2)
    got = names(fm.hit_counts(trace))
    traced = {rec.name for rec in ft.selected()}
    want = expected_hits(work, ft, traced)
    r.case("set_ftrace_notrace ft_hash: ft_* traced except ft_hash",
           "ft_hash" not in got and got == want and "ft_hash" not in traced, got=dict(got))
    fm.resume()
    ft.set_ftrace_filter(DYN_FTRACE_TEST_NAME2)
    ft.set_ftrace_notrace(None)
    ch = ft.refresh()
    work, trace = fm.window(2)
    got = names(fm.hit_counts(trace))
    r.case("filter changed while tracing: only the new function traced",
           set(got) == {DYN_FTRACE_TEST_NAME2} and got == expected_hits(work, ft,
                                                                        {DYN_FTRACE_TEST_NAME2}),
           enabled=ch.enabled, disabled=ch.disabled, got=dict(got))
    fm.resume()
    ft.stop()

    # 4. the profiler: per-function hits equal the workload's calls
    ft.set_ftrace_filter(None)
    fm.ring.reset_profile()
    ft.start("profile")
    fm.pause()
    fm.ring.reset_profile()
    work, trace = fm.window(2)
    prof = Counter({ft.name(a): n for a, n in fm.ring.profile().items() if n})
    want = expected_hits(work, ft, {rec.name for rec in ft.records})
    r.case("function profiler: hits per function equal the workload's calls",
           prof == want and not trace, profile=dict(prof))
    fm.resume()

    # 5. overruns: a ring nobody reads fills up; in overwrite mode (the
    # kernel's default) every overwritten event is counted, none dropped
    # (a tracer switch: the sites are on the profiler's own trampoline)
    ft.start("function")
    fm.pause()
    fm.read_trace()
    fm.ring.reset()
    fm.resume()
    size = fm.ring.size
    fm.run_until(lambda: min(fm.ring.hits_per_cpu()[c] for c in cpus) >= size + 64, read=False)
    fm.pause(read=False)
    hits, over = fm.ring.hits(), fm.ring.overruns
    got = len(fm.ring.drain())
    r.case("a full ring overwrites its oldest, counted: entries + overruns == hits",
           over > 0 and got + over == hits and fm.ring.dropped_events == 0
           and max(fm.ring.pending(c) for c in cpus) == 0,
           hits=hits, entries=got, overruns=over)
    r.overruns = over
    fm.ring.reset()
    fm.resume()
    ft.stop()
    r.case("stopped: every site restored, ftrace_call back on ftrace_stub",
           fm.sites_now() == fm.sites_at_boot and ft.func == "none")
    fm.wait_passes(1)
    r.entries = len(fm.trace)
    r.oopses = fm.oopses
    r.bad = fm.bad()
    r.syncs = core.stats.syncs - s0
    r.batches = core.stats.batches - b0
    return r
