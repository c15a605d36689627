# SPDX-License-Identifier: GPL-2.0-only
"""``demo`` interrupted at each of its steps, on a big sim machine and on the
live machine.

Two reports from the field, once each: ``demo --machine live`` hung after a
SIGINT with its workload process left running, and ``demo --cpus 64`` lost a
SIGINT and ran ten more minutes.  Here the demo is interrupted right after
each step it announces on stderr (``textpoke demo: booted``, ``attached to
pid P``, ``toggled 1 of N``, ...) -- the test waits for the line, not for a
time -- and must exit 130/143 with one valid JSON document saying
``"interrupted": true`` and ``"int3_left": 0``; on the live machine the
workload process must be gone when the demo has exited (killed and reaped
by it, never left running).

``make test`` tries one step of each; ``TEXTPOKE_CONTRACT_LONG=1`` every step
with both signals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

LONG = os.environ.get("TEXTPOKE_CONTRACT_LONG") == "1"
GUARD = 600          # seconds: against a hang (the failure looked for), not a measurement

SIM_STEPS = ["machine built", "booted", "toggling every site", "toggled 1 of", "toggled 2 of",
             "toggled 8 of"]
LIVE_STEPS = ["workload running", "attached to pid", "toggling every site", "toggled 1 of",
              "toggled 64 of"]


def _cases(steps: list[str], short: str) -> list[tuple[str, int]]:
    if LONG:
        return [(s, int(sig)) for s in steps for sig in (signal.SIGINT, signal.SIGTERM)]
    return [(short, int(signal.SIGINT))]


def _interrupt_at(argv: list[str], step: str, sig: int, tmp_path,
                  json_out: bool = True) -> tuple[int, dict | str, str]:
    out_f, err_f = tmp_path / "out", tmp_path / "err"
    with open(out_f, "w") as fo, open(err_f, "w") as fe:    # files: a full pipe never blocks it
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "demo", *argv]
                             + (["--json"] if json_out else []), stdout=fo, stderr=fe)
    try:
        guard = time.monotonic() + GUARD
        while f"textpoke demo: {step}" not in err_f.read_text():
            assert p.poll() is None, f"exited {p.returncode} before {step!r}:\n{err_f.read_text()}"
            assert time.monotonic() < guard, f"never reached {step!r}"
            time.sleep(0.002)
        p.send_signal(sig)
        try:
            p.wait(timeout=GUARD)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {GUARD} s after {signal.Signals(sig).name} at "
                                 f"{step!r} (a lost signal, or a hang):\n"
                                 + err_f.read_text()[-2000:]) from None
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err_f.read_text()
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    if not json_out:
        return p.returncode, out_f.read_text(), err
    doc = json.loads(out_f.read_text())
    assert doc["interrupted"] is True, doc
    if doc["int3_left"] is None:
        assert doc.get("int3_left_reason"), doc
    else:
        assert doc["int3_left"] == 0, doc
    return p.returncode, doc, err


@pytest.mark.parametrize("step, sig", _cases(SIM_STEPS, "toggled 1 of"),
                         ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_demo_on_64_vcpus_interrupted_at_each_step(step, sig, tmp_path):
    _, doc, _ = _interrupt_at(["--cpus", "64", "--toggles", "1000000"], step, sig, tmp_path)
    if step.startswith("toggled"):
        n = int(step.split()[1])
        assert n <= doc["toggles_done"] < 1000000, doc["toggles_done"]


CLIENT_STEPS = ["report written", "client static keys", "client static calls", "client modules",
                "client ftrace", "client kprobes"]


@pytest.mark.parametrize("step, sig", _cases(CLIENT_STEPS, "report written"),
                         ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_demo_clients_part_interrupted_at_each_step(step, sig, tmp_path):
    """Without --json the demo goes on to the clients after its toggling
    report.  A signal while that report was written (signals only recorded
    then) used to be forgotten when the clients' part put the handlers back
    in: the clients ran to the end and the demo exited 0."""
    _, out, err = _interrupt_at(["--cpus", "64", "--toggles", "2"], step, sig, tmp_path,
                                json_out=False)
    assert "textpoke demo" in out                 # the toggling report is there, whole
    assert "interrupted" in err, err[-1000:]


def _live_skip() -> str | None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the live machine needs Linux on x86-64"
    if shutil.which("gcc") is None:
        return "gcc builds the live workload"
    from textpoke.live import ptrace_permitted
    ok, why = ptrace_permitted()
    return None if ok else f"ptrace is not permitted here: {why}"


@pytest.mark.skipif(_live_skip() is not None, reason=_live_skip() or "")
@pytest.mark.parametrize("step, sig", _cases(LIVE_STEPS, "attached to pid"),
                         ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_demo_on_the_live_machine_interrupted_at_each_step(step, sig, tmp_path):
    _, doc, err = _interrupt_at(["--machine", "live", "--toggles", "1000000"], step, sig,
                                tmp_path)
    pid = int(re.search(r"workload running: pid (\d+)", err).group(1))
    # the demo killed and reaped its workload before it exited: not running,
    # not a zombie left to init
    assert not os.path.exists(f"/proc/{pid}"), open(f"/proc/{pid}/status").read()[:300]
