# SPDX-License-Identifier: GPL-2.0-only
"""``live trace`` and a program that sets its own GS base while traced.

The injected runtime finds a thread's ring (its ``struct ftrace_cpu``)
through the thread's GS base.  The target is live probe's
(``test_live_probe_gs``'s C program, shared): after the tracer is armed
a worker thread sets its GS base (``arch_prctl(ARCH_SET_GS)``) on a
buffer of its own that starts like a header (its own address first), calls
the traced function N times, then makes a thread (which inherits that
base) that calls it N times too; the main thread calls it all along.

The runtime as first written (``mov %gs:0``, then the record it points
at) takes the program's buffer for a record and writes its counters
there.  Now each per-CPU load reads the base (RDGSBASE, or
``arch_prctl(ARCH_GET_GS)`` without FSGSBASE) and follows it only when it
lies among the records and the record is its own address (the check
``live probe``'s recorder makes, one emitter: ``live/_gscheck.py``); a
call made with another base is counted as missed and recorded nowhere
(the records are single-writer rings, a shared spare would need a lock
the kernel's code does not take).  Asserted: the target lives, the buffer
is untouched, the worker's and the child's 2N calls are reported as
missed -- exactly -- and every event read is the main thread's, with its
tid."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
sys.path.insert(0, str(Path(__file__).parent))
from helpers import ptrace_skip_reason  # noqa: E402
from test_live_probe_gs import N, build_target, start_target  # noqa: E402  (the shared target)

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_target(tmp_path_factory.mktemp("live_trace_gs"))


def _run(exe, gs_read=None, profile=False):
    """Trace ``probed``; let the worker set its GS base, call, make its
    child; returns (lines, main tid, events, counts, close report, alive)."""
    from textpoke.live import LiveTrace
    t, out, main_tid = start_target(exe)
    try:
        lt = LiveTrace(t.pid, "probed", profile=profile, clock="counter")
        lt.gs_read = gs_read
        events = []
        try:
            lt.arm()
            out.gs_read = lt.gs_read
            t.stdin.write(b"go\n")
            t.stdin.flush()
            # a guard only: the test waits for the worker's own report
            deadline = time.monotonic() + 60
            lt.pump(lambda: out.get("done") is not None or t.poll() is not None
                    or time.monotonic() > deadline)
            events += lt.take()
        finally:
            try:
                left = lt.close()
            except Exception as e:          # noqa: BLE001  (the old runtime: a dead target)
                left = {"close_error": repr(e)}
        events += lt.final_events
        out.poll()
        return out, main_tid, events, lt.final_counts or {}, left, t.poll() is None, lt
    finally:
        t.kill()
        t.wait()
        t.stdin.close()
        t.stdout.close()


def _check(out, main_tid, events, counts, left, alive):
    assert alive, out.lines
    done, child = out.get("done"), out.get("child")
    assert done is not None and child is not None, out.lines
    wtid, ctid = int(done[1]), int(child[1])
    # the program's buffer untouched, its GS base its own in both threads
    assert done[2:] == ["1", "1"] and child[2] == "1", out.lines
    assert left["int3_left"] == 0 and left["regions_kept"] == [], left
    # the worker's and the child's calls: every one reported missed
    assert counts["missed"] == 2 * N, counts
    tids = {e.pid for e in events}
    assert wtid not in tids and ctid not in tids, tids
    # the main thread kept its ring: its events, with its tid
    return sum(1 for e in events if e.pid == main_tid)


def test_a_thread_that_sets_its_own_gs_base_while_traced(exe):
    from textpoke.live._probe_opt import fsgsbase
    import os
    if not fsgsbase(os.getpid()):
        pytest.skip("no FSGSBASE in user mode here (the arch_prctl read is tested below)")
    out, main_tid, events, counts, left, alive, _lt = _run(exe)
    assert out.gs_read == "rdgsbase"
    assert _check(out, main_tid, events, counts, left, alive) > 0
    assert {e.pid for e in events} == {main_tid}


def test_without_fsgsbase_the_base_is_read_with_arch_prctl(exe):
    """The check's other read (a CPU or kernel without FSGSBASE in user
    mode: a system call per traced call), chosen here on purpose."""
    out, main_tid, events, counts, left, alive, _lt = _run(exe, gs_read="syscall")
    assert _check(out, main_tid, events, counts, left, alive) > 0
    assert {e.pid for e in events} == {main_tid}


def test_profile_with_a_thread_on_its_own_gs_base(exe):
    """--profile: the return hook's entry loads its record through the same
    checked load (a missed call gets the sink, whose empty return stack
    hooks nothing): alive, buffer untouched, 2N missed, and the profile
    counts the main thread's calls only."""
    from textpoke.live._probe_opt import fsgsbase
    import os
    out, main_tid, events, counts, left, alive, lt = _run(
        exe, gs_read=None if fsgsbase(os.getpid()) else "syscall", profile=True)
    _check(out, main_tid, events, counts, left, alive)
    prof = dict((f, n) for f, n, _t in lt.final_profile)
    assert 0 < prof.get("probed", 0) == counts["hits"], (prof, counts)


def test_the_unchecked_runtime_is_what_this_closes(exe):
    """The same run with the runtime's per-CPU loads as first written
    (``mov %gs:0`` followed unchecked): the program's buffer is taken for
    a record and written into (or the target dies), and nothing says the
    calls were lost."""
    out, _main, _events, counts, _left, alive, _lt = _run(exe, gs_read="unchecked")
    done = out.get("done")
    # (here, Linux 6.x with FSGSBASE: the buffer's fourth word, 3, taken
    # for the ring's address -- SIGSEGV at the worker's first call)
    assert not alive or done is None or done[2] != "1", out.lines
    assert counts.get("missed", 0) == 0


def test_a_thread_on_its_own_gs_base_before_the_trace(exe):
    """A thread whose GS base is the program's own when the tracer starts
    keeps it and gets no ring (refused before: 'uses its GS base itself');
    the others are traced.  The worker here set its base and made its
    child before the trace: the main thread's calls are read, the worker's
    buffer and base are its own after the close."""
    from textpoke.live import LiveTrace
    t, out, main_tid = start_target(exe)
    try:
        t.stdin.write(b"go\n")
        t.stdin.flush()
        wtid = int(out.wait("done")[1])
        lt = LiveTrace(t.pid, "probed", clock="counter")
        try:
            lt.arm()
            assert lt._own_gs == {wtid}, (lt._own_gs, wtid)
            assert lt.stats.threads_without_ring == 1
            events = []
            # a guard only: the test waits for the main thread's events
            deadline = time.monotonic() + 30
            while len(events) < 10 and time.monotonic() < deadline:
                lt.pump(lambda: True)
                events += lt.take()
        finally:
            left = lt.close()
        events += lt.final_events
        assert left["int3_left"] == 0 and left["regions_kept"] == [], left
        assert len(events) >= 10 and {e.pid for e in events} == {main_tid}
        assert lt.final_counts["missed"] == 0
        t.stdin.write(b"gs\n")
        t.stdin.flush()
        assert out.wait("gs") == ["gs", "1", "1"], out.lines
    finally:
        t.kill()
        t.wait()
        t.stdin.close()
        t.stdout.close()


def test_the_checked_load_for_every_register():
    """The checked load (gs_stub, the shared emitter's check) run in
    Unicorn for every destination register: a base at a record gives the
    record; one inside a record, elsewhere (a header-like buffer of the
    program's: its own address first) or 0 gives the sink and counts one
    missed call; every other register and %rsp as they were."""
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
    from unicorn import x86_const as X
    from textpoke.live._trace_runtime import SINK_MISSED, gs_stub
    code_at, data, stack = 0x100000, 0x200000, 0x300000
    lo, sink = data + 0x1000, data + 0x3000
    hi = lo + 4 * 128
    names = ["RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI"] + [f"R{i}" for i in range(8, 16)]
    regs = [getattr(X, f"UC_X86_REG_{n}") for n in names]
    for reg in (r for r in range(16) if r != 4):
        for base, want in ((lo + 128, lo + 128), (lo + 64, sink), (data + 0x2000, sink), (0, sink)):
            uc = Uc(UC_ARCH_X86, UC_MODE_64)
            uc.mem_map(code_at, 0x1000)
            uc.mem_map(data, 0x4000)
            uc.mem_map(stack, 0x1000)
            for i in range(4):
                uc.mem_write(lo + 128 * i, (lo + 128 * i).to_bytes(8, "little"))
            uc.mem_write(data + 0x2000, (data + 0x2000).to_bytes(8, "little"))
            code = b"\xe8\x01\x00\x00\x00\xf4" + gs_stub(reg, "rdgsbase", lo, hi, sink)
            uc.mem_write(code_at, code)
            for i, r in enumerate(regs):
                if i != 4:
                    uc.reg_write(r, 0x1111 * (i + 1))
            uc.reg_write(X.UC_X86_REG_RSP, stack + 0x800)
            uc.reg_write(X.UC_X86_REG_GS_BASE, base)
            uc.emu_start(code_at, code_at + 5)          # the CALL, the stub, its RET
            assert uc.reg_read(regs[reg]) == want, (names[reg], hex(base))
            assert all(uc.reg_read(r) == 0x1111 * (i + 1)
                       for i, r in enumerate(regs) if i not in (4, reg)), names[reg]
            assert uc.reg_read(X.UC_X86_REG_RSP) == stack + 0x800
            missed = int.from_bytes(uc.mem_read(sink + SINK_MISSED, 8), "little")
            assert missed == (want == sink), (names[reg], hex(base), missed)
