# SPDX-License-Identifier: GPL-2.0-only
"""The Kernel object (image, tables, core, boot result, clients on demand)
and the capabilities clients ask of a machine instead of knowing a
backend."""

from __future__ import annotations

import pytest

from textpoke import (CALL_INSN_OPCODE, Capability, MachineClosedError, NotSupportedError, TextPoke,
                      text_gen_insn)
from textpoke.lowlevel import drive
from textpoke import RingBuffer
from textpoke.images import load_bundled
from textpoke.images._kernel import KERNEL_IMAGE, kernel_regions
from textpoke.kernel import KPROBES_EXECMEM, Kernel
from textpoke.sim import boot_workload
from textpoke.testing import MemoryMachine


@pytest.fixture
def kernel():
    image = load_bundled(KERNEL_IMAGE)
    with boot_workload(ncpus=2, seed=3, image=image) as w:
        with Kernel.start(w.sim, image) as k:
            yield k


def test_clients_are_created_on_demand_once_and_share_the_boot(kernel):
    assert kernel.clients == {}
    assert kernel.boot is not None and kernel.boot.ok
    keys = kernel.keys
    assert kernel.keys is keys and set(kernel.clients) == {"keys"}
    kp = kernel.kprobes
    # kprobes refuse what this kernel's keys, calls and alternatives reserve
    assert kp.keys is kernel.keys and kp.calls is kernel.calls and kp.smp is kernel.boot.smp
    assert kernel.modules.keys is keys and kernel.modules.features == kernel.boot.features
    assert kernel.bpf.execmem is kernel.modules.execmem is kernel.execmem
    assert set(kernel.clients) == {"keys", "calls", "kprobes", "modules", "bpf"}
    assert kernel.sym("ftrace_caller") == kernel.symbols["ftrace_caller"]


def test_execmem_is_split_between_kprobes_and_the_rest(kernel):
    rng = next(r for r in kernel.machine.text_ranges if not r.core)
    shared, kp = kernel.execmem, kernel.kprobes.execmem
    assert (shared.start, shared.end) == (rng.start, rng.end - KPROBES_EXECMEM)
    assert (kp.start, kp.end) == (rng.end - KPROBES_EXECMEM, rng.end)
    a = kernel.bpf.load(b"\xc3")
    assert shared.start <= a.addr < shared.end


def test_close_unregisters_kprobes_and_the_core_it_made():
    image = load_bundled(KERNEL_IMAGE)
    with boot_workload(ncpus=1, seed=1, image=image) as w:
        k = Kernel.start(w.sim, image)
        p = k.kprobes.register_kprobe("ft_hash")
        assert p.addr > image.sym("ft_hash") and w.sim.text_read(p.addr, 1) == b"\xcc"
        k.close()
        assert w.sim.text_read(p.addr, 1) != b"\xcc"
        assert k.core.closed and w.sim.trap_handlers == ()
        k.close()                                      # idempotent
        with pytest.raises(MachineClosedError):
            k.ftrace
        TextPoke(w.sim).close()                        # the machine is free for a new core


def test_a_kernel_over_an_existing_core_leaves_the_core_open():
    image = load_bundled(KERNEL_IMAGE)
    with boot_workload(ncpus=1, seed=1, image=image) as w, TextPoke(w.sim) as core:
        with Kernel.start(core, image) as k:
            assert k.core is core and k.keys.keys
        assert not core.closed and w.sim.owner is core


def test_sim_data_capability_maps_shares_and_places():
    image = load_bundled(KERNEL_IMAGE)
    with boot_workload(ncpus=1, seed=1, image=image) as w:
        m = w.sim
        assert {Capability.DATA, Capability.PERCPU, Capability.QUIESCE} <= m.capabilities
        a = m.map_data(100, "t1")
        m.mem.write(a, b"x" * 100)
        assert m.map_data(100, "t1", a) == a and m.mem.read(a, 100) == b"x" * 100
        b = m.map_data(4096, "t2")
        assert b >= a + 4096                          # placed after, not over, t1
        with pytest.raises(Exception):
            m.map_data(4096, "other", a)              # a different region there: refused


def test_sim_quiesce_waits_until_no_cpu_is_inside_the_range():
    with boot_workload(ncpus=2, seed=2) as w:
        w.start()
        w.sim.run(500)
        text = w.sim.text_ranges[0]
        wait = next(w.sim.quiesce([(text.start, text.end)], "test"))
        # the CPUs run the workload inside core text: never quiescent
        w.sim.run(2000)
        assert not wait.predicate() and "test" in wait.reason
        w.sim.stop_cpu(0)
        assert not wait.predicate()                    # cpu1 still inside
        w.sim.stop_cpu(1)
        assert wait.predicate()
        # a range no CPU enters is passed at once
        elsewhere = next(w.sim.quiesce([(0x10, 0x20)]))
        w.start()
        w.sim.run(100)
        assert elsewhere.predicate()


def test_clients_ask_for_capabilities_not_backends():
    m = MemoryMachine({0x1000: b"\x90" * 64})
    for cap in (Capability.DATA, Capability.PERCPU, Capability.QUIESCE):
        assert not m.has(cap)
    with pytest.raises(NotSupportedError, match="map guest data memory"):
        m.map_data(64, "x")
    with pytest.raises(NotSupportedError, match="per-CPU"):
        m.set_percpu_base(0, 0)
    with pytest.raises(NotSupportedError):
        drive(m.quiesce([(0, 1)]))
    image = load_bundled(KERNEL_IMAGE)
    with pytest.raises(NotSupportedError, match="ftrace ring buffers"):
        RingBuffer(m, image)


def _memory_machine_of(image) -> MemoryMachine:
    """The image's text in a MemoryMachine (no CPUs run, no capabilities),
    its data written into the machine's data memory."""
    regions = kernel_regions(image)
    m = MemoryMachine({s: bytes(c) for s, c, kind, _n in regions if kind == "text"}, ncpus=2)
    for s, c, kind, _n in regions:
        if kind in ("data", "rodata") and not isinstance(c, int):
            m.mem.write(s, bytes(c))
    return m


def _drive_clients(kernel) -> None:
    kernel.keys.static_key_enable("jl_key_false")
    kernel.keys.static_key_disable("jl_key_true")
    kernel.calls.static_call_update("sc_op", "sc_square")
    kernel.ftrace.set_ftrace_filter(["ft_*"])
    kernel.ftrace.start()


def test_the_same_client_code_gives_the_same_text_on_two_machines():
    """Kernel and clients created the same way over the sim and over a
    machine that only stores bytes: the same operations leave the same
    core text; what needs a capability the memory machine lacks is refused
    there, and only that."""
    image = load_bundled(KERNEL_IMAGE)
    mem = _memory_machine_of(image)
    with Kernel.start(mem, image, selftests=False) as k:
        _drive_clients(k)
        for client in ("kprobes", "modules", "bpf"):
            with pytest.raises(NotSupportedError, match="executable memory"):
                getattr(k, client)
        r = mem.text_ranges[0]
        on_memory = mem.text_read(r.start, r.end - r.start)
        assert mem.syncs > 0 and k.ftrace.enabled_records
    with boot_workload(ncpus=2, seed=4, image=image) as w, \
            Kernel.start(w.sim, image, selftests=False) as k2:
        w.sim.run(1000)
        _drive_clients(k2)
        on_sim = w.sim.text_read(r.start, r.end - r.start)
        assert k2.kprobes is not None                  # the sim has EXECMEM
        # ... so the function tracer has its own trampoline there (FTRACE_FL_TRAMP),
        # where the memory machine's sites call ftrace_caller (no execmem for one)
        ft2 = k2.ftrace
        tramp, sites = ft2.trampolines["function"].addr, [x.ip for x in ft2.enabled_records]
        assert sites and not k.ftrace.trampolines
    boot_text = bytes(next(c for s, c, kind, _n in kernel_regions(image) if s == r.start))
    assert on_memory[:len(boot_text)] != boot_text     # the clients did write
    want = bytearray(on_sim)
    for ip in sites:
        o = ip - r.start
        assert want[o:o + 5] == text_gen_insn(CALL_INSN_OPCODE, ip, tramp)
        want[o:o + 5] = text_gen_insn(CALL_INSN_OPCODE, ip, image.sym("ftrace_caller"))
    assert on_memory == bytes(want)


def _protocol_members(proto) -> set[str]:
    names = set(getattr(proto, "__annotations__", {}))
    names |= {n for n, v in vars(proto).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


def test_the_sim_rigs_give_what_the_selftests_use():
    """The self-tests in textpoke.selftests act only through a rig; the
    sim's ClientMachine and FtraceMachine must offer every member."""
    from textpoke.selftests import ClientRig, FtraceRig
    from textpoke.sim import ClientMachine, FtraceMachine
    for rig_cls, proto in ((ClientMachine, ClientRig), (FtraceMachine, FtraceRig)):
        with rig_cls(cpus=1, seed=0) as rig:
            missing = sorted(n for n in _protocol_members(proto) if not hasattr(rig, n))
            assert not missing, f"{rig_cls.__name__} lacks {missing}"
            assert rig.kernel.machine is rig.sim


def test_the_readmes_client_tour_runs(capsys):
    """The README's tour of the clients is code that runs as printed."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## The clients, and a booted kernel that creates them"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    assert "Kernel.start" in code
    exec(compile(code, "README.md (client tour)", "exec"), {})
    assert "<Kernel on the sim machine: keys, calls, ftrace, kprobes>" in capsys.readouterr().out


def test_kernel_config_reaches_the_clients():
    from textpoke.kernel import Kernel
    from textpoke.kernel._kernel import BUNDLED_CONFIG
    from textpoke.sim import ClientMachine
    assert BUNDLED_CONFIG == {"X86_KERNEL_IBT": True, "PREEMPTION": False,
                              "KPROBES_ON_FTRACE": False}
    with ClientMachine(cpus=1, seed=1) as m:
        assert m.kernel.config == BUNDLED_CONFIG and m.kernel.bpf.ibt is True
        k = Kernel(m.core, m.image, tables=m.tables, boot=m.kernel.boot,
                   config={"X86_KERNEL_IBT": False})
        assert k.bpf.ibt is False and k.config["PREEMPTION"] is False
        with Kernel(m.core, m.image, tables=m.tables, boot=m.kernel.boot,
                    config={"PREEMPTION": True}) as k2:
            assert k2.kprobes.preemption is True
