# SPDX-License-Identifier: GPL-2.0-only
"""The protocol under seeded schedules: the INT3 batch never misbehaves;
writing straight over live code does; and every step of the protocol is
needed -- removing any one of them produces a violation that replays
from its seed."""

import pytest

from textpoke.lowlevel import MUTATIONS
from textpoke.sim._verify import SCENARIOS, run_schedule, verify


def test_int3_protocol_has_no_violations():
    rep = verify(list(SCENARIOS), 25, seed=11)
    assert rep.schedules == 25 * len(SCENARIOS)
    assert rep.violating_schedules == 0, rep.first
    assert rep.int3_emulated > 0


def test_int3_protocol_with_byte_granular_fetch():
    rep = verify(["xline", "multi", "jcc32"], 15, seed=5, line_size=1)
    assert rep.violating_schedules == 0, rep.first


def test_naive_writes_break_visibly():
    rep = verify(list(SCENARIOS), 25, seed=11, strategy="naive")
    share = rep.violating_schedules / rep.schedules
    assert share > 0.1, rep.by_scenario
    assert rep.violations_by_kind.get("oops", 0) + rep.violations_by_kind.get("mixed", 0) > 0


# Where each removed step shows itself (see the scenario descriptions).
WHERE = {
    "no-sync-1": ["xline"],
    "no-sync-2": ["xline"],
    "no-sync-3": ["nop2-jmp8", "call"],
    "no-refs-wait": ["int3-entry"],
    "unordered": ["multi"],
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_is_caught_and_replays_from_its_seed(mutation):
    rep = verify(WHERE[mutation], 400, seed=2024, mutation=mutation, stop_at_first=True)
    assert rep.first is not None, f"{mutation}: no violation in {rep.schedules} schedules"
    v = rep.first
    again = run_schedule(v.scenario, v.seed, mutation=mutation)
    assert again.violations and again.violations[0] == v


def test_mutations_only_break_the_scenarios_that_need_them():
    # The same seeds without the mutation are clean: the violation is the
    # missing step's doing, not the scenario's.
    rep = verify(["xline", "int3-entry", "multi"], 20, seed=2024)
    assert rep.violating_schedules == 0


def test_verify_refuses_unknown_names():
    with pytest.raises(ValueError):
        verify(["nope"], 1)
    with pytest.raises(ValueError):
        verify(["call"], 1, mutation="no-sync-9")
    with pytest.raises(ValueError):
        verify(["call"], 1, strategy="naive", mutation="no-sync-1")


def test_parallel_and_serial_reports_agree():
    a = verify(["call", "xline"], 30, seed=3, strategy="naive")
    b = verify(["call", "xline"], 30, seed=3, strategy="naive", jobs=2)
    assert a.as_dict() == b.as_dict()
