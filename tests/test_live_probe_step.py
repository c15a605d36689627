# SPDX-License-Identifier: GPL-2.0-only
"""``live probe`` refuses, by default, a point whose instruction the kprobes
rules would single-step out of line.

Such a hit runs the instruction's copy in the client's slot and then traps on
the slot's second INT3, which only the prober handles: a SIGKILL of the
prober while a thread is between the two leaves that thread to die of the
INT3 (the target's SIGTRAP guard knows the probe points, not the slots).
So the point is refused with one line and exit 2, nothing written, unless
the user accepts the risk with ``--allow-single-step``.

The target's ``probed`` starts with ``67 8d 04 37`` (``lea (%edi,%esi),%eax``:
an address-size prefix, which the kprobes rules do not boost); its threads
check every result and abort on a wrong one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402
from livetest import build_c, live_cli  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <unistd.h>
asm(".text\n.globl probed\n.type probed,@function\nprobed:\n"
    ".byte 0x67,0x8d,0x04,0x37\nret\n.size probed,.-probed\n");
long probed(long a, long b);
static void *work(void *x)
{
	unsigned long i = 0;
	for (;;) {
		long r = probed(i, 0x1234);
		if ((unsigned long)r != (unsigned)(i + 0x1234))
			abort();
		if (!(++i & 255))
			usleep(100);
	}
	return x;
}
int main(void)
{
	pthread_t t[3];
	for (int k = 0; k < 3; k++)
		pthread_create(&t[k], 0, work, 0);
	printf("ready %p\n", (void *)&probed);
	fflush(stdout);
	work(0);
}
"""


@pytest.fixture
def target(tmp_path):
    build_c(tmp_path, SOURCE, forms={"t": ()})
    p = subprocess.Popen([str(tmp_path / "t")], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line[0] == "ready"
    try:
        yield p, int(line[1], 16)
    finally:
        p.kill()
        p.wait()


def _text(pid: int, addr: int, n: int = 5) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr)
        return f.read(n)


def test_a_point_that_would_be_single_stepped_is_refused_with_nothing_written(target):
    p, addr = target
    before, maps = _text(p.pid, addr), Path(f"/proc/{p.pid}/maps").read_text()
    r = live_cli("probe", "--pid", str(p.pid), "probed", "--duration", "0.3")
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "single-stepped out of line" in err[0] and \
        "--allow-single-step" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert _text(p.pid, addr) == before == bytes.fromhex("678d0437c3")
    assert Path(f"/proc/{p.pid}/maps").read_text() == maps
    assert p.poll() is None


def test_allow_single_step_probes_it_and_the_results_stay_right(target):
    p, addr = target
    r = live_cli("probe", "--pid", str(p.pid), "probed", "%di", "--allow-single-step",
                 "--max-hits", "200", "--duration", "20", "--json")
    assert r.returncode == 0, (r.returncode, r.stderr)
    import json
    doc = json.loads(r.stdout)
    assert doc["hits"] == 200 and doc["int3_left"] == 0
    assert doc["how"].startswith("single-stepped out of line"), doc["how"]
    assert _text(p.pid, addr) == bytes.fromhex("678d0437c3")
    assert p.poll() is None          # every result the threads checked was right
