# SPDX-License-Identifier: GPL-2.0-only
"""A SIGKILL of the patcher between a trap's stop and the thread's rewind
leaves the thread at the site, never mid-instruction.

Once a SIGTRAP stop is reaped its signal is gone: a tracer that dies from
then on has the kernel resume the thread, with no signal, wherever its rip
points -- at site+1 right after the trap, the middle of the instruction
(the tail of a NOP5 under an INT3: 0x1f, SIGILL).  The old code reaped the
stop, then rewound: a kill in between killed the target.  Now, while the
guard is in the target, the stop is peeked (WNOWAIT), the thread's siginfo
marked with the site and its rip set to it, and only then reaped; a kill at
any of those steps leaves either the SIGTRAP to the guard (which sets rip
to the site, from rip-1 or from the mark) or a thread at the site.

The driver toggles 200 fentry sites of a busy 4-thread target and SIGKILLs
itself at one step of the first trap it handles (a test-only hook of
live/_rewind.py, or its trap handler's entry, right after the reap).  Then:
the target lives, ``live recover`` leaves no INT3, the target answers, and
its SIGTERM returns only when every worker thread has left its loop (the
one that trapped included: not spinning at a site, not dead)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, gen, ptrace_skip_reason  # noqa: E402
from livetest import SRC_ENV, live_cli, toggle_driver  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 200

_KILL = """
    import os, signal, sys

    def die(point, tid):
        print("killed", point, tid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""

#: the point -> the driver's patch that kills it there
DRIVERS = {
    # the tracer's steps (live/_rewind.py, _Rewind._reap): stop peeked,
    # siginfo marked with the site (rip still site+1), rip at the site, reaped
    **{p: toggle_driver(_KILL + f"""
    from textpoke.live import _rewind

    def hook(point, tid):
        if point == {p!r}:
            die(point, tid)

    _rewind._test_hook = hook
""") for p in ("peek", "marked", "rewound", "reaped")},
    # the trap handler's entry, the stop reaped: the window of the old code
    # (it rewound only here); the same patch runs against the old tree
    "handler": toggle_driver(_KILL + """
    from textpoke.live import _traps

    def sigtrap_stop(self, t):
        die("handler", t.tid)

    _traps._Traps._sigtrap_stop = sigtrap_stop
"""),
}


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_rewind_window"))


@pytest.mark.parametrize("point", list(DRIVERS))
def test_sigkill_at_each_step_of_a_trap(exe, tmp_path, point):
    with Target(exe, tmp_path / "snap", mode="busy", threads=4) as t:
        d = subprocess.Popen([sys.executable, "-c", DRIVERS[point], str(t.pid)],
                             stdout=subprocess.PIPE, text=True, env=SRC_ENV)
        try:
            out = d.stdout.read()
            rc = d.wait(timeout=120)
        finally:
            if d.poll() is None:
                d.kill()
                d.wait()
        words = out.split()
        assert words[:2] == ["killed", point] and rc == -signal.SIGKILL, (out, rc)
        tid = int(words[2])
        rec = live_cli("recover", "--pid", str(t.pid), "--json", timeout=300)
        assert t.alive(), f"target died ({t.proc.poll()}) after a kill at {point}"
        assert rec.returncode == 0, rec.stdout + rec.stderr
        j = json.loads(rec.stdout)
        assert j["kept"] == [], j
        chk = live_cli("sites", "--pid", str(t.pid), "--check")
        assert chk.returncode == 0 and "stray INT3s: 0" in chk.stdout, chk.stdout + chk.stderr
        answer, _ = t.signal_and_read(signal.SIGUSR1)
        assert answer.startswith("snapshot"), answer
        # the thread that trapped still exists, and every worker returns
        # from its loop when asked: main joins them all and exits 0
        assert Path(f"/proc/{t.pid}/task/{tid}").exists()
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(timeout=60) == 0
        counts = [int(x) for x in (tmp_path / "snap").read_text().split()]
        assert len(counts) == N and all(c > 0 for c in counts)


# ---------------------------------------------------------------- kprobes
# A kprobe's INT3 stands in the text while the threads run; the probe tells
# the guard of it (guard_int3_sites), and a hit's stop is rewound before it
# is reaped as a batch's are.  Each worker checks what the probed function
# returns and counts its calls; the main thread prints the counts on a line
# of stdin.

PROBE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <unistd.h>
static long done[4];
/* its first instruction's tail is the 32-bit lea: resumed at +1, the sum
 * is cut to 32 bits and the worker aborts */
__asm__(".globl probed\n.type probed,@function\nprobed:\n"
	"\tlea (%rdi,%rsi),%rax\n\tadd %rdx,%rax\n\tret\n.size probed,.-probed\n");
long probed(long a, long b, long c);
static void *w(void *x) { long k = (long)x;
	for (long i = 0;; i++) {
		long a = i + (1L << 33);
		if (probed(a, 0x1234, k) != a + 0x1234 + k) abort();
		__atomic_store_n(&done[k], i + 1, __ATOMIC_RELAXED);
		if (!(i & 255)) usleep(100);
	} return 0; }
int main(void) { pthread_t t[4]; char buf[8];
	for (long k = 0; k < 4; k++) pthread_create(&t[k], 0, w, (void *)k);
	printf("ready\n"); fflush(stdout);
	while (fgets(buf, sizeof buf, stdin)) {
		printf("%ld %ld %ld %ld\n", __atomic_load_n(&done[0], __ATOMIC_RELAXED),
		       __atomic_load_n(&done[1], __ATOMIC_RELAXED),
		       __atomic_load_n(&done[2], __ATOMIC_RELAXED),
		       __atomic_load_n(&done[3], __ATOMIC_RELAXED));
		fflush(stdout);
	}
	return 0; }
"""

_PROBE_RUN = """
    from textpoke.cli import main
    main(["live", "probe", "--pid", sys.argv[1], "probed", "%di", "--duration", "30"])
    print("not killed", flush=True)
"""

PROBE_DRIVERS = {
    **{p: textwrap.dedent(_KILL + f"""
    from textpoke.live import _rewind

    def hook(point, tid):
        if point == {p!r}:
            die(point, tid)

    _rewind._test_hook = hook
""") + textwrap.dedent(_PROBE_RUN) for p in ("peek", "marked", "rewound", "reaped")},
    "handler": textwrap.dedent(_KILL + """
    from textpoke.live import _traps

    def sigtrap_stop(self, t):
        die("handler", t.tid)

    _traps._Traps._sigtrap_stop = sigtrap_stop
""") + textwrap.dedent(_PROBE_RUN),
}


@pytest.fixture(scope="module")
def probe_exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("live_rewind_probe")
    (d / "t.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


@pytest.mark.parametrize("point", list(PROBE_DRIVERS))
def test_sigkill_at_each_step_of_a_kprobe_hit(probe_exe, point):
    t = subprocess.Popen([str(probe_exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert t.stdout.readline().strip() == "ready"

        def counts() -> list[int]:
            t.stdin.write("c\n")
            t.stdin.flush()
            return [int(x) for x in t.stdout.readline().split()]

        d = subprocess.run([sys.executable, "-c", PROBE_DRIVERS[point], str(t.pid)],
                           capture_output=True, text=True, timeout=120, env=SRC_ENV)
        words = d.stdout.split()
        assert words[:2] == ["killed", point] and d.returncode == -signal.SIGKILL, \
            (d.stdout, d.stderr[-2000:], d.returncode)
        rec = live_cli("recover", "--pid", str(t.pid), "--json", timeout=300)
        assert t.poll() is None, f"target died ({t.poll()}) after a kill at {point}"
        assert rec.returncode == 0 and json.loads(rec.stdout)["kept"] == [], \
            rec.stdout + rec.stderr
        chk = live_cli("sites", "--pid", str(t.pid), "--check")
        assert chk.returncode == 0 and "stray INT3s: 0" in chk.stdout, chk.stdout + chk.stderr
        # every worker -- the one that trapped too -- goes on calling the
        # function and getting its right result (else it aborts)
        first = counts()
        for _ in range(20_000):             # (a bound, not a timing: 4 threads pass in ~1 ms)
            now = counts()
            assert t.poll() is None
            if all(b > a for a, b in zip(first, now)):
                break
            time.sleep(0.001)
        else:
            pytest.fail(f"a worker made no progress after the kill at {point}: {first} {now}")
    finally:
        if t.poll() is None:
            t.kill()
        t.wait()
