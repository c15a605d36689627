# SPDX-License-Identifier: GPL-2.0-only
"""SIGINT and SIGTERM on real processes: ``demo`` and ``verify`` exit 130
(143), report what ran so far, and with --json emit a valid document with
``"interrupted": true`` and ``"int3_left"`` counted by reading the text back.

The signal is sent once the process has been working for a while, judged by
the CPU time it (and its workers) have used -- not by a wall-clock delay --
so that it lands in the middle of the work on a slow machine as on a fast one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return kids


def _start(*args: str, group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "textpoke", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)


def _wait_busy(p: subprocess.Popen, cpu_seconds: float, workers: int = 0) -> list[int]:
    """Wait until *p* (with *workers* child processes) has used *cpu_seconds*
    of CPU; return the children's pids."""
    deadline = time.monotonic() + 300          # a guard against hanging, not a measurement
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        kids = _children(p.pid)
        if len(kids) >= workers and \
                _cpu_seconds(p.pid) + sum(_cpu_seconds(k) for k in kids) >= cpu_seconds:
            return kids
        time.sleep(0.05)
    raise AssertionError("the command never got going")


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = []
        for k in pids:
            try:
                with open(f"/proc/{k}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(k)
            except FileNotFoundError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_demo_interrupted(sig, code):
    p = _start("demo", "--json", "--toggles", "1000000", "--cpus", "3")
    _wait_busy(p, 2.0)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    d = json.loads(out)
    assert d["interrupted"] is True and d["int3_left"] == 0
    assert 0 < d["toggles_done"] < d["toggles"] == 1_000_000
    assert d["batches"] >= d["toggles_done"] and d["params"]["cpus"] == 3
    assert d["final_ok"] is None                       # not checked: it did not finish
    assert d["oopses"] == 0 and d["misbehaviours"] == 0
    # every site reads old or new bytes
    for s in d["sites"]:
        assert s["now"] in (s["old"], s["new"]), s
    assert "interrupted after" in err and "Traceback" not in err


def test_demo_interrupted_human_output():
    p = _start("demo", "--toggles", "1000000", "--cpus", "2", "--no-boot")
    _wait_busy(p, 2.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert "(interrupted)" in out and "INT3s of ours left 0" in out
    assert "Traceback" not in err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_verify_interrupted_with_workers(sig, code):
    p = _start("verify", "--json", "--schedules", "1000000", "--jobs", "2",
               "--scenario", "xline", "--mutation", "no-sync-1")
    kids = _wait_busy(p, 3.0, workers=2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    d = json.loads(out)
    assert d["interrupted"] is True and d["int3_left"] == 0
    assert 0 < d["schedules"] < d["planned"] == 1_000_000
    assert d["by_scenario"]["xline"]["schedules"] == d["schedules"]
    assert d["params"]["mutation"] == "no-sync-1" and d["params"]["seed"] == 0
    # what completed is reported: this mutation breaks xline often enough
    assert d["violations"] > 0 and d["first_violation"]["replay_command"]
    assert "Traceback" not in err
    assert _gone(kids), "worker processes outlived the command"


def test_verify_ctrl_c_to_the_whole_process_group():
    # A terminal's Ctrl-C reaches the workers too: they ignore it, the parent
    # decides, and the report is still whole.
    p = _start("verify", "--json", "--schedules", "1000000", "--jobs", "2", "--scenario", "call",
               group=True)
    kids = _wait_busy(p, 3.0, workers=2)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    d = json.loads(out)
    assert d["interrupted"] is True and d["int3_left"] == 0 and d["schedules"] > 0
    assert d["violations"] == 0
    assert _gone(kids)


def test_verify_interrupted_in_process():
    p = _start("verify", "--json", "--schedules", "1000000", "--jobs", "1", "--scenario", "multi")
    _wait_busy(p, 2.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    d = json.loads(out)
    assert d["interrupted"] is True and d["int3_left"] == 0 and 0 < d["schedules"] < d["planned"]


def test_a_signal_while_a_report_is_written_is_not_forgotten_when_work_resumes():
    """demo writes its toggling report with signals only recorded, then runs
    its clients: the recorded signal must stop them (it used to be reset
    by re-installing the handlers, and the clients ran on to exit 0)."""
    code = textwrap.dedent("""
        import os, signal
        from textpoke.cli import _signals
        _signals.install()
        _signals.reporting()
        os.kill(os.getpid(), signal.SIGTERM)      # recorded, not raised
        assert _signals.arrived() == signal.SIGTERM
        try:
            _signals.resume()
        except _signals.Terminated:
            print("raised")
        else:
            print("forgotten")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "raised", (p.stdout, p.stderr)


def test_ctrl_c_while_the_handlers_go_in_is_reported_not_a_traceback(monkeypatch, capsys):
    """A SIGINT that lands while main() is still installing its handlers
    (Python's own KeyboardInterrupt, before ours exist) keeps the contract:
    130, and the fallback document under --json."""
    import json as _json

    from textpoke import cli
    from textpoke.cli import _signals

    def interrupted() -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(_signals, "install", interrupted)
    code = cli.main(["boot", "--json"])
    out, err = capsys.readouterr()
    assert code == 130
    doc = _json.loads(out)
    assert doc["interrupted"] is True and doc["int3_left"] is None and doc["int3_left_reason"]
    assert "Traceback" not in err and "interrupted before any work was done" in err
