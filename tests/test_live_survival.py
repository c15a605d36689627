# SPDX-License-Identifier: GPL-2.0-only
"""The target outlives its patcher: SIGKILL of the patcher in the middle of
a batch (INT3s in the text of a busy 4-thread target), then ``live sites
--check`` and ``live recover``.

The patcher is a driver script that stops itself right after a phase of
the batch (the INT3s written, or the tails under them) and says so; the
test then kills it with SIGKILL.  Every thread of the target calls every
function all the time, so threads reach the INT3s at once: the SIGTRAP
guard injected into the target keeps them waiting at their sites.  The
survival campaign at random moments is bench/bench_live_survival.py."""

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
from livetest import killed_at_end, live_cli as tp, proc_state, site_bytes  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 200
NOP5 = bytes.fromhex("0f1f440000")
JMP0 = bytes.fromhex("e900000000")      # jmp +0: does what the NOP5 does

DRIVER = textwrap.dedent("""
    import json, os, sys
    from textpoke import TextPoke
    from textpoke.live import LiveMachine

    pid, phase, policy, sites = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    m = LiveMachine(pid, trap_policy=policy)
    core = TextPoke(m)
    said = []

    def listener(ev):
        if ev.phase == phase and not said:
            said.append(1)
            print("phase", phase, flush=True)
            sys.stdin.readline()          # the test kills us here

    core.events.subscribe(listener)
    with core.batch():
        for addr in sites:
            core.smp_text_poke_batch_add(addr, bytes.fromhex("e900000000"))
    print("finished", flush=True)
""")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_survival"))


@pytest.mark.parametrize("phase, policy", [("int3", "park"), ("tail", "emulate")])
def test_sigkill_mid_batch_then_recover(exe, tmp_path, phase, policy):
    from textpoke.live import journal_path
    with Target(exe, tmp_path / "busy", mode="busy", threads=4) as t:
        r = tp("sites", "--pid", str(t.pid), "--functions", "f0*", "--json")
        addrs = [int(s["addr"], 16) for s in json.loads(r.stdout)["sites"]]
        assert len(addrs) == N
        maps0 = Path(f"/proc/{t.pid}/maps").read_text()
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER)
        d = subprocess.Popen([sys.executable, str(driver), str(t.pid), phase, policy,
                              json.dumps(addrs)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with killed_at_end(d):
            assert d.stdout.readline().strip() == f"phase {phase}"
            now = site_bytes(t.pid, addrs)
            assert all(b[:1] == b"\xcc" for b in now)          # every site in flight
        # the kernel detached every thread; they run on into the INT3s and wait there
        assert journal_path(t.pid).exists()
        time.sleep(0.2)
        assert t.alive() and proc_state(t.pid) not in ("Z", "X", "")
        chk = tp("sites", "--pid", str(t.pid), "--check")
        assert chk.returncode == 1, chk.stdout + chk.stderr
        assert f"stray INT3s: {N}" in chk.stdout and "dead patcher" in chk.stdout
        # any other command refuses, pointing at recover
        tog = tp("toggle", "--pid", str(t.pid), "--functions", "f0*", "--to", "nop")
        assert tog.returncode == 2 and "live recover" in tog.stderr
        assert len(tog.stderr.strip().splitlines()) == 1
        rec = tp("recover", "--pid", str(t.pid), "--json")
        assert rec.returncode == 0, rec.stdout + rec.stderr
        j = json.loads(rec.stdout)
        assert j["int3_restored"] == N and j["guard_removed"] and j["kept"] == []
        # whole old instructions (recover rolls back), nothing injected left
        assert site_bytes(t.pid, addrs) == [NOP5] * N
        assert Path(f"/proc/{t.pid}/maps").read_text() == maps0
        assert not journal_path(t.pid).exists()
        assert tp("sites", "--pid", str(t.pid), "--check").returncode == 0
        line, _ = t.signal_and_read(signal.SIGUSR1)
        assert line.startswith("snapshot") and t.alive()
        assert tp("recover", "--pid", str(t.pid)).returncode == 0      # nothing left: a no-op


def test_clean_runs_leave_no_guard_or_journal(exe, tmp_path):
    """A normal toggle and count remove the guard and the journal: the
    target's mappings are as before."""
    from textpoke.live import journal_path
    with Target(exe, tmp_path / "busy", mode="busy", threads=4) as t:
        maps0 = Path(f"/proc/{t.pid}/maps").read_text()
        for to in ("call:fentry_ret", "nop"):
            r = tp("toggle", "--pid", str(t.pid), "--functions", "f0*", "--to", to)
            assert r.returncode == 0, r.stderr
            assert Path(f"/proc/{t.pid}/maps").read_text() == maps0
            assert not journal_path(t.pid).exists()
        r = tp("count", "--pid", str(t.pid), "--functions", "f000*", "--duration", "0.1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["freed"]
        assert Path(f"/proc/{t.pid}/maps").read_text() == maps0
        assert not journal_path(t.pid).exists() and t.alive()


def test_guard_code_is_its_source(tmp_path):
    """The injected handler's bytes are the assembled source kept next to
    them (the one displacement the linker would fill in: the data page)."""
    import shutil
    import struct
    from textpoke.live import _guard as G
    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("binutils (as, objcopy) are not installed")
    (tmp_path / "g.S").write_text(G.SOURCE)
    subprocess.run(["as", "-o", str(tmp_path / "g.o"), str(tmp_path / "g.S")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "g.o"),
                    str(tmp_path / "g.bin")], check=True)
    raw = bytearray((tmp_path / "g.bin").read_bytes())
    struct.pack_into("<i", raw, 3, G.CODE_SIZE - 7)
    assert bytes(raw) == G.CODE
    # the handler looks the site up at data+40 (count at +32) and the restorer
    # is rt_sigreturn
    assert G.CODE[G.RESTORER:G.RESTORER + 7] == bytes.fromhex("b80f0000000f05")
    assert G.TABLE_OFF == G.COUNT_OFF + 8 == 40


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def test_count_json_interrupted_while_arming_is_valid_json(tmp_path_factory):
    """SIGTERM as soon as count has attached (arming, or -- if arming was
    quicker -- the window): exit 143, valid JSON saying interrupted, what
    the sites hold and no INT3 left; the sites read NOP5 again."""
    n = 2000
    exe = gen.build(n, tmp_path_factory.mktemp("json_int"))
    with Target(exe, tmp_path_factory.mktemp("o") / "busy", mode="busy", threads=4) as t:
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "count", "--pid",
                              str(t.pid), "--functions", "f0*", "--duration", "30", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while p.poll() is None and _tracer(t.pid) != p.pid:
            time.sleep(0.0005)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 143, err
        j = json.loads(out)
        assert j["interrupted"] is True and j["int3_left"] == 0, j
        r = tp("sites", "--pid", str(t.pid), "--functions", "f0*", "--json")
        assert json.loads(r.stdout)["kinds"] == {"nop5": n}
        assert t.alive()
