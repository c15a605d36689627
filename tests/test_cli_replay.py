# SPDX-License-Identifier: GPL-2.0-only
"""A violation's printed replay is exact: it carries every parameter that
shapes the schedule (here a byte-granular fetch view, --line-size 1), is
printed on one line whatever the terminal width, and running it reproduces
the violation, with a kernel-style oops report."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys


def _run(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True,
                          text=True, timeout=600, env=env)


RUN = ("verify", "--scenario", "xline", "--mutation", "no-sync-1", "--line-size", "1",
       "--schedules", "60", "--seed", "3", "--jobs", "1")


def test_printed_replay_reproduces_a_byte_granular_violation():
    p = _run(*RUN, columns=40)
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("replay: ")]
    assert len(lines) == 1, p.stdout            # one line, not wrapped at 40 columns
    argv = shlex.split(lines[0].removeprefix("replay: "))
    assert argv[:2] == ["textpoke", "verify"]
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert opts["--line-size"] == "1" and opts["--mutation"] == "no-sync-1"
    assert opts["--scenario"] == "xline" and opts["--cpus"] == "3"
    assert opts["--strategy"] == "int3"

    first = json.loads(_run(*RUN, "--json").stdout)["first_violation"]
    assert first["seed"] == int(opts["--replay"])
    assert first["replay"]["line_size"] == 1 and first["reproduced"]
    assert first["replay_command"] == lines[0].removeprefix("replay: ")

    again = _run(*argv[1:], "--json")
    assert again.returncode == 1
    r = json.loads(again.stdout)
    assert r["params"] == first["replay"]
    assert r["violations"][0]["kind"] == first["kind"]
    assert r["violations"][0]["detail"] == first["detail"]


def test_replay_prints_the_oops_the_kernel_way_and_the_timeline():
    first = json.loads(_run(*RUN, "--json").stdout)["first_violation"]
    assert first["kind"] == "oops"
    p = _run(*shlex.split(first["replay_command"])[1:], "--trace", columns=40)
    assert p.returncode == 1
    out = p.stdout
    assert "RIP: 0010:" in out and "Code: " in out and "<" in out.split("Code: ")[1]
    assert "replay: " + first["replay_command"] in out.splitlines()
    # the timeline shows the patcher's pokes and the CPUs' INT3s/refills
    assert "patcher poke/int3" in out and "refill" in out
    # behaviour codes are named, not numbered
    assert "old=" in out and '"1"' not in out

    j = json.loads(_run(*shlex.split(first["replay_command"])[1:], "--trace", "--json").stdout)
    assert j["oopses"] and j["oopses"][0]["rip_symbol"] and j["oopses"][0]["code"]
    assert any(e["what"].startswith("poke/") for e in j["timeline"])
    assert all(k in ("old", "new", "not-taken", "wrong-direction", "none") or
               k.startswith("garbage-") for b in j["behaviours"].values() for k in b)


def test_the_line_size_shapes_the_schedule():
    # Why the replay must carry --line-size: a seed that breaks the
    # byte-granular protocol need not break it at the default line size, so
    # a replay that dropped it would run another schedule and find nothing.
    from textpoke.sim import run_schedule, schedule_seeds
    seed = next(sd for sd in schedule_seeds(3, 200)
                if run_schedule("xline", sd, mutation="no-sync-1", line_size=1).violations
                and not run_schedule("xline", sd, mutation="no-sync-1", line_size=64).violations)
    base = ["verify", "--scenario", "xline", "--mutation", "no-sync-1", "--replay", str(seed)]
    assert _run(*base, "--line-size", "1").returncode == 1
    assert _run(*base, "--line-size", "64").returncode == 0
