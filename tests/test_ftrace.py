# SPDX-License-Identifier: GPL-2.0-only
"""ftrace on running vCPUs: the kernel's startup test, 2,000 functions
enabled and disabled while 4 CPUs call them, refusals with nothing
written, the guest ring buffer and trace_pipe's format."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest

from textpoke import (CALL_INSN_OPCODE, FtraceBugError, FtraceDisabledError, FtraceFilterError,
                      TraceEntry, text_gen_insn, x86_nops)
from textpoke._ftrace import format_trace_line
from textpoke.selftests import DEMO_FUNCTIONS, expected_hits, ftrace_selftest
from textpoke.sim import FtraceMachine

have_gcc = all(shutil.which(t) for t in ("gcc", "as", "ld"))
NOP5 = x86_nops[5]


@pytest.fixture(scope="module")
def many():
    """The kernel image with 2,000 generated functions (built once)."""
    if not have_gcc:
        pytest.skip("needs gcc, as and ld to build the generated image")
    from textpoke.images.gen import many_image
    return many_image(2000)


def _text_snapshot(fm):
    t = fm.image.section(".text")
    return fm.sim.text_read(t.addr, t.end - t.addr)


# ------------------------------------------------------------------ startup test
@pytest.mark.parametrize("cpus", [4, 1])
def test_ftrace_startup_selftest_on_running_cpus(cpus):
    # One CPU alone runs every scheduler step: the reader must come often
    # enough that its ring never overruns inside a measured window.
    with FtraceMachine(cpus=cpus, seed=1) as fm:
        r = ftrace_selftest(fm)
        failed = [c for c in r.cases if not c["passed"]]
        assert not failed, failed
        assert r.passed and r.oopses == 0 and r.bad == []
        names = [c["name"] for c in r.cases]
        assert "a filter really filters: no entries while every CPU calls other traced functions" \
            in names and "one call gives one entry" in names
        assert r.overruns > 0            # the overrun case really overran
        assert r.entries > 1000


def test_one_call_one_entry_with_caller_and_cpu():
    with FtraceMachine(cpus=4, seed=7) as fm:
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.wait_passes(1)
        assert fm.ftrace.set_ftrace_filter("trace_selftest_dynamic_test_func") == 1
        up = fm.ftrace.start("function")
        assert (up.enabled, up.batches) == (1, 1) and up.syncs <= 3
        for cpu in (0, 2):
            mark = len(fm.trace)
            assert fm.call_once(cpu, "trace_selftest_dynamic_test_func")
            fm.pause()
            fm.read_trace()
            new = fm.trace[mark:]
            assert len(new) == 1
            e = new[0]
            assert e.cpu == cpu and e.ip == fm.sym("trace_selftest_dynamic_test_func")
            assert fm.ftrace.name(e.parent_ip) == "ftrace_work_loop"
            fm.resume()
        assert fm.oopses == 0 and fm.bad() == []


# ------------------------------------------------------------------ 2,000 functions
def test_2000_functions_enable_disable_while_4_cpus_call_them(many):
    with FtraceMachine(cpus=4, seed=3, image=many, ring_size=1 << 15) as fm:
        ft = fm.ftrace
        gen = [r for r in ft.records if r.name.startswith("gen_fn_")]
        assert len(gen) == 2000 and len(ft.records) >= 2000
        fm.set_work([r.ip for r in gen])
        fm.start()
        assert fm.wait_passes(1)
        calls_before = sum(fm.counts().values())
        assert calls_before >= 4 * 2000

        # enable while every CPU calls them
        assert ft.set_ftrace_filter("gen_fn_*") == 2000
        up = ft.start("function")
        assert up.enabled == 2000 and up.checked == 2000    # only the changing records
        assert up.batches == -(-2000 // 256) == 8
        assert up.syncs <= 3 * up.batches
        assert fm.call_sites() == 2000
        # the enable itself: nothing recorded that the workload did not call
        fm.pause()
        fm.read_trace()
        during = fm.hit_counts(fm.trace)
        work = fm.counts()
        assert during and all(n <= work[a] for a, n in during.items())

        # a window with every site enabled: no call lost, nothing invented
        work, trace = fm.window(2)
        got = fm.hit_counts(trace)
        assert sum(work.values()) >= 4 * 2 * 2000
        assert got == +work, {ft.name(a): (got[a], work[a]) for a in work if got[a] != work[a]}
        assert fm.ring.overruns == 0
        assert {e.cpu for e in trace} == {0, 1, 2, 3}
        fm.resume()

        # disable while they run: every site back to the exact original bytes
        dn = ft.stop()
        assert dn.disabled == 2000 and dn.batches == 8 and dn.syncs <= 24
        now = fm.sites_now()
        assert now == fm.sites_at_boot
        text = fm.image.section(".text")
        assert all(now[r.ip] == text.data[r.ip - text.addr:r.ip - text.addr + 5] == NOP5
                   for r in ft.records)
        fm.wait_passes(1)
        fm.pause()
        fm.read_trace()
        n_after = len(fm.trace)
        fm.resume()
        assert fm.wait_passes(2)
        fm.read_trace()
        assert len(fm.trace) == n_after          # disabled means no more entries
        assert fm.oopses == 0 and fm.bad() == []


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("enabled_first", [False, True])
def test_one_mismatching_site_refuses_everything_nothing_written(enabled_first):
    with FtraceMachine(cpus=4, seed=5) as fm:
        ft = fm.ftrace
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.wait_passes(1)
        if enabled_first:
            ft.start("function")
        victim = ft.by_name["ft_permission"]
        # something else put a call to ftrace_stub at the site
        other = text_gen_insn(CALL_INSN_OPCODE, victim.ip, fm.sym("ftrace_stub"))
        with fm.core.text_mutex:
            fm.core.smp_text_poke_single(victim.ip, other)
        before = _text_snapshot(fm)
        stats0 = (fm.core.stats.batches, fm.core.stats.syncs, len(fm.core.events))
        func0 = fm.sim.text_read(ft.call_site, 5)
        with pytest.raises(FtraceBugError) as ei:
            ft.stop() if enabled_first else ft.start("profile")
        e = ei.value
        assert e.addr == victim.ip and e.site.startswith("ft_permission") and e.found == other
        assert "nothing written" in str(e)
        fm.run(3000)
        assert _text_snapshot(fm) == before
        assert fm.sim.text_read(ft.call_site, 5) == func0
        assert (fm.core.stats.batches, fm.core.stats.syncs) == stats0[:2]
        # registering the profiler made its trampoline first, as the kernel's
        # __register_ftrace_function does before any record is looked at:
        # two copies into fresh execmem, nothing else
        new = list(fm.core.events)[stats0[2]:]
        if enabled_first:
            assert new == []
        else:
            t = ft.trampolines["profile"]
            assert len(new) == 2 and all(t.addr <= e.addr < t.addr + t.size for e in new)
        assert [r.enabled for r in ft.records].count(True) == (len(ft.records) if enabled_first
                                                               else 0)
        assert fm.oopses == 0 and fm.bad() == []


def test_filter_matching_nothing_refused():
    with FtraceMachine(cpus=1) as fm:
        fm.ftrace.set_ftrace_filter("ft_*")
        with pytest.raises(FtraceFilterError):
            fm.ftrace.set_ftrace_filter("no_such_function*")
        assert fm.ftrace.filter == ["ft_*"]


def test_filter_and_notrace_globs_select():
    with FtraceMachine(cpus=1) as fm:
        ft = fm.ftrace
        assert ft.set_ftrace_filter("ft_* trace_selftest_dynamic_test_func") == 6
        assert ft.set_ftrace_notrace("ft_[hl]*") == 4
        assert {r.name for r in ft.selected()} == {"ft_open", "ft_read", "ft_permission",
                                                  "trace_selftest_dynamic_test_func"}
        ft.set_ftrace_filter(None)
        ft.set_ftrace_notrace(None)
        assert len(ft.selected()) == len(ft.records)
        # the tracer's own callbacks carry no fentry site: tracing never recurses
        assert not {"function_trace_call", "function_profile_call", "ftrace_ops_list_func",
                    "ftrace_caller"} & set(ft.by_name)


# ------------------------------------------------------------------ ring and format
def test_trace_pipe_format():
    names = {0x1000: "ft_hash", 0x2005: "ft_lookup"}
    line = format_trace_line(TraceEntry(ts=1234, cpu=2, ip=0x1000, parent_ip=0x2005, pid=1002),
                             lambda a: names[a], {1002: "ftrace_work/2"})
    # the irq-info column (on by default in the kernel) between cpu and timestamp
    assert line == "   ftrace_work/2-1002    [002] .....         1234: ft_hash <-ft_lookup"
    assert re.fullmatch(r"\s*\S+-\d+\s+\[\d{3}\] \.{5}\s+\d+: \S+ <-\S+", line)


def _clock(fm) -> int:
    return fm.ring._r(fm.ring.clock)


def test_ring_overwrite_is_the_default_and_keeps_the_newest():
    # kernel/trace/ring_buffer.c, rb_move_tail/rb_handle_head_page: with the
    # buffer in overwrite mode (the default of the "overwrite" trace option)
    # a writer that catches up with unread data pushes the head page on, and
    # the entries it had are counted in the CPU's "overrun" -- the newest
    # events survive, the oldest go; "dropped events" stays 0.
    with FtraceMachine(cpus=2, seed=2, ring_size=64) as fm:
        assert fm.ring.overwrite
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.ftrace.start("function")
        fm.run_until(lambda: min(fm.ring.hits_per_cpu().values()) > 500, read=False)
        fm.pause(read=False)
        hits, over, end = fm.ring.hits(), fm.ring.overruns, _clock(fm)
        assert fm.ring.dropped_events == 0 and fm.ring.lost == over
        assert all(fm.ring.pending(c) == 64 for c in (0, 1))
        entries = fm.ring.drain()
        assert len(entries) == 2 * 64 and over == hits - 128 > 0
        per = fm.ring.overruns_per_cpu()
        assert set(per) == {0, 1} and all(v > 0 for v in per.values())
        # the newest are kept: the very last event of the run is there
        assert [e.ts for e in entries] == sorted(e.ts for e in entries)
        assert entries[-1].ts == end - 1
        for c in (0, 1):
            mine = [e.ts for e in entries if e.cpu == c]
            assert len(mine) == 64
        fm.ring.reset()
        assert fm.ring.overruns == 0 and fm.ring.hits() == 0
        fm.resume()
        fm.run(400, chunk=5)            # a reader that keeps up loses nothing
        assert fm.ring.lost == 0 and len(fm.trace) > 64
        assert fm.oopses == 0


def test_ring_without_overwrite_drops_the_new_events():
    # The "overwrite" option off (ring_buffer_change_overwrite): a full
    # ring refuses the new event (__rb_reserve_next fails, counted in the
    # buffer's dropped events) and the oldest entries are the ones read;
    # "overrun" stays 0.  Changed while tracing, as the kernel allows.
    with FtraceMachine(cpus=1, seed=2, ring_size=64) as fm:
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.ftrace.start("function")
        fm.run(50, chunk=5)
        fm.pause()
        fm.read_trace()
        fm.ring.overwrite = False
        fm.ring.reset()
        start = _clock(fm)
        fm.resume()
        fm.run_until(lambda: fm.ring.hits() > 200, read=False)
        fm.pause(read=False)
        hits, dropped = fm.ring.hits(), fm.ring.dropped_events
        assert fm.ring.overruns == 0 and dropped == hits - 64 > 0
        assert fm.ring.dropped_per_cpu() == {0: dropped} and fm.ring.lost == dropped
        entries = fm.ring.drain()
        assert [e.ts for e in entries] == list(range(start, start + 64))
        fm.ring.overwrite = True         # back on: the next full ring overwrites
        fm.ring.reset()
        fm.resume()
        fm.run_until(lambda: fm.ring.hits() > 200, read=False)
        fm.pause(read=False)
        assert fm.ring.dropped_events == 0 and fm.ring.overruns == fm.ring.hits() - 64
        assert fm.ring.drain()[-1].ts == _clock(fm) - 1
        fm.resume()


def test_profile_and_trace_together_match_workload():
    with FtraceMachine(cpus=4, seed=11) as fm:
        ft = fm.ftrace
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        up = ft.start("function+profile")
        assert up.func_updates == 1
        fm.pause()
        fm.ring.reset_profile()
        work, trace = fm.window(2)
        want = expected_hits(work, ft, {r.name for r in ft.records})
        prof = Counter({ft.name(a): n for a, n in fm.ring.profile().items() if n})
        got = Counter(ft.name(e.ip) for e in trace)
        assert prof == want == got
        fm.resume()
        ft.stop()
        assert fm.sim.text_read(ft.call_site, 5) == text_gen_insn(
            CALL_INSN_OPCODE, ft.call_site, fm.sym("ftrace_stub"))
        assert fm.oopses == 0 and fm.bad() == []


# ------------------------------------------------------------------ CLI
def _cli(capsys, *argv):
    from textpoke.cli import main
    rc = main(["ftrace", *argv])
    return rc, capsys.readouterr()


def test_cli_trace_pipe_lines_filter_and_notrace(capsys):
    rc, cap = _cli(capsys, "--functions", "ft_*", "--notrace", "ft_hash", "--duration", "400",
                   "--seed", "3")
    assert rc == 0
    lines = [ln for ln in cap.out.splitlines() if not ln.startswith("#")]
    assert len(lines) > 20
    pat = re.compile(r"\s*ftrace_work/(\d)-(\d+)\s+\[(\d{3})\] \.{5}\s+(\d+): (\S+) <-(\S+)")
    funcs = set()
    for ln in lines:
        m = pat.fullmatch(ln)
        assert m, ln
        assert int(m.group(1)) == int(m.group(3)) and int(m.group(2)) == 1000 + int(m.group(1))
        funcs.add(m.group(5))
    assert funcs <= {"ft_open", "ft_lookup", "ft_permission", "ft_read"} and "ft_open" in funcs
    assert "0 oopses" in cap.out


def test_cli_json_selftest_keys(capsys):
    import json
    rc, cap = _cli(capsys, "--selftest", "--json", "--duration", "200", "--cpus", "4")
    assert rc == 0
    d = json.loads(cap.out)
    for k in ("selftest", "oopses", "syncs", "batches", "entries", "overruns"):
        assert k in d
    assert d["selftest"]["passed"] is True and len(d["selftest"]["cases"]) >= 10
    assert d["oopses"] == 0 and d["overruns"] == 0 and d["entries"] == len(d["trace"]) > 0
    assert d["enable"]["batches"] == 1 and d["enable"]["syncs"] <= 3


def test_cli_profile_and_overruns_reported(capsys):
    import json
    rc, cap = _cli(capsys, "--profile", "--duration", "600")
    assert rc == 0
    rows = [ln.split() for ln in cap.out.splitlines() if ln.startswith("  ft_")]
    hits = {r[0]: int(r[1]) for r in rows}
    assert set(hits) == {"ft_open", "ft_lookup", "ft_hash", "ft_permission", "ft_read"}
    assert all(n > 0 for n in hits.values()) and hits["ft_hash"] > hits["ft_read"]
    rc, cap = _cli(capsys, "--buffer-size", "16", "--duration", "3000", "--json")
    d = json.loads(cap.out)
    assert rc == 0 and d["overruns"] > 0 and d["entries"] > 0
    rc, cap = _cli(capsys, "--buffer-size", "16", "--duration", "3000")
    assert "WARNING" in cap.out and "oldest events overwritten" in cap.out


def test_cli_usage_errors(capsys):
    rc, cap = _cli(capsys, "--functions", "no_such_fn*")
    assert rc == 2 and "matches no traceable function" in cap.err
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "--buffer-size", "100")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "--cpus", "9")
    assert e.value.code == 2


# ------------------------------------------------------------------ kernel's order and rules
def _record_text_writes(fm):
    """Every text write and sync broadcast of the machine, in order."""
    m, log = fm.sim, []
    one, many, sync = m.text_poke_write, m.text_poke_write_many, m.sync_each_cpu

    def w1(addr, data):
        log.append(("w", addr, bytes(data)))
        return one(addr, data)

    def wn(writes):
        log.extend(("w", a, bytes(d)) for a, d in writes)
        return many(writes)

    def sy():
        log.append(("sync",))
        return sync()

    m.text_poke_write, m.text_poke_write_many, m.sync_each_cpu = w1, wn, sy
    return log


def _call_pokes(fm, log, site):
    """The callbacks the CALL at *site* was pointed at (the last byte of
    each poke completes it), with the log index."""
    ft = fm.ftrace
    by_target = {text_gen_insn(CALL_INSN_OPCODE, site, a): n for n, a in ft.callbacks.items()}
    out = [(i, e) for i, e in enumerate(log)
           if e[0] == "w" and e[1] < site + 5 and site < e[1] + len(e[2])]
    # replay the writes to the site to see each completed instruction
    cur = bytearray(fm.image.section(".text").data[site - fm.image.section(".text").addr:][:5])
    done = []
    for i, (_k, a, d) in out:
        for j, b in enumerate(d):
            if 0 <= a + j - site < 5:
                cur[a + j - site] = b
        if bytes(cur) in by_target and (not done or done[-1][1] != by_target[bytes(cur)]):
            done.append((i, by_target[bytes(cur)]))
    return done


@pytest.mark.parametrize("tracer", ["function", "profile"])
def test_update_order_list_func_sites_sync_final(tracer):
    with FtraceMachine(cpus=2, seed=4) as fm:
        ft = fm.ftrace
        ft.set_ftrace_filter("ft_*")
        log = _record_text_writes(fm)
        ft.start(tracer)
        sites = {r.ip for r in ft.records}
        site_w = [i for i, e in enumerate(log) if e[0] == "w" and e[1] in sites]
        calls = _call_pokes(fm, log, ft.call_site)
        # ftrace_call: the list function first, then the tracer's
        assert [n for _i, n in calls] == ["function+profile", tracer]
        assert calls[0][0] < min(site_w) and max(site_w) < calls[1][0]
        assert any(e == ("sync",) for e in log[max(site_w) + 1:calls[1][0]])
        log.clear()
        ft.stop()
        site_w = [i for i, e in enumerate(log) if e[0] == "w" and e[1] in sites]
        calls = _call_pokes(fm, log, ft.call_site)
        assert [n for _i, n in calls] == ["function+profile", "none"]
        assert calls[0][0] < min(site_w) and max(site_w) < calls[1][0]
        assert fm.sim.text_read(ft.call_site, 5) == text_gen_insn(
            CALL_INSN_OPCODE, ft.call_site, fm.sym("ftrace_stub"))


def test_ftrace_regs_call_updated_too():
    # arch/x86/kernel/ftrace.c, ftrace_update_ftrace_func: both ftrace_call and
    # ftrace_regs_call are re-aimed whenever the callback changes.
    with FtraceMachine(cpus=1, seed=4) as fm:
        ft = fm.ftrace
        regs = ft.regs_call_site
        assert regs == fm.sym("ftrace_regs_call")
        ft.set_ftrace_filter("ft_open")
        ft.start("function")
        want = lambda site, fn: text_gen_insn(CALL_INSN_OPCODE, site, fm.sym(fn))  # noqa: E731
        assert fm.sim.text_read(regs, 5) == want(regs, "function_trace_call")
        assert fm.sim.text_read(ft.call_site, 5) == want(ft.call_site, "function_trace_call")
        ft.stop()
        assert fm.sim.text_read(regs, 5) == want(regs, "ftrace_stub")


def test_records_with_nothing_to_change_are_not_checked():
    with FtraceMachine(cpus=2, seed=6) as fm:
        ft = fm.ftrace
        victim = ft.by_name["ft_permission"]
        # something else changed a site that this update does not touch
        other = text_gen_insn(CALL_INSN_OPCODE, victim.ip, fm.sym("ftrace_stub"))
        with fm.core.text_mutex:
            fm.core.smp_text_poke_single(victim.ip, other)
        ft.set_ftrace_filter("ft_open")
        up = ft.start("function")                 # the kernel accepts this update
        assert up.enabled == 1 and up.checked == 1
        assert fm.sim.text_read(victim.ip, 5) == other
        ft.stop()


def test_ftrace_bug_kills_ftrace():
    with FtraceMachine(cpus=2, seed=6) as fm:
        ft = fm.ftrace
        victim = ft.by_name["ft_permission"]
        good = fm.sim.text_read(victim.ip, 5)
        other = text_gen_insn(CALL_INSN_OPCODE, victim.ip, fm.sym("ftrace_stub"))
        with fm.core.text_mutex:
            fm.core.smp_text_poke_single(victim.ip, other)
        with pytest.raises(FtraceBugError, match="now disabled"):
            ft.start("function")
        assert ft.disabled
        with fm.core.text_mutex:                  # even with the site put right ...
            fm.core.smp_text_poke_single(victim.ip, good)
        before = _text_snapshot(fm)
        for retry in (lambda: ft.start("function"), ft.stop, ft.refresh,
                      lambda: ft.update_ftrace_func("function")):
            with pytest.raises(FtraceDisabledError, match="ft_permission"):
                retry()                           # ... ftrace stays off
        assert _text_snapshot(fm) == before




# ------------------------------------------------------------------ dynamic trampolines
def _site_targets(fm, recs):
    out = set()
    for r in recs:
        b = fm.sim.text_read(r.ip, 5)
        assert b[0] == CALL_INSN_OPCODE
        out.add(r.ip + 5 + int.from_bytes(b[1:], "little", signed=True))
    return out


@pytest.mark.parametrize("features", [None, ("rethunk",)])
def test_single_tracer_sites_call_its_own_trampoline(features):
    # kernel/trace/ftrace.c, __register_ftrace_function -> ftrace_update_trampoline
    # -> arch/x86/kernel/ftrace.c arch_ftrace_update_trampoline/create_trampoline:
    # a registered ops gets its own copy of ftrace_caller in executable memory,
    # its op load aimed at the ops pointer stored after the copy and its CALL
    # straight at the ops' function, then a return.  __ftrace_hash_rec_update
    # sets FTRACE_FL_TRAMP on a record traced by exactly one ops that has a
    # trampoline, so ftrace_get_addr_new gives that trampoline; a second ops on
    # the record clears it and the site goes back to ftrace_caller (the list
    # function), and back again to the trampoline when it leaves.  The ops
    # here are static (global_ops, ftrace_profile_ops): their trampolines are
    # never freed (ftrace_shutdown frees only FTRACE_OPS_FL_DYNAMIC ones).
    from textpoke._ftrace._ops import RET_SIZE
    with FtraceMachine(cpus=2, seed=9, features=features) as fm:
        ft = fm.ftrace
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.wait_passes(1)
        traced = ft.set_ftrace_filter("ft_*")
        up = ft.start("function")
        t = ft.trampolines["function"]
        recs = ft.enabled_records
        assert len(recs) == traced == up.enabled and "profile" not in ft.trampolines
        assert _site_targets(fm, recs) == {t.addr} and t.addr != ft.trampoline
        assert not any(r.start <= t.addr < r.end for r in fm.sim.text_ranges if r.core)
        # the trampoline's bytes, rebuilt here from ftrace_caller
        start, end = fm.sym("ftrace_caller"), fm.sym("ftrace_caller_end")
        size = end - start
        assert t.size == size + RET_SIZE + 8
        tramp = fm.sim.text_read(t.addr, size)
        orig = fm.sim.text_read(start, size)
        op = fm.sym("ftrace_caller_op_ptr") - start
        call = fm.sym("ftrace_call") - start
        ptr = t.addr + size + RET_SIZE
        assert tramp[:op] == orig[:op] and tramp[op:op + 3] == bytes([0x48, 0x8B, 0x15])
        assert t.addr + op + 7 + int.from_bytes(tramp[op + 3:op + 7], "little", signed=True) == ptr
        assert int.from_bytes(fm.sim.text_read(ptr, 8), "little") == fm.sym("global_ops")
        assert tramp[op + 7:call] == orig[op + 7:call]
        assert tramp[call:call + 5] == text_gen_insn(CALL_INSN_OPCODE, t.addr + call,
                                                     fm.sym("function_trace_call"))
        assert tramp[call + 5:] == orig[call + 5:]
        ret = fm.sim.text_read(t.addr + size, 5)
        if features:        # cpu_wants_rethunk_at: jmp x86_return_thunk
            assert ret == text_gen_insn(0xE9, t.addr + size, fm.sym("__x86_return_thunk"))
        else:
            assert ret[:2] == bytes([0xC3, 0xCC])
        # it traces: every call of the workload, through the trampoline
        work, trace = fm.window(2)
        assert fm.hit_counts(trace) and Counter(
            ft.name(e.ip) for e in trace) == expected_hits(work, ft, {r.name for r in recs})
        fm.resume()

        # a second ops on the records: back to ftrace_caller and its list function
        up = ft.start("function+profile")
        assert up.modified == traced and up.checked == traced and up.enabled == 0
        assert _site_targets(fm, recs) == {ft.trampoline}
        assert "profile" in ft.trampolines
        assert fm.sim.text_read(ft.call_site, 5) == text_gen_insn(
            CALL_INSN_OPCODE, ft.call_site, fm.sym("ftrace_ops_list_func"))
        work, trace = fm.window(2)
        assert Counter(ft.name(e.ip) for e in trace) == expected_hits(work, ft,
                                                                       {r.name for r in recs})
        fm.resume()
        # ... and the one left goes back to its own trampoline, made once
        up = ft.start("function")
        assert up.modified == traced and _site_targets(fm, recs) == {t.addr}
        assert ft.trampolines["function"] is t
        ft.stop()
        assert all(fm.sim.text_read(r.ip, 5) == NOP5 for r in recs)
        assert ft.trampolines["function"] is t and t.addr in ft.execmem.used
        fm.wait_passes(1)
        assert fm.oopses == 0 and fm.bad() == []


def test_no_execmem_no_trampoline_sites_call_ftrace_caller():
    # create_trampoline returns 0 when alloc_tramp fails: no FTRACE_FL_TRAMP,
    # the records call ftrace_caller as before.
    with FtraceMachine(cpus=1, seed=9) as fm:
        ft = fm.ftrace
        ft.execmem = None
        ft.set_ftrace_filter("ft_*")
        ft.start("function")
        assert not ft.trampolines and ft.tramp_errors["function"] == "no execmem"
        assert _site_targets(fm, ft.enabled_records) == {ft.trampoline}
        ft.stop()


def test_kprobe_and_tracer_on_one_function_go_through_ftrace_regs_caller():
    # kernel/trace/ftrace.c __ftrace_hash_rec_update: a record with two ops
    # loses FTRACE_FL_TRAMP, and with one of them FTRACE_OPS_FL_SAVE_REGS it
    # gets FTRACE_FL_REGS: ftrace_get_addr_new gives ftrace_regs_caller, whose
    # ftrace_regs_call is the list function (two ops registered), which calls
    # each ops -- the tracer's entry and the kprobe's handler on every call.
    # The tracer's other records keep its own trampoline.  When the probe
    # goes, the record is back on that trampoline and ftrace_call on the
    # tracer's function.
    with FtraceMachine(cpus=2, seed=12) as fm:
        fm.kernel.config["KPROBES_ON_FTRACE"] = True
        kp = fm.kernel.kprobes
        ft = fm.ftrace
        fm.set_work(DEMO_FUNCTIONS)
        fm.start()
        fm.wait_passes(1)
        ft.set_ftrace_filter("ft_*")
        ft.start("function")
        tramp = ft.trampolines["function"].addr
        traced = {r.name for r in ft.enabled_records}
        read = ft.by_name["ft_read"]
        others = [r for r in ft.enabled_records if r is not read]
        hits = []
        p = kp.register_kprobe("ft_read", lambda p, r: hits.append(r.ip))
        assert p.addr == read.ip and read.ops == ("function", "kprobe")
        assert _site_targets(fm, [read]) == {fm.sym("ftrace_regs_caller")}
        assert _site_targets(fm, others) == {tramp}
        lst = text_gen_insn(CALL_INSN_OPCODE, ft.call_site, fm.sym("ftrace_ops_list_func"))
        assert fm.sim.text_read(ft.call_site, 5) == lst
        fm.pause()                  # the window's own pause: no hit between it and n0
        n0 = len(hits)
        work, trace = fm.window(2)
        got = Counter(ft.name(e.ip) for e in trace)
        assert got == expected_hits(work, ft, traced) and got["ft_read"] > 0
        assert len(hits) - n0 == got["ft_read"] and set(hits) == {read.ip + 1}
        fm.resume()
        kp.unregister_kprobe(p)
        assert _site_targets(fm, [read]) == {tramp} and read.ops == ("function",)
        assert fm.sim.text_read(ft.call_site, 5) == text_gen_insn(
            CALL_INSN_OPCODE, ft.call_site, fm.sym("function_trace_call"))
        work, trace = fm.window(2)
        assert Counter(ft.name(e.ip) for e in trace) == expected_hits(work, ft, traced)
        fm.resume()
        ft.stop()
        assert fm.oopses == 0 and fm.bad() == []
