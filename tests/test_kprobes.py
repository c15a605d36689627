# SPDX-License-Identifier: GPL-2.0-only
"""kprobes, kretprobes and optimised kprobes on 4 running vCPUs: the cases
of lib/test_kprobes.c, out-of-line execution and emulation, an optimised
probe counted against a guest counter across optimise/unoptimise, and
every refusal rule with the text unchanged."""

from __future__ import annotations

import pytest

from textpoke import Capability, KprobeError, SmpAlternatives, TrapPriority, x86_nops
from textpoke._alternative._smp_locks import SmpAltModule
from textpoke._kprobes._guest import DIV_FACTOR, HELPER_ADD, OPT_K, build_guest_functions
from textpoke.sim import ClientMachine

RAND1 = 0x2F5A_1C37          # lib/test_kprobes.c draws rand1 at random; any u32 > 0 will do


@pytest.fixture
def rig():
    with ClientMachine(cpus=4, seed=7) as cm:
        kp = cm.kernel.kprobes
        g = build_guest_functions(kp, cm.sim)
        yield cm, kp, g
        kp.close()
        assert cm.oopses == 0


def _text(cm, g, name):
    a, n = g.funcs[name]
    return cm.sim.text_read(a, n)


def _per_cpu(hits):
    return {h[0] for h in hits}


def test_trap_chain_order(rig):
    cm, kp, _g = rig
    chain = cm.sim.trap_handlers
    assert chain.index(cm.core.smp_text_poke_int3_handler) < chain.index(kp.kprobe_int3_handler)
    assert kp._handle.priority == TrapPriority.KPROBES


def test_kprobe_pre_post_handler_values(rig):
    """test_kprobe: the pre-handler runs before the probed instruction, the
    post-handler after it (out of line), on every CPU, and the function
    still returns rand1 / div_factor."""
    cm, kp, g = rig
    i = cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1,
                     allow=[RAND1 // DIV_FACTOR])
    cm.start()
    cm.wait_passes(1)
    pre, post = [], []

    def pre_h(p, regs):
        pre.append((regs.cpu, regs.ip, regs.gprs["rdi"] & 0xFFFFFFFF))

    def post_h(p, regs, flags):
        # `mov eax, edi` has run: eax holds the argument now
        post.append((regs.cpu, regs.ip, regs.gprs["rax"] & 0xFFFFFFFF))

    p = kp.register_kprobe("kprobe_target", pre_h, post_h)
    assert kp.site_info(p)["how"] == "single-step"
    assert cm.sim.text_read(p.addr, 1) == b"\xcc"
    assert cm.wait_passes(3)
    kp.unregister_kprobe(p)
    assert not cm.expect({i: RAND1 // DIV_FACTOR})
    assert pre and len(pre) == len(post) == p.nhit
    assert _per_cpu(pre) == set(cm.sim.cpus)
    assert all(ip == p.addr + 1 and rdi == RAND1 for _c, ip, rdi in pre)
    assert all(ip == p.addr + 2 and rax == RAND1 for _c, ip, rax in post)
    assert cm.bad() == [] and cm.oopses == 0
    assert kp.stats.single_stepped >= len(post)


def test_kprobes_register_unregister_several(rig):
    """test_kprobes: two probes registered together, both hit; after
    unregistering, the text is the original and they are hit no more."""
    cm, kp, g = rig
    before = {n: _text(cm, g, n) for n in ("kprobe_target", "kprobe_target2")}
    i1 = cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1,
                      allow=[RAND1 // DIV_FACTOR])
    i2 = cm.add_probe("kprobe_target2", addr=g.addr("kprobe_target2"), arg=RAND1,
                      allow=[RAND1 // DIV_FACTOR + 1])
    cm.start()
    seen = {}

    def pre(p, regs):
        seen[p.name] = seen.get(p.name, 0) + 1

    def post(p, regs, flags):
        seen[p.name + "/post"] = seen.get(p.name + "/post", 0) + 1

    ps = kp.register_kprobes([("kprobe_target", pre, post), ("kprobe_target2+4", pre, post)])
    assert cm.wait_passes(3)
    kp.unregister_kprobes(ps)
    n = dict(seen)
    assert n["kprobe_target+0x0"] > 0 and n["kprobe_target2+0x4"] > 0
    assert n["kprobe_target+0x0"] == n["kprobe_target+0x0/post"]
    assert n["kprobe_target2+0x4"] == n["kprobe_target2+0x4/post"]
    assert {k: _text(cm, g, k) for k in before} == before
    assert cm.wait_passes(2)
    assert seen == n                      # unregistered: no more hits
    assert not cm.expect({i1: RAND1 // DIV_FACTOR, i2: RAND1 // DIV_FACTOR + 1})
    assert not kp.probes and cm.oopses == 0


@pytest.mark.parametrize("off,how", [(0, "boosted"), (2, "single-step"), (9, "emulated"),
                                     (14, "single-step"), (25, "emulated")])
def test_each_kind_of_instruction(rig, off, how):
    """kp_opt_target: xor (boosted copy), a RIP-relative load (copy with
    its displacement re-targeted), a CALL (emulated: the callee sees the
    original return address), LOCK INC of a RIP-relative counter, RET."""
    cm, kp, g = rig
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=11,
                     allow=[11 + OPT_K + HELPER_ADD])
    cm.start()
    post = [] if how != "boosted" else None
    p = kp.register_kprobe(f"kp_opt_target+{off}", lambda p, r: None,
                           (lambda p, r, f: post.append(r.ip)) if post is not None else None)
    assert kp.site_info(p)["how"] == how
    assert cm.wait_passes(3)
    kp.unregister_kprobe(p)               # waits until no CPU is in the slot
    assert p.nhit >= 4
    if post is not None:
        assert len(post) == p.nhit
        want = {2: {p.addr + 7}, 9: {g.addr("kp_helper")}, 14: {p.addr + 8}}.get(off)
        if want is None:      # RET: back in the caller
            loop = cm.sym("client_loop")
            assert all(loop < ip < loop + cm.image.sizes["client_loop"] for ip in post)
        else:
            assert set(post) == want
    assert not cm.expect({i: 11 + OPT_K + HELPER_ADD})
    assert cm.bad() == [] and cm.oopses == 0


def test_jcc_emulated_both_ways(rig):
    cm, kp, g = rig
    ipos = cm.add_probe("kp_abs", addr=g.addr("kp_abs"), arg=5, allow=[5])
    ineg = cm.add_probe("kp_abs", addr=g.addr("kp_abs"), arg=-6, allow=[6])
    cm.start()
    after = []
    p = kp.register_kprobe("kp_abs+3", None, lambda p, r, f: after.append(r.ip))
    assert kp.site_info(p)["how"] == "emulated"
    assert cm.wait_passes(3)
    kp.unregister_kprobe(p)
    a = g.addr("kp_abs")
    assert set(after) == {a + 5, a + 9}      # not taken, taken
    assert not cm.expect({ipos: 5, ineg: 6})


def test_kretprobe_return_values(rig):
    """test_kretprobe / test_kretprobes: the return handler sees the return
    value, the function returns to its real caller."""
    cm, kp, g = rig
    i1 = cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1,
                      allow=[RAND1 // DIV_FACTOR])
    i2 = cm.add_probe("kprobe_target2", addr=g.addr("kprobe_target2"), arg=RAND1,
                      allow=[RAND1 // DIV_FACTOR + 1])
    cm.start()
    got = {1: [], 2: []}
    entries = []

    def entry(ri, regs):
        entries.append(ri.ret_addr)
        ri.data["arg"] = regs.gprs["rdi"]

    rp1 = kp.register_kretprobe("kprobe_target", lambda ri, r: got[1].append(
        (r.gprs["rax"], ri.data["arg"], r.ip == ri.ret_addr)), entry)
    rp2 = kp.register_kretprobe("kprobe_target2", lambda ri, r: got[2].append(
        (r.gprs["rax"], None, r.ip == ri.ret_addr)))
    assert cm.wait_passes(3)
    kp.unregister_kretprobe(rp1)
    kp.unregister_kretprobe(rp2)
    assert got[1] and got[2]
    assert all(v == (RAND1 // DIV_FACTOR, RAND1, True) for v in got[1])
    assert all(v == (RAND1 // DIV_FACTOR + 1, None, True) for v in got[2])
    assert rp1.nhit == len(got[1]) and rp2.nhit == len(got[2])
    loop = cm.sym("client_loop")
    assert all(loop <= a < loop + cm.image.sizes["client_loop"] for a in entries)
    assert cm.wait_passes(2)
    assert kp.pending_instances() == 0
    assert not cm.expect({i1: RAND1 // DIV_FACTOR, i2: RAND1 // DIV_FACTOR + 1})
    assert cm.oopses == 0


def test_kretprobe_on_image_function_skips_fentry(rig):
    cm, kp, _g = rig
    a = cm.sym("sc_func_a")
    assert a in kp.fentry
    i = cm.add_probe("sc_func_a", arg=41, allow=[42])
    cm.start()
    rv = []
    rp = kp.register_kretprobe("sc_func_a", lambda ri, r: rv.append(r.gprs["rax"]))
    assert rp.kp.addr == a + 5
    assert cm.wait_passes(3)
    kp.unregister_kretprobe(rp)
    assert rv and set(rv) == {42}
    assert not cm.expect({i: 42})


def test_optimized_kprobe_counts_every_call(rig):
    """An optimised probe on kp_opt_target (RIP-relative load in the
    displaced range, a CALL right after it): every CPU computes x + 1007,
    and the handler count equals the guest's own call counter, across
    optimise/unoptimise while the CPUs run it."""
    cm, kp, g = rig
    want = 3 + OPT_K + HELPER_ADD
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=3, allow=[want])
    cm.disable_probe(i)
    cm.start()
    seen = []

    def handler(p, regs):
        seen.append((regs.cpu, regs.ip, regs.gprs["rdi"]))

    p = kp.register_kprobe("kp_opt_target", handler)
    cm.sim.mem_write(g.counter, bytes(8))
    for c in cm.sim.cpus:
        cm._w(cm._slot(c, i, 0), g.addr("kp_opt_target"))     # enable the probe slot again
    assert cm.wait_passes(2)
    states = []
    batches0 = cm.core.stats.batches
    for _ in range(3):
        kp.optimize_kprobe(p)
        states.append(kp.site_info(p)["how"])
        assert cm.sim.text_read(p.addr, 1) == b"\xe9"
        assert cm.wait_passes(2)
        kp.unoptimize_kprobe(p)
        states.append(kp.site_info(p)["how"])
        assert cm.sim.text_read(p.addr, 1) == b"\xcc"
        assert cm.wait_passes(2)
    assert cm.core.stats.batches - batches0 == 3   # optimising batches; unoptimising does not
    assert states == ["optimized", "boosted"] * 3
    assert kp.site_info(p)["displaced"] == 9       # xor + the RIP-relative mov
    kp.optimize_kprobe(p)
    assert cm.wait_passes(2)
    cm.disable_probe(i)
    assert cm.wait_passes(2)                        # nobody is inside the function now
    calls = g.opt_calls(cm.sim)
    assert calls > 0 and len(seen) == calls == p.nhit
    assert kp.stats.detour_hits > 0 and kp.stats.hits > 0
    assert all(ip == p.addr + 1 and rdi == 3 for _c, ip, rdi in seen)
    assert {c for c, _ip, _r in seen} == set(cm.sim.cpus)
    assert cm.calls_made(i) == calls
    kp.unregister_kprobe(p)
    assert _text(cm, g, "kp_opt_target")[:9] == bytes.fromhex("31c0488b05") + \
        cm.sim.text_read(g.addr("kp_opt_target") + 5, 4)
    assert cm.bad() == [] and cm.oopses == 0


def test_optimized_handler_changes_registers(rig):
    """The detour restores what the handler wrote into the saved frame."""
    cm, kp, g = rig
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=3, allow=[3 + 1007, 103 + 1007])
    cm.start()
    p = kp.register_kprobe("kp_opt_target", lambda p, r: r.gprs.__setitem__("rdi", 103))
    kp.optimize_kprobe(p)
    assert not cm.expect({i: 103 + OPT_K + HELPER_ADD})
    kp.unregister_kprobe(p)
    assert not cm.expect({i: 3 + OPT_K + HELPER_ADD})


def test_optprobe_buffer_is_the_kernels_template_layout(rig):
    """The out-of-line buffer is laid out as arch_prepare_optimized_kprobe
    lays it: optprobe_template (pt_regs pushed, NOP3 without SMAP), the op
    pointer into rdi, a call of optimized_callback, the displaced copies,
    the JMP back; in consecutive MAX_OPTINSN_SIZE slots of one page."""
    import struct

    from textpoke._kprobes._opt import (MAX_OPTINSN_SIZE, TMPL_CALL_IDX, TMPL_END_IDX,
                                        TMPL_MOVE_IDX, optprobe_template)
    cm, kp, g = rig
    cm.start()
    p = kp.register_kprobe("kp_opt_target", lambda p, r: None)
    q = kp.register_kprobe("kprobe_target", lambda p, r: None)
    kp.optimize_kprobes([p, q])
    dp, dq = kp.site_info(p)["detour"], kp.site_info(q)["detour"]
    assert dq - dp == MAX_OPTINSN_SIZE                 # slot 1 after slot 0 of the page
    n = kp.site_info(p)["displaced"]
    b = cm.sim.text_read(dp, TMPL_END_IDX + n + 5)
    tmpl = optprobe_template()
    assert b[:TMPL_MOVE_IDX] == tmpl[:TMPL_MOVE_IDX]
    # push $__KERNEL_DS; push %rsp; pushfq; NOP3; sub $24, %rsp; push %rdi
    assert b[:12] == bytes.fromhex("6a18549c0f1f004883ec1857")
    assert b[TMPL_MOVE_IDX:TMPL_MOVE_IDX + 2] == b"\x48\xbf"        # movabs $op, %rdi
    call = TMPL_CALL_IDX
    assert b[call] == 0xE8 and \
        dp + call + 5 + struct.unpack("<i", b[call + 1:call + 5])[0] == kp._opt_stub
    assert b[call + 5:TMPL_END_IDX] == tmpl[call + 5:]
    # the copies (xor; the RIP-relative mov re-targeted) and the JMP back
    assert b[TMPL_END_IDX:TMPL_END_IDX + 2] == bytes.fromhex("31c0")
    j = TMPL_END_IDX + n
    assert b[j] == 0xE9 and dp + j + 5 + struct.unpack("<i", b[j + 1:j + 5])[0] == p.addr + n
    assert not cm.bad() and cm.oopses == 0


def test_instruction_slots_are_the_kernels_cache(rig):
    """kprobe_insn_slots: every probe, emulated or not, gets a 16-byte slot
    (MAX_INSN_SIZE) of one page with its copy and tail, as arch_copy_kprobe
    writes them; unregistering only marks the slot free (its bytes stay,
    as in the kernel's page), and the next probe takes it again."""
    cm, kp, g = rig
    cm.start()
    call = cm.sim.text_read(g.addr("kp_opt_target") + 9, 5)
    # a RIP-relative mov, single-stepped (a post-handler: never boosted)
    a = kp.register_kprobe("kp_opt_target+2", lambda p, r: None, lambda p, r, f: None)
    b = kp.register_kprobe("kp_opt_target+9", lambda p, r: None)       # CALL: emulated
    sa, sb = kp.site_info(a)["slot"], kp.site_info(b)["slot"]
    assert kp.insn_slots.pages[0][0] == sa and sb == sa + 16      # slots 0 and 1 of a page
    assert kp.site_info(b)["how"] == "emulated"
    assert call[0] == 0xE8 and cm.sim.text_read(sb, 6) == call + b"\xcc"     # the copy, never run, and its INT3
    held = cm.sim.text_read(sa, 16)
    kp.unregister_kprobe(a)
    assert cm.sim.text_read(sa, 16) == held             # not cleared (was INT3-filled)
    c = kp.register_kprobe("kprobe_target", lambda p, r: None)
    assert kp.site_info(c)["slot"] == sa                # the clean slot is reused
    kp.unregister_kprobes([b, c])
    assert len(kp.insn_slots.pages) == 1 and 1 not in kp.insn_slots.pages[0][1]   # none in use


def test_a_boosted_slot_is_dirty_until_collected(rig):
    """A boosted copy may still be run by a preempted task: its slot is
    freed dirty (free_insn_slot(.., boostable)) and is not handed out again
    until a garbage collection, which runs when no clean slot is left."""
    from textpoke._kprobes._opt import InsnSlots
    cm, kp, _g = rig
    cm.start()
    p = kp.register_kprobe("kp_opt_target")                            # xor: boosted
    assert kp.site_info(p)["how"] == "boosted"
    s = kp.site_info(p)["slot"]
    kp.unregister_kprobe(p)
    q = kp.register_kprobe("kp_opt_target")
    assert kp.site_info(q)["slot"] == s + 16            # the dirty one is skipped
    kp.unregister_kprobe(q)
    # the cache alone: a full page of dirty slots is collected on the next alloc
    slots = InsnSlots(kp.execmem)
    got = [slots.alloc() for _ in range(slots.per_page)]
    for a in got:
        slots.free(a, dirty=True)
    assert slots.nr_garbage == slots.per_page
    assert slots.alloc() == got[0] and slots.nr_garbage == 0 and len(slots.pages) == 1


# ---------------------------------------------------------------- refusals
def _refused(cm, kp, spec, reason, span, *, post=None, match=None):
    a, n = span
    before = cm.sim.text_read(a, n)
    with pytest.raises(KprobeError, match=match) as ei:
        kp.register_kprobe(spec, lambda p, r: None, post)
    assert ei.value.reason == reason, str(ei.value)
    assert cm.sim.text_read(a, n) == before
    assert not kp.probes


def test_refusals_leave_text_unchanged(rig):
    cm, kp, g = rig
    cm.start()
    cm.wait_passes(1)
    tgt = g.funcs["kp_opt_target"]
    _refused(cm, kp, "kp_opt_target+1", "boundary", tgt)          # inside the xor
    _refused(cm, kp, "kp_opt_target+5", "boundary", tgt)          # inside the mov
    _refused(cm, kp, "kp_int3_range+3", "int3", g.funcs["kp_int3_range"])
    _refused(cm, kp, "no_such_function", "symbol", tgt)
    sc = cm.sym("sc_func_a")
    _refused(cm, kp, "sc_func_a+0", "fentry", (sc, 16))           # the fentry NOP
    # a LOCK prefix the SMP alternatives own: on 4 possible CPUs the boot
    # registered none (as the kernel), so register the image's as a UP boot does
    smp = SmpAlternatives(cm.core)
    locks = tuple(sorted(lk.addr for lk in cm.tables.smp_locks))
    text = cm.sim.text_ranges[0]
    smp.modules.append(SmpAltModule("vmlinux", locks, (text.start, text.end)))
    kp.smp = smp
    lock = next(a for a in locks if kp.function_at(a))
    f = kp.function_at(lock)
    # ... is accepted: the kernel's one-byte alternatives_text_reserved(addr,
    # addr) compares the end exclusively and never matches
    before = cm.sim.text_read(f[1], f[2])
    p = kp.register_kprobe(f"{f[0]}+{lock - f[1]}", lambda p, r: None)
    assert cm.sim.text_read(lock, 1) == b"\xcc"
    kp.unregister_kprobe(p)
    assert cm.sim.text_read(f[1], f[2]) == before
    assert kp.text_reserved(lock, lock + 4) == "alternatives (LOCK prefix)"   # a detour's range
    # a jump-label site
    site = next(s.entry.code for k in cm.keys.keys.values() for s in k.sites
                if kp.function_at(s.entry.code))
    f = kp.function_at(site)
    _refused(cm, kp, f"{f[0]}+{site - f[1]}", "reserved", (f[1], f[2]), match="jump_label")
    # a static-call site
    site = next(s.site.addr for c in cm.calls.calls.values() for s in c.sites
                if kp.function_at(s.site.addr))
    f = kp.function_at(site)
    _refused(cm, kp, f"{f[0]}+{site - f[1]}", "reserved", (f[1], f[2]), match="static_call")
    # a kretprobe off the function entry
    with pytest.raises(KprobeError) as ei:
        kp.register_kretprobe("kprobe_target+2", lambda ri, r: None)
    assert ei.value.reason == "entry"
    assert cm.oopses == 0


def _opt_refused(cm, kp, p, span, match):
    a, n = span
    before = cm.sim.text_read(a, n)
    with pytest.raises(KprobeError, match=match) as ei:
        kp.optimize_kprobe(p)
    assert ei.value.reason == "optimize"
    assert cm.sim.text_read(a, n) == before
    assert before[p.addr - a] == 0xCC and not kp.is_optimized(p)   # still an INT3 probe


def test_optimize_refusals(rig, monkeypatch):
    cm, kp, g = rig
    cm.start()
    cm.wait_passes(1)
    # the bundled image's config has IBT (no jump tables: indirect jumps are
    # taken, as can_optimize does); a kernel that may have jump tables refuses
    assert kp.jump_tables is False
    kp.jump_tables = True
    cases = [("kp_jump_in", "jumps into the range"),
             ("kp_indirect", "indirect jump"),
             ("kp_int3_range", "INT3"),
             ("kprobe_target+10", "shorter than 5|bytes to the end")]
    for spec, match in cases:
        name = spec.split("+")[0]
        p = kp.register_kprobe(spec, lambda p, r: None)
        _opt_refused(cm, kp, p, g.funcs[name], match)
        kp.unregister_kprobe(p)
    p = kp.register_kprobe("kp_opt_target", lambda p, r: None, lambda p, r, f: None)
    _opt_refused(cm, kp, p, g.funcs["kp_opt_target"], "post-handler")
    kp.unregister_kprobe(p)
    # a detour beyond +-2 GiB
    p = kp.register_kprobe("kp_opt_target", lambda p, r: None)
    monkeypatch.setattr(kp, "_alloc_detour", lambda: p.addr + (3 << 30))
    monkeypatch.setattr(kp, "_free_detour", lambda a: None)
    _opt_refused(cm, kp, p, g.funcs["kp_opt_target"], "2 GiB")
    monkeypatch.undo()
    kp.unregister_kprobe(p)
    assert cm.sim.text_read(*g.funcs["kp_opt_target"]) == _text(cm, g, "kp_opt_target")
    # an IBT kernel (no jump tables) optimises a function with an indirect jump
    kp.jump_tables = False
    p = kp.register_kprobe("kp_indirect", lambda p, r: None)
    kp.optimize_kprobe(p)
    assert kp.is_optimized(p)
    kp.unregister_kprobe(p)
    assert cm.oopses == 0


def test_close_restores_everything(rig):
    cm, kp, g = rig
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=1, allow=[1008])
    cm.start()
    orig = {n: _text(cm, g, n) for n in g.funcs}
    a = kp.register_kprobe("kp_opt_target", lambda p, r: None)
    kp.register_kprobe("kp_opt_target+14", None, lambda p, r, f: None)
    kp.register_kretprobe("kprobe_target", lambda ri, r: None)
    kp.optimize_kprobe(a)
    cm.wait_passes(2)
    cm.disable_probe(i)
    cm.wait_passes(2)
    kp.close()
    assert {n: _text(cm, g, n) for n in g.funcs} == orig
    assert kp.kprobe_int3_handler not in cm.sim.trap_handlers
    assert cm.oopses == 0


# ---------------------------------------------------------------- CLI
def test_cli_selftest_json(capsys):
    import json

    from textpoke.cli import main
    assert main(["kprobe", "--selftest", "--json", "--cpus", "4", "--seed", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["selftest"]["passed"] and len(d["selftest"]["cases"]) >= 10
    assert d["oopses"] == 0 and d["syncs"] > 0 and d["batches"] >= 2


def test_cli_probe_prints_registers(capsys):
    from textpoke.cli import main
    assert main(["kprobe", "kp_opt_target", "--optimize", "--show", "2"]) == 0
    text = capsys.readouterr().out
    assert "optimized" in text and "rdi=0x3" in text and "0 oopses" in text


def test_cli_exit_codes(capsys):
    from textpoke.cli import main
    assert main(["kprobe", "no_such_function"]) == 2
    assert main(["kprobe", "kp_opt_target+1"]) == 2        # not an instruction boundary
    assert main(["kprobe"]) == 2
    capsys.readouterr()


def _decoded(hexbytes):
    from textpoke import insn_decode_kernel
    return insn_decode_kernel(bytes.fromhex(hexbytes) + b"\xcc" * 15, 0x1000000)


@pytest.mark.parametrize("code,boost", [
    ("0fbae005", False),          # bt eax, 5: not in 6.12's table
    ("0fb10e", True),             # cmpxchg [rsi], ecx
    ("f00fb10e", True),           # lock cmpxchg: LOCK does not stop boosting
    ("f0ff06", True),             # lock inc dword [rsi]
    ("0fc10e", True),             # xadd
    ("0fa4c105", True),           # shld ecx, eax, 5
    ("0f31", True),               # rdtsc
    ("0fc70e", False),            # cmpxchg8b
    ("0f0b", False),              # ud2
    ("0f1f00", True),             # nopl (%rax)
    ("2e8b06", False),            # CS override
    ("678b06", False),            # address-size override
    ("f3a4", True),               # rep movsb (REP is a prefix, not the opcode)
    ("0f380000", False),          # three-byte opcode
])
def test_can_boost_follows_6_12(code, boost):
    from textpoke._kprobes._insn import can_boost
    assert can_boost(_decoded(code)) is boost


def test_exception_instructions_refused():
    from textpoke._kprobes._insn import is_exception_insn
    for code in ("0f0b", "0fb9c0", "0fff00", "cc", "cd03", "f1"):    # (INTO is invalid in 64-bit)
        assert is_exception_insn(_decoded(code)), code
    assert not is_exception_insn(_decoded("0f1f00"))


def test_no_boosting_with_preemption(rig):
    cm, kp, g = rig
    i = cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1,
                     allow=[RAND1 // DIV_FACTOR])
    cm.start()
    p = kp.register_kprobe("kprobe_target", lambda p, r: None)
    assert kp.site_info(p)["how"] == "boosted"           # the bundled image: no PREEMPTION
    kp.unregister_kprobe(p)
    kp.preemption = True                                 # CONFIG_PREEMPTION=y, Debian's
    p = kp.register_kprobe("kprobe_target", lambda p, r: None)
    assert kp.site_info(p)["how"] == "single-step"
    assert cm.wait_passes(2)
    kp.unregister_kprobe(p)
    assert kp.stats.single_stepped > 0 and not cm.expect({i: RAND1 // DIV_FACTOR})


def test_kretprobe_maxactive_default(rig):
    cm, kp, g = rig
    rp = kp.register_kretprobe("kprobe_target", lambda ri, r: None)
    assert rp.maxactive == max(10, 2 * len(cm.sim.cpus)) == 10      # 4 CPUs: 10, not 8
    kp.unregister_kretprobe(rp)
    rp = kp.register_kretprobe("kprobe_target", lambda ri, r: None, maxactive=3)
    assert rp.maxactive == 3
    kp.unregister_kretprobe(rp)


def test_aggregate_pre_handlers_stop_at_the_first_true(rig):
    cm, kp, g = rig
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=5, allow=[5 + OPT_K + HELPER_ADD])
    cm.start()
    first, second = [], []

    def does_the_xor(p, regs):      # performs `xor eax, eax` itself and says so
        first.append(regs.cpu)
        regs.gprs["rax"] = 0
        regs.ip = p.addr + 2
        return 1

    p1 = kp.register_kprobe("kp_opt_target", does_the_xor)
    p2 = kp.register_kprobe("kp_opt_target", lambda p, r: second.append(r.cpu))
    assert cm.wait_passes(2)
    kp.unregister_kprobes([p1, p2])
    assert first and second == []
    assert not cm.expect({i: 5 + OPT_K + HELPER_ADD})


def test_cfi_preamble_and_blacklist_refused(rig):
    cm, kp, g = rig
    a, n = g.funcs["kprobe_target2"]
    kp.add_function("__pfx_kprobe_target2", a - 16, 16)
    _refused(cm, kp, "__pfx_kprobe_target2+0", "reserved", (a - 16, 16 + n), match="CFI")
    kp.blacklist.append((a, a + n))                      # as NOKPROBE_SYMBOL(kprobe_target2)
    _refused(cm, kp, "kprobe_target2+4", "blacklist", (a, n))
    kp.add_function("kprobe_target2.cold", a + n, 1)     # a .cold part counts as its function
    assert kp.function_at(a + n)[0] == "kprobe_target2.cold" and kp.within_kprobe_blacklist(a + n)


def test_probe_inside_an_optimised_range_unoptimises_it(rig):
    cm, kp, g = rig
    want = 3 + OPT_K + HELPER_ADD
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=3, allow=[want])
    cm.start()
    hits = {"outer": 0, "inner": 0}
    outer = kp.register_kprobe("kp_opt_target", lambda p, r: hits.__setitem__("outer", hits["outer"] + 1))
    kp.optimize_kprobe(outer)
    assert kp.is_optimized(outer) and kp.site_info(outer)["displaced"] == 9
    # +2 is the RIP-relative mov, inside the 9 displaced bytes: accepted
    inner = kp.register_kprobe("kp_opt_target+2",
                               lambda p, r: hits.__setitem__("inner", hits["inner"] + 1))
    assert not kp.is_optimized(outer)
    assert cm.sim.text_read(outer.addr, 1) == b"\xcc" and cm.sim.text_read(inner.addr, 1) == b"\xcc"
    assert cm.wait_passes(2)
    kp.unregister_kprobes([outer, inner])
    assert hits["outer"] > 0 and hits["inner"] > 0
    assert not cm.expect({i: want}) and cm.bad() == [] and cm.oopses == 0
    assert _text(cm, g, "kp_opt_target")[:2] == bytes.fromhex("31c0")


def test_unoptimise_is_int3_sync_tail_sync(rig):
    cm, kp, g = rig
    want = 3 + OPT_K + HELPER_ADD
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=3, allow=[want])
    cm.start()
    p = kp.register_kprobe("kp_opt_target", lambda p, r: None)
    kp.optimize_kprobe(p)
    assert cm.wait_passes(1)
    m, log = cm.sim, []
    one, many, sync = m.text_poke_write, m.text_poke_write_many, m.sync_each_cpu
    m.text_poke_write = lambda a, d: (log.append(("w", a, bytes(d))), one(a, d))[1]
    m.text_poke_write_many = lambda ws: (log.extend(("w", a, bytes(d)) for a, d in ws),
                                         many(ws))[1]
    m.sync_each_cpu = lambda: (log.append(("sync",)), sync())[1]
    b0 = cm.core.stats.batches
    kp.unoptimize_kprobe(p)
    m.text_poke_write, m.text_poke_write_many, m.sync_each_cpu = one, many, sync
    tail = cm.sim.text_read(p.addr + 1, 4)
    assert log == [("w", p.addr, b"\xcc"), ("sync",), ("w", p.addr + 1, tail), ("sync",)]
    assert cm.core.stats.batches == b0 and tail == bytes.fromhex("c0488b05")   # xor eax,eax; mov rax,..
    assert cm.wait_passes(2)
    kp.unregister_kprobe(p)
    assert not cm.expect({i: want}) and cm.oopses == 0 and cm.bad() == []


def test_kprobe_optimizer_optimises_what_it_can(rig):
    cm, kp, g = rig
    want = 3 + OPT_K + HELPER_ADD
    i = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=3, allow=[want])
    cm.start()
    opt = kp.register_kprobe("kp_opt_target", lambda p, r: None)
    post = kp.register_kprobe("kprobe_target", lambda p, r: None, lambda p, r, f: None)
    jump_in = kp.register_kprobe("kp_jump_in", lambda p, r: None)
    assert not kp.is_optimized(opt)                      # auto_optimize off: INT3 probes
    b0 = cm.core.stats.batches
    assert kp.kprobe_optimizer() == [opt]                # the others cannot be: no error
    assert cm.core.stats.batches - b0 == 1
    assert kp.is_optimized(opt) and not kp.is_optimized(post) and not kp.is_optimized(jump_in)
    assert kp.kprobe_optimizer() == []
    kp.unregister_kprobes([opt, post, jump_in])
    # the kernel's default: optimised after registration
    kp.auto_optimize = True
    p = kp.register_kprobe("kp_opt_target", lambda p, r: None)
    assert kp.is_optimized(p)
    # a probe inside its range unoptimises it, and the optimizer leaves it
    # so (the new probe, a 7-byte mov, is optimised in its turn)
    inner = kp.register_kprobe("kp_opt_target+2", lambda p, r: None)
    assert not kp.is_optimized(p) and cm.sim.text_read(p.addr, 1) == b"\xcc"
    assert kp.is_optimized(inner) and cm.sim.text_read(inner.addr, 1) == b"\xe9"
    assert cm.wait_passes(2)
    kp.unregister_kprobes([p, inner])
    assert not cm.expect({i: want}) and cm.oopses == 0 and cm.bad() == []


def test_each_probe_is_optimised_with_its_own_text_poke_bp(rig):
    """6.12's arch_optimize_kprobes writes each probe's JMP32 with its own
    text_poke_bp: one batch and three syncs a probe, not one batch for the
    optimizer's pass (same bytes); unregistering an optimised probe is
    arch_unoptimize_kprobe (INT3, sync, tail, sync) then arch_disarm_kprobe
    (the original byte, sync): three syncs a probe, no batch."""
    cm, kp, g = rig
    cm.start()
    before = {n: _text(cm, g, n) for n in ("kp_opt_target", "kprobe_target", "kp_jump_in")}
    ps = [kp.register_kprobe(n, lambda p, r: None) for n in ("kp_opt_target", "kprobe_target")]
    b0, s0 = cm.core.stats.batches, cm.core.stats.syncs
    q0 = kp.stats.quiesce_waits
    assert kp.kprobe_optimizer() == ps
    assert all(kp.is_optimized(p) for p in ps)
    assert cm.core.stats.batches - b0 == 2
    # (a machine that cannot show where its CPUs are syncs for the wait too)
    wait = 0 if cm.sim.has(Capability.QUIESCE) else 1
    assert cm.core.stats.syncs - s0 == 3 * 2 + (kp.stats.quiesce_waits - q0) * wait
    b0, s0 = cm.core.stats.batches, cm.core.stats.syncs
    kp.unregister_kprobes(ps)
    assert cm.core.stats.batches == b0 and cm.core.stats.syncs - s0 == 3 * 2 + wait
    assert {n: _text(cm, g, n) for n in before} == before
    assert cm.oopses == 0 and cm.bad() == []


# ------------------------------------------------------------------ KPROBES_ON_FTRACE
@pytest.fixture
def ftrig():
    with ClientMachine(cpus=2, seed=5) as cm:
        cm.kernel.config["KPROBES_ON_FTRACE"] = True     # Debian's config
        kp = cm.kernel.kprobes
        yield cm, kp
        kp.close()
        assert cm.oopses == 0


def _call_target(cm, site):
    b = cm.sim.text_read(site, 5)
    assert b[0] == 0xE8, b.hex(" ")
    return site + 5 + int.from_bytes(b[1:], "little", signed=True)


def test_kprobe_on_fentry_is_an_ftrace_ops(ftrig):
    # kernel/kprobes.c check_ftrace_location: with CONFIG_KPROBES_ON_FTRACE a
    # probe on the fentry NOP gets KPROBE_FLAG_FTRACE, and arm_kprobe_ftrace
    # adds its address to kprobe_ftrace_ops (kprobe_ipmodify_ops with a
    # post-handler), registering that ops (FTRACE_OPS_FL_SAVE_REGS) for the
    # first probe -- no INT3 is written.  The lone ops gets its own trampoline
    # made from ftrace_regs_caller with the jnz NOPed (create_trampoline), and
    # arch/x86/kernel/kprobes/ftrace.c kprobe_ftrace_handler runs the
    # pre-handler with regs->ip = ip + 1, then the post-handler with ip + 5.
    # A bare symbol is the entry itself (arch_adjust_kprobe_addr skips only
    # an ENDBR), so it lands on the NOP.
    cm, kp = ftrig
    ft = cm.kernel.ftrace
    a = cm.sym("sc_func_a")
    assert a in kp.fentry
    i = cm.add_probe("sc_func_a", arg=41, allow=[42])
    cm.start()
    cm.wait_passes(1)
    nop = cm.sim.text_read(a, 5)
    pre, post = [], []
    p = kp.register_kprobe("sc_func_a",
                           lambda p, r: pre.append((r.cpu, r.ip, r.gprs["rdi"] & 0xFFFFFFFF)),
                           lambda p, r, f: post.append((r.cpu, r.ip)))
    assert p.addr == a and cm.sim.text_read(a, 1)[0] != 0xCC
    t = ft.trampolines["kprobe_ipmodify"]
    assert t.save_regs and _call_target(cm, a) == t.addr
    assert set(ft.extra_ops) == {"kprobe_ipmodify"} and ft.extra_ops["kprobe_ipmodify"].ips == {a}
    start = cm.sym("ftrace_regs_caller")
    size = cm.sym("ftrace_regs_caller_end") - start
    j = cm.sym("ftrace_regs_caller_jmp") - start
    assert cm.sim.text_read(start + j, 1) == b"\x75"
    assert cm.sim.text_read(t.addr + j, 2) == x86_nops[2]
    call = cm.sym("ftrace_regs_call") - start
    assert _call_target(cm, t.addr + call) == cm.sym("kprobe_ftrace_handler")
    assert t.size == size + 5 + 8
    assert cm.wait_passes(3)
    assert {c for c, _ip, _x in pre} == {0, 1} and {c for c, _ip in post} == {0, 1}
    assert {(ip, x) for _c, ip, x in pre} == {(a + 1, 41)}
    assert {ip for _c, ip in post} == {a + 5}
    assert p.nhit == len(pre) == len(post) and kp.stats.hits == 0
    assert kp.stats.ftrace_hits == len(pre)
    # never optimised: the optimizer leaves it alone
    assert kp.kprobe_optimizer() == []
    kp.unregister_kprobe(p)
    assert cm.sim.text_read(a, 5) == nop and not ft.extra_ops
    assert not cm.expect({i: 42})


def test_ftrace_kprobe_pre_handler_may_move_ip(ftrig):
    # kprobe_ftrace_handler: a pre-handler that returns non-zero has changed
    # regs->ip itself; the post-handlers are skipped and ftrace_regs_caller
    # returns to that ip (the ops is FTRACE_OPS_FL_IPMODIFY-capable).
    cm, kp = ftrig
    a, b = cm.sym("sc_func_a"), cm.sym("sc_func_b")
    i = cm.add_probe("sc_func_a", arg=41, allow=[42, 43])
    cm.start()
    cm.wait_passes(1)

    def redirect(p, regs):
        regs.ip = b                      # sc_func_b(x) = x + 2
        return 1

    p = kp.register_kprobe("sc_func_a", redirect)
    assert kp._sites[a].ftrace == "kprobe"           # no post-handler: kprobe_ftrace_ops
    cm.wait_passes(1)
    assert not cm.expect({i: 43})                     # every call went to sc_func_b
    kp.unregister_kprobe(p)
    assert not cm.expect({i: 42})


def test_kretprobe_through_an_ftrace_kprobe(ftrig):
    # The kretprobe's entry probe lands on the fentry NOP and is an ftrace
    # kprobe; its handler sees regs->sp at the function's entry (the slot of
    # its return address, as ftrace_regs_caller fills pt_regs), swaps it, and
    # the return handler sees the return value.
    cm, kp = ftrig
    a = cm.sym("sc_func_a")
    i = cm.add_probe("sc_func_a", arg=41, allow=[42])
    cm.start()
    rv = []
    rp = kp.register_kretprobe("sc_func_a", lambda ri, r: rv.append(r.gprs["rax"]))
    assert rp.kp.addr == a and kp._sites[a].ftrace
    assert cm.wait_passes(3)
    kp.unregister_kretprobe(rp)
    assert rv and set(rv) == {42}
    assert not cm.expect({i: 42})


# ------------------------------------------------------------------ rethook
def test_kretprobes_return_through_rethook(rig):
    # kernel/kprobes.c pre_handler_kretprobe -> rethook_hook ->
    # arch/x86/kernel/rethook.c arch_rethook_prepare: the return address on
    # the stack becomes arch_rethook_trampoline and the instance goes on the
    # current task's list.  The function's RET lands in that trampoline,
    # which pushes pt_regs and calls arch_rethook_trampoline_callback ->
    # kernel/trace/rethook.c rethook_trampoline_handler: the real return
    # address is the first instance on the list not holding the trampoline
    # (a second kretprobe on the same function hooked the trampoline itself),
    # every handler of this frame runs -- newest first -- with regs->ip set
    # to that real address, and the fake return slot gets it.  A handler's
    # change to regs->ax reaches the caller: the trampoline restores pt_regs.
    cm, kp, g = rig
    i = cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1,
                     allow=[RAND1 // DIV_FACTOR, 77])
    cm.start()
    seen = []
    hooked = []

    def entry2(ri, regs):
        hooked.append(ri.ret_addr)

    rp1 = kp.register_kretprobe("kprobe_target",
                                lambda ri, r: seen.append((1, r.cpu, r.ip, r.gprs["rax"])))

    def h2(ri, r):
        seen.append((2, r.cpu, r.ip, r.gprs["rax"]))
        r.gprs["rax"] = 77

    rp2 = kp.register_kretprobe("kprobe_target", h2, entry2)
    assert kp.rethook and kp.trampoline == cm.sym("arch_rethook_trampoline")
    assert cm.wait_passes(3)
    loop = cm.sym("client_loop")
    in_loop = lambda a: loop <= a < loop + cm.image.sizes["client_loop"]  # noqa: E731
    # the second entry probe found the first's trampoline on the stack
    assert hooked and set(hooked) == {kp.trampoline}
    # per return: handler 2 (newest) then handler 1, both at the real address;
    # 1 sees the value 2 left in rax
    ones = [s for s in seen if s[0] == 1]
    twos = [s for s in seen if s[0] == 2]
    assert ones and twos and all(in_loop(ip) for _n, _c, ip, _ax in seen)
    assert {ax for *_x, ax in twos} == {RAND1 // DIV_FACTOR}
    assert {ax for *_x, ax in ones} == {77}
    assert {c for _n, c, *_x in seen} == set(cm.sim.cpus)
    assert not cm.expect({i: 77})          # the caller got the handler's value
    kp.unregister_kretprobe(rp2)
    kp.unregister_kretprobe(rp1)
    assert cm.wait_passes(2) and kp.pending_instances() == 0
    assert not cm.expect({i: RAND1 // DIV_FACTOR})
    assert kp.stats.ret_hits > 0


def test_kretprobe_maxactive_is_one_pool_for_every_cpu(rig):
    # rethook_alloc(..., rp->maxactive): the instances come from one pool of
    # maxactive for the kretprobe, whatever CPU or task takes them
    # (rethook_try_get), so never more than maxactive are pending in all.
    cm, kp, g = rig
    cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1,
                 allow=[RAND1 // DIV_FACTOR])
    cm.start()
    most = []

    def entry(ri, regs):
        most.append(kp.pending_instances())

    rp = kp.register_kretprobe("kprobe_target", lambda ri, r: None, entry, maxactive=1)
    assert cm.wait_passes(3)
    kp.unregister_kretprobe(rp)
    assert most and max(most) <= 0 and rp.nmissed > 0 and rp.nhit > 0
