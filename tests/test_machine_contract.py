# SPDX-License-Identifier: GPL-2.0-only
"""The machine protocol contract: what the core relies on, run against
every machine backend (sim, the in-memory testing machine, a live
process), and each capability on every machine that declares it."""

import pytest

from textpoke import BadAddressError, Machine, TextPoke
from textpoke.lowlevel import WaitUntil


def _sim():
    from textpoke.sim import boot_workload
    w = boot_workload(ncpus=3, seed=9)
    w.start()
    w.sim.run(100)
    site = w.by_name["nop5_jmp32"]
    return w.sim, site.addr, site.old, site.new


def _memory():
    from textpoke.testing import MemoryMachine
    nop5, jmp = bytes.fromhex("0f1f440000"), bytes.fromhex("e9fb0f0000")
    m = MemoryMachine({0x40_0000: bytes(16) + nop5, 0x80_0000: b""}, ncpus=2)
    return m, 0x40_0010, nop5, jmp


def _live():
    import weakref
    from test_live_machine import Target, live_skip_reason
    reason = live_skip_reason()
    if reason:
        pytest.skip(reason)
    from textpoke.live import LiveMachine
    t = Target(2)
    m = LiveMachine(t.pid)
    weakref.finalize(m, t.kill)      # closing the machine detaches first (finalize runs after)
    site = t.sites["idle"]           # a NOP5 no thread runs: plain writes are safe there
    return m, site[0], t.old("idle"), t.new("idle")


MACHINES = {"sim": _sim, "memory": _memory, "live": _live}


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


def test_one_textpoke_per_machine_and_close_lets_go(machine):
    from textpoke import MachineError
    m, addr, old, new = machine
    core = TextPoke(m)
    with pytest.raises(MachineError, match="already has a TextPoke"):
        TextPoke(m)
    core.close()
    core.close()                                   # idempotent
    assert core.smp_text_poke_int3_handler not in m.trap_handlers
    with TextPoke(m) as again, again.batch():      # the machine is free again
        again.smp_text_poke_batch_add(addr, new)
    assert m.text_read(addr, len(new)) == new


def test_trap_chain_runs_by_priority_whatever_the_registration_order(machine):
    from textpoke import TrapPriority
    m, _, _, _ = machine

    def mk(name):
        def h(regs):
            return False
            yield
        h.__qualname__ = name
        return h
    notifier = m.register_trap_handler(mk("die"), priority=TrapPriority.NOTIFIER)
    kprobe = m.register_trap_handler(mk("kprobe"), priority=TrapPriority.KPROBES)
    core = TextPoke(m)
    names = [h.__qualname__ for h in m.trap_handlers]
    assert names.index("TextPoke.smp_text_poke_int3_handler") < names.index("kprobe") < names.index("die")
    with kprobe:
        pass                                       # leaving the block unregisters
    assert "kprobe" not in [h.__qualname__ for h in m.trap_handlers]
    notifier.unregister()
    notifier.unregister()                          # idempotent
    assert [h.__qualname__ for h in m.trap_handlers] == ["TextPoke.smp_text_poke_int3_handler"]
    core.close()


def test_closed_machine_refuses_work_and_closes_its_textpoke(machine):
    from textpoke import MachineClosedError
    m, addr, _, new = machine
    core = TextPoke(m)
    m.close()
    assert m.closed and core.closed and m.owner is None
    with pytest.raises(MachineClosedError):
        m.run_task(m.sync_each_cpu())
    with pytest.raises(MachineClosedError):
        TextPoke(m)


def test_capabilities_are_declared_and_required(machine):
    from textpoke import Capability, NotSupportedError
    m, _, _, _ = machine
    assert isinstance(m.capabilities, frozenset)
    for cap in Capability:
        if cap in m.capabilities:
            m.require(cap)
        else:
            with pytest.raises(NotSupportedError, match=m.name):
                m.require(cap)


def test_data_capability_maps_memory_the_host_reads_and_writes(machine):
    from textpoke import Capability
    m, _, _, _ = machine
    if not m.has(Capability.DATA):
        pytest.skip(f"{m.name} lends no data memory")
    a = m.map_data(100, "contract-data")
    assert m.mem.read(a, 100) == bytes(100)
    m.mem.write(a + 8, b"textpoke")
    assert m.mem.read(a + 8, 8) == b"textpoke"
    assert m.map_data(100, "contract-data", a) == a        # the same region again


def test_execmem_capability_lends_non_core_text_the_shared_allocator_fills(machine):
    from textpoke import Capability, ExecMem
    m, _, _, _ = machine
    if not m.has(Capability.EXECMEM):
        pytest.skip(f"{m.name} lends no executable memory")
    core = TextPoke(m)
    rng = m.execmem_range(4096)
    assert not rng.core and m.is_text(rng.start, rng.end - rng.start)
    assert not m.text_range_of(rng.start).core
    em = ExecMem(core, start=rng.start, end=rng.end)
    a = em.alloc(32)
    core.text_poke_copy(a, b"\x90" * 31 + b"\xc3")
    assert m.text_read(a, 32) == b"\x90" * 31 + b"\xc3"
    em.free(a)
    assert m.text_read(a, 32) == b"\xcc" * 32             # a stale pointer traps
    core.close()


def test_quiesce_returns_once_no_cpu_is_in_an_unused_range(machine):
    from textpoke import Capability
    m, addr, _, _ = machine
    if not m.has(Capability.QUIESCE):
        pytest.skip(f"{m.name} cannot show where its CPUs are")
    m.run_task(m.quiesce([(addr, addr + 5)], "contract"))
