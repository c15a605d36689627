# SPDX-License-Identifier: GPL-2.0-only
"""The sim's write path: byte-granular for verification, one store per
poke for throughput, with exactly the touched lines made stale."""

import dataclasses

import pytest

from textpoke.sim import COARSE, FINE, FREE, SchedPolicy, boot_workload


def _yields(task):
    n = 0
    for _ in task:
        n += 1
    return n


@pytest.mark.parametrize("policy,expect", [(FINE, "byte"), (COARSE, "poke"), (FREE, "poke")])
def test_policies_choose_their_write_granularity(policy, expect):
    assert policy.write_granularity == expect


def test_unknown_granularity_is_refused():
    with pytest.raises(ValueError):
        SchedPolicy(write_granularity="word")


@pytest.mark.parametrize("granularity", ["byte", "poke"])
def test_write_marks_exactly_the_lines_it_touched(granularity):
    pol = dataclasses.replace(FINE, write_granularity=granularity, refresh_prob=0.0)
    w = boot_workload(ncpus=3, line_size=16, policy=pol, trace=True)
    sim = w.sim
    start = sim.text_ranges[0].start
    addr = start + 16 * 5 + 13            # 13..15 of line 5, 0..3 of line 6
    data = bytes([0x90] * 7)
    old = sim.text_read(addr, 7)
    n = _yields(sim.text_poke_write(addr, data))
    assert n == (7 if granularity == "byte" else 1)
    assert sim.text_read(addr, 7) == data
    for c in sim.cpus:
        assert sim.vcpus[c].stale == {(0, 5), (0, 6)}
        assert sim.view_read(c, addr, 7) == old          # nobody refetched yet
    writes = [e for e in sim.trace if e[0] == "write"]
    assert b"".join(e[4] for e in writes) == data and writes[0][3] == addr
    w.close()


def test_byte_writes_are_seen_one_byte_at_a_time():
    w = boot_workload(ncpus=1, policy=FINE)
    sim = w.sim
    s = w.by_name["nop5_jmp32"]
    task = sim.text_poke_write(s.addr, s.new)
    seen = []
    for _ in task:
        seen.append(sim.text_read(s.addr, 5))
    assert seen[0] == s.new[:1] + s.old[1:] and seen[-1] == s.new and len(set(seen)) >= 2
    w.close()
