# SPDX-License-Identifier: GPL-2.0-only
"""The same client self-tests on a live process as on the sim: the bundled
image loaded into a real process, booted there through the live machine,
its threads running the probe loop while the very functions of
:mod:`textpoke.selftests` switch static keys and static calls."""

from __future__ import annotations

import pytest

from textpoke.selftests import many_key_flip, static_call_selftest, static_keys_selftest
from test_live_machine import live_skip_reason

pytestmark = pytest.mark.skipif(live_skip_reason() is not None, reason=live_skip_reason() or "")


@pytest.fixture
def rig():
    from textpoke.live import LiveClientRig
    with LiveClientRig(cpus=3) as r:
        yield r
    assert r.proc.returncode == 0        # the loader ended by itself, nothing killed it


def test_the_rig_is_a_live_process_booted_through_the_machine(rig):
    from textpoke import Capability
    m = rig.machine
    assert m.name == "live" and len(m.cpus) == 4                # main + 3 loop threads
    assert any(r.name == "kernel.elf" and r.core for r in m.text_ranges)
    assert rig.kernel.boot is not None and rig.core.machine is m
    assert not m.has(Capability.CALL)      # the boot's self-tests that need it were skipped


def test_static_keys_selftest_on_a_live_process(rig):
    r = static_keys_selftest(rig)
    assert r.passed, [c for c in r.cases if not c["passed"]][:5]
    assert len(r.cases) > 80 and r.oopses == 0 and r.bad == [] and r.batches > 0


def test_static_call_selftest_on_a_live_process(rig):
    r = static_call_selftest(rig)
    assert r.passed, [c for c in r.cases if not c["passed"]][:5]
    assert r.oopses == 0 and r.bad == []


def test_a_key_of_1000_sites_flips_while_the_threads_run_them(rig):
    r = many_key_flip(rig, 1000, flips=2)
    assert r.passed, r.cases
    assert [c["batches"] for c in r.cases] == [1, 1]      # live: one batch for 32,768 sites


def test_the_oracle_has_teeth_on_live(rig):
    """A value the host does not accept is seen by the guest loop and
    reported, as on the sim."""
    i = rig.add_probe("sc_func_a", arg=2, allow=[3])
    rig.start()
    assert rig.expect({i: 3}) == {} and rig.bad() == []
    wrong = rig.expect({i: 4})
    assert wrong == {i: [3, 3, 3]}
    assert rig.bad() and all(b["value"] == 3 for b in rig.bad())


def test_the_kernels_execmem_on_live_is_a_region_the_machine_maps(rig):
    """Kernel.execmem asks the machine (EXECMEM): on live a region is mapped
    in the process; the shared allocator hands out and invalidates chunks."""
    em = rig.kernel.execmem
    rng = next(r for r in rig.machine.text_ranges if r.start <= em.start < r.end)
    assert not rng.core
    a = em.alloc(64)
    rig.core.text_poke_copy(a, b"\xc3")
    em.free(a)
    assert rig.machine.text_read(a, 64) == b"\xcc" * 64
