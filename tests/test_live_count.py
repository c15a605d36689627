# SPDX-License-Identifier: GPL-2.0-only
"""Injected memory and live counting on real processes built here by GCC.

The big one: ``live_count`` over 10,000 functions of a running 4-thread
program (tests/live_targets/count): every function counted, counts equal
to what the program itself reports for the window, every site back to its
original bytes (read back), the program alive and still answering."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import importlib.util

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, expected_window, gen, ptrace_skip_reason  # noqa: E402
from livetest import site_bytes as _site_bytes  # noqa: E402

from textpoke import insn_decode_kernel
from textpoke.live._count import COUNTER_STRIDE, STUB_SIZE, stub_code
from textpoke.live._inject import InjectError
from textpoke.live._region import LOW_INTEGERS, Region, pick_address
from textpoke.live import Mapping

_skip = ptrace_skip_reason()
needs_machine = pytest.mark.skipif(importlib.util.find_spec("textpoke.live._machine") is None,
                                   reason="textpoke.live._machine (the live machine) is not there")
needs_ptrace = pytest.mark.skipif(_skip is not None, reason=_skip or "")


# --- pure pieces -------------------------------------------------------------
def test_stub_counts_and_returns():
    stub, counter = 0x7000_0000, 0x7000_1000 + 5 * COUNTER_STRIDE
    code = stub_code(stub, counter)
    assert len(code) == STUB_SIZE
    inc = insn_decode_kernel(code, stub)
    assert inc.raw[:1] == b"\xf0" and inc.mnemonic == "inc" and inc.rip_relative
    assert inc.end + inc.displacement_value == counter
    ret = insn_decode_kernel(code[inc.length:], inc.end)
    assert ret.flow == "ret" and set(code[inc.length + 1:]) == {0xCC}


def _m(start, end, path=""):
    return Mapping(start, end, "r-xp", 0, "00:00", 1 if path else 0, path)


def test_pick_address_stays_in_reach_and_free():
    maps = [_m(0x400000, 0x500000, "/exe"), _m(0x500000, 0x600000, "/exe"),
            Mapping(0x600000, 0x700000, "rw-p", 0, "00:00", 0, "[heap]"),
            _m(0x7f0000000000, 0x7f0000100000, "/libc")]
    a = pick_address(maps, 0x5000, 0x401000, 0x4ff000)
    # a non-PIE: not below the code, where addresses look like the small
    # integers on a stack (a counter there kept a stub region mapped), but
    # above 1 GiB, still within reach
    assert a >= LOW_INTEGERS and a >= 0x700000 + (64 << 20)
    for site in (0x401000, 0x4ff000):
        assert abs(a - (site + 5)) < 2**31 and abs(a + 0x5000 - (site + 5)) < 2**31
    # no room below: above the heap, leaving it room to grow, still in reach
    maps2 = [_m(0x10000, 0x500000, "/exe"), Mapping(0x500000, 0x600000, "rw-p", 0, "", 0, "[heap]")]
    b = pick_address(maps2, 0x5000, 0x401000, 0x4ff000)
    assert b >= 0x600000 + (64 << 20) and abs(b + 0x5000 - 0x401005) < 2**31
    # a PIE far from everything: just below it
    maps3 = [_m(0x55550000_0000, 0x55550010_0000, "/pie")]
    c = pick_address(maps3, 0x2000, 0x55550000_1000, 0x55550000_2000)
    assert 0x55550000_0000 - 2**31 < c < 0x55550000_0000
    with pytest.raises(InjectError):
        pick_address([_m(0x10000, 0x7FFFFFFFF000, "/all")], 0x1000, 0x401000, 0x402000)


class _Regs:
    def __init__(self, rip, rsp):
        self.rip, self.rsp = rip, rsp


def test_in_use_sees_rip_and_stack_words():
    """Against this very process: a buffer plays a thread's stack."""
    region = Region(os.getpid(), 0x7000_0000_0000, 0x2000, 0x1000)
    stack = (ctypes.c_uint64 * 512)()
    sp = ctypes.addressof(stack) + 1024
    my_maps = [Mapping(sp - 1024, sp + 3072, "rw-p", 0, "", 0, "")]   # exactly the buffer
    try:
        assert region.in_use([(1, _Regs(0x1234, sp))], my_maps) == []
        assert "runs at" in region.in_use([(1, _Regs(region.base + 9, sp))], my_maps)[0]
        stack[200] = region.base + 8           # a return address / saved rip above rsp
        why = region.in_use([(1, _Regs(0x1234, sp))], my_maps)
        assert len(why) == 1 and "points into it" in why[0]
        stack[200] = region.data + 8           # a pointer to the data is no obstacle
        assert region.in_use([(1, _Regs(0x1234, sp))], my_maps) == []
    finally:
        region.close()


# --- on real processes --------------------------------------------------------
@pytest.fixture(scope="module")
def builddir(tmp_path_factory):
    return tmp_path_factory.mktemp("live_count")


@needs_ptrace
def test_injected_mmap_restores_every_register(builddir):
    from textpoke import live  # noqa: F401  (the package imports)
    from textpoke.live import _ptrace as pt
    from textpoke.live._inject import StoppedThread
    from textpoke.live import Symbols, read_maps
    n, threads, rounds = 30, 4, 5
    exe = gen.build(n, builddir)
    with Target(exe, builddir / "inj.out", threads=threads, rounds=rounds) as t, Symbols(t.pid) as s:
        lo, hi = s.resolve("f00000"), s.resolve(f"f{n - 1:05d}")
        tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
        assert len(tids) == threads + 1
        # the main thread sits in sigwait (a syscall to restart); a worker in usleep/its loop
        for tid in (t.pid, tids[-1]):
            with StoppedThread(t.pid, tid) as th:
                before = bytes(th.regs())
                em = Region.map(t.pid, tid, 100, 5000, near=(lo, hi))
                assert bytes(th.regs()) == before
                # data: 2 pages asked, then the rescue's data and code pages
                assert em.code_size == 4096 and em.data_size == 8192 + 8192
                perms = {m.start: m.perms for m in read_maps(t.pid) if m.start in em}
                assert perms == {em.base: "r-xp", em.data: "rw-p", em.end - 4096: "r-xp"}
                assert abs(em.end - (lo + 5)) < 2**31 and abs(em.base - (hi + 5)) < 2**31
                em.write(em.base, b"\xc3\xcc")
                assert em.read(em.base, 2) == b"\xc3\xcc"
                assert em.in_use([(tid, pt.getregs(tid, pt.UserRegs()))]) == []
                em.unmap(tid)
                assert not [m for m in read_maps(t.pid) if m.start in em]
                assert bytes(th.regs()) == before
        # the program is unharmed: its interrupted sigwait still takes signals,
        # and a window runs exactly
        line, counts = t.signal_and_read(signal.SIGUSR1)
        assert line == "window 1" and counts == expected_window(n, threads, rounds)
        assert t.alive()


# --- live_count ---------------------------------------------------------------
NBIG, THREADS, ROUNDS = 10_000, 4, 3


@pytest.fixture(scope="module")
def big_exe(builddir):
    # -O0: the 10,000 one-line functions compile in half the time (2.7 s
    # against 5.7 s here), their fentry NOPs and call counts the same
    return gen.build(NBIG, builddir, extra=("-O0",))


@needs_ptrace
@needs_machine
@pytest.mark.parametrize("strategy", ["int3", "stop-machine"])
def test_live_count_10000_functions_is_exact(big_exe, builddir, strategy):
    """The threads are idle while the sites are switched on and off, and call
    every function a known number of times inside the window (the window
    callback opens it with SIGUSR1 and waits for the program's report), so
    every count must equal both the program's own count and the formula."""
    from textpoke.live import live_count
    from textpoke.live._fentry import NOP5, fentry_sites
    from textpoke.live import Symbols
    want = expected_window(NBIG, THREADS, ROUNDS)
    with Target(big_exe, builddir / f"big_{strategy}.out", threads=THREADS, rounds=ROUNDS) as t:
        with Symbols(t.pid) as s:
            sites = fentry_sites(s, "f0*")
        addrs = [x.addr for x in sites]
        assert len(addrs) == NBIG and _site_bytes(t.pid, addrs) == [NOP5] * NBIG
        maps_before = Path(f"/proc/{t.pid}/maps").read_text()
        reported: list[list[int]] = []
        armed_bytes: list[list[bytes]] = []

        def window():
            armed_bytes.append(_site_bytes(t.pid, addrs[:50] + addrs[-50:]))
            line, counts = t.signal_and_read(signal.SIGUSR1)
            assert line == "window 1"
            reported.append(counts)

        res = live_count(t.pid, "f0*", strategy=strategy, window=window)
        # while armed every site was a CALL (into injected memory)
        assert all(b[:1] == b"\xe8" for b in armed_bytes[0])
        assert reported[0] == want                      # the program did what it says
        got = dict(res.counts)
        assert len(got) == NBIG and res.sites == NBIG and not res.skipped
        assert [got[f"f{i:05d}"] for i in range(NBIG)] == reported[0]
        # sorted like funccount: most calls first, then by name
        assert [n for _, n in res.counts] == sorted((n for _, n in res.counts), reverse=True)
        # every site reads its original bytes again, stubs unmapped, target alive
        assert _site_bytes(t.pid, addrs) == [NOP5] * NBIG and res.restored
        assert res.freed and res.kept_mapped == []
        assert Path(f"/proc/{t.pid}/maps").read_text() == maps_before
        assert res.alive and t.alive()
        # and it still runs correctly afterwards: a second window, uncounted
        line, counts = t.signal_and_read(signal.SIGUSR1)
        assert line == "window 2" and counts == want
        assert t.stop() == [2 * w for w in want]


@needs_ptrace
@needs_machine
def test_live_count_while_threads_call_everything(big_exe, builddir):
    """Busy threads call every function all the time, also while the sites
    are switched.  Calls made between two snapshots taken inside the window
    are all counted (at most one call per thread in flight at either
    snapshot), and nothing is counted that the program did not do."""
    from textpoke.live import live_count
    with Target(big_exe, builddir / "busy.out", mode="busy", threads=THREADS) as t:
        snaps: list[list[int]] = []

        def window():
            # the second snapshot is the first one after the threads made a
            # call since the first: on a loaded box they may not have run
            # between two signals (a guard against a hang, not a measure)
            line, first = t.signal_and_read(signal.SIGUSR1)
            assert line == "snapshot 1"
            guard = time.monotonic() + 120
            k, counts = 1, first
            while counts == first:
                assert time.monotonic() < guard, "the threads made no call in 120 s"
                k += 1
                line, counts = t.signal_and_read(signal.SIGUSR1)
                assert line == f"snapshot {k}"
            snaps.extend((first, counts))

        res = live_count(t.pid, "f0*", window=window)
        after = t.signal_and_read(signal.SIGUSR1)[1]
        got = dict(res.counts)
        inside = [b - a for a, b in zip(*snaps)]
        assert sum(inside) > 0
        for i in range(NBIG):
            c = got[f"f{i:05d}"]
            assert inside[i] - THREADS <= c <= after[i]
        assert res.restored and res.freed and t.alive()
