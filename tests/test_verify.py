# SPDX-License-Identifier: GPL-2.0-only
"""The protocol under seeded schedules: the INT3 batch never misbehaves;
writing straight over live code does; and every step of the protocol is
needed -- removing any one of them produces a violation that replays
from its seed."""

import pytest

from textpoke.lowlevel import MUTATIONS
from textpoke.sim import SCENARIOS, run_schedule, verify


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


def test_verify_streams_and_stops_cleanly_when_interrupted():
    # 10**9 schedules per scenario: only a lazy, bounded pipeline gets to the
    # first progress callback; the interrupt keeps what completed.
    from textpoke.sim import VerifyReport

    for jobs in (1, 2):
        rep = VerifyReport()
        seen = []

        def progress(done, total):
            seen.append((done, total))
            if done >= 40:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            verify(["call", "xline"], 10**9, seed=4, jobs=jobs, progress=progress, report=rep)
        assert rep.interrupted and rep.int3_left == 0
        assert seen[0][1] == 2 * 10**9 == rep.planned
        assert 40 <= rep.schedules < 1000
        assert rep.by_scenario["call"]["schedules"] == rep.schedules   # in order: call first
        assert rep.as_dict()["params"] == {"scenarios": ["call", "xline"], "strategy": "int3",
                                           "mutation": None, "cpus": 3, "line_size": 64,
                                           "schedules": 10**9, "seed": 4}


def test_schedule_result_names_behaviours_and_carries_its_replay():
    r = run_schedule("jcc32", 7, line_size=16, ncpus=2)
    assert r.replay.line_size == 16 and r.replay.cpus == 2 and r.replay.seed == 7
    assert "--line-size 16" in r.replay.command() and "--cpus 2" in r.replay.command()
    names = {k for b in r.behaviours.values() for k in b}
    assert names and names <= {"old", "new", "not-taken"}
    assert r.int3_left == 0 and r.timeline is None


def test_traced_replay_has_a_timeline_and_a_kernel_style_oops():
    rep = verify(["xline"], 100, seed=3, mutation="no-sync-1", line_size=1, stop_at_first=True)
    v = rep.first
    assert v is not None and v.kind == "oops"
    r = run_schedule(v.scenario, v.seed, **v.replay.kwargs(), trace=True)
    assert r.violations[0] == v                       # tracing does not change the schedule
    assert r.oopses and r.oopses[0]["rip_symbol"] and "<" in r.oopses[0]["code"]
    whats = {e["what"] for e in r.timeline}
    assert {"write", "oops"} <= whats and any(w.startswith("poke/") for w in whats)


def test_each_schedule_releases_its_machine(monkeypatch):
    import textpoke.sim._schedule as V
    closed = []
    real = V.boot_workload

    def spy(**kw):
        w = real(**kw)
        orig = w.close
        w.close = lambda: (closed.append(w), orig())[1]
        return w
    booted = []
    real_boot = spy

    def counting(**kw):
        booted.append(1)
        return real_boot(**kw)
    monkeypatch.setattr(V, "boot_workload", counting)
    verify(["call"], 6, seed=1, reuse=False)
    assert len(booted) == 6 and len(closed) == 6 and all(w.sim.closed for w in closed)
    # reused: one machine booted for the six schedules, closed when verify returns
    booted.clear()
    closed.clear()
    verify(["call", "xline"], 6, seed=1)
    assert len(booted) == 1 and len(closed) == 1 and closed[0].sim.closed
    assert not V._POOL


def test_wide_call_and_jcc_retargets_have_teeth():
    # Every displacement byte differs and the site straddles a line: writing
    # straight over them is caught, the INT3 protocol is not.
    for scn in ("call-xline", "jcc32-xline"):
        naive = verify([scn], 30, seed=11, strategy="naive")
        assert naive.violating_schedules > 0, scn
        assert naive.violations_by_kind.get("oops", 0) > 0
        v = naive.first
        again = run_schedule(v.scenario, v.seed, **v.replay.kwargs())
        assert again.violations and again.violations[0] == v
        clean = verify([scn], 30, seed=11)
        assert clean.violating_schedules == 0, clean.first
        assert clean.int3_emulated > 0


def test_teeth_sites_differ_in_every_displacement_byte_across_a_line():
    from textpoke.sim._teeth import install_teeth
    from textpoke.sim import boot_workload

    with boot_workload(ncpus=1) as w:
        for s in install_teeth(w):
            op = 1 if s.kind == "call" else 2
            assert all(a != b for a, b in zip(s.old[op:], s.new[op:])), s
            assert s.addr // 4096 != (s.addr + s.length - 1) // 4096   # crosses every line size
            assert w.current(s) == s.old


def test_reused_machines_give_the_same_reports():
    # Reuse (snapshot after boot, restore per schedule) is invisible in the
    # report: same verdicts, counters and first violation, for every strategy.
    for kw in ({"strategy": "naive"}, {"mutation": "no-sync-1"}, {}):
        a = verify(["xline", "call-xline", "multi"], 12, seed=5, reuse=False, **kw)
        b = verify(["xline", "call-xline", "multi"], 12, seed=5, reuse=True, **kw)
        assert a.as_dict() == b.as_dict(), kw


def test_a_pooled_machine_that_changed_shape_is_booted_anew():
    import textpoke.sim._schedule as V
    from textpoke.sim import FINE

    V.release_pool()
    try:
        key = (2, 64, FINE)
        w = V._pooled_workload(key, 1, False)
        w.sim.add_cpu()                     # a CPU more: the snapshot no longer fits
        w2 = V._pooled_workload(key, 2, False)
        assert w2 is not w and w.sim.closed and w2.sim.ncpus == 2
        w3 = V._pooled_workload(key, 3, False)
        assert w3 is w2 and w3.sim.seed == 3 and w3.sim.steps == 0
    finally:
        V.release_pool()


def test_changed_span_is_the_smallest_range_of_differing_bytes():
    # A refill or a restore drops the translations over exactly these bytes:
    # too small a range would leave a CPU running a block made from old bytes.
    import random as _r
    from textpoke.sim._ucfast import changed_span
    assert changed_span(b"", b"") == (0, 0)
    assert changed_span(b"\x90" * 64, b"\x90" * 64) == (0, 0)
    assert changed_span(b"\x00" * 8, b"\x01" + b"\x00" * 7) == (0, 1)
    assert changed_span(b"\x00" * 8, b"\x00" * 7 + b"\x80") == (7, 8)
    assert changed_span(b"ab\xcccdef", b"ab\x0fcdXf") == (2, 6)
    rng = _r.Random(5)
    for _ in range(500):
        n = rng.randrange(1, 80)
        old = bytes(rng.randrange(256) for _ in range(n))
        new = bytearray(old)
        for _ in range(rng.randrange(0, 4)):
            new[rng.randrange(n)] = rng.randrange(256)
        diff = [i for i in range(n) if old[i] != new[i]]
        want = (diff[0], diff[-1] + 1) if diff else (0, 0)
        assert changed_span(old, memoryview(bytes(new))) == want
