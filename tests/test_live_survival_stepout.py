# SPDX-License-Identifier: GPL-2.0-only
"""A thread got out of a range (``step_out_of_range``: ``live count`` and
``toggle`` do it before freeing their stubs, every stop-machine write and
``live recover`` before writing over a thread) survives a SIGKILL of the
patcher right after.

It used to be single-stepped out: the thread is then left in the step's
SIGTRAP stop with the trap flag (and the syscall-exit trap) set, which the
kernel keeps when the tracer dies -- the SIGTRAP is delivered, untraced,
and kills the process.  That was how ``live count`` died of SIGTRAP in the
survival campaign (a kill while a busy thread was being stepped out of the
counting stubs).  Now a thread is let run a moment and interrupted again:
whatever stop it is left in, a kill resumes it normally.

The target's spinner runs ``inner`` (40 NOPs) then ``outer`` (40 NOPs)
for ever; a driver holds every thread until the spinner's rip is inside
``inner``, gets it out, says so with every thread still held, and is
SIGKILLed there.  The target must go on spinning, untraced."""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason() or (None if shutil.which("gcc") else "no gcc")
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")
LIMIT = 60.0        # a failsafe only: every wait below waits for a state
SRC = Path(__file__).parents[1] / "src"

TARGET = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
volatile uint64_t spins;
__attribute__((noinline)) void inner(void) { __asm__ volatile(".rept 40\n nop\n .endr"); }
__attribute__((noinline)) void outer(void) { __asm__ volatile(".rept 40\n nop\n .endr"); }
static void *spin(void *a) {
    printf("%ld %lx %lx\n", (long)syscall(SYS_gettid), (unsigned long)inner,
           (unsigned long)&spins);
    fflush(stdout);
    for (;;) { inner(); outer(); spins++; }
    return a;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, spin, 0);
    for (;;) pause();
}
"""

DRIVER = textwrap.dedent("""
    import sys
    from textpoke.live import LiveMachine
    pid, tid, lo, hi = (int(x) for x in sys.argv[1:5])
    m = LiveMachine(pid)
    for _ in range(100000):
        with m.stopped():
            rip = m.get_regs(tid).rip
            if lo < rip < hi:
                m.step_out_of_range(lo, hi)
                print("out", hex(rip), hex(m.get_regs(tid).rip), flush=True)
                sys.stdin.readline()          # SIGKILLed here, every thread held
                break
""")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("stepout")
    (d / "t.c").write_text(TARGET)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


def _tracer(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return -1


def test_sigkill_right_after_a_thread_got_out_of_a_range(exe, tmp_path):
    t = subprocess.Popen([str(exe)], stdout=subprocess.PIPE)
    d = None
    try:
        tid, inner, spins = t.stdout.readline().split()
        tid, inner, spins = int(tid), int(inner, 16), int(spins, 16)
        d = subprocess.Popen([sys.executable, "-c", DRIVER, str(t.pid), str(tid), str(inner),
                              str(inner + 40)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(SRC)})
        r, _, _ = select.select([d.stdout], [], [], LIMIT)
        line = d.stdout.readline().decode().split() if r else []
        assert line[:1] == ["out"], f"driver said {line!r} (exit {d.poll()})"
        before, after = int(line[1], 16), int(line[2], 16)
        assert inner < before < inner + 40
        assert not inner < after < inner + 40
        d.kill()
        d.wait()
        # the kernel has detached and resumed every thread; the spinner must
        # count on (it would have died of SIGTRAP at once)
        mem = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)

        def count() -> int:
            got = os.pread(mem, 8, spins)
            if len(got) < 8:            # the process is gone
                t.wait(timeout=LIMIT)
                raise AssertionError(f"target died ({t.returncode})")
            return struct.unpack("<Q", got)[0]
        try:
            s0 = count()
            end = time.monotonic() + LIMIT
            while count() < s0 + 100_000:
                assert t.poll() is None, f"target died ({t.returncode})"
                assert time.monotonic() < end, "the spinner never went on"
                time.sleep(0.002)
        finally:
            os.close(mem)
        assert t.poll() is None
        assert _tracer(t.pid) == 0
    finally:
        if d is not None and d.poll() is None:
            d.kill()
            d.wait()
        t.kill()
        t.wait()
        from textpoke.live import journal_path
        journal_path(t.pid).unlink(missing_ok=True)
