# SPDX-License-Identifier: GPL-2.0-only
"""Old seeds replay exactly: every schedule in tests/data/verify_replays.json
was recorded with the code as it was before schedules got faster (machine
reuse, fewer Python steps); each must give the same verdict, the same
counters and the same timeline, event for event (hashed), today.

Regenerate (only when a schedule's meaning changes on purpose, and say so in
the commit):  python tests/test_verify_replays.py --regen
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from textpoke.sim import run_schedule, schedule_seeds

DATA = Path(__file__).parent / "data" / "verify_replays.json"

OLD_SCENARIOS = ("nop2-jmp8", "nop5-jmp32", "call", "ret-jmp32", "jcc32", "xline", "multi",
                 "int3-entry")
#: where each mutation shows itself (as in test_verify.WHERE), with seeds
#: known to be caught among them
MUTATION_CASES = {
    "no-sync-1": ("xline", [1304602151, 2140188135, 7]),
    "no-sync-2": ("xline", [780421486, 3698977000, 8]),
    "no-sync-3": ("call", [1304602151, 3252222657, 6]),
    "no-refs-wait": ("int3-entry", [1761317079, 3252222657, 11]),
    "unordered": ("multi", [2019024262, 780421486, 15]),
}


def cases() -> list[dict]:
    out = []
    for scn in OLD_SCENARIOS:
        for strategy in ("int3", "naive"):
            for seed in schedule_seeds(11, 2):
                out.append({"scenario": scn, "seed": seed, "strategy": strategy,
                            "mutation": None, "cpus": 3, "line_size": 64})
    for mut, (scn, seeds) in MUTATION_CASES.items():
        for seed in seeds:
            out.append({"scenario": scn, "seed": seed, "strategy": "int3", "mutation": mut,
                        "cpus": 3, "line_size": 64})
    out.append({"scenario": "xline", "seed": 3, "strategy": "naive", "mutation": None,
                "cpus": 2, "line_size": 1})
    out.append({"scenario": "jcc32", "seed": 7, "strategy": "int3", "mutation": None,
                "cpus": 2, "line_size": 16})
    return out


def observe(case: dict, **kw) -> dict:
    r = run_schedule(case["scenario"], case["seed"], strategy=case["strategy"],
                     mutation=case["mutation"], ncpus=case["cpus"], line_size=case["line_size"],
                     trace=True, **kw)
    d = r.as_dict()
    tl = d.pop("timeline")
    return {"verdict": [[v["kind"], v["detail"]] for v in d["violations"]],
            "steps": r.steps, "int3_emulated": r.int3_emulated, "syncs": r.syncs,
            "int3_left": r.int3_left,
            "result_sha256": hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest(),
            "timeline_sha256": hashlib.sha256(json.dumps(tl, sort_keys=True, default=repr)
                                              .encode()).hexdigest()}


def _recorded() -> list[dict]:
    return json.loads(DATA.read_text())["schedules"]


@pytest.mark.parametrize("rec", _recorded() if DATA.exists() else [],
                         ids=lambda r: f"{r['case']['scenario']}-{r['case']['strategy']}-"
                                       f"{r['case']['mutation']}-{r['case']['seed']}")
def test_old_seed_replays_the_same(rec):
    assert observe(rec["case"]) == rec["observed"]


def test_old_seeds_replay_the_same_on_reused_machines():
    # One pooled machine per configuration runs every recorded schedule, in
    # order and then in reverse: each restore must leave no trace of the last.
    from textpoke.sim._verify import release_pool

    recs = _recorded()
    try:
        for rec in recs + recs[::-1]:
            assert observe(rec["case"], reuse=True) == rec["observed"], rec["case"]
    finally:
        release_pool()


def test_fast_forward_changes_no_schedule(monkeypatch):
    # Seeds not in the fixture, every scenario, strategy and mutation, and
    # other CPU counts and line sizes: one by one or fast-forwarded, the
    # same verdict, counters and timeline.
    from textpoke.lowlevel import MUTATIONS
    from textpoke.sim import _schedule as V

    ways = [("int3", None), ("naive", None)] + [("int3", m) for m in MUTATIONS]
    out = []
    for i, scn in enumerate(V.SCENARIOS):
        for j, (strategy, mut) in enumerate(ways):
            cpus, ls = ((3, 64), (2, 16), (4, 1))[(i + j) % 3]
            for seed in schedule_seeds(1000 + 7 * i + j, 1):
                case = {"scenario": scn, "seed": seed, "strategy": strategy, "mutation": mut,
                        "cpus": cpus, "line_size": ls}
                monkeypatch.setattr(V, "FAST_FORWARD", False)
                slow = observe(case)
                monkeypatch.setattr(V, "FAST_FORWARD", True)
                assert observe(case) == slow, case
                out.append(bool(slow["verdict"]))
    assert any(out) and not all(out)


def test_the_fixture_has_teeth():
    recs = _recorded()
    assert len(recs) >= 40
    # it holds violating and clean schedules, and every mutation is caught at least once
    assert any(r["observed"]["verdict"] for r in recs)
    assert any(not r["observed"]["verdict"] for r in recs)
    caught = {r["case"]["mutation"] for r in recs if r["observed"]["verdict"]}
    assert {m for m in MUTATION_CASES} <= caught, caught


if __name__ == "__main__" and sys.argv[1:] == ["--regen"]:
    recs = [{"case": c, "observed": observe(c)} for c in cases()]
    DATA.write_text(json.dumps({"about": "seed -> verdict and hashes, recorded before the "
                                "verify speed-up (see test_verify_replays.py)",
                                "schedules": recs}, indent=1) + "\n")
    print(f"{len(recs)} schedules recorded, "
          f"{sum(1 for r in recs if r['observed']['verdict'])} violating")
