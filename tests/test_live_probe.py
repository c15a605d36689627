# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live probe`` on real processes: kprobes through the kernel's
client (``Kernel(...).kprobes`` over a LiveMachine).  A C target calls a
function with known arguments in a loop; each hit line must carry them.
Refusals are one line, exit 2, nothing written; SIGINT/SIGTERM leave the
target alive and its text as it was."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

NOP5 = bytes.fromhex("0f1f440000")

TARGET_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) long probed(long a, long b, long c)
{
	sink += a ^ b;
	return a + b + c;
}
int main(int argc, char **argv)
{
	long i = 0;
	printf("ready %p\n", (void *)&probed);
	fflush(stdout);
	for (;;) {
		probed(i++, 0x1234, 0xabcdef);
		usleep(500);
	}
}
"""


def tp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("live_probe")
    (d / "t.c").write_text(TARGET_C)
    # a fentry program: probed() starts with the NOP5 of -mnop-mcount
    subprocess.run(["gcc", "-O1", "-fno-pie", "-no-pie", "-pg", "-mfentry", "-mnop-mcount",
                    "-mrecord-mcount", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return d / "t"


class _Target:
    def __init__(self, exe: Path) -> None:
        self.p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().split()
        assert line[:1] == ["ready"], line
        self.pid = self.p.pid
        self.probed = int(line[1], 16)

    def read(self, addr: int, n: int = 5) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(n)

    def alive(self) -> bool:
        return self.p.poll() is None

    def close(self) -> None:
        self.p.kill()
        self.p.wait()
        self.p.stdout.close()


@pytest.fixture
def target(exe):
    t = _Target(exe)
    yield t
    t.close()


_LINE = re.compile(r"^\s*(\S+)-(\d+)\s+\[(\d+)\] (\d+\.\d{6}): (\S+): \((\S+)\)(.*)$")


def _parse(line: str) -> dict:
    m = _LINE.match(line)
    assert m, line
    args = dict(kv.split("=", 1) for kv in m.group(7).split())
    return {"comm": m.group(1), "tid": int(m.group(2)), "event": m.group(5),
            "where": m.group(6), "args": args}


def test_hit_lines_carry_the_arguments(target):
    """Each hit: the registers the function was called with (%di, %si,
    %dx, $argN), the return address on the stack, in kprobe_events form."""
    r = tp("probe", "--pid", str(target.pid), "probed", "%di", "b=%si", "c=%dx:u64",
           "$arg2", "ret=+0(%sp):symbol", "--max-hits", "5")
    assert r.returncode == 0, r.stderr
    hits = [_parse(x) for x in r.stdout.splitlines()]
    assert len(hits) == 5
    firsts = [int(h["args"]["arg1"], 16) for h in hits]
    assert firsts == list(range(firsts[0], firsts[0] + 5))      # i, i+1, ... no hit lost
    for h in hits:
        assert h["comm"] == "t" and h["tid"] == target.pid
        assert h["event"] == "p_probed_0" and h["where"] == "probed+0x0"
        assert h["args"]["b"] == "0x1234" and h["args"]["c"] == str(0xabcdef)
        assert h["args"]["arg4"] == "0x1234"                     # $arg2 is %si
        assert h["args"]["ret"].startswith("main+")
    assert "probe point restored: yes" in r.stderr
    assert target.read(target.probed) == NOP5 and target.alive()


def test_mid_function_json(target):
    """A probe inside the function (a RIP-relative load, copied out of line)
    with --json: valid JSON, the hits, the text back."""
    r = tp("probe", "--pid", str(target.pid), "probed+5", "a=%di", "--max-hits", "3", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["hits"] == 3 and len(doc["events"]) == 3
    assert doc["event"] == "p_probed_5" and doc["int3_left"] == 0 and doc["target_alive"]
    assert "boosted" in doc["how"] and doc["interrupted"] is False
    a = [int(e["args"]["a"], 16) for e in doc["events"]]
    assert a == list(range(a[0], a[0] + 3))
    assert target.read(target.probed + 5, 7) == bytes.fromhex("488b0d") + target.read(
        target.probed + 8, 4) and target.alive()


@pytest.mark.parametrize("fetch, message", [
    ("%xx", "unknown register"),
    ("v=", "nothing to fetch"),
    ("$bogus", "unknown variable"),
    ("+8(%sp", "cannot parse"),
    ("x=%di:u7", "unknown type"),
    ("1x=%di", "bad name"),
    ("@nosuchsym", "no symbol"),
])
def test_fetcharg_errors_exit_2(target, fetch, message):
    r = tp("probe", "--pid", str(target.pid), "probed", fetch, "--max-hits", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "" and target.read(target.probed) == NOP5


@pytest.mark.parametrize("point, fetch, message", [
    ("probed+2", "%di", "not an instruction boundary"),
    ("probed+5", "$arg1", "only for a probe on a function's entry"),
    ("no_such_function", "%di", "no symbol"),
    ("0x401000", "%di", "give a symbol"),
])
def test_bad_probe_points_exit_2(target, point, fetch, message):
    r = tp("probe", "--pid", str(target.pid), point, fetch, "--max-hits", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert target.read(target.probed, 12) == NOP5 + target.read(target.probed + 5, 7)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_target_alive_and_text_clean(target, sig, code):
    """Signalled after its first hit: exit 130/143, JSON with interrupted,
    int3_left 0 and the hits counted; the target runs on, text as before."""
    before = target.read(target.probed, 16)
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                          str(target.pid), "probed", "%di", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = p.stderr.readline()
    assert said.startswith("textpoke live probe: p_probed_0"), said + p.stderr.read()
    first = p.stderr.readline()          # the command's own word that a hit was seen
    assert first.startswith("textpoke live probe: first hit"), first + p.stderr.read()
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["int3_left"] == 0 and doc["hits"] >= 1
    assert len(doc["events"]) == doc["hits"]
    assert target.alive() and target.read(target.probed, 16) == before


def test_second_int3_of_a_slot_through_the_live_trap_chain(target):
    """A probe with a post-handler is not boosted: its slot ends in a second
    INT3, which the live machine hands to the kprobes client on its chain
    (the single-step stand-in); the function still computes the same."""
    from textpoke.live._probe import LiveProbe
    lp = LiveProbe(target.pid, "probed", ["%di"])
    try:
        lp.arm()
        kp = lp.kernel.kprobes
        posts: list[tuple[int, int]] = []
        q = kp.register_kprobe("probed+0xc", post_handler=lambda p, regs, f: posts.append(
            (regs.gprs["rax"], regs.gprs["rdi"])))
        site = kp._sites[q.addr]
        assert site.slot is not None and not site.boosted
        lp.pump(lambda: len(posts) >= 3)
        # after `mov %rdi,%rax` ran out of line, %rax holds the first argument
        assert all(rax == rdi for rax, rdi in posts)
        assert [a for a, _ in posts[:3]] == list(range(posts[0][0], posts[0][0] + 3))
        assert kp.stats.single_stepped >= 3
    finally:
        left = lp.close()
    assert left["int3_left"] == 0 and left["regions_kept"] == []
    assert target.read(target.probed) == NOP5 and target.read(target.probed + 0xc, 3) == \
        bytes.fromhex("4889f8") and target.alive()


PY_WORK = ("import json, sys, time\nprint('ready', flush=True)\nwhile True:\n"
           "  json.dumps([1, 'x', {'a': 1}])\n  bytearray(300000)\n  time.sleep(0.001)")


@pytest.mark.parametrize("point, fetch", [("PyObject_Hash", "v=%di"),
                                          ("libc.so.6:malloc", "v=%di:u64")])
def test_debian_python3(point, fetch):
    """Debian's /usr/bin/python3 (stripped: .dynsym only) and its libc: a
    function of the executable and one of a shared library far from it."""
    py = "/usr/bin/python3"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3")
    p = subprocess.Popen([py, "-c", PY_WORK], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        r = tp("probe", "--pid", str(p.pid), point, fetch, "--max-hits", "20", "--json")
        if r.returncode == 2 and "no symbol" in r.stderr:
            pytest.skip(f"this python3 has no {point}")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["hits"] == 20 and doc["int3_left"] == 0 and p.poll() is None
        vals = [int(e["args"]["v"], 0) for e in doc["events"]]
        if "malloc" in point:
            assert any(v >= 300000 for v in vals), vals      # the bytearray's buffer
        else:
            assert all(v > 0 for v in vals)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_sigkill_of_the_prober_leaves_the_target_alive(target):
    """SIGKILL cannot be caught: the probe's INT3 was guarded and journaled
    before it was written, so the thread that reaches it waits at the site
    (instead of dying of SIGTRAP) until 'live recover' puts the byte back;
    the target then runs on (a new probe sees its calls).  (The INT3 probe:
    the optimised one's SIGKILL is in test_live_probe_opt.py.)"""
    with open(f"/proc/{target.pid}/maps") as f:
        maps = f.read()
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "probe", "--pid",
                          str(target.pid), "probed", "%di", "--json", "--no-optimize"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr.readline().startswith("textpoke live probe: p_probed_0")
    assert p.stderr.readline().startswith("textpoke live probe: first hit")
    p.kill()
    p.communicate(timeout=60)
    assert target.alive() and target.read(target.probed, 1) == b"\xcc"
    r = tp("recover", "--pid", str(target.pid), "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads(r.stdout)
    assert doc["int3_restored"] == 1 and doc["guard_removed"]
    # the probes' execmem is journaled as a stub region: unmapped once no
    # thread is in its slot (it was kept mapped for good before)
    assert doc["regions_freed"] == 1 and doc["kept"] == []
    with open(f"/proc/{target.pid}/maps") as f:
        assert f.read() == maps                # every page of it (the rescue's too)
    assert target.alive() and target.read(target.probed) == NOP5
    r = tp("probe", "--pid", str(target.pid), "probed", "%di", "--max-hits", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_fetcharg_kinds(target):
    """The other fetch-arg forms and types, and a leading '-' after '--'."""
    r = tp("probe", "--pid", str(target.pid), "--max-hits", "1", "probed", "--",
           "-8(%sp)", "$stack0", "$comm", "sym=+0(%sp):symbol", "b=%si:s16", "lo=%si:u8",
           "\\-5:s64", "@sink", "k=@t:sink", "ip=%ip")
    assert r.returncode == 0, r.stderr
    a = _parse(r.stdout.splitlines()[0])["args"]
    assert a["arg3"] == '"t"' and a["sym"].startswith("main+")
    assert a["b"] == str(0x1234) and a["lo"] == str(0x34) and a["arg7"] == "-5"
    assert a["arg8"] == a["k"] and a["ip"] == hex(target.probed)
    assert int(a["arg2"], 16) > target.probed       # $stack0: the return address, into main
