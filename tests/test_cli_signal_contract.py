# SPDX-License-Identifier: GPL-2.0-only
"""SIGINT and SIGTERM at random moments, to every command run with --json.

Whenever the signal lands -- while argparse runs, while the machine boots,
in a self-test, mid-batch, while the report is written -- the command must
exit 130 (SIGINT) or 143 (SIGTERM), print one valid JSON document, and
that document must say ``int3_left`` 0 (read back from the text) or
``null`` with an ``int3_left_reason`` (no machine text was touched), and
nothing may print a traceback.

A moment is an amount of CPU time the process has used since its signal
handlers went in (seen in /proc/PID/status: SIGTERM caught), so that the
same seed means the same point of the work on a slow machine as on a fast
one; the assertions do not depend on where it lands.  Seeded and
replayable: each case prints ``TEXTPOKE_CONTRACT_SEED=... pytest -k ...``.
The short form (a few moments, every command once) is part of ``make
test``; ``TEXTPOKE_CONTRACT_LONG=1`` tries every command with both signals
at many moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")

LONG = os.environ.get("TEXTPOKE_CONTRACT_LONG") == "1"
SEED = int(os.environ.get("TEXTPOKE_CONTRACT_SEED", "20261206"))
_TICK = os.sysconf("SC_CLK_TCK")

#: every command, with --json, doing enough work to be caught at it
COMMANDS = {
    "demo": ["demo", "--json", "--toggles", "1000000", "--cpus", "2"],
    "demo-short": ["demo", "--json", "--toggles", "2", "--cpus", "2"],
    "verify": ["verify", "--json", "--schedules", "1000000", "--jobs", "2", "--scenario", "call"],
    "boot": ["boot", "--json"],
    "keys": ["keys", "--selftest", "--json", "--cpus", "2"],
    "static-call": ["static-call", "--selftest", "--json", "--cpus", "2"],
    "module": ["module", "--json", "--cpus", "2"],
    "kprobe": ["kprobe", "--selftest", "--json", "--cpus", "2"],
    "ftrace": ["ftrace", "--selftest", "--json", "--cpus", "2", "--duration", "10000000"],
    "ftrace-graph": ["ftrace", "--tracer", "function_graph", "--selftest", "--json", "--cpus",
                     "2", "--duration", "10000000"],
}


#: the longest moment per command (CPU seconds): about its whole run
LAST = {"boot": 0.8, "demo-short": 1.2, "keys": 1.5, "static-call": 1.5, "module": 1.5,
        "kprobe": 1.5}


def _moments(rng: random.Random, n: int, last: float) -> list[float]:
    """CPU seconds after the handlers went in: often within the first
    0.2 s (imports, parsing, the machine's first steps), else up to *last*."""
    return [round(rng.uniform(0, 0.2) if rng.random() < 0.5 else rng.uniform(0.2, last), 3)
            for _ in range(n)]


def _cases() -> list[tuple[str, int, float]]:
    rng = random.Random(SEED)
    cases = []
    for name in COMMANDS:
        if LONG:
            for sig in (signal.SIGINT, signal.SIGTERM):
                cases += [(name, int(sig), m) for m in _moments(rng, 4, LAST.get(name, 3.0))]
        else:
            sig = rng.choice((signal.SIGINT, signal.SIGTERM))
            cases.append((name, int(sig), _moments(rng, 1, LAST.get(name, 3.0))[0]))
    return cases


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _cpu_all(pid: int) -> float:
    """CPU time of *pid* and its children (verify's workers do its work)."""
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
    except (FileNotFoundError, ProcessLookupError):
        pass
    return _cpu(pid) + sum(_cpu(k) for k in kids)


def _handlers_in(pid: int) -> bool:
    """SIGTERM is caught: Python catches SIGINT itself from the start, and
    SIGTERM only once textpoke installed its handlers (both at once)."""
    cgt = _status(pid).get("SigCgt")
    return cgt is not None and bool(int(cgt, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("name, sig, moment", _cases(),
                         ids=[f"{n}-{signal.Signals(s).name}-{m}s" for n, s, m in _cases()])
def test_a_signal_at_any_moment_keeps_the_contract(name, sig, moment, tmp_path):
    argv = COMMANDS[name]
    print(f"replay: TEXTPOKE_CONTRACT_SEED={SEED}{' TEXTPOKE_CONTRACT_LONG=1' if LONG else ''} "
          f"pytest tests/test_cli_signal_contract.py -k '{name}-{signal.Signals(sig).name}-{moment}s'"
          f"   # textpoke {' '.join(argv)}, {signal.Signals(sig).name} after {moment} CPU s")
    out_f, err_f = tmp_path / "out", tmp_path / "err"
    with open(out_f, "w") as fo, open(err_f, "w") as fe:     # files: a full pipe never blocks it
        p = subprocess.Popen([sys.executable, "-m", "textpoke", *argv], stdout=fo, stderr=fe)
    try:
        guard = time.monotonic() + 120        # against a hang, not a measurement
        while not _handlers_in(p.pid):
            assert p.poll() is None, err_f.read_text()
            assert time.monotonic() < guard, "the handlers never went in"
            time.sleep(0.001)
        start = _cpu_all(p.pid)
        while p.poll() is None and _cpu_all(p.pid) - start < moment:
            assert time.monotonic() < guard, "the command never used its CPU time"
            time.sleep(0.002)
        sent = p.poll() is None
        if sent:
            p.send_signal(sig)
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out, err = out_f.read_text(), err_f.read_text()
    if p.returncode in (0, 1) and moment > 0 and not sent:
        # it finished before the moment came: then its own report must hold
        print(f"finished ({p.returncode}) before the moment: its full report is checked")
    else:
        assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    doc = json.loads(out)                     # one valid document, whatever the moment
    assert isinstance(doc, dict)
    assert "int3_left" in doc, sorted(doc)
    if doc["int3_left"] is None:
        assert doc.get("int3_left_reason"), doc
    else:
        assert doc["int3_left"] == 0, doc
    assert doc.get("interrupted") in (True, False), doc


# --- live commands on real processes -------------------------------------------------
# The target is the counting program of tests/live_targets/count (200 fentry
# functions, 4 threads calling them in a hot loop).  After the signal, the
# target must still run, no site may hold an INT3 (``live sites --check``
# exits 0: no stray INT3, nothing a patcher left), and the target's own
# SIGTERM exit (join every thread, write the counts, exit 0) must work.

LIVE_N = 200

#: name -> argv after "live" (PID filled in)
LIVE = {
    "live-sites": ["sites", "--functions", "f0*", "--json"],
    "live-count": ["count", "--functions", "f0*", "--duration", "2", "--json"],
    "live-count-window": ["count", "--functions", "f0*", "--duration", "60", "--json"],
    "live-toggle": ["toggle", "--functions", "f0*", "--to", "call:fentry_ret", "--json"],
    "live-poke": ["poke", "f00007", "e900000000", "--json"],
    "live-recover": ["recover", "--json"],
}
#: moments (CPU s) up to about the whole run of each
LIVE_LAST = {"live-sites": 0.6, "live-count": 0.8, "live-toggle": 0.6, "live-poke": 0.4,
             "live-recover": 0.5, "live-count-window": 0.0}


def _live_cases() -> list[tuple[str, int, float]]:
    rng = random.Random(SEED + 1)
    cases = []
    # make test: two commands that write (each case costs a target and a
    # check: ~5-8 s); the long form: every live command, both signals
    for name in LIVE if LONG else ("live-count-window", "live-toggle"):
        # live-count-window: the signal lands inside the counting window,
        # once the command said the window is open (a state, not a time)
        last = LIVE_LAST[name]
        n = 3 if LONG else 1
        sigs = (signal.SIGINT, signal.SIGTERM) if LONG else (rng.choice((signal.SIGINT,
                                                                          signal.SIGTERM)),)
        for sig in sigs:
            cases += [(name, int(sig), m if last else -1.0) for m in _moments(rng, n, last)]
    return cases


def _live_helpers():
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
    import helpers
    return helpers


@pytest.fixture(scope="module")
def live_exe(tmp_path_factory):
    h = _live_helpers()
    why = h.ptrace_skip_reason()
    if why:
        pytest.skip(why)
    return h.gen.build(LIVE_N, tmp_path_factory.mktemp("live_sig"))


def _tp_live(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *argv], capture_output=True,
                          text=True, timeout=timeout)


def _kill_a_patcher_mid_count(pid: int) -> None:
    """Leave something for recover: a count killed (SIGKILL) inside its window."""
    p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "count", "--pid", str(pid),
                          "--functions", "f0*", "--duration", "60"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said = p.stderr.readline()
        assert said.startswith("textpoke live count: counting for"), said + p.stderr.read()
    finally:
        p.kill()
        p.wait()
        p.stderr.close()


@pytest.mark.parametrize("name, sig, moment", _live_cases(),
                         ids=[f"{n}-{signal.Signals(s).name}-{m}s" for n, s, m in _live_cases()])
def test_a_signal_to_a_live_command_keeps_the_contract_and_the_target(name, sig, moment,
                                                                      live_exe, tmp_path):
    h = _live_helpers()
    with h.Target(live_exe, tmp_path / "counts", mode="busy", threads=4) as t:
        argv = [LIVE[name][0], "--pid", str(t.pid), *LIVE[name][1:]]
        print(f"replay: TEXTPOKE_CONTRACT_SEED={SEED}{' TEXTPOKE_CONTRACT_LONG=1' if LONG else ''}"
              f" pytest tests/test_cli_signal_contract.py -k '{name}-{signal.Signals(sig).name}-"
              f"{moment}s'   # textpoke live {' '.join(argv)}")
        if name == "live-recover":
            _kill_a_patcher_mid_count(t.pid)
            assert t.alive()
        out_f, err_f = tmp_path / "out", tmp_path / "err"
        with open(out_f, "w") as fo, open(err_f, "w") as fe:
            p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", *argv],
                                 stdout=fo, stderr=fe)
        try:
            guard = time.monotonic() + 120        # against a hang, not a measurement
            while not _handlers_in(p.pid):
                assert p.poll() is None, err_f.read_text()
                assert time.monotonic() < guard, "the handlers never went in"
                time.sleep(0.001)
            if moment < 0:                        # inside the window: wait for it to open
                while "counting for" not in err_f.read_text():
                    assert p.poll() is None, err_f.read_text()
                    assert time.monotonic() < guard, "the window never opened"
                    time.sleep(0.002)
            else:
                start = _cpu_all(p.pid)
                while p.poll() is None and _cpu_all(p.pid) - start < moment:
                    assert time.monotonic() < guard, "the command never used its CPU time"
                    time.sleep(0.002)
            sent = p.poll() is None
            if sent:
                p.send_signal(sig)
            p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        out, err = out_f.read_text(), err_f.read_text()
        if p.returncode in (0, 1) and not sent:
            print(f"finished ({p.returncode}) before the moment: its full report is checked")
        else:
            assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
        assert "Traceback" not in err, err[-3000:]
        doc = json.loads(out)
        assert isinstance(doc, dict)
        assert "int3_left" in doc, sorted(doc)
        if doc["int3_left"] is None:
            assert doc.get("int3_left_reason"), doc
        else:
            assert doc["int3_left"] == 0, doc
        assert doc.get("interrupted") in (True, False), doc
        assert t.alive(), "the target died"
        if name == "live-recover" and p.returncode != 0:
            r = _tp_live("recover", "--pid", str(t.pid))     # an interrupted recovery, finished
            assert r.returncode == 0, r.stdout + r.stderr
        chk = _tp_live("sites", "--pid", str(t.pid), "--functions", "f0*", "--check", "--json")
        assert chk.returncode == 0, chk.stdout[-2000:] + chk.stderr
        cdoc = json.loads(chk.stdout)
        assert cdoc["stray_int3"] == 0 and not cdoc["leftovers"], (cdoc["stray_int3"],
                                                                   cdoc["leftovers"])
        assert t.alive(), "the target died"
        assert sum(t.stop()) > 0          # SIGTERM: joins its threads, writes counts, exit 0
