# SPDX-License-Identifier: GPL-2.0-only
"""Exhaustive exploration: within its bound every interleaving is tried, so
each removed step of the protocol is caught for certain, with a shortest
counterexample that replays action by action; the INT3 protocol is clean
in every interleaving; an interrupted exploration resumes from its state
file to the same result."""

import json
import subprocess
import sys

import pytest

from textpoke.verify._explore import parse_bound
from textpoke.verify import Bound, explore, replay_path

ONE = Bound(cpus=2, execs=1, refills=1)
NO_EVICT = Bound(cpus=2, execs=1, refills=0)


@pytest.mark.parametrize("scenario,mutation,bound,kind", [
    ("call-xline", "no-sync-1", ONE, "mixed"),
    ("nop5-jmp32", "no-sync-3", NO_EVICT, "oops"),
    ("xline", "unordered", NO_EVICT, "oops"),
    ("int3-entry", "no-refs-wait", Bound(cpus=1, execs=2, refills=0), "oops"),
])
def test_each_mutation_is_caught_with_a_shortest_replayable_path(scenario, mutation, bound, kind):
    r = explore(scenario, mutation=mutation, bound=bound)
    assert r.violation is not None and r.violation["kind"] == kind, r.violation
    again = replay_path(scenario, tuple(r.path), mutation=mutation, bound=bound)
    assert again["violation"] == r.violation
    # shortest: no path one action shorter ends in a violation (BFS: all were explored)
    assert again["steps"][-1] == r.path[-1]


def test_naive_writes_are_caught_at_once():
    r = explore("nop5-jmp32", strategy="naive", bound=ONE)
    assert r.violation["kind"] == "mixed" and len(r.path) <= 4


def test_int3_protocol_is_clean_in_every_interleaving_within_the_bound():
    r = explore("nop5-jmp32", bound=NO_EVICT)
    assert r.complete and r.violation is None
    assert r.states > 500 and r.interleavings > r.states


def test_an_interrupted_exploration_resumes_from_its_state_file(tmp_path):
    b = Bound(cpus=1, execs=1, refills=1)
    full = explore("call-xline", bound=b)
    state = tmp_path / "x.json"

    def stop(d):
        if d["depth"] == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        explore("call-xline", bound=b, state_file=state, progress=stop)
    assert json.loads(state.read_text())["depth"] == 5
    resumed = explore("call-xline", bound=b, state_file=state)
    assert (resumed.states, resumed.edges, resumed.interleavings, resumed.complete) == \
        (full.states, full.edges, full.interleavings, True)
    with pytest.raises(ValueError):        # another exploration's file is refused
        explore("call-xline", bound=Bound(cpus=1, execs=2, refills=1), state_file=state)


def test_bound_parsing():
    assert parse_bound("cpus=3,execs=2,refills=0,line=16") == Bound(3, 2, 0, 16)
    for bad in ("cpus=9", "line=3", "nope=1", "execs=x"):
        with pytest.raises(ValueError):
            parse_bound(bad)


def test_cli_reports_and_replays_a_counterexample():
    base = [sys.executable, "-m", "textpoke", "verify", "--exhaustive", "--scenario",
            "call-xline", "--mutation", "no-sync-1", "--bound", "cpus=2,execs=1,refills=1"]
    p = subprocess.run(base + ["--json"], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    d = json.loads(p.stdout)
    assert d["violation"]["kind"] == "mixed" and "--path" in d["replay_command"]
    q = subprocess.run(base + ["--path", " ".join(d["path"])], capture_output=True, text=True)
    assert q.returncode == 1 and "violation: mixed" in q.stdout
    r = subprocess.run(base[:-4] + ["--scenario", "multi"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
