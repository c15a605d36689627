# SPDX-License-Identifier: GPL-2.0-only
"""SMP alternatives: the state is an object its owner keeps, and
alternatives_text_reserved answers the questions kprobes asks -- a one-byte
query ``(addr, addr)`` and an optimised probe's ``(src, src + len - 1)``,
*end* inclusive."""

from __future__ import annotations

import pytest

from textpoke import TextMutexError, TextPoke
from textpoke import (SmpAlternatives, alternative_instructions, alternatives_enable_smp,
                      alternatives_smp_module_add, alternatives_smp_module_del,
                      alternatives_text_reserved)
from textpoke.images._tables import SmpLock
from textpoke.sim._boot import boot_kernel_image

MODERN = ["xmm2", "popcnt", "erms"]


def _boot(ncpus=2, present=1, **kw):
    sim, image, tables = boot_kernel_image(ncpus)
    core = TextPoke(sim)
    r = alternative_instructions(core, image, tables, MODERN, ncpus=present, selftests=False, **kw)
    return sim, image, tables, core, r


@pytest.fixture(scope="module")
def up_booted():
    """Two possible CPUs, one present: the LOCK prefixes are DS now and
    their range is registered for going SMP later."""
    return _boot()


def _reserved(smp, start, end):
    with smp.core.text_mutex:
        return alternatives_text_reserved(smp, start, end)


def test_one_byte_query_on_a_lock_prefix(up_booted):
    sim, _image, tables, _core, r = up_booted
    locks = {lk.addr for lk in tables.smp_locks}
    assert r.uniproc_patched and len(locks) >= 2
    for lock in sorted(locks):
        assert sim.text_read(lock, 1) == b"\x3e"        # unlocked to DS, still reserved
        assert _reserved(r.smp, lock, lock), hex(lock)
        # the byte after the prefix is the opcode: not reserved for the SMP switch
        if lock + 1 not in locks:
            assert not _reserved(r.smp, lock + 1, lock + 1), hex(lock + 1)
        if lock - 1 not in locks:
            assert not _reserved(r.smp, lock - 1, lock - 1), hex(lock - 1)


def test_ranges_around_a_lock_prefix(up_booted):
    _sim, _image, tables, _core, r = up_booted
    locks = sorted(lk.addr for lk in tables.smp_locks)
    lock = locks[0]
    # an optimised kprobe over [src, src + len - 1]
    assert _reserved(r.smp, lock - 4, lock)                  # last byte is the prefix
    assert not _reserved(r.smp, lock - 5, lock - 1)          # ends just before it
    assert _reserved(r.smp, lock, lock + 4)                  # first byte is the prefix
    assert _reserved(r.smp, lock - 2, lock + 2)
    assert not _reserved(r.smp, lock + 1, lock)              # empty (end < start)
    # every small window near each prefix, against a plain inclusive oracle
    for lock in locks:
        for start in range(lock - 6, lock + 7):
            for end in range(start, start + 6):
                want = any(start <= a <= end for a in locks)
                assert _reserved(r.smp, start, end) == want, (hex(start), hex(end))


def test_text_reserved_needs_text_mutex_and_a_registered_range(up_booted):
    _sim, image, tables, core, r = up_booted
    lock = tables.smp_locks[0].addr
    with pytest.raises(TextMutexError):
        alternatives_text_reserved(r.smp, lock, lock)
    # nothing registered on an SMP boot, nor with a single possible CPU
    for ncpus, present in ((2, 2), (1, 1)):
        *_, smp_r = _boot(ncpus, present)
        assert smp_r.smp.modules == []
        assert not _reserved(smp_r.smp, lock, lock)


def test_module_add_and_del():
    sim, image, tables, core, r = _boot()
    smp = r.smp
    text = tables.text
    lock = tables.smp_locks[0].addr
    # a second range under its own name, given as bare addresses
    alternatives_smp_module_del(smp, "core kernel")
    assert not _reserved(smp, lock, lock)
    (rec,) = alternatives_smp_module_add(smp, "mod", [lock], text, image=image)
    assert (rec.addr, rec.action, rec.old) == (lock, "unchanged", b"\x3e")   # DS already
    assert [m.name for m in smp.modules] == ["mod"] and smp.modules[0].locks == (lock,)
    assert _reserved(smp, lock, lock)
    with pytest.raises(TypeError, match="SmpLock or an address"):
        alternatives_smp_module_add(smp, "bad", ["0x10"], text)
    back = alternatives_enable_smp(smp, image=image)
    assert [(s.addr, s.action) for s in back] == [(lock, "patched")]
    assert sim.text_read(lock, 1) == b"\xf0"
    assert not smp.uniproc_patched
    # once SMP, adding a range registers nothing and writes nothing
    assert alternatives_smp_module_add(smp, "late", [SmpLock(lock)], text) == ()
    assert [m.name for m in smp.modules] == ["mod"]


def test_state_is_owned_per_core_not_shared():
    sim_a, image, tables, core_a, ra = _boot()
    sim_b, _image, _tables, core_b, rb = _boot()
    assert isinstance(ra.smp, SmpAlternatives) and ra.smp is not rb.smp
    assert ra.smp.core is core_a and rb.smp.core is core_b
    alternatives_enable_smp(ra.smp)
    lock = tables.smp_locks[0].addr
    assert sim_a.text_read(lock, 1) == b"\xf0" and sim_b.text_read(lock, 1) == b"\x3e"
    assert rb.smp.uniproc_patched and not ra.smp.uniproc_patched
    # the old call shape (a TextPoke) is refused with a pointer to the state
    with pytest.raises(TypeError, match="BootResult.smp"):
        alternatives_enable_smp(core_b)
    # a caller-owned state is filled in, and must belong to the same core
    sim_c, image, tables = boot_kernel_image(2)
    core_c = TextPoke(sim_c)
    with pytest.raises(ValueError, match="another TextPoke"):
        alternative_instructions(core_c, image, tables, MODERN, ncpus=1, selftests=False,
                                 smp=ra.smp)
    own = SmpAlternatives(core_c)
    r2 = alternative_instructions(core_c, image, tables, MODERN, ncpus=1, selftests=False, smp=own)
    assert r2.smp is own and own.uniproc_patched and [m.name for m in own.modules] == ["core kernel"]
