# SPDX-License-Identifier: GPL-2.0-only
"""The machine protocol contract: what the core relies on, run against
every machine backend (today: sim; the live backend joins this list)."""

import pytest

from textpoke import BadAddressError, Machine, TextPoke, WaitUntil


def _sim():
    from textpoke.sim import boot_workload
    w = boot_workload(ncpus=3, seed=9)
    w.start()
    w.sim.run(100)
    site = w.by_name["nop5_jmp32"]
    return w.sim, site.addr, site.old, site.new


MACHINES = {"sim": _sim}


@pytest.fixture(params=sorted(MACHINES))
def machine(request):
    return MACHINES[request.param]()


def test_is_a_machine_with_cpus_and_text(machine):
    m, addr, _, _ = machine
    assert isinstance(m, Machine)
    assert len(m.cpus) >= 1
    assert m.text_ranges and m.text_ranges[0].core
    assert m.is_text(addr, 5) and m.stext == m.text_ranges[0].start


def test_text_write_through_alias_reads_back(machine):
    m, addr, old, new = machine
    assert m.text_read(addr, len(old)) == old
    m.run_task(m.text_poke_write(addr, new))
    assert m.text_read(addr, len(new)) == new


def test_ranges_outside_text_are_refused(machine):
    m, _, _, _ = machine
    last = m.text_ranges[-1]
    with pytest.raises(BadAddressError):
        m.text_range_of(last.end, 1)
    with pytest.raises(BadAddressError):
        m.text_range_of(m.text_ranges[0].end - 2, 5)


def test_sync_each_cpu_completes(machine):
    m, _, _, _ = machine
    m.run_task(m.sync_each_cpu())


def test_run_task_returns_the_value_and_honours_waits(machine):
    m, _, _, _ = machine
    box = {"n": 0}

    def task():
        for _ in range(3):
            box["n"] += 1
            yield
        yield WaitUntil(lambda: box["n"] == 3, "three steps")
        return "done"

    assert m.run_task(task()) == "done"


def test_core_handler_is_first_on_the_trap_chain(machine):
    m, _, _, _ = machine
    core = TextPoke(m)
    assert list(m.trap_handlers)[0] == core.smp_text_poke_int3_handler


def test_single_site_patch_through_the_core(machine):
    m, addr, old, new = machine
    core = TextPoke(m)
    with core.text_mutex:
        core.smp_text_poke_single(addr, new)
    assert m.text_read(addr, len(new)) == new
    assert core.stats.syncs == 3
