# SPDX-License-Identifier: GPL-2.0-only
"""The survival campaign as an opt-in test: ``kill -9`` of ``live toggle``
/ ``live count`` at random moments on a busy 4-thread target with 10,000
fentry sites, then ``live recover`` (bench/bench_live_survival.py's runs,
fewer of them).

    TEXTPOKE_SURVIVAL=1 pytest tests/test_live_survival_campaign.py

runs 5 kills (``TEXTPOKE_SURVIVAL_RUNS=N`` for more, ``TEXTPOKE_SURVIVAL_SEED``
to replay); each costs some 10 s, so it is not part of ``make test``.  Every
run must leave the target alive, ``recover`` exiting 0, no stray byte at
any site, no mapping and no journal left, and the target answering."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import gen, ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = [
    pytest.mark.skipif(_skip is not None, reason=_skip or ""),
    pytest.mark.skipif(os.environ.get("TEXTPOKE_SURVIVAL") != "1",
                       reason="opt-in, some 10 s a kill: TEXTPOKE_SURVIVAL=1"),
]

RUNS = int(os.environ.get("TEXTPOKE_SURVIVAL_RUNS", "5"))
SEED = int(os.environ.get("TEXTPOKE_SURVIVAL_SEED", "5"))
SITES = 10_000


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_live_survival.py"
    spec = importlib.util.spec_from_file_location("bench_live_survival", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("survival")
    return _bench(), gen.build(SITES, tmp), tmp, random.Random(SEED)


@pytest.mark.parametrize("i", range(RUNS))
def test_target_outlives_a_killed_patcher(campaign, i):
    bench, exe, tmp, rng = campaign
    r = bench.one_run(exe, tmp, rng, i)
    what = f"{r['cmd']} killed {r.get('delay', 0):.3f}s after attaching, left {r['left']}"
    assert r["alive"], f"{what}: " + "; ".join(r["why"])
    assert r["recover_rc"] == 0, f"{what}: " + "; ".join(r["why"])
    assert r["stray_sites"] == 0 and r["stray_bytes"] == 0, f"{what}: " + "; ".join(r["why"])
    assert r["leaked_maps"] == 0 and not r["journal_left"], f"{what}: " + "; ".join(r["why"])
    assert r["answers"], f"{what}: " + "; ".join(r["why"])
