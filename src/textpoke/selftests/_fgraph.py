# SPDX-License-Identifier: GPL-2.0-only
"""The function graph tracer's startup self-test on running CPUs, in the
spirit of the kernel's ``trace_selftest_startup_function_graph``: the
tracer on the demo functions while every vCPU calls them, then what a
graph trace must satisfy -- every entry has its return, the counts are
the workload's own calls, depths and callers follow the static call graph,
a call lasts at least its callees' events, the functions' results stay
right (the return hook gives the real return address and the return
value back), a full return stack leaves calls unhooked and counted, and
stopping gives every site back."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .._ftrace._graph import FunctionGraph
from ._ftrace import CALLEES, FtraceRig, expected_hits, start_demo_work
from ._result import SelfTestResult

__all__ = ["GraphSelfTest", "graph_selftest", "GRAPH_FUNCTIONS"]

#: the functions traced: the demo's and their callees
GRAPH_FUNCTIONS = ("ft_open", "ft_lookup", "ft_hash", "ft_permission", "ft_read")


@dataclass
class GraphSelfTest(SelfTestResult):
    name: str = "function_graph_startup"
    entries: int = 0
    returns: int = 0


def graph_selftest(fm: FtraceRig, passes: int = 3) -> GraphSelfTest:
    """Run the cases on *fm*'s CPUs (an FtraceMachine); leave the tracer
    off and the CPUs paused."""
    r = GraphSelfTest()
    ft, core = fm.ftrace, fm.core
    s0, b0 = start_demo_work(fm)
    ft.set_ftrace_filter(" ".join(GRAPH_FUNCTIONS))
    ft.set_ftrace_notrace(None)
    g = FunctionGraph(fm.kernel)
    try:
        fm.pause()
        up = g.start()
        gf = fm.image.sym("ftrace_graph_func")
        t = ft.trampolines.get("function_graph")
        on = all(fm.sim.text_read(ft.by_name[n].ip, 5) == ft.call_insn(ft.by_name[n].ip,
                                                                        t.addr if t else 0)
                 for n in GRAPH_FUNCTIONS)
        call_ok = t is not None and fm.sim.text_read(t.addr + t.call_offset, 5) == \
            ft.call_insn(t.addr + t.call_offset, gf)
        r.case("start: every selected site calls graph_ops' trampoline, which calls "
               "ftrace_graph_func", on and call_ok and up.enabled == len(GRAPH_FUNCTIONS),
               sites=up.enabled, batches=up.batches, syncs=up.syncs)
        work, _ = fm.window(passes)
        ev = g.drain()
        name = ft.name
        entries = Counter(name(e.func) for e in ev if e.kind == "entry")
        returns = Counter(name(e.func) for e in ev if e.kind == "return")
        r.entries, r.returns = sum(entries.values()), sum(returns.values())
        r.case("every entry has its return", entries == returns and g.in_flight == 0
               and not g.dead, entries=r.entries, returns=r.returns, in_flight=g.in_flight)
        want = expected_hits(work, ft, set(GRAPH_FUNCTIONS))
        r.case("every call of every traced function hooked once", entries == want
               and g.overruns == 0,
               differ={n: (entries[n], want[n]) for n in set(entries) | set(want)
                       if entries[n] != want[n]})
        parents = {callee: caller for caller, cs in CALLEES.items() for callee in cs}
        nest_ok = dur_ok = True
        for cpu in {e.cpu for e in ev}:
            stack: list = []
            for e in (x for x in ev if x.cpu == cpu):
                if e.kind == "entry":
                    caller = name(stack[-1][0].func) if stack else None
                    nest_ok &= e.depth == len(stack) and caller in (None, parents.get(name(e.func)))
                    stack.append([e, 0])
                else:
                    top, inner = stack.pop()
                    nest_ok &= top.func == e.func and e.calltime == top.ts
                    dur_ok &= e.duration >= 1 + inner
                    if stack:
                        stack[-1][1] += e.duration + 1
            nest_ok &= not stack
        r.case("depths and callers follow the call graph (ft_hash in ft_lookup in ft_open)",
               nest_ok)
        r.case("a call lasts at least its callees' events (counter clock)", dur_ok)
        r.case("results right: the real return address and return value given back",
               not fm.bad())
        dn = g.stop()
        r.case("stop: every site as booted, ftrace_call back on ftrace_stub",
               fm.sites_now() == fm.sites_at_boot and dn.disabled == len(GRAPH_FUNCTIONS)
               and fm.sim.text_read(fm.image.sym("ftrace_call"), 5) ==
               ft.call_insn(fm.image.sym("ftrace_call"), fm.image.sym("ftrace_stub")))
        # a return stack of one frame: the callees of a hooked call are not
        # hooked, and counted (the kernel's trace_overrun)
        g2 = FunctionGraph(fm.kernel, depth_max=1)
        g2.start()
        try:
            work2, _ = fm.window(1)
        finally:
            g2.stop()
        ev2 = g2.drain()
        deep = sum(e.depth > 0 for e in ev2)
        r.case("return stack full: deeper calls not hooked, counted as overruns",
               deep == 0 and g2.overruns > 0 and g2.in_flight == 0 and not fm.bad(),
               overruns=g2.overruns)
        g2.close()
    finally:
        if g.active:
            g.stop()
        g.close()
    r.syncs = core.stats.syncs - s0
    r.batches = core.stats.batches - b0
    r.oopses = fm.oopses
    r.bad = fm.bad()
    return r
