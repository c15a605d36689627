# SPDX-License-Identifier: GPL-2.0-only
"""Every write checked (issue §2), on a real process: each refusal is one
line on stderr, exit 2, no traceback, and the text is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, gen, ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 20
NOP5 = bytes.fromhex("0f1f440000")


def tp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *args], capture_output=True,
                          text=True, timeout=120)


def _read(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return gen.build(N, tmp_path_factory.mktemp("live_checks"))


@pytest.fixture
def target(exe, tmp_path):
    with Target(exe, tmp_path / "out", threads=2, rounds=1) as t:
        yield t


def _addr(pid: int, name: str) -> int:
    from textpoke.live import Symbols
    with Symbols(pid) as s:
        return s.resolve(name)


def _refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_numeric_address_inside_an_instruction_is_refused(target):
    f = _addr(target.pid, "f00003")
    before = _read(target.pid, f, 16)
    r = tp("poke", "--pid", str(target.pid), hex(f + 2), "e900000000")
    _refused(r, "not an instruction boundary")
    assert _read(target.pid, f, 16) == before


def test_nop5_over_other_instructions_is_refused(target):
    f = _addr(target.pid, "f00003")
    before = _read(target.pid, f, 16)
    # +5: 'lock addq $1, calls(%rip)' (9 bytes); +14: 'ret' (1 byte)
    for off in (5, 14):
        r = tp("poke", "--pid", str(target.pid), f"f00003+{off}", NOP5.hex())
        _refused(r, "replaces one whole instruction")
    assert _read(target.pid, f, 16) == before


@pytest.mark.parametrize("new", ["cc", "90cc909090"])
def test_int3_in_new_bytes_is_refused_without_force(target, new):
    f = _addr(target.pid, "f00001")
    r = tp("poke", "--pid", str(target.pid), "f00001", new)
    _refused(r, "INT3", "--force")
    assert _read(target.pid, f, 5) == NOP5


def test_branch_into_data_is_refused(target):
    f = _addr(target.pid, "f00002")
    calls = _addr(target.pid, "calls")             # a .bss array
    rel = (calls - (f + 5)).to_bytes(4, "little", signed=True)
    r = tp("poke", "--pid", str(target.pid), "f00002", ("e9" + rel.hex()))
    _refused(r, "not executable code")
    r = tp("toggle", "--pid", str(target.pid), "--functions", "f0000*", "--to", "call:calls")
    _refused(r, "not executable code")
    assert _read(target.pid, f, 5) == NOP5


def test_a_sound_poke_still_works(target):
    r = tp("poke", "--pid", str(target.pid), "f00004", "e900000000", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["written"]
    r = tp("poke", "--pid", str(target.pid), "f00004", NOP5.hex())
    assert r.returncode == 0, r.stderr
    line, counts = target.signal_and_read(__import__("signal").SIGUSR1)
    assert line == "window 1" and target.alive()


def test_functions_without_an_entry_form_are_refused_with_the_reason():
    """Debian's own python3 and libc: no fentry site; toggle says why (exit
    2, one line) and sites says per module what can be patched."""
    import os
    import shutil
    py = "/usr/bin/python3"
    if not os.path.exists(py) or shutil.which("gcc") is None:
        pytest.skip("no /usr/bin/python3")
    p = subprocess.Popen([py, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        # an ordinary entry: toggled at its entry (tests/test_live_toggle_entries.py);
        # a glob matching nothing is one line, exit 2
        r = tp("toggle", "--pid", str(p.pid), "--functions", "PyObject_Hash", "--to", "nop")
        assert r.returncode == 0 and "1 already were; at function entries" in r.stdout, r.stderr
        r = tp("toggle", "--pid", str(p.pid), "--functions", "NoSuchFunc*", "--to", "nop")
        assert r.returncode == 2 and "no function matching" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = tp("sites", "--pid", str(p.pid))
        assert r.returncode == 0 and "libc.so.6:" in r.stdout and "can take a JMP" in r.stdout
    finally:
        p.kill()
        p.wait()
