# SPDX-License-Identifier: GPL-2.0-only
"""``live trace`` on a process whose threads turned RDTSC off
(``prctl(PR_SET_TSC, PR_TSC_SIGSEGV)``, a per-thread flag): the runtime's
TSC clock and the profiler's return hook would give it a SIGSEGV at its
first traced call.  Every thread is asked (an injected
``prctl(PR_GET_TSC)``) before anything is mapped: the trace falls back to
the counter clock and says so, ``--profile`` is refused in one line (exit
2).  Without the check the same target dies of SIGSEGV (the test's teeth)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_live_trace import _armed, _tracer, tp  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

#: "one": only the second worker turns RDTSC off (the check must ask every
#: thread); "all": main does, before its threads are made (they inherit it)
TARGET_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
volatile long sink;
__attribute__((noinline)) long leaf(long a) { sink += a; return a * 3; }
static int one;
static pthread_barrier_t bar;
static void *w(void *a)
{
	if (one && a)
		prctl(PR_SET_TSC, PR_TSC_SIGSEGV);
	pthread_barrier_wait(&bar);
	for (;;) { leaf(1); usleep(100); }
}
int main(int argc, char **argv)
{
	pthread_t t;
	char buf[16];
	one = argc > 1 && !strcmp(argv[1], "one");
	if (!one)
		prctl(PR_SET_TSC, PR_TSC_SIGSEGV);
	pthread_barrier_init(&bar, NULL, 3);
	pthread_create(&t, 0, w, (void *)0);
	pthread_create(&t, 0, w, (void *)1);
	pthread_barrier_wait(&bar);
	printf("ready\n");
	fflush(stdout);
	while (fgets(buf, sizeof buf, stdin)) {
		leaf(2);
		printf("ok\n");
		fflush(stdout);
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the target")
    d = tmp_path_factory.mktemp("live_trace_tsc")
    (d / "notsc.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "notsc"), str(d / "notsc.c")],
                   check=True)
    return d / "notsc"


class _T:
    def __init__(self, exe: Path, mode: str) -> None:
        self.p = subprocess.Popen([str(exe), mode], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def ping(self) -> str:
        self.p.stdin.write("x\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def maps(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return f.read().splitlines()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.mark.parametrize("mode", ["one", "all"])
def test_counter_clock_when_rdtsc_is_off(exe, mode):
    t = _T(exe, mode)
    try:
        tr = _tracer(t.pid, "--functions", "notsc:leaf", "--json", "--duration", "0.3")
        first = _armed(tr)
        assert "timestamps: the event counter" in first and "RDTSC disabled" in first, first
        out, err = tr.communicate(timeout=120)
        assert tr.returncode == 0, err
        doc = json.loads(out)
        assert doc["trace_clock"] == "counter" and doc["tsc_hz"] is None
        assert doc["events_read"] > 0 and doc["restored"] is True and doc["int3_left"] == 0
        # the counter's integers, and the thread that turned RDTSC off traced too
        assert all(e["ts"] is None and isinstance(e["timestamp"], int) for e in doc["events"])
        assert len({e["tid"] for e in doc["events"]}) >= 2
        assert t.p.poll() is None and t.ping() == "ok"
    finally:
        t.close()


def test_profile_refused_when_rdtsc_is_off(exe):
    t = _T(exe, "one")
    try:
        before = t.maps()
        r = tp("trace", "--pid", str(t.pid), "--functions", "notsc:leaf", "--profile",
               "--duration", "0.3")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "RDTSC" in lines[0] and "PR_TSC_SIGSEGV" in lines[0], lines
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert t.maps() == before                # nothing mapped, nothing left
        assert tp("sites", "--pid", str(t.pid), "--check").returncode == 0
        assert t.p.poll() is None and t.ping() == "ok"
    finally:
        t.close()


_UNCHECKED = r"""
import sys, time
from textpoke.live import _trace as T
T.tsc_disabled = lambda m, tids: None           # the check taken away
lt = T.LiveTrace(int(sys.argv[1]), "notsc:leaf", clock="tsc")
print("planned", flush=True)
end = time.monotonic() + 30
try:
    lt.arm()          # the target may die before this returns
    while T.alive(lt.pid) and time.monotonic() < end:
        lt.pump(lambda: True)
        lt.take()
finally:
    try:
        lt.close()
    except Exception:
        pass
"""


def test_without_the_check_the_target_dies(exe):
    """The teeth: the same target, the check replaced by "allowed", dies
    of SIGSEGV at the first RDTSC of the runtime's copy."""
    from textpoke.live._trace import tsc_variant_reason
    if tsc_variant_reason():
        pytest.skip("the TSC is not the trace clock here")
    t = _T(exe, "all")
    try:
        drv = subprocess.Popen([sys.executable, "-c", _UNCHECKED, str(t.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert drv.stdout.readline().strip() == "planned", drv.stderr.read()
        assert t.p.wait(timeout=60) == -signal.SIGSEGV
        drv.communicate(timeout=60)
    finally:
        if t.p.poll() is None:
            t.close()
