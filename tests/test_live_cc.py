# SPDX-License-Identifier: GPL-2.0-only
"""The live demo's workload and the live rig's loader are built by one
helper (live/_cc.py): a missing gcc and a failed build are one-line
errors of each caller's own class, in its own words."""

import shutil

import pytest

from textpoke.live import _cc
from textpoke.live._demo import LiveDemoError, build_workload
from textpoke.live._rig import LiveRigError, build_loader


@pytest.mark.parametrize("build, error, words", [
    (build_workload, LiveDemoError, "the live demo builds its workload with gcc"),
    (build_loader, LiveRigError, "the live client rig builds its loader with gcc"),
])
def test_no_gcc_is_a_clear_error_of_the_callers_class(build, error, words, tmp_path,
                                                      monkeypatch):
    monkeypatch.setattr(_cc.shutil, "which", lambda name: None)
    with pytest.raises(error, match=words + r".*\(apt install gcc\)"):
        build(tmp_path)
    assert list(tmp_path.iterdir()) == []         # nothing written before the check


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_failed_build_says_gccs_words(tmp_path):
    with pytest.raises(LiveRigError, match=r"(?s)building the thing failed:\n.*error"):
        _cc.build_c(tmp_path, "x.c", "int main(void) { return nosuch; }\n", "x", ["-O1"],
                    error=LiveRigError, user="u", thing="t", product="thing")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_loader_builds(tmp_path):
    exe = build_loader(tmp_path)
    assert exe == tmp_path / "client_loader" and exe.stat().st_mode & 0o111
