# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke boot``: JSON and human output, --disasm, --debug-alternative,
and clean refusals (exit 2, no traceback) for bad features and symbols."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke import cli

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "textpoke", "boot", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_boot_json():
    p = _run("--json", "--cpus", "1", "--cpu-features", "erms,fsrm,popcnt")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["uniproc_patched"] and out["ncpus"] == 1
    assert set(out["features"]) == {"always", "erms", "fsrm", "popcnt"}
    assert [t["name"] for t in out["selftests"]] == ["int3_selftest", "alt_reloc_selftest"]
    assert all(t["passed"] for t in out["selftests"])
    counts = out["counts"]
    assert counts[".altinstructions"]["entries"] == len(out["alternatives"]) >= 50
    assert counts[".smp_locks"]["patched"] == counts[".smp_locks"]["entries"] > 0
    site = next(a for a in out["alternatives"] if a["symbol"] == "alt_probe_erms")
    assert site["taken"] and site["old"] == "b801000000" and site["final"] == "b802000000"
    assert "debug_alternative" not in out


def test_boot_disasm_before_and_after():
    p = _run("--json", "--disasm", "alt_probe_jmp_shrink", "--disasm", "alt_call_nop")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)["disasm"]
    shrink = d["alt_probe_jmp_shrink"]
    before = [i["text"] for i in shrink["before"]]
    after = [i["text"] for i in shrink["after"]]
    assert before[0].startswith("mov") and before[1] == "nop"
    assert after[1].startswith("jmp") and after[2] == "int3"
    assert [i["text"] for i in d["alt_call_nop"]["before"]][1].startswith("call")
    assert "nop" in [i["text"].split()[0] for i in d["alt_call_nop"]["after"]][1]


def test_boot_debug_alternative_mask():
    p = _run("--json", "--debug-alternative=0x10")
    assert p.returncode == 0, p.stderr
    recs = json.loads(p.stdout)["debug_alternative"]
    assert recs and {r["kind"] for r in recs} == {"smp"}


def test_boot_human_output(capsys):
    rc = cli.main(["boot", "--cpus", "2", "--cpu-features", "xenpv,retpoline",
                   "--disasm", "alt_probe_nested2", "--debug-alternative", "alt"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("alternatives (.altinstructions", "retpoline sites", "tables",
                 "alt_probe_nested2 before patching", "alt_probe_nested2 after patching",
                 "int3_selftest: passed", "alt_reloc_selftest: passed",
                 "SMP lock prefixes: left as LOCK", "SMP alternatives: feat:"):
        assert text in out, text


@pytest.mark.parametrize("args, message", [
    (("--cpu-features", "erms,warp_drive"), "unknown CPU feature 'warp_drive'"),
    (("--disasm", "no_such_function"), "unknown symbol 'no_such_function'"),
    (("--cpus", "0"), "argument --cpus: must be from 1..64, got 0"),
    (("--cpus", "65"), "argument --cpus: must be from 1..64, got 65"),
])
def test_boot_refuses_cleanly(args, message):
    p = _run(*args)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr and not p.stdout
    assert len(p.stderr.splitlines()) == 1


def test_boot_lists_features():
    p = _run("--cpu-features", "list", "--json")
    assert p.returncode == 0
    feats = json.loads(p.stdout)["features"]
    assert feats["erms"] == "9*32+9" and "xenpv" in feats
