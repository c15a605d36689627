# SPDX-License-Identifier: GPL-2.0-only
"""The SIGTRAP guard against a target that replaces its SIGTRAP action
while it is being patched.

The target (built here): 3 threads call 40 fentry functions all the time;
a fourth thread calls ``signal(SIGTRAP, SIG_DFL)`` -- in a tight loop
(``loop``), or once each time it is asked with SIGUSR2 (``ask``: once, when a file
appears -- a signal would stop in the tracer, which is busy -- and it
answers ``reset 1`` on stdout when the call has returned).

* ``loop``: ``live toggle`` both ways and ``live count`` still end with
  the guard removed (no journal, no mapping left) and the target's own
  action in place -- before, the guard was kept ("the target replaced its
  SIGTRAP handler") and every later command refused.
* ``ask``: the patcher (a driver script) stops after the INT3s of a batch
  are written; the target resets its action (a SIGKILL now would kill it
  at the next INT3); the driver writes the tails -- the guard is checked
  before, and put back -- and stops again; SIGKILL: the target lives, and
  ``live recover`` leaves every site whole and the target's SIG_DFL in
  place.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402
from livetest import (killed_at_end, live_cli as tp, peek_u64, proc_state,  # noqa: E402
                      sigtrap_caught, site_bytes)

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 40
NOP5 = bytes.fromhex("0f1f440000")

SOURCE = r"""
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define N %(n)d
volatile unsigned long hits;
%(funcs)s
typedef void (*fn_t)(void);
static fn_t fns[N] = { %(names)s };
static int looping;
static const char *trigger;

static void *worker(void *arg)
{
	(void)arg;
	for (;;)
		for (int i = 0; i < N; i++)
			fns[i]();
	return NULL;
}

static void *resetter(void *arg)
{
	(void)arg;
	unsigned long done = 0;
	for (;;) {
		if (looping) {
			signal(SIGTRAP, SIG_DFL);
			done++;
			continue;
		}
		if (done || access(trigger, F_OK)) {
			usleep(1000);
			continue;
		}
		signal(SIGTRAP, SIG_DFL);
		done++;
		printf("reset %%lu\n", done);
		fflush(stdout);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t;
	looping = argc > 1 && !strcmp(argv[1], "loop");
	trigger = argc > 2 ? argv[2] : "/nonexistent";
	for (int i = 0; i < 3; i++)
		pthread_create(&t, NULL, worker, NULL);
	pthread_create(&t, NULL, resetter, NULL);
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
"""


def _build(tmp: Path) -> Path:
    funcs = "\n".join(f"__attribute__((noinline)) void g{i:03d}(void) {{ hits++; }}"
                      for i in range(N))
    names = ", ".join(f"g{i:03d}" for i in range(N))
    c = tmp / "resetter.c"
    c.write_text(SOURCE % {"n": N, "funcs": funcs, "names": names})
    exe = tmp / "resetter"
    subprocess.run(["gcc", "-O1", "-fno-pie", "-no-pie", "-pg", "-mfentry", "-mnop-mcount",
                    "-mrecord-mcount", "-pthread", "-o", str(exe), str(c)], check=True)
    return exe


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return _build(tmp_path_factory.mktemp("live_guard"))


class _Target:
    def __init__(self, exe: Path, mode: str, trigger: Path | None = None) -> None:
        self.proc = subprocess.Popen([str(exe), mode, str(trigger or "/nonexistent")],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def alive(self) -> bool:
        return self.proc.poll() is None and proc_state(self.pid) not in ("Z", "X", "")


def _hits_addr(pid: int) -> int:
    from textpoke.live import Symbols
    with Symbols(pid) as s:
        return s.lookup("hits").addr


def _sites(pid: int) -> list[int]:
    r = tp("sites", "--pid", str(pid), "--functions", "g0*", "--json")
    assert r.returncode == 0, r.stderr
    addrs = [int(s["addr"], 16) for s in json.loads(r.stdout)["sites"]]
    assert len(addrs) == N
    return addrs


def test_target_resetting_sigtrap_in_a_loop_is_patched_cleanly(exe):
    from textpoke.live import journal_path
    with _Target(exe, "loop") as t:
        addrs = _sites(t.pid)
        maps0 = Path(f"/proc/{t.pid}/maps").read_text()
        for to in ("call:g039", "nop"):
            r = tp("toggle", "--pid", str(t.pid), "--functions", "g0[0-3][0-8]", "--to", to)
            assert r.returncode == 0, r.stdout + r.stderr
            assert not journal_path(t.pid).exists(), journal_path(t.pid).read_text()
            assert Path(f"/proc/{t.pid}/maps").read_text() == maps0
            assert t.alive()
        assert site_bytes(t.pid, addrs) == [NOP5] * N
        r = tp("count", "--pid", str(t.pid), "--functions", "g0*", "--duration", "0.1", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["freed"]
        assert not journal_path(t.pid).exists()
        assert Path(f"/proc/{t.pid}/maps").read_text() == maps0
        # the target's own SIG_DFL is its action (nothing caught), as it asked
        assert not sigtrap_caught(t.pid) and t.alive()


DRIVER = textwrap.dedent("""
    import json, sys
    from textpoke import TextPoke
    from textpoke.live import LiveMachine

    pid, sites = int(sys.argv[1]), json.loads(sys.argv[2])
    m = LiveMachine(pid)
    core = TextPoke(m)
    said = set()

    def listener(ev):
        if ev.phase in ("int3", "tail") and ev.phase not in said:
            said.add(ev.phase)
            print("phase", ev.phase, getattr(m, "guard_reinstalled", -1), flush=True)
            sys.stdin.readline()          # the test lets us go on, or kills us here

    core.events.subscribe(listener)
    with core.batch():
        for addr in sites:
            core.smp_text_poke_batch_add(addr, bytes.fromhex("e900000000"))
    print("finished", flush=True)
""")


def test_guard_put_back_after_the_target_reset_it_then_sigkill(exe, tmp_path):
    from textpoke.live import journal_path
    trigger = tmp_path / "reset-now"
    with _Target(exe, "ask", trigger) as t:
        addrs = _sites(t.pid)
        maps0 = Path(f"/proc/{t.pid}/maps").read_text()
        hits = _hits_addr(t.pid)
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER)
        d = subprocess.Popen([sys.executable, str(driver), str(t.pid), json.dumps(addrs)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with killed_at_end(d):
            assert d.stdout.readline().split()[:2] == ["phase", "int3"]
            assert all(b[:1] == b"\xcc" for b in site_bytes(t.pid, addrs))
            assert sigtrap_caught(t.pid)                       # the guard
            trigger.touch()
            assert t.proc.stdout.readline().strip() == "reset 1"
            assert not sigtrap_caught(t.pid)                   # the target's SIG_DFL
            d.stdin.write("\n")
            d.stdin.flush()
            # the tails are written: before them the guard was found gone and put back
            said = d.stdout.readline().split()
            assert said[:2] == ["phase", "tail"]
            caught = sigtrap_caught(t.pid)
        # detached: the workers run into the INT3s and wait there in the
        # guard -- the calls counted stop -- and the process lives on
        last, still = peek_u64(t.pid, hits), 0
        for _ in range(500):
            if not t.alive():
                break
            time.sleep(0.01)
            now = peek_u64(t.pid, hits)
            still = still + 1 if now == last else 0
            last = now
            if still >= 5:
                break
        assert t.alive(), f"target died: {t.proc.poll()}"
        assert still >= 5, "the workers never stopped at the INT3s"
        assert said[2] == "1" and caught             # found replaced once, put back
        rec = tp("recover", "--pid", str(t.pid), "--json")
        assert rec.returncode == 0, rec.stdout + rec.stderr
        j = json.loads(rec.stdout)
        assert j["int3_restored"] == N and j["guard_removed"] and j["kept"] == []
        assert all(b in (NOP5, bytes.fromhex("e900000000")) for b in site_bytes(t.pid, addrs))
        assert Path(f"/proc/{t.pid}/maps").read_text() == maps0
        assert not journal_path(t.pid).exists()
        # what the target asked for last is its action again
        assert not sigtrap_caught(t.pid) and t.alive()


def test_an_int3_written_on_purpose_keeps_no_guard(exe):
    """``poke --force ... cc`` on a hot function: the INT3 is the user's
    once the batch is done -- no guard keeps the threads waiting at it and
    no journal reads as a dead patcher's; the target dies of SIGTRAP as it
    would without textpoke."""
    from textpoke.live import journal_path
    with _Target(exe, "ask") as t:
        r = tp("poke", "--pid", str(t.pid), "g005", "cc", "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        assert t.proc.wait(timeout=60) == -signal.SIGTRAP
        assert not journal_path(t.pid).exists()


DIE_DRIVER = textwrap.dedent("""
    import json, sys
    from textpoke import TextPoke
    from textpoke.live import LiveMachine

    pid, sites = int(sys.argv[1]), json.loads(sys.argv[2])
    said = set()
    try:
        with LiveMachine(pid) as m:
            core = TextPoke(m)

            def listener(ev):
                if ev.phase == "int3" and ev.phase not in said:
                    said.add(ev.phase)
                    print("phase int3", flush=True)
                    sys.stdin.readline()          # the test kills the target here

            core.events.subscribe(listener)
            with core.batch():
                for addr in sites:
                    core.smp_text_poke_batch_add(addr, bytes.fromhex("e900000000"))
    except Exception as e:                        # the target is gone: the batch fails
        print("failed", type(e).__name__, flush=True)
    else:
        print("finished", flush=True)
""")


def test_a_target_that_dies_mid_batch_leaves_no_journal(exe, tmp_path):
    """The target dies (here SIGKILL; in ``poke ... cc`` its own INT3,
    its default action given back) while a patcher holds INT3s and the
    guard in it: nothing is left to recover in a dead process, so the
    patcher's clean end leaves no journal -- before, it wrote the guard and
    the sites down as a dead patcher's would be: a file left behind for a
    process that no longer exists."""
    from textpoke.live import journal_path
    with _Target(exe, "ask") as t:
        addrs = _sites(t.pid)
        driver = tmp_path / "driver.py"
        driver.write_text(DIE_DRIVER)
        d = subprocess.Popen([sys.executable, str(driver), str(t.pid), json.dumps(addrs)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with killed_at_end(d):
            assert d.stdout.readline().split() == ["phase", "int3"]
            assert journal_path(t.pid).exists()       # the sites in flight, the guard
            t.proc.kill()
            # (kill() returns with the group exit under way: every thread
            # has SIGKILL pending or is in its exit)
            d.stdin.write("\n")
            d.stdin.flush()
            said = d.stdout.readline().split()
            assert said[:1] in (["failed"], ["finished"]), said
            assert d.wait(timeout=60) == 0
        assert t.proc.wait(timeout=60) == -signal.SIGKILL
        assert not journal_path(t.pid).exists(), journal_path(t.pid).read_text()
