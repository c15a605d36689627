# SPDX-License-Identifier: GPL-2.0-only
"""The function graph tracer (textpoke._ftrace._graph): on the sim's
running vCPUs (entries, returns, durations, the return hook through
return_to_handler), on Debian's real 6.12 image offline (what
``echo function_graph > current_tracer`` writes), and against the
kernel's own memory in the run-time references (opt-in)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from textpoke._ftrace._graph import format_graph
from textpoke import FunctionGraph, GraphError
from textpoke.sim import FtraceMachine
from textpoke.selftests import DEMO_FUNCTIONS

FT = ("ft_open", "ft_lookup", "ft_hash", "ft_permission", "ft_read")


def _call_target(site: int, insn: bytes) -> int:
    assert insn[0] == 0xE8, insn.hex()
    return site + 5 + struct.unpack("<i", insn[1:5])[0]


@pytest.fixture(scope="module")
def graphed():
    """Two vCPUs running the ftrace workload; the graph tracer on the ft_*
    functions for an exact window of passes (started and stopped while
    every CPU is paused at the end of a pass)."""
    with FtraceMachine(cpus=2, seed=3) as fm:
        ft = fm.ftrace
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.wait_passes(1)
        ft.set_ftrace_filter(" ".join(FT))
        g = FunctionGraph(fm.kernel)
        fm.pause()
        up = g.start()
        tramp = ft.trampolines["function_graph"]
        sites_on = {n: fm.sim.text_read(ft.by_name[n].ip, 5) for n in FT}
        ftrace_call = fm.sim.text_read(fm.sym("ftrace_call"), 5)
        tramp_call = fm.sim.text_read(tramp.addr + tramp.call_offset, 5)
        counts, _ = fm.window(3)
        dn = g.stop()
        events = g.drain()
        yield dict(fm=fm, g=g, up=up, dn=dn, events=events, counts=counts, tramp=tramp,
                   sites_on=sites_on, ftrace_call=ftrace_call, tramp_call=tramp_call)
        g.close()


def test_graph_start_calls_its_own_trampoline_which_calls_ftrace_graph_func(graphed):
    fm, tramp = graphed["fm"], graphed["tramp"]
    gf = fm.sym("ftrace_graph_func")
    assert graphed["up"].enabled == len(FT)
    for n, insn in graphed["sites_on"].items():
        assert _call_target(fm.ftrace.by_name[n].ip, insn) == tramp.addr, n
    assert _call_target(tramp.addr + tramp.call_offset, graphed["tramp_call"]) == gf
    assert _call_target(fm.sym("ftrace_call"), graphed["ftrace_call"]) == gf
    # the ops pointer after the trampoline is graph_ops
    ptr = fm.sim.text_read(tramp.addr + tramp.size - 8, 8)
    assert struct.unpack("<Q", ptr)[0] == fm.sym("graph_ops")


def test_every_entry_has_its_return_and_the_counts_are_the_workloads(graphed):
    fm, g, ev = graphed["fm"], graphed["g"], graphed["events"]
    assert not g.dead and g.overruns == 0 and g.in_flight == 0
    assert fm.bad() == [] and fm.oopses == 0     # return values and addresses intact
    name = fm.ftrace.name
    entries = Counter(name(e.func) for e in ev if e.kind == "entry")
    returns = Counter(name(e.func) for e in ev if e.kind == "return")
    assert entries == returns
    # exactly the calls the workload made in the window (callees follow callers)
    made = {fm.ftrace.name(a): n for a, n in graphed["counts"].items()}
    assert entries["ft_open"] == entries["ft_lookup"] - made.get("ft_lookup", 0) \
        == entries["ft_permission"] == made["ft_open"] > 0
    assert entries["ft_hash"] == made["ft_hash"] + entries["ft_lookup"]
    assert entries["ft_read"] == made["ft_read"]


def test_nesting_depths_and_durations_follow_the_call_graph(graphed):
    fm, ev = graphed["fm"], graphed["events"]
    name = fm.ftrace.name
    for cpu in {e.cpu for e in ev}:
        stack: list = []
        for e in (x for x in ev if x.cpu == cpu):
            if e.kind == "entry":
                assert e.depth == len(stack)
                parent = name(stack[-1][0].func) if stack else None
                # ft_hash is called by ft_lookup or straight from the loop
                assert parent in {None: (None,), "ft_lookup": ("ft_open", None),
                                  "ft_hash": ("ft_lookup", None),
                                  "ft_permission": ("ft_open",)}.get(name(e.func), (None,))
                stack.append([e, 0])
            else:
                top, inner = stack.pop()
                assert top.func == e.func and e.calltime == top.ts and e.depth == len(stack)
                # the counter clock ticks on every event: a call lasts at
                # least its callees' events, plus its own return
                assert e.duration >= 1 + inner
                if stack:
                    stack[-1][1] += e.duration + 1
        assert stack == []


def test_stop_restores_every_site_and_no_int3_is_left(graphed):
    fm, dn = graphed["fm"], graphed["dn"]
    assert dn.disabled == len(FT)
    assert fm.sites_now() == fm.sites_at_boot
    assert _call_target(fm.sym("ftrace_call"),
                        fm.sim.text_read(fm.sym("ftrace_call"), 5)) == fm.sym("ftrace_stub")
    assert fm.kernel.core.int3_left() == 0


def test_format_graph_prints_leaves_on_one_line(graphed):
    fm, ev = graphed["fm"], graphed["events"]
    lines = format_graph([e for e in ev if e.cpu == ev[0].cpu], fm.ftrace.name)
    body = "\n".join(lines)
    assert "ft_open() {" in body and "ft_hash();" in body and "} /* ft_open */" in body


def test_one_tracer_at_a_time(graphed):
    fm = graphed["fm"]
    fm.ftrace.start("function")
    try:
        with pytest.raises(GraphError, match="function tracer is on"):
            FunctionGraph(fm.kernel).start()
    finally:
        fm.ftrace.stop()


def _graph_window(setup, passes: int = 3, cpus: int = 2):
    """The graph tracer on the ft_* functions for an exact window of
    passes on *cpus* vCPUs, after *setup(g)*; (events, the workload's
    counts of the window, the tracer)."""
    with FtraceMachine(cpus=cpus, seed=3) as fm:
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.wait_passes(1)
        fm.ftrace.set_ftrace_filter(" ".join(FT))
        g = FunctionGraph(fm.kernel)
        setup(g)
        fm.pause()
        g.start()
        counts, _ = fm.window(passes)
        g.stop()
        assert fm.bad() == [] and fm.oopses == 0 and g.in_flight == 0 and not g.dead
        made = {fm.ftrace.name(a): n for a, n in counts.items()}
        ev = [(e.kind, fm.ftrace.name(e.func), e.depth, e.duration) for e in g.drain()]
        g.close()
        return ev, made, g


def _entries(ev) -> Counter:
    return Counter(n for k, n, _d, _t in ev if k == "entry")


def test_set_graph_function_traces_it_and_what_it_calls():
    """set_graph_function ft_lookup: ft_lookup (at depth 0: its caller
    ft_open is not hooked) and the ft_hash it calls, nothing else --
    not ft_open, not ft_permission, not an ft_hash called straight from
    the loop."""
    ev, made, g = _graph_window(lambda g: g.set_graph_function("ft_lookup"))
    e = _entries(ev)
    assert g.graph_hash and set(e) == {"ft_lookup", "ft_hash"}
    calls = e["ft_lookup"]
    assert calls == made["ft_open"] + made.get("ft_lookup", 0) > 0
    assert e["ft_hash"] == calls                     # one ft_hash per ft_lookup
    assert {d for k, n, d, _t in ev if n == "ft_lookup"} == {0}
    assert {d for k, n, d, _t in ev if n == "ft_hash"} == {1}
    assert Counter(n for k, n, _d, _t in ev if k == "return") == e


def test_set_graph_notrace_hides_it_and_what_it_calls():
    """set_graph_notrace ft_lookup: neither it nor the ft_hash under it;
    ft_open and ft_permission still, and an ft_hash from the loop."""
    ev, made, _g = _graph_window(lambda g: g.set_graph_notrace("ft_lookup"))
    e = _entries(ev)
    assert "ft_lookup" not in e
    assert e["ft_open"] == e["ft_permission"] == made["ft_open"] > 0
    assert e["ft_hash"] == made["ft_hash"] > 0       # only the loop's own calls
    # ft_lookup's frame was hooked (notrace), so ft_permission stays at depth 1
    assert {d for k, n, d, _t in ev if n == "ft_permission"} == {1}


def test_max_graph_depth_stops_hooking_deeper_calls():
    ev, made, _g = _graph_window(lambda g: setattr(g, "max_graph_depth", 1))
    e = _entries(ev)
    assert {d for _k, _n, d, _t in ev} == {0}
    assert e["ft_open"] == made["ft_open"] > 0 and "ft_permission" not in e
    # ft_lookup and ft_hash only where the loop calls them itself
    assert e["ft_hash"] == made["ft_hash"] and e.get("ft_lookup", 0) == made.get("ft_lookup", 0)


def test_tracing_thresh_records_only_long_enough_returns():
    """tracing_thresh: no entries, and a return only when the call lasted
    at least that long (ticks of the tracer's clock here: one CPU, so that
    no other CPU's events tick it meanwhile).  Every hooked call still
    ticks the clock, so ft_open lasts 7 (its three callees' entries and
    returns and its own return): a threshold of 3 keeps ft_open and
    ft_lookup (3: ft_hash's entry and return, its own)."""
    ev, made, g = _graph_window(lambda g: g.set_tracing_thresh(3), cpus=1)
    assert [x for x in ev if x[0] == "entry"] == []
    r = Counter(n for _k, n, _d, _t in ev)
    assert set(r) == {"ft_open", "ft_lookup"} and r["ft_open"] == made["ft_open"] > 0
    assert all(t >= 3 for _k, _n, _d, t in ev)
    assert {t for _k, n, _d, t in ev if n == "ft_open"} == {7}


def test_graph_function_globs_that_match_nothing_are_refused():
    from textpoke import FtraceFilterError
    with FtraceMachine(cpus=1, seed=0) as fm:
        g = FunctionGraph(fm.kernel)
        assert g.set_graph_function("ft_hash") == 1
        with pytest.raises(FtraceFilterError, match="matches no traceable function"):
            g.set_graph_function("no_such_function*")
        assert g.graph_hash == frozenset({fm.ftrace.by_name["ft_hash"].ip})
        with pytest.raises(ValueError):
            g.set_tracing_thresh(-1)


def test_a_return_through_a_frame_not_hooked_stops_graph_tracing():
    """The kernel's "Bad frame pointer": a return whose slot is not the
    hooked one stops graph tracing for good and leaves the INT3 unhandled."""
    from textpoke import PtRegs
    with FtraceMachine(cpus=1, seed=0) as fm:
        g = FunctionGraph(fm.kernel)
        fm.ftrace.set_ftrace_filter("ft_hash")
        g.start()
        g.stacks[0] = []
        regs = PtRegs(ip=fm.sym("return_to_handler_trap") + 1, sp=0x1000, flags=0,
                      mem=fm.sim.mem, cpu=0)
        gen = g._int3(regs)
        with pytest.raises(StopIteration) as e:
            next(gen)
        assert e.value.value is False and g.dead and "no hooked frame" in g.why_dead
        g.stop()


def test_cli_function_graph_on_the_sim():
    p = subprocess.run([sys.executable, "-m", "textpoke", "ftrace", "--tracer", "function_graph",
                        "--functions", "ft_*", "--cpus", "2", "--duration", "400", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["tracer"] == "function_graph" and d["int3_left"] == 0 and d["in_flight"] == 0
    assert d["entries"] == d["returns"] > 0 and d["bad"] == []
    assert all(e["duration"] >= 1 for e in d["events"] if e["kind"] == "return")
    p = subprocess.run([sys.executable, "-m", "textpoke", "ftrace", "--tracer", "function_graph",
                        "--profile"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not with --tracer function_graph" in p.stderr


# ------------------------------------------------------------ the real image
def _image_dir() -> Path | None:
    cached = sorted((Path.home() / ".cache/textpoke/kernel").glob("6.12.*-cloud-amd64"))
    for d in (os.environ.get("TEXTPOKE_KERNEL_DIR"), *[str(c) for c in cached[::-1]]):
        if d and (Path(d) / "vmlinuz").is_file():
            return Path(d)
    return None


def test_graph_on_the_real_image_writes_what_the_kernel_does():
    d = _image_dir()
    if d is None:
        pytest.skip("Debian's 6.12 cloud kernel is not cached (make test-kernel fetches it)")
    from textpoke._alternative._kearly import read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    from textpoke.kernel._offline import tracepoint_probes
    tramp = 0xFFFFFFFFC0000000
    img = load_kernel(str(d / "vmlinuz"))
    cfg = read_config(d / "config") if (d / "config").is_file() else None
    with offline_kernel(img, CpuCaps.from_names(["always"]), BootOptions(ncpus=1), config=cfg,
                        regions=[ExecRegion(tramp, 4096, "ftrace")]) as ok:
        m = ok.machine
        core = m.core
        before = m.text_read(core.start, core.end - core.start)
        k = ok.kernel
        k.ftrace.set_ftrace_filter("vfs_read*")
        g = FunctionGraph(k)
        g.start()
        t = k.ftrace.trampolines["function_graph"]
        assert t.addr == tramp
        assert _call_target(tramp + t.call_offset, m.text_read(tramp + t.call_offset, 5)) == \
            img.sym("ftrace_graph_func")
        assert struct.unpack("<Q", m.text_read(tramp + t.size - 8, 8))[0] == img.sym("graph_ops")
        for r in k.ftrace.selected():
            assert _call_target(r.ip, m.text_read(r.ip, 5)) == tramp
        # fgraph's direct calls aim at the tracer's entry and return functions
        for call, func in (("fgraph_func", "trace_graph_entry"),
                           ("fgraph_retfunc", "trace_graph_return")):
            tr = img.sym(f"__SCT__{call}")
            jmp = m.text_read(tr, 5)        # the static call's trampoline: JMP func
            assert jmp[0] == 0xE9 and tr + 5 + struct.unpack("<i", jmp[1:])[0] == img.sym(func)
            assert k.calls.calls[call].func == img.sym(func)
        # sched_switch has two probes (fgraph's and the cmdline recorder's):
        # its static call is the iterator again
        assert tracepoint_probes(k, "sched_switch") == ["ftrace_graph_probe_sched_switch",
                                                         "probe_sched_switch"]
        assert k.calls.calls["tp_func_sched_switch"].func == img.sym("__traceiter_sched_switch")
        assert k.calls.calls["tp_func_sched_wakeup"].func == img.sym("probe_sched_wakeup")
        g.stop()
        assert k.core.int3_left() == 0
        assert m.text_read(core.start, core.end - core.start) == before
        assert tracepoint_probes(k, "sched_switch") == []
        # tracing_thresh: graph_trace_init makes trace_graph_thresh_return the
        # return function, so fgraph_retfunc's sites go there; a write of the
        # file on the running tracer restarts it (graph_trace_update_thresh)
        ret = k.calls.calls["fgraph_retfunc"]
        g.tracing_thresh = 10
        g.start()
        assert ret.func == img.sym("trace_graph_thresh_return")
        tr = img.sym("__SCT__fgraph_retfunc")
        jmp = m.text_read(tr, 5)
        assert tr + 5 + struct.unpack("<i", jmp[1:])[0] == img.sym("trace_graph_thresh_return")
        g.set_tracing_thresh(0)
        assert g.active and ret.func == img.sym("trace_graph_return")
        g.stop()
        assert m.text_read(core.start, core.end - core.start) == before


# ------------------------------------------- against the kernel at run time
def _runtime_refs() -> list[Path]:
    root = Path(os.environ.get("TEXTPOKE_CACHE", Path.home() / ".cache/textpoke")) / "reference"
    return sorted(root.glob("*/runtime-*/manifest.json"))


@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="boots the real image once per setup (set TEXTPOKE_KERNEL_TESTS=1)")
@pytest.mark.parametrize("manifest", _runtime_refs() or [None],
                         ids=lambda p: p.parent.name if p else "none")
def test_function_graph_equals_the_kernels_own_run_time_text(manifest, tmp_path):
    """``ftrace --image --tracer function_graph`` from the kernel's memory
    at the stop before the step: 0 differing bytes in .text and in the
    trampoline page (library), and the CLI says so too; then the tracer's
    stop gives the kernel's memory after ``echo nop``."""
    if manifest is None:
        pytest.skip("no run-time reference cached (tools/kernel_runtime_reference.py)")
    import dataclasses
    import zstandard
    from textpoke._alternative._kdiff import diff_sections
    from textpoke._alternative._kearly import EarlyBoot, read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    ref = manifest.parent
    m = json.loads(manifest.read_text())
    d = ref.parent.parent.parent / "kernel" / m["kernel"]["release"]
    if not (d / "vmlinuz").is_file():
        pytest.skip(f"{d}/vmlinuz is not cached")
    steps = {s["name"]: s for s in m["steps"]}
    if "ftrace-graph-on" not in steps:
        pytest.skip(f"{ref.name}: no function_graph step")

    def text(name: str) -> bytes:
        f = ref / steps[name]["text"]["file"]
        return zstandard.ZstdDecompressor().decompress(f.read_bytes(), max_output_size=1 << 27)

    prev = m["steps"][steps["ftrace-graph-on"]["index"] - 1]["name"]
    tramp = [a for a in steps["ftrace-graph-on"]["allocated"]["ftrace_trampolines"]
             if a not in steps[prev]["allocated"]["ftrace_trampolines"]][0]
    img = load_kernel(str(d / "vmlinuz"))
    cfg = read_config(d / "config")
    mem = int(m["setup"]["memory"].rstrip("G")) << 30
    with offline_kernel(img, CpuCaps(m["caps"]),
                        BootOptions(return_thunk=m["return_thunk_sym"], ncpus=m["setup"]["smp"]),
                        early=EarlyBoot(cmdline=m["setup"]["cmdline"], ncpus=m["setup"]["smp"],
                                        mem=mem, config=cfg),
                        config=cfg, regions=[ExecRegion(tramp, 4096, "ftrace")],
                        before=text(prev)) as ok:
        def check(name: str) -> None:
            live = dataclasses.replace(ok.kt, exec_ranges=[r for r in ok.kt.exec_ranges
                                                           if r[0] == ".text"], changes=[])
            assert diff_sections(live, text(name)) == {".text": 0}, name
            page = [r for r in steps[name]["regions"] if r["addr"] == tramp]
            assert page, name
            assert ok.machine.text_read(tramp, 4096) == (ref / page[0]["file"]).read_bytes()

        ok.kernel.ftrace.set_ftrace_filter(m["probes"]["ftrace_glob"])
        g = FunctionGraph(ok.kernel)
        g.start()
        check("ftrace-graph-on")
        g.stop()
        check("ftrace-graph-off")

    # the command users run
    before, after = tmp_path / "before.bin", tmp_path / "after.bin"
    before.write_bytes(text(prev))
    after.write_bytes(text("ftrace-graph-on"))
    p = subprocess.run(
        [sys.executable, "-m", "textpoke", "ftrace", "--image", str(d / "vmlinuz"),
         "--cpus", str(m["setup"]["smp"]), "--cpu-caps", ",".join(map(str, m["caps"])),
         "--return-thunk", m["return_thunk_sym"], "--cmdline", m["setup"]["cmdline"],
         "--mem", m["setup"]["memory"], "--tracer", "function_graph",
         "--functions", m["probes"]["ftrace_glob"], "--trampoline", hex(tramp),
         "--before", str(before), "--reference", str(after), "--no-progress", "--json"],
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr + p.stdout[-2000:]
    doc = json.loads(p.stdout)
    assert doc["differing_bytes"] == {".text": 0} and doc["int3_left"] == 0
    assert doc["tracer"] == "function_graph" and doc["functions"] == 3
    # and off again (echo nop): --then-stop against the kernel's next stop
    after.write_bytes(text("ftrace-graph-off"))
    p = subprocess.run(p.args[:-1] + ["--then-stop", "--json"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr + p.stdout[-2000:]
    doc = json.loads(p.stdout)
    assert doc["differing_bytes"] == {".text": 0} and doc["disable"]["disabled"] == 3


def test_then_stop_is_refused_without_image():
    p = subprocess.run([sys.executable, "-m", "textpoke", "ftrace", "--then-stop"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "give --image" in p.stderr


# ------------------------------------------------------------ the self-test
def test_the_graph_selftest_passes_on_running_cpus():
    from textpoke.selftests import graph_selftest
    with FtraceMachine(cpus=3, seed=5) as fm:
        r = graph_selftest(fm)
        assert r.passed, [c for c in r.cases if not c["passed"]]
        assert len(r.cases) == 8 and r.entries == r.returns > 0
        assert fm.kernel.core.int3_left() == 0 and fm.sites_now() == fm.sites_at_boot


def test_the_graph_selftest_catches_calls_that_were_not_hooked(monkeypatch):
    """Teeth: a host half that lets every ft_hash call through unhooked
    (no entry, no return) fails the counting case, and only what it broke."""
    from textpoke._ftrace import _graph
    from textpoke.selftests import graph_selftest
    real = _graph.FunctionGraph._enter

    def lossy(self, regs):
        if self.ft.name(regs.gprs["rdi"]) == "ft_hash":
            return True
        return real(self, regs)
    monkeypatch.setattr(_graph.FunctionGraph, "_enter", lossy)
    with FtraceMachine(cpus=2, seed=1) as fm:
        r = graph_selftest(fm)
    failed = [c["name"] for c in r.cases if not c["passed"]]
    assert not r.passed and failed == ["every call of every traced function hooked once"]


def test_cli_graph_selftest():
    p = subprocess.run([sys.executable, "-m", "textpoke", "ftrace", "--tracer", "function_graph",
                        "--selftest", "--functions", "ft_*", "--cpus", "2", "--duration", "200",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["selftest"]["passed"] and len(d["selftest"]["cases"]) == 8
    assert d["entries"] == d["returns"] > 0 and d["int3_left"] == 0
