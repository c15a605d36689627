# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live ...`` on real processes: output, --json, exit codes
(0/1/2/130), and what the text reads afterwards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import importlib.util

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, expected_window, gen, ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
needs_machine = pytest.mark.skipif(importlib.util.find_spec("textpoke.live._machine") is None,
                                   reason="textpoke.live._machine (the live machine) is not there")
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N, THREADS, ROUNDS = 200, 4, 5
NOP5 = bytes.fromhex("0f1f440000")


def tp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_cli"))


@pytest.fixture
def target(exe, tmp_path):
    with Target(exe, tmp_path / "out", threads=THREADS, rounds=ROUNDS) as t:
        yield t


@pytest.fixture
def busy(exe, tmp_path):
    with Target(exe, tmp_path / "busy", mode="busy", threads=THREADS) as t:
        yield t


def _read(pid: int, addr: int, n: int = 5) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def _write(pid: int, addr: int, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        f.seek(addr)
        f.write(data)


def _sites(pid: int, pattern: str = "f0*") -> list[dict]:
    r = tp("sites", "--pid", str(pid), "--functions", pattern, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["sites"]


# --- sites ----------------------------------------------------------------------
def test_sites_lists_every_function(target):
    sites = _sites(target.pid)
    assert [s["function"] for s in sites] == [f"f{i:05d}" for i in range(N)]
    assert {s["kind"] for s in sites} == {"nop5"} and {s["source"] for s in sites} == {"mcount"}
    r = tp("sites", "--pid", str(target.pid), "--functions", "f0000[0-2]")
    assert r.returncode == 0 and "3 sites: nop5 3" in r.stdout and "f00002" in r.stdout


def test_sites_check_finds_a_stray_int3(target):
    """What a user runs after a SIGKILL of the patcher."""
    site = _sites(target.pid, "f00123")[0]
    addr = int(site["addr"], 16)
    clean = tp("sites", "--pid", str(target.pid), "--check")
    assert clean.returncode == 0 and "stray INT3s: 0" in clean.stdout
    _write(target.pid, addr, b"\xcc")          # the target is idle: safe
    try:
        r = tp("sites", "--pid", str(target.pid), "--check")
        assert r.returncode == 1
        assert "stray INT3s: 1" in r.stdout and "f00123" in r.stdout and site["addr"] in r.stdout
        j = json.loads(tp("sites", "--pid", str(target.pid), "--check", "--json").stdout)
        assert j["stray_int3"] == 1
    finally:
        _write(target.pid, addr, NOP5[:1])
    assert tp("sites", "--pid", str(target.pid), "--check").returncode == 0


def test_help_says_what_check_is_for():
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", "sites", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SIGKILL" in r.stdout and "exits 1" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["sites", "--pid", "0"], "--pid"),
    (["poke", "--pid", "1", "f00001", "zz"], "hex"),
    (["toggle", "--pid", "1", "--functions", "f*", "--to", "ret:x"], "jmp:SYMBOL or nop"),
    (["count", "--pid", "1", "--functions", "f*", "--strategy", "naive"], "strategy"),
    (["count", "--pid", "1", "--functions", "f*", "--duration", "-1"], "--duration"),
])
def test_usage_errors_exit_2(args, message):
    r = tp(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_no_such_process_exits_2():
    r = tp("sites", "--pid", str(2**22 - 1))
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(2**22 - 1) in r.stderr


def test_poke_refuses_a_misaligned_name(target):
    r = tp("poke", "--pid", str(target.pid), "f00003+2", "90")
    assert r.returncode == 2 and "not an instruction boundary" in r.stderr
    assert _read(target.pid, int(_sites(target.pid, "f00003")[0]["addr"], 16)) == NOP5


# --- patching (needs the live machine) ---------------------------------------------
@needs_machine
def test_poke_by_name_and_number(target):
    addr = int(_sites(target.pid, "f00007")[0]["addr"], 16)
    jmp0 = "e900000000"                            # JMP32 +0: the same as the NOP5
    r = tp("poke", "--pid", str(target.pid), "f00007", jmp0, "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["old"] == NOP5.hex(" ") and j["new"] == "e9 00 00 00 00" and j["written"]
    assert _read(target.pid, addr) == bytes.fromhex(jmp0)
    r = tp("poke", "--pid", str(target.pid), hex(addr), NOP5.hex(), "--strategy", "stop-machine")
    assert r.returncode == 0, r.stderr
    assert _read(target.pid, addr) == NOP5
    line, counts = target.signal_and_read(signal.SIGUSR1)
    assert counts == expected_window(N, THREADS, ROUNDS) and target.alive()


@needs_machine
@pytest.mark.parametrize("strategy", ["int3", "stop-machine"])
def test_toggle_to_call_and_back(busy, strategy):
    pid = str(busy.pid)
    r = tp("toggle", "--pid", pid, "--functions", "f00*", "--to", "call:fentry_ret",
           "--strategy", strategy, "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["sites"] == 200 and j["switched"] == 200 and j["now_as_asked"] == 200
    assert j["int3_left"] == 0
    kinds = {s["kind"] for s in _sites(busy.pid, "f00*")}
    assert kinds == {"call"}
    # calls land in fentry_ret: every site's rel32 reaches it
    tgt = None
    for s in _sites(busy.pid, "f00*"):
        a = int(s["addr"], 16)
        b = bytes.fromhex(s["bytes"].replace(" ", ""))
        t = a + 5 + int.from_bytes(b[1:], "little", signed=True)
        assert tgt in (None, t)
        tgt = t
    r = tp("toggle", "--pid", pid, "--functions", "f00*", "--to", "nop", "--strategy", strategy)
    assert r.returncode == 0 and "200 of 200 sites switched to nop" in r.stdout
    assert {s["kind"] for s in _sites(busy.pid)} == {"nop5"}
    time.sleep(0.05)
    assert busy.alive()


@needs_machine
def test_count_json(target):
    r = tp("count", "--pid", str(target.pid), "--functions", "f0000*", "--duration", "0.1", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["sites"] == 10 and j["restored"] and j["freed"] and j["alive"]
    assert [c["function"] for c in j["counts"]] == sorted(f"f{i:05d}" for i in range(10))
    assert j["total"] == 0                       # idle target: nothing called in the window
    assert {s["kind"] for s in _sites(target.pid)} == {"nop5"}


@needs_machine
def test_count_table_and_sigint(busy):
    """Ctrl-C ends the window early: the sites are switched back, the counts
    printed, exit 130; the target keeps running."""
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "count", "--pid", str(busy.pid),
                          "--functions", "f0*", "--duration", "60", "--top", "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait for the command to say its window is open (every site switched on
    # and the batch finished), then interrupt.  The bytes reading CALL is not
    # that state: they do so before the arming batch has ended.
    addrs = [int(s["addr"], 16) for s in _sites(busy.pid)]
    said = p.stderr.readline()
    assert said.startswith("textpoke live count: counting for"), said + p.stderr.read()
    assert all(_read(busy.pid, a)[:1] == b"\xe8" for a in addrs)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = out.splitlines()
    assert lines[1].split() == ["FUNC", "COUNT"] and len(lines[2:7]) == 5
    assert all(int(line.split()[1]) > 0 for line in lines[2:7])
    assert "sites restored: yes" in out and "stubs freed" in out
    assert all(_read(busy.pid, a) == NOP5 for a in addrs) and busy.alive()


# --- demo --machine live --------------------------------------------------------------
@needs_machine
def test_demo_on_the_live_machine():
    """The demo's workload (images/workload.S, built by gcc as a 4-thread
    program) toggled 1,000 times: no wrong behaviour, both variants ran at
    every site, no INT3 left, every thread runs the final code."""
    r = subprocess.run([sys.executable, "-m", "textpoke", "demo", "--machine", "live",
                        "--toggles", "1000", "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["toggles_done"] == 1000 and j["batches"] == 1000 and j["cpus"] == 4
    assert j["oopses"] == 0 and j["misbehaviours"] == 0 and j["int3_left"] == 0 and j["final_ok"]
    for s in j["sites"]:
        if s["kind"] == "nop5-int3":
            continue
        assert s["behaviours"].get("old", 0) > 0 and s["behaviours"].get("new", 0) > 0, s
        # an even number of toggles: every site holds its old bytes again
        assert s["now"] == s["old"]
    assert all(n > 0 for n in j["iterations"])
