# SPDX-License-Identifier: GPL-2.0-only
"""``live probe`` on a multithreaded process: several probes in one
command (``-a 'SYMBOL FETCHARGS'``), a ring per thread found through the
thread's GS base, and the thread id the host wrote into that ring (no
``gettid`` per hit) -- checked against the thread id each worker passes
as its first argument, so a hit stamped with another thread's id fails.

The target's workers call ``f1(tid, i)`` always and ``f2(tid, i)`` one
time in four; a line on its stdin makes one more worker (a thread that
comes after the probe is armed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

TARGET_C = r"""
#include <stdio.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/syscall.h>
volatile long sink;
__attribute__((noinline)) long f1(long tid, long k) { sink += tid ^ k; return tid + k; }
__attribute__((noinline)) long f2(long tid, long k) { sink -= tid + k; return tid - k; }
static void *w(void *x) { long tid = syscall(SYS_gettid);
	for (long i = 0;; i++) { f1(tid, i); if (!(i & 3)) f2(tid, i); if (!(i & 255)) usleep(200); }
	return 0; }
int main(void) { pthread_t t; char buf[16];
	for (int k = 0; k < 3; k++) pthread_create(&t, 0, w, 0);
	printf("ready\n"); fflush(stdout);
	while (fgets(buf, sizeof buf, stdin)) { pthread_create(&t, 0, w, 0);
		printf("spawned\n"); fflush(stdout); }
	return 0; }
"""


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("live_probe_threads")
    (d / "t.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


class _T:
    def __init__(self, exe: Path) -> None:
        self.p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid
        self.text = {f: self.read(self.sym(f), 8) for f in ("f1", "f2")}

    def sym(self, name: str) -> int:
        from textpoke.live._symbols import Symbols
        s = Symbols(self.pid)
        try:
            return s.lookup(name, None).addr
        finally:
            s.close()

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(n)

    def spawn(self) -> None:
        """Ask for one more worker (its clone stops the creator for the
        tracer: read the "spawned" line once the tracer has run)."""
        self.p.stdin.write("x\n")
        self.p.stdin.flush()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def target(exe):
    t = _T(exe)
    yield t
    t.close()


def _optimisable() -> None:
    from textpoke.live._probe_opt import cpu_refusal
    if cpu_refusal():
        pytest.skip(f"not optimised here: {cpu_refusal()}")


def test_two_probes_one_command_every_hit_stamped_with_its_thread(target):
    """``f1 %di -a 'f2 %di %si'``: both optimised, hits of both events,
    from every worker, each hit's thread id equal to the tid the worker
    passed (the id the host wrote into that thread's ring)."""
    _optimisable()
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                        str(target.pid), "f1", "tid=%di", "-a", "f2 tid=%di k=%si:u64",
                        "--max-hits", "600", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [p["event"] for p in doc["probes"]] == ["p_f1_0", "p_f2_0"]
    assert all(p["optimized"] for p in doc["probes"]), doc["probes"]
    assert doc["int3_left"] == 0 and doc["regions_kept"] == [] and doc["hits"] == 600
    ev = doc["events"]
    assert {e["event"] for e in ev} == {"p_f1_0", "p_f2_0"}
    for e in ev:
        assert int(e["args"]["tid"], 16) == e["tid"], e
    assert len({e["tid"] for e in ev}) == 3
    assert all("k" in e["args"] for e in ev if e["event"] == "p_f2_0")
    assert sum(p["hits"] for p in doc["probes"]) >= 600
    # the start lines: one per probe, each saying how
    lines = [ln for ln in r.stderr.splitlines() if " at f" in ln]
    assert len(lines) == 2 and all("optimised" in ln for ln in lines), r.stderr
    assert target.p.poll() is None
    assert {f: target.read(target.sym(f), 8) for f in ("f1", "f2")} == target.text


def test_int3_probes_several_points(target):
    """The same two points with --no-optimize: INT3 probes through the
    trap chain, hits of both, the same tids."""
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                        str(target.pid), "--no-optimize", "-a", "f1 %di", "-a", "f2 %di",
                        "--max-hits", "80", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {e["event"] for e in doc["events"]} == {"p_f1_0", "p_f2_0"}
    for e in doc["events"]:
        assert int(e["args"]["arg1"], 16) == e["tid"], e
    assert doc["int3_left"] == 0 and target.p.poll() is None
    assert {f: target.read(target.sym(f), 8) for f in ("f1", "f2")} == target.text


@pytest.mark.parametrize("bad,why", [
    (["f1", "-a", "f1 %si"], "one probe per address"),
    (["-a", ""], "empty probe definition"),
    ([], "give a probe point"),
    (["f1", "-a", "nosuchfn %di"], "nosuchfn"),
])
def test_bad_probe_sets_exit_2(target, bad, why):
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                        str(target.pid), *bad, "--max-hits", "1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert {f: target.read(target.sym(f), 8) for f in ("f1", "f2")} == target.text


@pytest.mark.parametrize("spare", [8, 0])
def test_a_thread_made_while_probed_gets_its_ring(target, spare, monkeypatch):
    """A worker made after the probe is armed: with rings to spare it gets
    one of its own, its header holding its tid; with none (spare 0: every
    ring taken by the threads there) it writes to the shared spare ring,
    whose tid reads 0, and the recorder asks gettid -- either way its hits
    carry its own tid."""
    _optimisable()
    import struct
    from textpoke.live import _probe_rings
    from textpoke.live._probe import LiveProbe
    monkeypatch.setattr(_probe_rings, "RING_SLOTS_SPARE", spare)
    lp = LiveProbe(target.pid, "f1", ["%di"])
    hits = []
    try:
        lp.arm(optimize=True)
        assert lp.optimized, lp.how()
        rings, m = lp.ring, lp.machine
        first = set(rings.of)
        assert first == set(m.cpus) and len(first) == 4
        idx = [rings.of[t] for t in first]
        assert len(set(idx)) == 4 and rings.spare is not rings.rings[idx[0]]
        for t in first:
            self_, tid = struct.unpack("<QQ", m.mem.read(rings.rings[rings.of[t]].addr, 16))
            assert self_ == rings.rings[rings.of[t]].addr and tid == t
        target.spawn()

        def new_hit() -> bool:
            hits.extend(lp.take())
            return any(h.tid not in first for h in hits)
        lp.pump(new_hit)
        assert target.p.stdout.readline().strip() == "spawned"
        new = {h.tid for h in hits} - first
        assert len(new) == 1
        (tid,) = new
        ring = rings.rings[rings.of[tid]]
        hdr_tid = struct.unpack("<Q", m.mem.read(ring.addr + 8, 8))[0]
        if spare:
            assert ring is not rings.spare and hdr_tid == tid
        else:
            assert ring is rings.spare and hdr_tid == 0
    finally:
        left = lp.close()
    assert left["int3_left"] == 0 and left["regions_kept"] == []
    for h in hits:
        assert int(h.values[0], 16) == h.tid, h
    assert target.p.poll() is None and target.read(target.sym("f1"), 8) == target.text["f1"]


def test_optimised_and_int3_probes_in_one_command(target):
    """f1 optimised, f2 kept an INT3 probe (``@sink`` reads memory only a
    stopped thread shows): hits of both, each with its own
    thread's id, the start lines saying which is which."""
    _optimisable()
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                        str(target.pid), "f1", "tid=%di", "-a", "f2 tid=%di s=@sink",
                        "--max-hits", "300", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    p1, p2 = doc["probes"]
    assert p1["optimized"] and not p2["optimized"], doc["probes"]
    assert "reads memory other than" in p2["not_optimized_reason"]
    ev = doc["events"]
    assert {e["event"] for e in ev} == {"p_f1_0", "p_f2_0"}
    for e in ev:
        assert int(e["args"]["tid"], 16) == e["tid"], e
    assert doc["int3_left"] == 0 and target.p.poll() is None
    assert {f: target.read(target.sym(f), 8) for f in ("f1", "f2")} == target.text
