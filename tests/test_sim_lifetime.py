# SPDX-License-Identifier: GPL-2.0-only
"""The sim machine's lifetime (close releases the engines at once) and CPU
hotplug (ids never reused, syncs never block on a vanished CPU, the core's
per-CPU references follow the CPU set)."""

import gc
import weakref

import pytest

from textpoke import TextPoke
from textpoke import Capability
from textpoke import MachineClosedError, MachineError
from textpoke.sim import FINE, boot_workload


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_closing_a_machine_frees_its_engines_without_the_cycle_collector():
    gc.disable()
    try:
        w = boot_workload(ncpus=3, seed=1)
        w.start()
        w.sim.run(50)
        engines = [weakref.ref(c.uc) for c in w.sim.vcpus]
        sim = weakref.ref(w.sim)
        w.close()
        assert all(r() is None for r in engines)     # freed by refcount, at close
        del w
        assert sim() is None                         # no cycle keeps the machine either
    finally:
        gc.enable()


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="needs /proc")
def test_rss_stays_flat_over_hundreds_of_machines():
    def one(i):
        with boot_workload(ncpus=3, seed=i) as w:
            core = TextPoke(w.sim)
            w.start()
            w.sim.run(40)
            with core.batch():
                s = w.sites[i % 4]
                core.smp_text_poke_batch_add(s.addr, s.new)
    for i in range(50):
        one(i)
    at_50 = _rss_mb()
    for i in range(50, 300):
        one(i)
    at_300 = _rss_mb()
    # Unclosed, each machine held ~0.6 MB of engine until a full collection
    # (250 more machines: >100 MB); closed, nothing accumulates.
    assert at_300 - at_50 < 25, (at_50, at_300)


def test_use_after_close_raises_machine_closed():
    w = boot_workload(ncpus=2, seed=3)
    sim = w.sim
    s = w.sites[0]
    w.close()
    w.close()                                        # idempotent
    assert sim.closed
    for call in (lambda: sim.run(1), sim.step, lambda: sim.start_cpu(0, w.loop_top),
                 lambda: sim.call(w.loop_top), lambda: sim.text_poke_write(s.addr, s.new),
                 lambda: sim.run_task(iter(())), lambda: sim.text_read(s.addr, 1),
                 lambda: sim.mem_read(w.percpu(0), 8), sim.add_cpu,
                 lambda: sim.view_read(0, s.addr, 1), lambda: TextPoke(sim)):
        with pytest.raises(MachineClosedError):
            call()


def test_closing_mid_batch_lets_go_of_the_tasks():
    w = boot_workload(ncpus=2, seed=5, policy=FINE)
    core = TextPoke(w.sim)
    w.start()
    core.text_mutex.acquire()
    s = w.by_name["nop5_jmp32"]
    core.smp_text_poke_batch_add(s.addr, s.new)
    t = w.sim.spawn(core.smp_text_poke_batch_finish_task(), "patcher")
    w.sim.run(30)
    assert not t.done
    w.close()
    assert w.sim.closed and not w.sim._tasks


# ------------------------------------------------------------------ hotplug
def test_hotplug_ids_are_never_reused_and_cpus_lists_present_ones():
    w = boot_workload(ncpus=3, seed=2)
    sim = w.sim
    assert sim.has(Capability.HOTPLUG)
    heard = []
    sim.subscribe_cpus(lambda ev, cpu: heard.append((ev, cpu, cpu in sim.cpus)))
    w.start()
    sim.run(100)
    sim.remove_cpu(1)
    assert sim.cpus == [0, 2] and sim.ncpus == 2
    new = w.add_cpu()
    assert new == 3 and sim.cpus == [0, 2, 3]
    # listeners: told of the new CPU while it is present, before it ran anything
    assert heard == [("remove", 1, False), ("add", 3, True)]
    with pytest.raises(MachineError):
        sim.view_read(1, w.loop_top, 1)
    with pytest.raises(MachineError):
        sim.start_cpu(1, w.loop_top)
    it = w.iterations(3)
    sim.run(600)
    assert w.iterations(3) > it                      # the new CPU runs the workload
    assert sim.call(w.image.sym("call_old"), cpu=3) == 1    # its stack is mapped too
    sim.remove_cpu(0)
    sim.remove_cpu(2)
    with pytest.raises(MachineError):
        sim.remove_cpu(3)                            # the last CPU stays
    assert not sim.oopses


def test_a_new_cpu_comes_up_with_a_fully_refilled_view():
    import dataclasses
    from textpoke.sim import COARSE
    w = boot_workload(ncpus=2, policy=dataclasses.replace(COARSE, refresh_prob=0.0))
    sim, core = w.sim, TextPoke(w.sim)
    s = w.by_name["nop2_jmp8"]
    with core.text_mutex:
        core.text_poke(s.addr, s.new)                # no sync: old views stay stale
    assert all(sim.view_read(c, s.addr, 2) == s.old for c in sim.cpus)
    cpu = sim.add_cpu()
    assert sim.view_read(cpu, s.addr, 2) == s.new


def test_sync_never_blocks_on_a_cpu_that_vanishes():
    w = boot_workload(ncpus=3, seed=4, policy=FINE)
    sim = w.sim
    w.start()
    task = sim.sync_each_cpu()
    wait = next(task)
    assert not wait.predicate()
    sim.stop_cpu(0)
    sim.stop_cpu(1)
    sim.stop_cpu(2)
    sim.remove_cpu(1)                                # never took its IPI
    assert sim.run_until(wait.predicate, 1000)       # the other two take theirs
    assert sim.vcpus[1].ipis_taken == 0


def test_removing_a_cpu_inside_a_trap_handler_lets_the_handler_finish():
    w = boot_workload(ncpus=2, seed=1)
    sim = w.sim
    s = w.by_name["probe"]
    seen = []

    def slow(regs):
        if regs.ip - 1 != s.addr:
            return False
        seen.append(("enter", regs.cpu))
        for _ in range(50):
            yield
        regs.ip = s.addr + 5
        seen.append(("leave", regs.cpu))
        return True

    sim.register_trap_handler(slow)
    sim.text_write_early(s.addr, b"\xcc")
    w.start()
    assert sim.run_until(lambda: any(c.state == "trap" for c in sim.vcpus), 5000)
    cpu = next(c.id for c in sim.vcpus if c.state == "trap")
    sim.remove_cpu(cpu)
    assert seen[-1] == ("leave", cpu)                # the handler ran to its end first
    assert cpu not in sim.cpus and not sim.oopses


def test_hotplug_while_a_batch_runs_on_a_running_workload():
    for seed in range(12):
        w = boot_workload(ncpus=3, seed=seed, policy=FINE)
        sim = w.sim
        core = TextPoke(sim)
        w.start()
        sim.run(100)
        sites = [w.by_name[n] for n in ("nop5_jmp32", "call", "xline_jcc32")]
        core.text_mutex.acquire()
        for s in sites:
            core.smp_text_poke_batch_add(s.addr, s.new)
        t = sim.spawn(core.smp_text_poke_batch_finish_task(), "patcher")
        added = removed = None
        for i in range(200_000):
            if t.done:
                break
            sim.step()
            if i == 40 + seed * 7 and added is None:
                assert core.text_poke_array.nr_entries        # mid-batch, really
                added = w.add_cpu()
                assert core.text_poke_array_refs.keys() == set(sim.cpus)
            if i == 90 + seed * 11 and removed is None:
                assert core.text_poke_array.nr_entries
                removed = 1
                sim.remove_cpu(removed)
                assert core.text_poke_array_refs.keys() == set(sim.cpus)
        core.text_mutex.release()
        assert t.done and t.exc is None, (seed, t.exc)
        assert not sim.oopses, (seed, sim.oopses)
        assert all(core.text_poke_array_refs[c] == 0 for c in sim.cpus)
        assert all(sim.text_read(s.addr, s.length) == s.new for s in sites)
        if added is not None:
            it = w.iterations(added)
            sim.run(3000)
            assert w.iterations(added) > it and not sim.oopses
        w.close()
