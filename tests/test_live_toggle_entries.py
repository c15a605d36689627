# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live toggle`` on ordinary function entries (no fentry NOP), on
real processes: tests/live_targets/entries (functions written in assembly,
each movable one counting its own calls in hits[], 4 threads).

jmp:FUNC redirects (the function's own counter stops, FUNC's takes its
calls, the results change as FUNC's do); call:FUNC runs FUNC first through
a trampoline mapped in the process, then the function (both counters move,
the results do not); back to nop puts the original bytes back and frees the
trampoline region.  Refusals are one line, exit 2, nothing written; a
SIGKILL of the patcher with a trampoline region in flight is undone by
``live recover``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

HERE = Path(__file__).parent / "live_targets" / "entries"
sys.path.insert(0, str(HERE))
from entries_target import Entries, build_entries  # noqa: E402
MOVABLE = ["e_rip", "e_endbr", "e_jcc", "e_jmp", "e_inner"]
HIT = {n: i for i, n in enumerate(MOVABLE)}          # the hits[] slot of each

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_entries(tmp_path_factory.mktemp("entries"))


@pytest.fixture
def target(exe):
    t = Entries(exe)
    yield t
    t.close()


def _tp(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "textpoke", "live", *args],
                       capture_output=True, text=True, timeout=120)
    if check is not None:
        assert r.returncode == check, (args, r.returncode, r.stdout, r.stderr)
    return r


def _toggle(pid: int, glob: str, to: str, *more: str, check: int | None = 0):
    return _tp("toggle", "--pid", str(pid), "--functions", glob, "--to", to, *more, check=check)


def _text(pid: int) -> dict[str, bytes]:
    from textpoke.live import Symbols
    with Symbols(pid) as s, open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        out = {}
        for fn in s.functions("e_*"):
            f.seek(fn.addr)
            out[fn.name] = f.read(fn.size)
        return out


def _anon_exec(pid: int) -> set[str]:
    """Runs of contiguous anonymous mappings holding executable code: a
    trampoline region is one run (its code, its data, and the pages of the
    injected-syscall rescue at its end), whatever its pages' permissions."""
    runs: list[list] = []
    for ln in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = ln.split()
        if len(f) >= 6:
            continue
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        if runs and runs[-1][1] == lo:
            runs[-1][1] = hi
            runs[-1][2] |= "x" in f[1]
        else:
            runs.append([lo, hi, "x" in f[1]])
    return {f"{lo:x}-{hi:x}" for lo, hi, x in runs if x}


def _delta(a: list[int], b: list[int]) -> dict[str, int]:
    return {n: b[i] - a[i] for n, i in HIT.items()}


def test_jmp_redirects_an_entry_and_nop_puts_it_back(target):
    t = target
    text = _text(t.pid)
    base_sum, h0 = t.go(100)
    r = _toggle(t.pid, "e_rip", "jmp:e_inner", "--json")
    doc = json.loads(r.stdout)
    assert doc["entries"] == 1 and doc["switched"] == 1 and doc["now_as_asked"] == 1
    assert doc["int3_left"] == 0 and doc["trampoline_regions_mapped"] == []
    assert _text(t.pid)["e_rip"][:1] == b"\xe9"
    s, h1 = t.go(100)
    d = _delta(h0, h1)
    # e_rip no longer runs (its counter stands still); e_inner runs for both
    assert d["e_rip"] == 0 and d["e_inner"] == 2 * 400 and d["e_jcc"] == 400
    assert s != base_sum                   # e_inner returns rdi+9, e_rip rdi+3
    # again: already so, nothing written
    doc = json.loads(_toggle(t.pid, "e_rip", "jmp:e_inner", "--json").stdout)
    assert doc["switched"] == 0 and doc["now_as_asked"] == 1
    _toggle(t.pid, "e_rip", "nop")
    assert _text(t.pid) == text
    s, h2 = t.go(100)
    assert s == base_sum and _delta(h1, h2) == {n: 400 for n in MOVABLE}


def test_call_runs_a_trampoline_and_nop_frees_it(target):
    t = target
    text = _text(t.pid)
    maps0 = _anon_exec(t.pid)
    base_sum, h0 = t.go(100)
    glob = "e_[rj][icm][pc]"                  # e_rip, e_jcc, e_jmp
    doc = json.loads(_toggle(t.pid, glob, "call:e_inner", "--json").stdout)
    assert doc["entries"] == 3 and doc["switched"] == 3 and doc["now_as_asked"] == 3
    assert len(doc["trampoline_regions_mapped"]) == 1
    assert len(_anon_exec(t.pid) - maps0) == 1
    s, h1 = t.go(100)
    d = _delta(h0, h1)
    # each function still runs (results unchanged) after e_inner ran first
    assert s == base_sum
    assert d["e_rip"] == d["e_jcc"] == d["e_jmp"] == d["e_endbr"] == 400
    assert d["e_inner"] == 400 + 3 * 400
    # call:FUNC again: nothing to do; to another FUNC: a new region, the old one freed
    assert json.loads(_toggle(t.pid, glob, "call:e_inner", "--json").stdout)["switched"] == 0
    doc = json.loads(_toggle(t.pid, glob, "call:e_spare", "--json").stdout)
    assert doc["switched"] == 3 and len(doc["trampoline_regions_freed"]) == 1
    assert len(_anon_exec(t.pid) - maps0) == 1
    s, h2 = t.go(100)
    assert s == base_sum and _delta(h1, h2) == {n: 400 for n in MOVABLE}
    # back: the original bytes, the region unmapped
    doc = json.loads(_toggle(t.pid, glob, "nop", "--json").stdout)
    assert doc["switched"] == 3 and len(doc["trampoline_regions_freed"]) == 1
    assert _text(t.pid) == text and _anon_exec(t.pid) == maps0
    assert t.go(100)[0] == base_sum


def test_a_region_is_freed_only_when_no_entry_uses_it(target):
    t = target
    text = _text(t.pid)
    maps0 = _anon_exec(t.pid)
    _toggle(t.pid, "e_[rj][icm][pc]", "call:e_inner")
    doc = json.loads(_toggle(t.pid, "e_rip", "nop", "--json").stdout)
    assert doc["trampoline_regions_freed"] == []          # e_jcc, e_jmp still jump in
    assert len(_anon_exec(t.pid) - maps0) == 1
    base_sum, h0 = t.go(50)
    assert _delta(h0, t.go(50)[1])["e_inner"] == 200 + 2 * 200
    doc = json.loads(_toggle(t.pid, "e_j*", "nop", "--json").stdout)
    assert len(doc["trampoline_regions_freed"]) == 1
    assert _text(t.pid) == text and _anon_exec(t.pid) == maps0


def test_switching_while_four_threads_run_through_the_entries(target):
    """Both ways, both strategies, with 4 threads calling the functions in
    a loop: threads between moved instructions are stepped out, a thread
    inside a trampoline (or in FUNC, called from it) keeps it mapped until
    it has left; the target runs on and its text ends as it began."""
    t = target
    text = _text(t.pid)
    maps0 = _anon_exec(t.pid)
    assert t.ask("busy") == ["busy"]
    for strategy, tos in (("int3", ("call:e_inner", "call:e_spare", "jmp:e_inner", "nop")),
                          ("stop-machine", ("call:e_inner", "nop"))):
        for to in tos:
            doc = json.loads(_toggle(t.pid, "e_[rej]*[pcr]", to, "--strategy", strategy,
                                     "--json").stdout)
            assert doc["now_as_asked"] == doc["sites"] == 4 and doc["int3_left"] == 0, doc
            assert doc["kept"] == [], doc
    stopped = t.ask("stop")
    assert stopped[0] == "stopped" and t.proc.poll() is None
    assert _text(t.pid) == text and _anon_exec(t.pid) == maps0
    assert t.go(10)[0] == t.go(10)[0]


@pytest.mark.parametrize("func, reason", [
    ("e_short", "short"), ("e_into", "jump-into"), ("e_ind", "indirect-jump"),
    ("e_call", "call"), ("e_ret", "ret"), ("e_sys", "syscall"), ("e_ud", "int"),
    ("e_loop", "loop"), ("e_outer", "entry-point")])
def test_each_entry_refusal_is_one_line_and_writes_nothing(target, func, reason):
    t = target
    text = _text(t.pid)
    r = _toggle(t.pid, func, "call:e_inner", check=2)
    assert f"{reason} 1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert _text(t.pid) == text


def test_a_glob_with_one_refused_entry_writes_nothing(target):
    t = target
    text = _text(t.pid)
    r = _toggle(t.pid, "e_*", "jmp:e_inner", check=2)
    assert "cannot take a JMP" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _text(t.pid) == text


def test_targets_that_are_not_code_and_jmps_not_ours_are_refused(target):
    t = target
    text = _text(t.pid)
    for to in ("call:hits", "jmp:hits", "jmp:0x10"):
        r = _toggle(t.pid, "e_rip", to, check=2)
        assert "not executable code" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _text(t.pid) == text
    # a JMP someone else wrote (to no function and no trampoline of ours)
    from textpoke.live import Symbols
    with Symbols(t.pid) as s:
        a = s.lookup("e_spare").addr
    stack = next(int(ln.split("-")[0], 16) for ln in Path(f"/proc/{t.pid}/maps").read_text()
                 .splitlines() if ln.endswith("[stack]"))
    rel = (stack - (a + 5)) & 0xFFFFFFFF
    old = text["e_spare"][:5]
    with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as f:
        f.seek(a)
        f.write(b"\xe9" + rel.to_bytes(4, "little"))
    try:
        for to in ("nop", "call:e_inner"):
            r = _toggle(t.pid, "e_spare", to, check=2)
            assert "patched 1" in r.stderr, r.stderr
    finally:
        with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as f:
            f.seek(a)
            f.write(old)
    assert _text(t.pid) == text


def test_a_killed_toggle_is_recovered(target, tmp_path):
    """SIGKILL of 'live toggle --to call:' while its trampoline region is
    journaled (mapped, its entries being switched): the target lives;
    'live recover' puts every entry back whole and frees the region; the
    text ends as it began.  Then a finished toggle is not undone by
    recover (nothing was in flight), and back to nop frees its region."""
    from textpoke.live import journal_path
    t = target
    text = _text(t.pid)
    maps0 = _anon_exec(t.pid)
    assert t.ask("busy") == ["busy"]
    jp = journal_path(t.pid)
    caught = 0
    for _attempt in range(20):
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "toggle", "--pid",
                              str(t.pid), "--functions", "e_[rej]*[pcr]", "--to", "call:e_inner"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # kill it the moment its journal names the region
            while p.poll() is None:
                try:
                    if '"toggle"' in jp.read_text():
                        p.send_signal(signal.SIGKILL)
                        break
                except (FileNotFoundError, ValueError):
                    pass
        finally:
            p.wait()
        assert t.proc.poll() is None, "the target died"
        if p.returncode == -signal.SIGKILL and jp.exists():
            _tp("sites", "--pid", str(t.pid), "--check", check=1)
            rep = json.loads(_tp("recover", "--pid", str(t.pid), "--json").stdout)
            assert rep["kept"] == [] and not jp.exists(), rep
            if rep["regions_freed"] == 1:       # the region was in flight: all undone
                caught += 1
                assert _text(t.pid) == text and _anon_exec(t.pid) == maps0
            else:                               # killed just after it was done
                _toggle(t.pid, "e_[rej]*[pcr]", "nop")
                assert _text(t.pid) == text and _anon_exec(t.pid) == maps0
            if caught:
                break
        else:
            # finished before the kill: a toggle that is done is the state asked
            # for, not a leftover; switch it back
            assert not jp.exists()
            _toggle(t.pid, "e_[rej]*[pcr]", "nop")
            assert _text(t.pid) == text and _anon_exec(t.pid) == maps0
    assert caught, "no kill landed while the region was in flight"
    assert t.ask("stop")[0] == "stopped"
    assert t.go(10)[0] == t.go(10)[0]


PY = "/usr/bin/python3"
PY_WORK = ("import os, sys\nprint('up', flush=True)\n"
           "for line in sys.stdin:\n    print(os.getpid(), os.getppid(), flush=True)\n")


@pytest.mark.skipif(not os.path.exists(PY), reason="no /usr/bin/python3")
def test_debian_python3_and_its_libc():
    """libc's getpid redirected to getppid (python's os.getpid() then
    answers the parent's pid), then called first through a trampoline
    (answers its own again), then back; python3's own PyObject_Hash
    likewise.  The text ends as the file has it, the journal empty."""
    from textpoke.live import journal_path
    p = subprocess.Popen([PY, "-c", PY_WORK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "up"

        def ask() -> list[int]:
            p.stdin.write("x\n")
            p.stdin.flush()
            return [int(x) for x in p.stdout.readline().split()]

        pid, ppid = ask()
        assert pid == p.pid and ppid != pid
        glob = "libc.so.6:getpid"
        before = _read_fn(p.pid, glob)
        _toggle(p.pid, glob, "jmp:libc.so.6:getppid")
        assert ask() == [ppid, ppid]
        doc = json.loads(_toggle(p.pid, glob, "call:libc.so.6:getppid", "--json").stdout)
        assert doc["switched"] == 1 and len(doc["trampoline_regions_mapped"]) == 1
        assert ask() == [pid, ppid]
        doc = json.loads(_toggle(p.pid, glob, "nop", "--json").stdout)
        assert doc["switched"] == 1 and doc["now_as_asked"] == 1
        # freed, or kept mapped with the reason (a stale return address on
        # python's stack cannot be told from a live one)
        assert len(doc["trampoline_regions_freed"]) + len(doc["kept"]) == 1
        assert _read_fn(p.pid, glob) == before and ask() == [pid, ppid]
        h = "python3:PyObject_Hash"
        before = _read_fn(p.pid, h)
        _toggle(p.pid, h, "call:libc.so.6:getppid")
        assert _read_fn(p.pid, h)[:1] == b"\xe9"
        _toggle(p.pid, h, "nop")
        assert _read_fn(p.pid, h) == before and ask() == [pid, ppid]
        assert not journal_path(p.pid).exists()
    finally:
        p.kill()
        p.wait()


def _read_fn(pid: int, glob: str) -> bytes:
    from textpoke.live import Symbols
    with Symbols(pid) as s, open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        fn = s.functions(glob)[0]
        f.seek(fn.addr)
        return f.read(fn.size)
