# SPDX-License-Identifier: GPL-2.0-only
"""``live probe`` optimised (the default; ``--optimize``) on real processes: the kprobes client's
optimisation (a JMP to its buffer) with the recorder of
:mod:`textpoke.live._probe_opt` as ``optimized_callback``.  The optimised
path must be the one taken (the command says so, and the site reads a JMP
while it runs), print what the INT3 path prints for the same calls, keep
every thread running, and leave the text and the mappings as they were;
where a rule refuses, the INT3 probe runs and the reason is said."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_live_probe import NOP5, _parse, _skip, exe, target, tp  # noqa: E402,F401

pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

ARGS = ["%di", "%si", "c=%dx", "ret=+0(%sp)", "$stack0", "$comm"]


def _maps(pid: int, exec_only: bool = False) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [ln.split()[0] for ln in f if not exec_only or "x" in ln.split()[1]]


def _events(pid: int, *extra: str, n: int = 5) -> dict:
    r = tp("probe", "--pid", str(pid), "probed", *ARGS, "--max-hits", str(n), "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_optimised_path_taken_and_prints_what_the_int3_path_prints(target):
    maps = _maps(target.pid)
    int3 = _events(target.pid, "--no-optimize")
    opt = _events(target.pid, "--optimize")
    assert int3["optimized"] is False and "boosted" in int3["how"]
    assert opt["optimized"] is True and opt["how"].startswith("optimised"), opt["how"]
    for doc in (int3, opt):
        assert doc["hits"] == 5 and doc["int3_left"] == 0 and doc["regions_kept"] == []
        assert "close_error" not in doc
        ev = doc["events"]
        # the target calls probed(i++, 0x1234, 0xabcdef): consecutive first arguments
        firsts = [int(e["args"]["arg1"], 16) for e in ev]
        assert firsts == list(range(firsts[0], firsts[0] + 5))
    same = lambda doc: [{k: v for k, v in e["args"].items() if k != "arg1"} for e in doc["events"]]  # noqa: E731
    assert same(opt) == same(int3)
    assert same(opt)[0] == {"arg2": "0x1234", "c": "0xabcdef", "ret": same(int3)[0]["ret"],
                            "arg5": same(int3)[0]["ret"], "arg6": '"t"'}
    assert [e["tid"] for e in opt["events"]] == [target.pid] * 5
    assert int3["events"][-1]["timestamp"] < opt["events"][0]["timestamp"]
    assert target.alive() and target.read(target.probed) == NOP5 and _maps(target.pid) == maps


def test_text_lines_match_and_the_jmp_is_in_while_armed(target):
    """The plain lines have the INT3 path's form; while the command runs the
    probe point holds a JMP (not an INT3): the threads do not stop."""
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                          str(target.pid), "probed", "%si", "--optimize"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = p.stderr.readline()
        assert "optimised" in said, said + p.stderr.read()
        assert target.read(target.probed, 1) == b"\xe9"
        line = p.stdout.readline()
        got = _parse(line)
        assert got["event"] == "p_probed_0" and got["where"] == "probed+0x0"
        assert got["args"] == {"arg1": "0x1234"} and got["tid"] == target.pid
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    assert p.returncode == 130
    assert target.alive() and target.read(target.probed) == NOP5


@pytest.mark.parametrize("point, fetch, why", [
    ("probed+5", "%di", "red zone"),
    ("probed", "+0(%di)", "reads memory other than"),
    ("probed", "%di:string", "reads a string"),
])
def test_refused_optimisation_keeps_the_int3_probe_and_says_why(target, point, fetch, why):
    r = tp("probe", "--pid", str(target.pid), point, fetch, "--max-hits", "2", "--json",
           "--optimize")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["optimized"] is False and why in doc["not_optimized_reason"]
    assert "not optimised: " in doc["how"] and doc["hits"] == 2 and doc["int3_left"] == 0
    assert target.alive() and target.read(target.probed) == NOP5


def test_sigterm_partial_json(target):
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                          str(target.pid), "probed", "%di", "--json", "--optimize"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "optimised" in p.stderr.readline()
    first = p.stderr.readline()
    assert first.startswith("textpoke live probe: first hit"), first + p.stderr.read()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["optimized"] is True and doc["hits"] >= 1
    assert doc["int3_left"] == 0 and doc["regions_kept"] == []
    assert target.alive() and target.read(target.probed) == NOP5


PY_WORK = ("import json, threading, time\n"
           "def w():\n  while True:\n    json.dumps([1, 'x', {'a': 1}])\n"
           "    bytearray(300000)\n    time.sleep(0.001)\n"
           "for _ in range(3):\n  threading.Thread(target=w, daemon=True).start()\n"
           "print('ready', flush=True)\nw()")


@pytest.mark.parametrize("point", ["PyObject_Hash", "libc.so.6:malloc"])
def test_debian_python3_four_threads(point):
    """Debian's /usr/bin/python3 (stripped, PIE) and its libc, four busy
    threads: optimised, every thread's hits recorded, nothing left behind."""
    py = "/usr/bin/python3"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3")
    p = subprocess.Popen([py, "-c", PY_WORK], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        maps = _maps(p.pid, exec_only=True)      # (its heap grows meanwhile)
        r = tp("probe", "--pid", str(p.pid), point, "v=%di", "--max-hits", "400", "--json",
               "--optimize")
        if r.returncode == 2 and "no symbol" in r.stderr:
            pytest.skip(f"this python3 has no {point}")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["optimized"] is True, doc["how"]
        assert doc["hits"] == 400 and doc["int3_left"] == 0 and doc["regions_kept"] == []
        assert len({e["tid"] for e in doc["events"]}) == 4
        vals = [int(e["args"]["v"], 0) for e in doc["events"]]
        if "malloc" in point:
            assert 300001 in vals or 300000 in vals, sorted(set(vals))[-5:]
        assert p.poll() is None and _maps(p.pid, exec_only=True) == maps
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_ring_protocol_on_a_fake_memory():
    """The host side of the ring: committed entries in claim order, one
    being written stops the read there, a lapped one is an overrun, and at
    the end an uncommitted one is dropped (counted), never returned."""
    import struct
    from textpoke.live._probe_opt import ENTRY_SIZE
    from textpoke.live._probe_rings import ProbeRing

    class Mem:
        def __init__(self) -> None:
            self.b = bytearray(ProbeRing.data_bytes(4))

        def read(self, a, n):
            return bytes(self.b[a:a + n])

    m = Mem()
    ring = ProbeRing(m, 0, 4)

    def put(i: int, committed: bool = True) -> None:
        # the header: self, tid, head, mask
        struct.pack_into("<QQ", m.b, 16, max(struct.unpack_from("<Q", m.b, 16)[0], i + 1), 3)
        at = 64 + (i & 3) * ENTRY_SIZE
        struct.pack_into("<QQ", m.b, at, i + 1 if committed else 0, 1000 + i)

    put(0), put(1, committed=False), put(2)
    assert [e[1] for e in ring.drain()] == [1000]          # stops at entry 1
    put(1)
    assert [e[1] for e in ring.drain()] == [1001, 1002]
    for i in range(3, 10):
        put(i)
    assert [e[1] for e in ring.drain()] == [1006, 1007, 1008, 1009]
    assert ring.overruns == 3
    put(10, committed=False)
    assert ring.drain() == [] and ring.dropped == 0
    assert ring.drain(final=True) == [] and ring.dropped == 1


def test_sigkill_leaves_the_target_running_and_recover_undoes_it(target):
    """SIGKILL of the prober while optimised: nothing traps (the JMP, the
    buffer and the recorder need no patcher), the hits go on into the
    ring; the JMP is journaled with its region, so 'live recover' puts the
    original bytes back and unmaps the buffer and the ring (every page of
    them: the map is as before)."""
    maps = _maps(target.pid)
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                          str(target.pid), "probed", "%di", "--json", "--optimize"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "optimised" in p.stderr.readline()
    assert p.stderr.readline().startswith("textpoke live probe: first hit")
    p.kill()
    p.communicate(timeout=60)
    assert target.alive() and target.read(target.probed, 1) == b"\xe9"
    r = tp("recover", "--pid", str(target.pid), "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads(r.stdout)
    assert doc["calls_restored"] == 1 and doc["regions_freed"] == 2 and doc["kept"] == []
    assert target.alive() and target.read(target.probed) == NOP5 and _maps(target.pid) == maps
    r = tp("probe", "--pid", str(target.pid), "probed", "%di", "--max-hits", "2", "--optimize")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_stack_words_copied_are_only_those_read():
    """The recorder copies only the stack words the fetch-args read (a word
    past the stack's mapping would fault in the target)."""
    from textpoke.live._probe import parse_fetchargs
    from textpoke.live._probe_opt import (_REC_BODY, _REC_WORDS, fetch_refusal, recorder_code,
                                          stack_words)
    cases = {("%di",): 0, ("+8(%sp)",): 2, ("$stack0",): 1, ("$arg7", "%si"): 2,
             ("$stack13",): 14, ("+4(%sp):u32",): 2}
    for args, n in cases.items():
        fa = parse_fetchargs(list(args))
        assert fetch_refusal(fa) is None and stack_words(fa) == n, args
        for rings in ((0x10000, 0x20040), None):
            code = recorder_code(n, spare=0x20000, rings=rings)
            at = len(code) - len(_REC_BODY) + _REC_WORDS
            assert code[at - 1:at + 4] == bytes([0xB9, n, 0, 0, 0])
    for bad in ("-8(%sp)", "$stack14", "+108(%sp)", "+0(%di)", "@0x1000"):
        assert fetch_refusal(parse_fetchargs([bad])) is not None, bad


def test_a_lapped_ring_counts_what_it_lost(target):
    """A ring of 2 entries read every 5 ms while the target calls every
    0.5 ms: the writers lap it, and every claim is either a hit read or an
    overrun counted (hits read from the ring + lost == the ring's head, the
    claims; a call may also have hit the INT3 before the JMP was in); the
    hits read are in call order."""
    from textpoke.live._probe import LiveProbe
    lp = LiveProbe(target.pid, "probed", ["%di"])
    try:
        lp.arm(optimize=True, ring_size=2)
        assert lp.optimized, lp.how()
        lp.pump(lambda: lp.ring.overruns >= 20 and lp.nrecorded >= 3)
    finally:
        left = lp.close()
    assert left["int3_left"] == 0 and left["regions_kept"] == []
    hits = lp.take()
    assert lp.nhit == len(hits) and lp.ring.overruns >= 20
    assert lp.ring.tail == lp.nrecorded + lp.ring.overruns + lp.ring.dropped
    assert lp.nrecorded >= 3
    firsts = [int(h.values[0], 16) for h in hits]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
    # one thread, one call per claim: the span of what the ring gave (the
    # last hits: those through the INT3 came first) fits the claims
    ring = firsts[-lp.nrecorded:]
    assert ring[-1] - ring[0] + 1 <= lp.ring.tail
    assert target.alive() and target.read(target.probed) == NOP5


FORK_WORK = ("import json, os, sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
             "for k in range(3):\n  pid = os.fork()\n  if pid == 0:\n"
             "    for _ in range(2000):\n      json.dumps([1, 'x', {'a': 1}]); hash(object())\n"
             "    os._exit(7)\n  print('child', os.waitpid(pid, 0)[1] >> 8, flush=True)\n"
             "while True:\n  json.dumps([1]); hash(object()); time.sleep(0.001)\n")


@pytest.mark.parametrize("mode", ["--optimize", "--no-optimize"])
def test_children_forked_under_the_probe_run_on(mode):
    """A python3 that forks while the probe is in (its children call the
    probed function): optimised, each child runs on through its copy of the
    JMP, buffer and ring; with the INT3 probe, the machine puts the child's
    INT3 back at the fork event. Every child exits with its own status."""
    py = "/usr/bin/python3"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3")
    t = subprocess.Popen([py, "-c", FORK_WORK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    p = None
    try:
        assert t.stdout.readline().strip() == "ready"
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                              str(t.pid), "PyObject_Hash", "%di", "--json", mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = p.stderr.readline()
        if "no symbol" in said:
            pytest.skip("this python3 has no PyObject_Hash")
        assert ("optimised" in said) == (mode == "--optimize"), said + p.stderr.read()
        t.stdin.write("go\n")
        t.stdin.flush()
        assert [t.stdout.readline().strip() for _ in range(3)] == ["child 7"] * 3
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        doc = json.loads(out)
        assert doc["hits"] >= 1 and doc["int3_left"] == 0 and doc["regions_kept"] == []
        assert t.poll() is None
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.communicate()
        t.kill()
        t.wait()
        t.stdout.close()
        t.stdin.close()
