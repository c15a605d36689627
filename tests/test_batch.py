# SPDX-License-Identifier: GPL-2.0-only
"""The SMP batch: rules of smp_text_poke_batch_add, refusals, ordering,
sync counts, events, text_mutex -- on the sim machine with CPUs running."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textpoke import (TEXT_POKE_ARRAY_MAX, BadAddressError, BadInstructionError, OverlapError,
                      TextMutexError, TextPoke, text_gen_insn, x86_nops)
from textpoke.sim import boot_workload
from textpoke.sim._workload import MODULE_BASE


def _snapshot(w):
    t = w.sim.text_ranges[0]
    return w.sim.text_read(t.start, t.end - t.start)


# ---------------------------------------------------------------- refusals
BAD_ADDS = {
    "length 0": lambda s: (s.addr, b""),
    "length 7": lambda s: (s.addr, x86_nops[7]),
    "length 6 that is not Jcc.d32": lambda s: (s.addr, x86_nops[6]),
    "emulate is an ALU instruction": lambda s: (s.addr, x86_nops[5], None, bytes.fromhex("4801c3")[:3] + b"\x90\x90"),
    "emulate is NOP3": lambda s: (s.addr, x86_nops[3]),
    "emulate is an indirect call": lambda s: (s.addr, bytes.fromhex("ff1500000000")[:5]),
    "emulate is 2e2e2e31c0 without a CALL": lambda s: (s.addr, bytes.fromhex("2e2e2e31c0")),
    "length disagrees with CALL": lambda s: (s.addr, text_gen_insn(0xE8, s.addr, s.addr) + b"\xcc", 6),
    "non-INT3 padding after RET": lambda s: (s.addr, bytes.fromhex("c390909090")),
    "non-INT3 padding after JMP8": lambda s: (s.addr, bytes.fromhex("eb0390cccc")),
    "undecodable": lambda s: (s.addr, bytes.fromhex("0606060606")),
    "address outside text": lambda s: (0x0050_0000, x86_nops[5]),
    "site running off the end of text": lambda s: (0x0100_1000 - 2, x86_nops[5]),
}


@pytest.mark.parametrize("case", sorted(BAD_ADDS))
def test_bad_input_is_refused_and_text_untouched(workload, core, case):
    w = workload
    w.start()
    w.sim.run(200)
    site = w.by_name["nop5_jmp32"]
    before = _snapshot(w)
    args = BAD_ADDS[case](site)
    addr, opcode = args[0], args[1]
    length = args[2] if len(args) > 2 else None
    emulate = args[3] if len(args) > 3 else None
    with pytest.raises((BadInstructionError, BadAddressError)):
        with core.batch():
            core.smp_text_poke_batch_add(addr, opcode, length, emulate)
    assert _snapshot(w) == before
    assert core.text_poke_array.nr_entries == 0
    assert not w.sim.oopses


def test_overlapping_sites_in_one_batch_are_refused(workload, core):
    w = workload
    site = w.by_name["nop5_jmp32"]
    before = _snapshot(w)
    with pytest.raises(OverlapError):
        with core.batch():
            core.smp_text_poke_batch_add(site.addr, site.new)
            core.smp_text_poke_batch_add(site.addr + 3, x86_nops[2])
    assert _snapshot(w) == before          # the whole batch was dropped


def test_same_address_twice_is_an_overlap(workload, core):
    s = workload.by_name["nop2_jmp8"]
    before = _snapshot(workload)
    # The first entry stays queued after the overlap is refused; releasing
    # text_mutex with it pending drops it (and says so): never applied later.
    with pytest.raises(TextMutexError, match="1 batch entry"):
        with core.text_mutex:
            core.smp_text_poke_batch_add(s.addr, s.new)
            with pytest.raises(OverlapError):
                core.smp_text_poke_batch_add(s.addr, s.old)
    assert _snapshot(workload) == before
    assert not core.text_poke_array.vec and core.stats.dropped == 1


def test_text_poke_refuses_unmapped_and_three_page_writes(workload, core):
    with core.text_mutex:
        with pytest.raises(BadAddressError):
            core.text_poke(0x0500_0000, b"\x90")
        with pytest.raises(BadAddressError):
            core.text_poke(MODULE_BASE + 0xFFF, b"\xcc" * (4096 + 2))   # touches three pages
        core.text_poke(MODULE_BASE + 0xFFF, b"\xcc" * 2)                # two pages: fine


def test_text_mutex_is_asserted(workload, core):
    s = workload.by_name["nop2_jmp8"]
    with pytest.raises(TextMutexError):
        core.smp_text_poke_batch_add(s.addr, s.new)
    with pytest.raises(TextMutexError):
        core.text_poke(s.addr, s.new)
    with pytest.raises(TextMutexError):
        core.smp_text_poke_single(s.addr, s.new)
    with pytest.raises(TextMutexError):
        core.text_poke_copy_locked(MODULE_BASE, b"\x90")


def test_text_poke_copy_refuses_core_text_and_fills_module_text(workload, core):
    s = workload.by_name["nop2_jmp8"]
    with pytest.raises(BadAddressError):
        core.text_poke_copy(s.addr, b"\x90\x90")
    blob = bytes(range(256)) * 40                 # 10 KiB: crosses three pages
    core.text_poke_copy(MODULE_BASE + 100, blob)
    assert workload.sim.text_read(MODULE_BASE + 100, len(blob)) == blob
    core.text_poke_set(MODULE_BASE + 100, 0xCC, len(blob))
    assert workload.sim.text_read(MODULE_BASE + 100, len(blob)) == b"\xcc" * len(blob)
    # two pages per poke: 8092 + 2148 bytes
    assert core.events.counts["copy"] == 2 and core.events.counts["set"] == 2


def test_text_poke_early_only_before_smp(workload, core):
    s = workload.by_name["nop2_jmp8"]
    core.text_poke_early(s.addr, s.new)
    assert workload.sim.text_read(s.addr, 2) == s.new
    workload.start()
    from textpoke import MachineError
    with pytest.raises(MachineError):
        core.text_poke_early(s.addr, s.old)


# ------------------------------------------------------- the batch in motion
def test_single_site_patch_runs_protocol_with_three_syncs(workload, core):
    w = workload
    w.start()
    w.sim.run(300)
    s = w.by_name["call"]
    with core.text_mutex:
        core.smp_text_poke_single(s.addr, s.new)
    assert w.sim.text_read(s.addr, 5) == s.new
    assert core.stats.syncs == 3
    phases = [e.phase for e in core.events]
    assert phases == ["int3", "tail", "batch", "first"]
    batch_ev = [e for e in core.events if e.phase == "batch"][0]
    assert batch_ev.old == s.old and batch_ev.new == s.new


def test_int3_only_entry_needs_one_sync(workload, core):
    s = workload.by_name["probe"]
    with core.text_mutex:
        core.smp_text_poke_single(s.addr, b"\xcc")
    assert core.stats.syncs == 1          # nothing after the INT3 to write or sync
    assert workload.sim.text_read(s.addr, 1) == b"\xcc"


def test_single_while_batch_pending_applies_both(workload, core):
    a, b = workload.by_name["call"], workload.by_name["nop2_jmp8"]
    with core.text_mutex:
        core.smp_text_poke_batch_add(a.addr, a.new)
        core.smp_text_poke_single(b.addr, b.new)
        assert core.text_poke_array.nr_entries == 0
    assert workload.sim.text_read(a.addr, 5) == a.new
    assert workload.sim.text_read(b.addr, 2) == b.new
    assert core.stats.batches == 1


def test_jcc32_entry_is_stored_as_the_kernel_stores_it(workload, core):
    s = workload.by_name["jcc32"]
    with core.text_mutex:
        core.smp_text_poke_batch_add(s.addr, s.new)
        tpl = core.text_poke_array.vec[0]
        assert tpl.len == 6 and tpl.opcode == 0x74          # JE.d32 mapped onto JE.d8
        assert tpl.text == s.new[1:]
        assert tpl.disp == int.from_bytes(s.new[2:], "little", signed=True)
        core.smp_text_poke_batch_finish()
    assert workload.sim.text_read(s.addr, 6) == s.new


def test_nop_entries_emulate_as_jumps_to_the_next_instruction(workload, core):
    n2, n5 = workload.by_name["nop2_jmp8"], workload.by_name["nop5_jmp32"]
    with core.text_mutex:
        core.smp_text_poke_batch_add(n2.addr, x86_nops[2])
        core.smp_text_poke_batch_add(n5.addr, x86_nops[5])
        t2, t5 = core.text_poke_array.vec
        assert (t2.opcode, t2.disp) == (0xEB, 0) and (t5.opcode, t5.disp) == (0xE9, 0)
        core.text_poke_array.vec.clear()


def _nop5_sled(n):
    """A module region of n NOP5 sites (no CPU runs it here)."""
    w = boot_workload(ncpus=2, seed=3, module_size=max(0x10000, n * 5 + 0x1000))
    return w, [MODULE_BASE + 5 * i for i in range(n)]


@pytest.mark.parametrize("n", [1, 255, 256, 257, 700])
@pytest.mark.parametrize("order", ["sorted", "shuffled", "reversed"])
def test_sync_broadcasts_are_at_most_three_per_256_sites(n, order):
    w, addrs = _nop5_sled(n)
    core = TextPoke(w.sim)
    if order == "shuffled":
        random.Random(n).shuffle(addrs)
    elif order == "reversed":
        addrs.reverse()
    with core.batch():
        for a in addrs:
            core.smp_text_poke_batch_add(a, text_gen_insn(0xE9, a, a + 5))
    assert core.stats.syncs <= 3 * math.ceil(n / TEXT_POKE_ARRAY_MAX)
    assert core.stats.sites == n
    for a in addrs:
        assert w.sim.text_read(a, 5) == text_gen_insn(0xE9, a, a + 5)


def test_kernel_order_mode_flushes_on_disorder():
    w, addrs = _nop5_sled(20)
    core = TextPoke(w.sim, keep_sorted=False)
    addrs.reverse()
    with core.batch():
        for a in addrs:
            core.smp_text_poke_batch_add(a, text_gen_insn(0xE9, a, a + 5))
    assert core.stats.flushes_unordered == 19
    assert core.stats.batches == 20 and core.stats.syncs == 60


@settings(max_examples=60)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True), st.randoms())
def test_batch_array_stays_sorted_and_applies_everything(slots, rnd):
    w, _ = _nop5_sled(1)
    core = TextPoke(w.sim)
    addrs = [MODULE_BASE + 5 * s for s in slots]
    rnd.shuffle(addrs)
    with core.text_mutex:
        for a in addrs:
            core.smp_text_poke_batch_add(a, text_gen_insn(0xE9, a, a + 5))
        rel = [t.rel_addr for t in core.text_poke_array.vec]
        assert rel == sorted(rel)
        core.smp_text_poke_batch_finish()
    for a in addrs:
        assert w.sim.text_read(a, 5)[0] == 0xE9
    assert core.stats.syncs == 3


SITE_SPECS = st.one_of(
    st.tuples(st.just("call"), st.integers(-1000, 1000)),
    st.tuples(st.just("jmp32"), st.integers(-1000, 1000)),
    st.tuples(st.just("jmp8"), st.integers(-128, 127)),
    st.tuples(st.just("jcc32"), st.integers(0, 15)),
    st.tuples(st.just("nop"), st.sampled_from([1, 2, 3, 4, 5])),
    st.tuples(st.just("ret"), st.integers(1, 5)),
    st.tuples(st.just("junk"), st.binary(min_size=1, max_size=5)),
)


def _build(kind, arg, addr):
    if kind == "call":
        return text_gen_insn(0xE8, addr, addr + 5 + arg), True
    if kind == "jmp32":
        return text_gen_insn(0xE9, addr, addr + 5 + arg), True
    if kind == "jmp8":
        return text_gen_insn(0xEB, addr, addr + 2 + arg), True
    if kind == "jcc32":
        return bytes([0x0F, 0x80 | arg]) + (16).to_bytes(4, "little"), True
    if kind == "nop":
        return x86_nops[arg], arg in (2, 5)
    if kind == "ret":
        return b"\xc3" + b"\xcc" * (arg - 1), True
    return arg, None


@settings(max_examples=150)
@given(SITE_SPECS)
def test_batch_add_accepts_exactly_what_the_rules_allow(spec):
    w, _ = _nop5_sled(1)
    core = TextPoke(w.sim)
    addr = MODULE_BASE + 64
    opcode, ok = _build(*spec, addr)
    before = w.sim.text_read(addr, 8)
    with core.text_mutex:
        try:
            core.smp_text_poke_batch_add(addr, opcode)
        except BadInstructionError:
            assert ok is not True
            assert w.sim.text_read(addr, 8) == before
            return
        assert ok is not False
        core.smp_text_poke_batch_finish()
    assert w.sim.text_read(addr, len(opcode)) == opcode


# --------------------------------------------------------- failure mid-batch
def test_machine_failure_mid_batch_rolls_every_site_back():
    """A write that fails part-way through the protocol: the sites already
    touched go back to their old bytes (no INT3 of ours left), the error
    propagates, and the CPUs -- which ran throughout -- never misbehaved."""
    from textpoke import Machine, MachineError
    w = boot_workload(ncpus=3, seed=12)
    sim = w.sim
    real_write = sim.text_poke_write
    calls = {"n": 0}

    def flaky_write(addr, data):
        calls["n"] += 1
        if calls["n"] == 7:            # after all INT3s and part of the tails
            raise MachineError("injected: the alias mapping went away")
        yield from real_write(addr, data)

    sim.text_poke_write = flaky_write
    # one write at a time through the flaky one (the protocol's default)
    sim.text_poke_write_many = lambda writes: Machine.text_poke_write_many(sim, writes)
    core = TextPoke(sim)
    sites = [w.by_name[n] for n in ("nop2_jmp8", "nop5_jmp32", "call", "jcc32", "xline_nop5")]
    before = _snapshot(w)
    w.start()
    sim.run(300)
    with pytest.raises(MachineError, match="injected"):
        with core.batch():
            for s in sites:
                core.smp_text_poke_batch_add(s.addr, s.new)
    sim.text_poke_write = real_write
    assert _snapshot(w) == before                     # every site is back to old bytes
    assert core.stats.rollbacks == 1
    assert core.text_poke_array.nr_entries == 0
    assert all(v == 0 for v in core.text_poke_array_refs.values())
    it = [w.iterations(c) for c in sim.cpus]
    sim.run(3000)
    assert not sim.oopses
    assert all(w.iterations(c) > i for c, i in zip(sim.cpus, it))
    for s in w.sites:
        for c in sim.cpus:
            assert all(n == 0 for v, n in enumerate(w.counts(c, s)) if v not in s.allowed)
    # and the core is usable again
    with core.batch():
        core.smp_text_poke_batch_add(sites[0].addr, sites[0].new)
    assert sim.text_read(sites[0].addr, 2) == sites[0].new
