# SPDX-License-Identifier: GPL-2.0-only
"""``live trace`` on a process that forks all the time: children that exit,
exec, or keep running (calling the traced functions in their copy of the
text and of the runtime) while sites are switched on and off.  A child
forked while a batch's INT3s stand in the text gets its copy put back
(``live/_fork.py``: the machine seizes with ``PTRACE_O_TRACEFORK``);
without that, such a child waited at the site for ever (the SIGTRAP guard's
handler it inherited sends it back to the INT3), so the target hung
waiting for it (4 children in 4 sessions here).  The parent's trace goes
on, every session ends clean, every child exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402
from livetest import build_c  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_live_trace import _armed, _tracer, tp  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

#: a busy worker calls top() (-> leaf) for ever; the forker forks every
#: 0.3 ms without calling them itself (so it is never parked on an INT3 of
#: ours and forks while they stand); each child calls top() 1,000 times and
#: exits, execs /bin/true, or (1 in 50) keeps calling until told to stop
TARGET_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>
volatile long sink;
__attribute__((noinline)) long leaf(long a) { sink += a; return a * 3; }
__attribute__((noinline)) long top(long a) { return leaf(a) ^ a; }
static volatile int *stop;
static long forks, bad, reaped, lastsig, kept;
static void reap(int st)
{
	reaped++;
	if (WIFSIGNALED(st)) { bad++; lastsig = WTERMSIG(st); }
	else if (WEXITSTATUS(st)) { bad++; lastsig = 1000 + WEXITSTATUS(st); }
}
static void *worker(void *arg) { for (long i = 0; !*stop; i++) top(i); return NULL; }
static pid_t parent;
static void *forker(void *arg)
{
	parent = getpid();
	for (long n = 0; !*stop; n++) {
		pid_t c = fork();
		if (c == 0) {
			for (int i = 0; i < 1000; i++)
				top(i);
			if (n % 50 == 0) {
				while (!*stop && getppid() == parent) { top(1); usleep(20000); }
				for (int i = 0; i < 1000; i++)
					top(i);
				_exit(0);
			}
			if (n % 2)
				execl("/bin/true", "true", (char *)0);
			_exit(0);
		}
		if (c > 0) { forks++; if (n % 50 == 0) kept++; }
		int st;
		while (waitpid(-1, &st, WNOHANG) > 0)
			reap(st);
		usleep(300);
	}
	return NULL;
}
int main(void)
{
	char buf[64];
	pthread_t w, f;
	stop = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pthread_create(&w, NULL, worker, NULL);
	pthread_create(&f, NULL, forker, NULL);
	printf("ready\n");
	fflush(stdout);
	if (!fgets(buf, sizeof buf, stdin))
		return 1;
	*stop = 1;
	pthread_join(f, NULL);
	pthread_join(w, NULL);
	int st;
	while (wait(&st) > 0)
		reap(st);
	printf("forks=%ld kept=%ld reaped=%ld bad=%ld lastsig=%ld\n", forks, kept, reaped, bad,
	       lastsig);
	fflush(stdout);
	return 0;
}
"""


@pytest.fixture(scope="module")
def exes(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("live_trace_fork"), TARGET_C, name="f.c")


@pytest.mark.parametrize("form", ["plain", "fentry"])
def test_forks_while_tracing(exes, form):
    t = subprocess.Popen([str(exes / form)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert t.stdout.readline().strip() == "ready"
        for k in range(2):
            # every other session the profiler (return addresses hooked:
            # a child inherits them, and its copy of the return stacks)
            extra = ["--profile"] if k % 2 else []
            tr = _tracer(t.pid, "--functions", f"{form}:[lt]*", "--json", "--duration", "0.3",
                         *extra)
            _armed(tr)
            out, err = tr.communicate(timeout=120)
            assert tr.returncode == 0, err
            doc = json.loads(out)
            assert doc["restored"] is True and doc["int3_left"] == 0, doc
            assert doc["regions_kept"] == [], doc["regions_kept"]
            assert doc["hits"] > 0                 # the parent's trace went on
            if not extra:
                # (plain's top may be refused: a tail call into leaf)
                assert "leaf" in {e["function"] for e in doc["events"]} <= {"top", "leaf"}
            assert t.poll() is None
        assert tp("sites", "--pid", str(t.pid), "--check").returncode == 0
        t.stdin.write("stop\n")
        t.stdin.flush()
        # the target waits for every child: one stuck at a site hangs it
        out, _ = t.communicate(timeout=60)
        m = re.search(r"forks=(\d+) kept=(\d+) reaped=(\d+) bad=(\d+) lastsig=(\d+)", out)
        assert m, out
        forks, kept, reaped, bad, lastsig = map(int, m.groups())
        assert forks > 100 and kept > 0 and reaped == forks
        assert bad == 0, f"{bad} children died or failed (last: {lastsig})"
        assert t.returncode == 0
    finally:
        if t.poll() is None:
            # a failed run: its children too (one stuck at a site spins)
            kids = []
            for tid in Path(f"/proc/{t.pid}/task").iterdir():
                try:
                    kids += (tid / "children").read_text().split()
                except OSError:
                    pass
            t.kill()
            t.wait()
            for k in kids:
                try:
                    os.kill(int(k), signal.SIGKILL)
                except OSError:
                    pass
