# SPDX-License-Identifier: GPL-2.0-only
"""The command line, as a program would use it."""

import json
import subprocess
import sys



def run(*args):
    p = subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_demo_json():
    rc, out, err = run("demo", "--cpus", "4", "--toggles", "60", "--seed", "5", "--json")
    assert rc == 0, err
    d = json.loads(out)
    for key in ("cpus", "toggles", "int3_emulated", "syncs", "pokes", "oopses"):
        assert key in d
    assert d["cpus"] == 4 and d["toggles"] == 60 and d["oopses"] == 0
    assert d["syncs"] == 180 and d["pokes"] == 60 * 7
    assert d["misbehaviours"] == 0 and d["final_ok"]
    # the demo's machine is the booted kernel image, not a bare loop
    assert d["boot"]["image"] == "kernel.elf"
    assert all(d["boot"]["selftests"].values())
    assert d["boot"]["patched"][".altinstructions"]["taken"] > 0


def test_demo_human_output():
    rc, out, _ = run("demo", "--toggles", "10")
    assert rc == 0
    assert "oopses 0" in out and "nop2_jmp8" in out


def test_verify_list():
    rc, out, _ = run("verify", "--list", "--json")
    d = json.loads(out)
    assert set(d["mutations"]) == {"no-sync-1", "no-sync-2", "no-sync-3", "no-refs-wait", "unordered"}
    assert "xline" in d["scenarios"] and "int3-entry" in d["scenarios"]


def test_verify_json_clean_and_violating():
    rc, out, _ = run("verify", "--scenario", "call", "--schedules", "5", "--json", "--jobs", "1")
    d = json.loads(out)
    assert rc == 0 and d["schedules"] == 5 and d["violations"] == 0
    assert d["first_violation"] is None and d["interrupted"] is False and d["int3_left"] == 0
    # the run's parameters and base seed are always there
    assert d["params"] == {"scenarios": ["call"], "strategy": "int3", "mutation": None, "cpus": 3,
                           "line_size": 64, "schedules": 5, "seed": 0}
    rc, out, _ = run("verify", "--scenario", "multi", "--schedules", "5", "--mutation", "unordered",
                     "--json", "--jobs", "1", "--seed", "9")
    d = json.loads(out)
    assert rc == 1 and d["violations"] > 0 and d["base_seed"] == 9
    fv = d["first_violation"]
    assert fv["kind"] == "oops" and isinstance(fv["seed"], int) and fv["reproduced"]
    assert fv["replay"] == {"scenario": "multi", "strategy": "int3", "mutation": "unordered",
                            "cpus": 3, "line_size": 64, "seed": fv["seed"]}
    assert fv["oops"] and fv["oops"]["cpu"] in (0, 1, 2)
    rc, out, _ = run("verify", "--scenario", "multi", "--mutation", "unordered", "--replay",
                     str(fv["seed"]), "--json")
    r = json.loads(out)
    assert rc == 1 and r["violations"] and r["violations"][0]["detail"] == fv["detail"]
    assert r["oopses"] and r["params"] == fv["replay"]
