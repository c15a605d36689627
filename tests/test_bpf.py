# SPDX-License-Identifier: GPL-2.0-only
"""BPF-style pokes on four running vCPUs: a JIT-ed program placed in
execmem, called through a NOP5 site turned CALL/JMP, replaced, refused on
an unexpected old instruction, removed and freed (INT3)."""

from __future__ import annotations

import errno

import pytest

from textpoke import (BadAddressError, BpfJit, BpfTextPokeBusy, ExecMem, ExecMemError,
                      x86_nops)
from textpoke._bpf import jit_add_const
from textpoke import BPF_MOD_CALL, BPF_MOD_JUMP, bpf_arch_text_poke
from textpoke.sim import ClientMachine


@pytest.fixture
def cm():
    with ClientMachine(cpus=4, seed=7) as m:
        yield m


def test_jit_programs_called_through_patched_sites(cm):
    jit = cm.kernel.bpf                          # the kernel makes the JIT on first use
    assert isinstance(jit, BpfJit) and jit.execmem is cm.kernel.modules.execmem
    p1, p2 = jit.load(jit_add_const(40)), jit.load(jit_add_const(1000))
    assert cm.sim.text_read(p1.addr, p1.size) == p1.code
    assert not cm.sim.text_ranges[0].start <= p1.addr < cm.sim.text_ranges[0].end   # module text
    call_ip, jmp_ip = cm.sym("bpf_call_poke"), cm.sym("bpf_jmp_poke")
    ci = cm.add_probe("bpf_call_site", arg=5, allow=[7])
    ji = cm.add_probe("bpf_jmp_site", arg=6, allow=[7])
    cm.start()
    cm.wait_passes(2)
    steps = [
        (BPF_MOD_CALL, ci, call_ip, None, p1, 7, 45),
        (BPF_MOD_JUMP, ji, jmp_ip, None, p1, 7, 46),
        (BPF_MOD_CALL, ci, call_ip, p1, p2, 45, 1005),
        (BPF_MOD_JUMP, ji, jmp_ip, p1, p2, 46, 1006),
        (BPF_MOD_CALL, ci, call_ip, p2, None, 1005, 7),
    ]
    for t, slot, ip, old, new, was, now in steps:
        cm.allow(slot, [was, now])
        assert jit.text_poke(ip, t, old, new) == 0
        assert cm.expect({slot: now}) == {}
    assert cm.sim.text_read(call_ip, 5) == x86_nops[5]
    # already new: nothing done
    b0 = cm.core.stats.batches
    assert jit.text_poke(jmp_ip, BPF_MOD_JUMP, p2, p2) == 1 and cm.core.stats.batches == b0
    # the expected-old check: EBUSY, nothing written
    before = cm.sim.text_read(jmp_ip, 5)
    with pytest.raises(BpfTextPokeBusy) as ei:
        bpf_arch_text_poke(cm.core, jmp_ip, BPF_MOD_JUMP, p1.addr, None)
    assert ei.value.errno == errno.EBUSY and ei.value.found == before
    assert cm.sim.text_read(jmp_ip, 5) == before and cm.core.stats.batches == b0
    # take the program off the site, then free the JIT memory: INT3 fill
    cm.allow(ji, [1006, 7])
    jit.text_poke(jmp_ip, BPF_MOD_JUMP, p2, None)
    assert cm.expect({ji: 7}) == {}
    jit.free(p1)
    jit.free(p2)
    assert cm.sim.text_read(p1.addr, 16) == b"\xcc" * 16
    assert cm.oopses == 0 and cm.bad() == []


def test_execmem_allocator(cm):
    em = ExecMem(cm.core)
    a, b = em.alloc(10), em.alloc(100)
    assert b >= a + 16 and a % 16 == 0
    em.free(a)
    assert em.alloc(16) == a                     # first fit reuses the hole
    with pytest.raises(ExecMemError):
        em.free(a + 1)
    with pytest.raises(ExecMemError):
        em.alloc(em.end - em.start + 1)


def test_invalidate_refuses_core_text(cm):
    em = ExecMem(cm.core, start=cm.sym("bpf_call_site"), end=cm.sym("bpf_call_site") + 64)
    a = em.alloc(16)
    with pytest.raises(BadAddressError):
        em.free(a)


def test_endbr_before_the_hook_is_stepped_over_with_ibt(cm):
    from textpoke._bpf import is_endbr
    jit = cm.kernel.bpf
    p1 = jit.load(jit_add_const(3))
    for endbr in (bytes.fromhex("f30f1efa"), bytes.fromhex("f30f1efb"), bytes.fromhex("660f1f00")):
        assert is_endbr(int.from_bytes(endbr, "little"))
        # a program whose prologue is ENDBR + the NOP5 hook
        hooked = jit.load(endbr + x86_nops[5] + jit_add_const(1))
        assert jit.text_poke(hooked.addr, BPF_MOD_CALL, None, p1) == 0
        assert cm.sim.text_read(hooked.addr, 4) == endbr                 # ENDBR kept
        assert cm.sim.text_read(hooked.addr + 4, 5) == \
            b"\xe8" + (p1.addr - hooked.addr - 9).to_bytes(4, "little", signed=True)
    assert not is_endbr(int.from_bytes(x86_nops[4], "little"))
    # without IBT the ENDBR is the instruction at ip: the NOP5 is not there
    plain = BpfJit(cm.core, execmem=jit.execmem, ibt=False)
    h = plain.load(bytes.fromhex("f30f1efa") + x86_nops[5] + jit_add_const(1))
    with pytest.raises(BpfTextPokeBusy):
        plain.text_poke(h.addr, BPF_MOD_CALL, None, p1)


def test_address_outside_kernel_and_bpf_text_is_invalid(cm):
    from textpoke import BpfTextPokeInvalid
    jit = cm.kernel.bpf
    p1 = jit.load(jit_add_const(3))
    # execmem that is no BPF program (module text, say), and guest data
    other = jit.execmem.alloc(16)
    cm.core.text_poke_copy(other, x86_nops[5] + b"\xcc" * 11)
    b0 = cm.core.stats.batches
    for ip in (other, cm.recs):
        with pytest.raises(BpfTextPokeInvalid) as ei:
            jit.text_poke(ip, BPF_MOD_CALL, None, p1)
        assert ei.value.errno == errno.EINVAL and ei.value.ip == ip
    with pytest.raises(BpfTextPokeInvalid):
        bpf_arch_text_poke(cm.core, p1.addr, BPF_MOD_CALL, None, p1.addr)    # no BPF text known
    assert cm.sim.text_read(other, 5) == x86_nops[5] and cm.core.stats.batches == b0
