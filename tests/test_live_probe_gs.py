# SPDX-License-Identifier: GPL-2.0-only
"""The optimised ``live probe`` and a program that sets its own GS base
while probed.

The recorder finds its thread's ring through the thread's GS base.  A
thread of the target here calls ``arch_prctl(ARCH_SET_GS, buf)`` after the
probe is armed, on a buffer of its own that looks like a ring's header
(its own address first, a made-up thread id, a head, a mask), then calls
the probed function N times, then makes a thread (which inherits that GS
base) that calls it N times too.  The recorder as first written (``mov
%gs:0,%r10``, then the header it points at) takes the program's buffer
for a ring and writes its entries there: the buffer changes (or the
target dies) and the hits are lost.  The recorder now reads the base with
RDGSBASE and follows it only when it lies among the rings' headers: the
target lives, its buffer is untouched, its GS base stays its own (also
after the probe ends: the machine puts back only bases it gave), and
every hit is recorded -- in the spare ring, stamped by ``gettid`` with
the thread id the thread passes as its second argument.

``test_the_unchecked_recorder_is_what_this_closes`` runs the same with the
old recorder injected and asserts what it did (the buffer written)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402
from livetest import build_c  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 300

TARGET_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <asm/prctl.h>
#define N %d
volatile long sink;
__attribute__((noinline)) long probed(long i, long tid) { sink += i ^ tid; return i + tid; }
static unsigned long buf[1024], copy[1024];
static unsigned long gs(void) { unsigned long v = 0; syscall(SYS_arch_prctl, ARCH_GET_GS, &v);
	return v; }
static void *child(void *x) { long tid = syscall(SYS_gettid);
	for (long i = 0; i < N; i++) probed(i, tid);
	printf("child %%ld %%d\n", tid, gs() == (unsigned long)buf); fflush(stdout); return 0; }
static void *worker(void *x) { char line[16]; long tid = syscall(SYS_gettid); pthread_t t;
	if (!fgets(line, sizeof line, stdin)) return 0;
	buf[0] = (unsigned long)buf; buf[1] = 4242; buf[2] = 0; buf[3] = 3;  /* a ring's header */
	memcpy(copy, buf, sizeof buf);
	syscall(SYS_arch_prctl, ARCH_SET_GS, (unsigned long)buf);
	for (long i = 0; i < N; i++) probed(i, tid);
	pthread_create(&t, 0, child, 0); pthread_join(t, 0);
	printf("done %%ld %%d %%d\n", tid, !memcmp(buf, copy, sizeof buf), gs() == (unsigned long)buf);
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		printf("gs %%d %%d\n", gs() == (unsigned long)buf, !memcmp(buf, copy, sizeof buf));
		fflush(stdout); }
	return 0; }
int main(void) { pthread_t t; long tid = syscall(SYS_gettid);
	pthread_create(&t, 0, worker, 0);
	printf("ready %%ld\n", tid); fflush(stdout);
	for (long i = 0;; i++) { probed(i, tid); usleep(500); } }
""" % N


def build_target(d: Path) -> Path:
    """The target built in *d* (``d/t``; skips without gcc)."""
    return build_c(d, TARGET_C, {"t": ()}) / "t"


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_target(tmp_path_factory.mktemp("live_probe_gs"))


def _optimisable() -> None:
    from textpoke.live._probe_opt import cpu_refusal, fsgsbase
    import os
    if cpu_refusal():
        pytest.skip(f"not optimised here: {cpu_refusal()}")
    if not fsgsbase(os.getpid()):
        pytest.skip("no FSGSBASE in user mode here: the recorder uses no GS base at all")


class _Lines:
    """The target's stdout, read without blocking (the probe pumps between)."""

    def __init__(self, p) -> None:
        self.p, self.buf, self.lines = p, b"", []

    def poll(self) -> list[str]:
        if self.p.stdout.closed:
            return self.lines
        fd = self.p.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            b = os.read(fd, 4096)
            if not b:
                break
            self.buf += b
        *done, self.buf = self.buf.split(b"\n")
        self.lines += [x.decode() for x in done]
        return self.lines

    def get(self, word: str) -> list[str] | None:
        for ln in self.poll():
            if ln.split()[:1] == [word]:
                return ln.split()
        return None

    def wait(self, word: str, *, exited_ok: bool = False) -> list[str] | None:
        """The first line starting with *word*, once the target printed it
        (None if it exited first and *exited_ok*; else that fails)."""
        while self.get(word) is None:
            if self.p.poll() is not None:
                assert exited_ok, self.lines
                return None
            select.select([self.p.stdout.fileno()], [], [], 5)
        return self.get(word)


def start_target(exe: Path) -> tuple[subprocess.Popen, _Lines, int]:
    """The target started and ready: (process, its lines, main's tid)."""
    t = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = _Lines(t)
    try:
        return t, out, int(out.wait("ready")[1])
    except BaseException:
        t.kill()
        t.wait()
        raise


def _run(exe, monkeypatch=None):
    """Probe ``probed`` optimised; let the worker set its GS base, call,
    make its child; returns (lines, hits, close report, alive, probe)."""
    from textpoke.live._probe import LiveProbe
    t, out, main_tid = start_target(exe)
    try:
        lp = LiveProbe(t.pid, "probed", ["i=%di", "tid=%si"])
        hits = []
        try:
            lp.arm(optimize=True)
            assert lp.optimized, lp.how()
            out.how = lp.how()
            t.stdin.write(b"go\n")
            t.stdin.flush()
            # a guard only: the test waits for the worker's own report
            deadline = time.monotonic() + 60
            lp.pump(lambda: out.get("done") is not None or t.poll() is not None
                    or time.monotonic() > deadline)
            hits += lp.take()
            # every hit the worker and its child made was committed before
            # the worker printed: one more read of the rings takes them all
            lp.pump(lambda: True)
            hits += lp.take()
        finally:
            left = lp.close()
        hits += lp.take()
        out.poll()
        from textpoke.live._recover import gs_bases
        out.gs_after = gs_bases(t.pid) if t.poll() is None else None
        if t.poll() is None:
            t.stdin.write(b"gs\n")
            t.stdin.flush()
            out.wait("gs", exited_ok=True)
        return out, main_tid, hits, left, t.poll() is None, lp
    finally:
        t.kill()
        t.wait()
        t.stdin.close()
        t.stdout.close()


def _val(h, name: str) -> int:
    return int(h.values[["i", "tid"].index(name)], 0)


def test_a_thread_that_sets_its_own_gs_base_while_probed(exe):
    _optimisable()
    out, main_tid, hits, left, alive, lp = _run(exe)
    assert alive, out.lines
    done, child = out.get("done"), out.get("child")
    assert done is not None and child is not None, out.lines
    wtid, ctid = int(done[1]), int(child[1])
    # the program's buffer untouched, its GS base its own in both threads
    assert done[2:] == ["1", "1"], done
    assert child[2] == "1", child
    # ... and still after the probe ended (the machine put back only its own)
    assert out.get("gs") == ["gs", "1", "1"], out.lines
    assert left["int3_left"] == 0 and left["regions_kept"] == [], left
    # every hit stamped with the thread that made it, none lost
    for h in hits:
        assert _val(h, "tid") == h.tid, h
    by = {}
    for h in hits:
        by.setdefault(h.tid, []).append(_val(h, "i"))
    assert sorted(by.get(wtid, [])) == list(range(N)), len(by.get(wtid, []))
    assert sorted(by.get(ctid, [])) == list(range(N)), len(by.get(ctid, []))
    assert by.get(main_tid), by.keys()           # the main thread kept its own ring
    # the child, born with the program's base, was left on the spare ring
    assert ctid in lp.ring.own_gs
    # the close put back the bases it gave (main: 0) and left the program's
    assert out.gs_after[main_tid] == 0 and out.gs_after[wtid] != 0, out.gs_after
    print(f"hits: main {len(by[main_tid])}, worker {len(by[wtid])}, child {len(by[ctid])}")


def test_the_unchecked_recorder_is_what_this_closes(exe, monkeypatch):
    """The same run with the recorder as first written injected: the
    program's buffer is written (or the target dies), the hits are lost."""
    _optimisable()
    from textpoke.live import _probe_opt
    monkeypatch.setattr(_probe_opt, "recorder_code",
                        lambda words=14, **kw: _probe_opt.RECORDER_UNCHECKED)
    out, _main, hits, _left, alive, _lp = _run(exe)
    done = out.get("done")
    # (here, on Linux 6.x with FSGSBASE: alive, the buffer written, and
    # the worker's N hits gone into it instead of the rings)
    assert not alive or done is None or done[2] != "1", out.lines
    if done is not None:
        assert sum(1 for h in hits if h.tid == int(done[1])) < N


def test_without_fsgsbase_no_gs_base_is_used(exe, monkeypatch):
    """Where RDGSBASE does not run in user mode (made up here) the recorder
    uses no GS base: every thread records in the spare ring with
    ``gettid``, and the same run keeps every hit with its thread."""
    _optimisable()
    from textpoke.live import _probe_opt
    monkeypatch.setattr(_probe_opt, "fsgsbase", lambda pid: False)
    out, main_tid, hits, left, alive, lp = _run(exe)
    assert alive and not lp.ring.use_gs and len(lp.ring.rings) == 1, out.lines
    assert "no FSGSBASE" in out.how, out.how
    done, child = out.get("done"), out.get("child")
    assert done[2:] == ["1", "1"] and child[2] == "1", out.lines
    for h in hits:
        assert _val(h, "tid") == h.tid, h
    by = {}
    for h in hits:
        by.setdefault(h.tid, []).append(_val(h, "i"))
    assert sorted(by.get(int(done[1]), [])) == list(range(N))
    assert sorted(by.get(int(child[1]), [])) == list(range(N))
    assert by.get(main_tid)
    assert out.gs_after[main_tid] == 0
