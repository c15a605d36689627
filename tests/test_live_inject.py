# SPDX-License-Identifier: GPL-2.0-only
"""Injected system calls (:mod:`textpoke.live._inject`) on a real process,
and the check that no thread is inside a region before it is unmapped
(:func:`textpoke.live._region.threads_inside`) on made-up registers."""

from __future__ import annotations

import errno
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()


@pytest.mark.skipif(_skip is not None, reason=_skip or "")
def test_injected_calls_return_their_result_and_leave_the_thread_as_it_was():
    """getpid, gettid and a failing munmap run in a thread sleeping in a
    system call: each returns its own result (an errno negated), every
    register reads as before, and the thread goes on with its sleep (it
    prints after it, not before)."""
    from textpoke.live._inject import SYS_munmap, StoppedThread
    p = subprocess.Popen([sys.executable, "-c", "import sys, time\nprint('ready', flush=True)\n"
                          "sys.stdin.readline()\ntime.sleep(0.2)\nprint('slept', flush=True)"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with StoppedThread(p.pid) as th:
            before = bytes(th.regs())
            assert th.syscall(39) == p.pid                          # getpid
            assert th.syscall(186) == p.pid                         # gettid: the main thread
            assert th.syscall(SYS_munmap, 0x1001, 4096) == -errno.EINVAL
            assert bytes(th.regs()) == before
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "slept"
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_threads_inside_sees_a_rip_and_a_stack_word():
    from textpoke.live._ptrace import UserRegs
    from textpoke.live._region import threads_inside
    lo, hi = 0x7000_0000, 0x7000_2000
    stack = 0x7FFF_0000
    mem = bytearray(8192)
    struct.pack_into("<Q", mem, 4096 + 24, lo + 0x10)   # a return address at rsp+24

    def read(addr: int, n: int) -> bytes:
        off = addr - stack
        return bytes(mem[off:off + n])

    from textpoke.live._process import Mapping
    maps = [Mapping(stack, stack + 8192, "rw-p", 0, "00:00", 0, "[stack]")]

    def regs(rip: int, rsp: int) -> UserRegs:
        r = UserRegs()
        r.rip, r.rsp = rip, rsp
        return r

    inside = threads_inside(1, [(11, regs(lo + 5, stack + 4096))], [(lo, hi)], [(lo, hi)],
                            maps, read)
    assert len(inside) == 1 and "runs at" in inside[0]
    word = threads_inside(1, [(12, regs(0x400000, stack + 4096))], [(lo, hi)], [(lo, hi)],
                          maps, read)
    assert len(word) == 1 and "rsp+24" in word[0]
    # the word is outside the red zone's reach once rsp is above it
    clear = threads_inside(1, [(13, regs(0x400000, stack + 4096 + 32 + 128))], [(lo, hi)],
                           [(lo, hi)], maps, read)
    assert clear == []
