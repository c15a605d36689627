# SPDX-License-Identifier: GPL-2.0-only
"""The boot self-tests ask the machine's declared capabilities (not
hasattr), and the INT3 self-test's handler sits on the trap chain as a die
notifier: after the text-poke and kprobes handlers, only for the call."""

from __future__ import annotations

import pytest

from textpoke import Capability, TextPoke, TrapPriority, alternative_instructions
from textpoke._alternative import alt_reloc_selftest, int3_selftest
from textpoke.lowlevel import int3_emulate_call
from textpoke.sim._boot import boot_kernel_image

MODERN = ["xmm2", "popcnt", "erms"]


@pytest.fixture
def booted():
    sim, image, tables = boot_kernel_image(1)
    return sim, image, tables, TextPoke(sim)


def _names(sim):
    return [h.__name__ for h in sim.trap_handlers]


def test_without_call_both_selftests_are_skipped_with_the_reason(booted):
    sim, image, tables, core = booted
    sim.capabilities = frozenset({Capability.SCRATCH, Capability.EXECMEM})
    assert not sim.has(Capability.CALL)
    for test in (int3_selftest, alt_reloc_selftest):
        t = test(core, image)
        assert t.passed is None and "cannot run guest functions" in t.detail, t
        assert t.name in t.detail
    # the boot still patches, and a skipped self-test is not a failure
    r = alternative_instructions(core, image, tables, MODERN)
    assert r.ok and [t.passed for t in r.selftests] == [None, None]
    assert sum(a.written for a in r.alternatives) > 0
    assert _names(sim) == ["smp_text_poke_int3_handler"]


def test_without_scratch_only_the_int3_selftest_is_skipped(booted):
    sim, image, tables, core = booted
    sim.capabilities = frozenset({Capability.CALL})
    t = int3_selftest(core, image)
    assert t.passed is None and "scratch" in t.detail
    r = alternative_instructions(core, image, tables, MODERN)
    assert [(t.name, t.passed) for t in r.selftests] == \
        [("int3_selftest", None), ("alt_reloc_selftest", True)]


def test_the_notifier_runs_after_kprobes_and_is_gone_afterwards(booted):
    sim, image, _tables, core = booted
    seen = []

    def kprobe_like(regs):
        seen.append(_names(sim))
        return False                       # not ours: pass it on
        yield

    with sim.register_trap_handler(kprobe_like, priority=TrapPriority.KPROBES):
        t = int3_selftest(core, image)
    assert t.passed is True and t.value == 1
    assert seen == [["smp_text_poke_int3_handler", "kprobe_like", "int3_exception_notify"]]
    assert _names(sim) == ["smp_text_poke_int3_handler"]


def test_a_kprobe_that_claims_the_int3_hides_it_from_the_notifier(booted):
    sim, image, _tables, core = booted
    ip, magic = image.sym("int3_selftest_ip"), image.sym("int3_magic")

    def kprobe_claims(regs):
        if regs.ip - 1 != ip:
            return False
        int3_emulate_call(regs, magic)
        return True
        yield

    with sim.register_trap_handler(kprobe_claims, priority=TrapPriority.KPROBES):
        t = int3_selftest(core, image)
    # val was stored (the CALL was emulated), but not by the self-test's own
    # handler, which must be what catches it
    assert t.passed is False and t.value == 1 and "handler hits 0" in t.detail


def test_a_later_handler_never_sees_a_trap_the_notifier_took(booted):
    sim, image, _tables, core = booted
    late = []

    def after_notifiers(regs):
        late.append(regs.ip)
        return False
        yield

    with sim.register_trap_handler(after_notifiers, priority=TrapPriority.NOTIFIER + 1):
        assert int3_selftest(core, image).passed is True
    assert late == []
