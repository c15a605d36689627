# SPDX-License-Identifier: GPL-2.0-only
"""SIGKILL of ``live probe`` at chosen moments of the kprobes client's
optimisation, on a 4-thread target: the client tells the live probe what
it will write (``Kprobes.before_optimize``) and the JMP is journaled before
it goes in, so wherever the patcher dies -- once the JMP is journaled and
nothing written, with the JMP's tail written under the INT3, or with the
JMP in -- ``live recover`` puts the function's original bytes back and
unmaps the probes' execmem and ring: the target alive, its executable
mappings and its whole map as before the probe, and every thread's GS
base -- which the prober had pointed at its ring's header, and which
``sites --check`` reports -- back to what it was (0), as the kernel has it
(PTRACE_GETREGS of each thread, :func:`textpoke.live._recover.gs_bases`).

The kill points are the probe's own steps, wrapped in a driver process:
the journal hook, then the live machine's syncs of the INT3 protocol
(the 2nd after the hook follows the tail's write, the 3rd the first
byte's), each followed by a SIGKILL of the driver itself."""

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

ENV_SRC = str(Path(__file__).parents[1] / "src")

TARGET_C = r"""
#include <stdio.h>
#include <pthread.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) long probed(long a, long b, long c) { sink += a ^ b; return a + b + c; }
static void *w(void *x) { long i = 0; for (;;) { probed(i++, 0x1234, 0xabcdef);
	if (!(i & 255)) usleep(100); } return 0; }
int main(void) { pthread_t t[3]; for (int k = 0; k < 3; k++) pthread_create(&t[k], 0, w, 0);
	printf("ready %p\n", (void *)&probed); fflush(stdout); w(0); }
"""

DRIVER = r"""
import os, signal, sys
from textpoke.live import _probe as P
from textpoke.live._machine import LiveMachine
where = sys.argv[2]
state = {"hooked": False, "syncs": 0}

def die(what):
    print("killed " + what, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

orig_j = P.LiveProbe._journal_jmps
def journal(self, sites):
    orig_j(self, sites)
    state["hooked"] = True
    if where == "journaled":
        die(where)
P.LiveProbe._journal_jmps = journal

orig_s = LiveMachine.sync_each_cpu
def sync(self):
    if state["hooked"]:
        state["syncs"] += 1
        if (where, state["syncs"]) in (("tail", 2), ("written", 3)):
            die(where)
    return (yield from orig_s(self))
LiveMachine.sync_each_cpu = sync

from textpoke.cli import main
main(["live", "probe", "--pid", sys.argv[1], "probed", "%di", "--optimize", "--duration", "30"])
print("not killed", flush=True)
"""


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("live_probe_kill")
    (d / "t.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


def _read(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def _maps(pid: int) -> list[str]:
    # the address ranges and permissions (not the stack's or heap's growth)
    with open(f"/proc/{pid}/maps") as f:
        return sorted(" ".join(ln.split()[:2]) for ln in f if "[stack" not in ln
                      and "[heap]" not in ln)


@pytest.mark.parametrize("where,first", [("journaled", 0xCC), ("tail", 0xCC),
                                         ("written", 0xE9)])
def test_kill_inside_the_clients_optimise_is_recovered_clean(exe, where, first):
    t = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        line = t.stdout.readline().split()
        assert line[:1] == ["ready"], line
        addr = int(line[1], 16)
        before, maps = _read(t.pid, addr, 8), _maps(t.pid)
        from textpoke.live._recover import check, gs_bases
        gs0 = gs_bases(t.pid)
        assert len(gs0) == 4 and set(gs0.values()) == {0}, gs0
        d = subprocess.run([sys.executable, "-c", DRIVER, str(t.pid), where],
                           capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "PYTHONPATH": ENV_SRC})
        assert d.stdout.strip() == f"killed {where}", d.stdout + d.stderr
        assert d.returncode == -9
        # the state the kill point means, in the target's text
        text = _read(t.pid, addr, 5)
        assert text[0] == first, text.hex()
        if where == "journaled":
            assert text[1:] == before[1:5]
        else:
            assert text[1:] != before[1:5]          # the JMP's tail is in
        assert t.poll() is None
        # the journal names the JMP (before it was written) as the site of
        # the probes' execmem, with the bytes it replaces
        from textpoke.live._journal import Journal
        j = Journal.load(t.pid)
        assert j is not None and not j.patcher_alive
        sites = [s for r in j.data["regions"] if r["kind"] == "probe" for s in r["sites"]]
        assert len(sites) == 1, j.data["regions"]
        a, old, new = sites[0]
        assert a == addr and old == before[:5].hex() and new[:2] == "e9", sites
        assert new[2:] == text[1:].hex() or where == "journaled"
        # every thread's GS base at its ring's header, inside a region the
        # dead prober left: what sites --check reports
        rings = [r for r in j.data["regions"] if r["kind"] == "data"]
        assert len(rings) == 1, j.data["regions"]
        lo = rings[0]["base"]
        hi = lo + rings[0]["code_size"] + rings[0]["data_size"]
        gs = gs_bases(t.pid)
        assert gs.keys() == gs0.keys() and all(lo <= v < hi for v in gs.values()), gs
        assert check(t.pid)["gs_into_regions"] == 4
        c = subprocess.run([sys.executable, "-m", "textpoke", "live", "sites", "--pid",
                            str(t.pid), "--check"], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "PYTHONPATH": ENV_SRC})
        assert c.returncode == 1 and "4 thread(s) with a GS base into them" in c.stdout, c.stdout
        r = subprocess.run([sys.executable, "-m", "textpoke", "live", "recover", "--pid",
                            str(t.pid), "--json"], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "PYTHONPATH": ENV_SRC})
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert rep["kept"] == [], rep
        if first == 0xE9:
            assert rep["calls_restored"] == 1, rep
        else:
            assert rep["int3_restored"] == 1 and rep["calls_restored"] == 0, rep
        assert rep["regions_freed"] >= 2, rep           # the execmem and the ring
        assert rep["gs_restored"] == 4, rep
        assert t.poll() is None
        assert _read(t.pid, addr, 8) == before
        assert _maps(t.pid) == maps
        assert gs_bases(t.pid) == gs0
    finally:
        t.kill()
        t.wait()
        t.stdout.close()
