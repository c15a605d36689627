# SPDX-License-Identifier: GPL-2.0-only
"""The sim machine: reproducibility, the stale fetch view, traps and oopses,
IPIs versus trap handlers."""

import iced_x86 as I
import pytest

from textpoke import TextPoke
from textpoke.lowlevel import WaitUntil
from textpoke.sim import COARSE, FINE, boot_workload
from textpoke.sim._demo import run_demo
from textpoke.sim._workload import MODULE_BASE


def _asm(addr, instrs):
    """Encode a list of iced Instructions at addr (a real encoder, no hex)."""
    enc = I.Encoder(64)
    out = b""
    for ins in instrs:
        enc.encode(ins, addr + len(out))
        out += bytes(enc.take_buffer())
    return out


def _trace(seed):
    w = boot_workload(ncpus=3, seed=seed, policy=FINE)
    w.sim.trace = []
    core = TextPoke(w.sim)
    w.start()
    w.sim.run(200)
    with core.batch():
        for s in w.sites[:4]:
            core.smp_text_poke_batch_add(s.addr, s.new)
    w.sim.run(200)
    regs = [c.regs_dict() for c in w.sim.vcpus]
    return w.sim.trace, regs, [e.as_dict() for e in core.events]


def test_same_seed_same_run_event_for_event():
    a, b = _trace(7), _trace(7)
    assert a == b
    assert any(ev[0] == "int3" for ev in a[0])      # the run did exercise the handler


def test_different_seeds_differ():
    assert _trace(7)[0] != _trace(8)[0]


def test_cpu_fetches_stale_bytes_until_it_serialises():
    import dataclasses
    # no random refills: a view changes only when its CPU serialises
    w = boot_workload(ncpus=4, policy=dataclasses.replace(COARSE, refresh_prob=0.0))
    sim, core = w.sim, TextPoke(w.sim)
    s = w.by_name["nop2_jmp8"]
    with core.text_mutex:
        core.text_poke(s.addr, s.new)     # plain write: no sync
    assert sim.text_read(s.addr, 2) == s.new
    assert all(sim.view_read(c, s.addr, 2) == s.old for c in sim.cpus)
    core.smp_text_poke_sync_each_cpu()
    assert all(sim.view_read(c, s.addr, 2) == s.new for c in sim.cpus)


def test_store_to_text_is_an_oops_and_other_cpus_go_on(workload):
    w, sim = workload, workload.sim
    code = _asm(MODULE_BASE, [
        I.Instruction.create_mem_i32(I.Code.MOV_RM8_IMM8,
                                     I.MemoryOperand(I.Register.RIP, displ=w.by_name["call"].addr), 1),
    ])
    core = TextPoke(sim)
    core.text_poke_copy(MODULE_BASE, code)
    w.start([1, 2, 3])
    sim.start_cpu(0, MODULE_BASE)
    sim.run(400)
    assert len(sim.oopses) == 1
    o = sim.oopses[0]
    assert o.cpu == 0 and o.kind.startswith("#PF") and o.rip == MODULE_BASE
    assert o.bytes_at_rip[: len(code)] == code
    assert sim.vcpus[0].state == "dead"
    it = [w.iterations(c) for c in (1, 2, 3)]
    sim.run(400)
    assert all(w.iterations(c) > i for c, i in zip((1, 2, 3), it))


def test_unhandled_int3_is_an_oops_with_registers(workload, core):
    w, sim = workload, workload.sim
    s = w.by_name["nop5_jmp32"]
    w.start()
    with core.text_mutex:
        core.text_poke(s.addr, b"\xcc")       # nobody will claim it
    core.smp_text_poke_sync_each_cpu()
    sim.run(500)
    assert sim.oopses
    o = sim.oopses[0]
    assert o.kind == "int3" and o.rip == s.addr and o.bytes_at_rip[0] == 0xCC
    assert o.regs["rbx"] == w.percpu(o.cpu)


def test_ipis_are_never_taken_inside_a_trap_handler(workload):
    w, sim = workload, workload.sim
    s = w.by_name["probe"]
    sim.trace = []

    def slow_handler(regs):
        if regs.ip - 1 != s.addr:
            return False
        sim.trace.append(("enter", regs.cpu))
        for _ in range(30):
            yield
        regs.ip = s.addr + 5
        sim.trace.append(("leave", regs.cpu))
        return True

    sim.register_trap_handler(slow_handler)
    core = TextPoke(sim)
    sim.text_write_early(s.addr, b"\xcc")
    w.start()
    for _ in range(40):
        sim.run(37)
        core.smp_text_poke_sync_each_cpu()
    inside = set()
    ipis = entered = 0
    for ev in sim.trace:
        if ev[0] == "enter":
            inside.add(ev[1])
            entered += 1
        elif ev[0] == "leave":
            inside.discard(ev[1])
        elif ev[0] == "ipi":
            ipis += 1
            assert ev[2] not in inside, f"cpu{ev[2]} took an IPI inside its trap handler"
    assert ipis >= 40 and entered > 40      # both really happened, many times
    assert not sim.oopses


def test_task_waits_are_honoured(workload):
    sim = workload.sim
    flag = {"v": False}
    order = []

    def waiter():
        yield WaitUntil(lambda: flag["v"], "flag")
        order.append("waiter")

    def setter():
        yield
        order.append("setter")
        flag["v"] = True

    sim.spawn(waiter())
    sim.spawn(setter())
    sim.run_until(lambda: len(order) == 2, 1000)
    assert order == ["setter", "waiter"]


@pytest.mark.parametrize("line_size", [1, 16, 64])
def test_demo_runs_clean_at_any_line_size(line_size):
    r = run_demo(cpus=3, toggles=40, seed=line_size, line_size=line_size)
    assert r.oopses == [] and r.misbehaviours == 0 and r.final_ok
    assert r.int3_emulated > 0 and r.syncs == 3 * 40
    for site in r.sites:
        if site["kind"] != "nop5-int3":
            assert site["behaviours"].get("old", 0) > 0 and site["behaviours"].get("new", 0) > 0


def test_free_running_mode_uses_preemption_points():
    from textpoke.sim import FREE
    w = boot_workload(ncpus=2, policy=FREE)
    w.start()
    w.sim.run(40)                 # ~20 turns per CPU: each runs to the next preemption point
    its = [w.iterations(c) for c in w.sim.cpus]
    assert all(it >= 16 * 8 for it in its), its      # progress on every turn, not just the first
    assert all(it % 16 == 0 for it in its)           # and every turn ends at the preemption point
    assert not w.sim.oopses


def test_the_kernel_image_carries_the_workload_and_runs_it_after_boot():
    from textpoke.sim._demo import boot_kernel_with_workload
    w, core, res = boot_kernel_with_workload(cpus=2, seed=4)
    assert res.ok and w.image.sym("workload_main") in w.sim.text_ranges[0]
    assert {s.name for s in w.sites} >= {"nop2_jmp8", "call", "xline_jcc32"}
    w.start()
    with core.batch():
        for s in w.sites[:3]:
            core.smp_text_poke_batch_add(s.addr, s.new)
    w.sim.run(2000)
    assert not w.sim.oopses and all(w.iterations(c) > 5 for c in w.sim.cpus)
