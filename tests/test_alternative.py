# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time patching (alternative_instructions) of the bundled kernel-like
image: which variant every site took under several CPU feature sets (as the
image's own probe functions report it), the bytes before and after, the
kernel's refusals as typed errors with the text untouched, and the SMP
lock/unlock round trip."""

from __future__ import annotations

import dataclasses
import types

import pytest

from textpoke import (CALL_INSN_OPCODE, MachineError, TextMutexError, TextPoke, insn_decode_kernel,
                      text_gen_insn, x86_nops)
from textpoke import (AlternativeError, SelfTestError, alternative_instructions,
                      alternatives_enable_smp, alternatives_smp_unlock, alternatives_text_reserved,
                      apply_alternatives, apply_retpolines, apply_returns, apply_seal_endbr)
from textpoke._alternative import (DA_ALL, DA_ALT, DA_RETPOLINE, DA_SMP, alt_reloc_selftest,
                                   int3_selftest, parse_debug_alternative)
from textpoke.images._kernel import alt_probes
from textpoke.sim._boot import boot_kernel_image
from textpoke.images._tables import RetpolineSite, X86_FEATURES, feature_set

MODERN = ["xmm2", "rdtscp", "lfence_rdtsc", "popcnt", "avx2", "bmi2", "erms", "fsrm", "smap",
          "clflushopt", "hypervisor"]
MITIGATED_XEN = ["retpoline", "retpoline_lfence", "rethunk", "xenpv", "up", "hypervisor"]
RETPOLINE = ["retpoline", "xmm2", "popcnt"]

FEATURE_SETS = {
    "bare": [],
    "modern": MODERN,
    "mitigated-xen": MITIGATED_XEN,
    "retpoline": RETPOLINE,
}


def _boot(features, ncpus=1, present=None, **kw):
    sim, image, tables = boot_kernel_image(ncpus)
    core = TextPoke(sim)
    text = image.sections[".text"]
    before = sim.text_read(text.addr, len(text.data))
    r = alternative_instructions(core, image, tables, features, ncpus=present, **kw)
    return types.SimpleNamespace(sim=sim, image=image, tables=tables, core=core, r=r,
                                 before=before, text=text,
                                 call=lambda name, *a: sim.call(image.sym(name), *a))


@pytest.fixture(scope="module", params=list(FEATURE_SETS))
def booted(request):
    b = _boot(FEATURE_SETS[request.param])
    b.feats = feature_set(FEATURE_SETS[request.param])
    b.has = lambda name: X86_FEATURES[name] in b.feats
    return b


# ---------------------------------------------------------------- variants
def test_every_probe_took_the_variant_its_features_imply(booted):
    probes = alt_probes(booted.image, booted.tables)
    assert len(probes) >= 45
    wrong = {p.name: (booted.sim.call(p.addr), p.expected(booted.feats)) for p in probes
             if booted.sim.call(p.addr) != p.expected(booted.feats)}
    assert not wrong


def test_records_say_which_entries_were_taken(booted):
    for a in booted.r.alternatives:
        assert a.taken == ((a.cpuid in booted.feats) != bool(a.flags & 1)), a
    by_name = {a.symbol: a for a in booted.r.alternatives if a.nested == 1}
    assert by_name["alt_probe_always"].taken
    assert by_name["alt_probe_xenpv"].taken == booted.has("xenpv")
    assert by_name["alt_probe_not_xenpv"].taken == (not booted.has("xenpv"))


def test_paravirt_nest_and_direct_calls(booted):
    # call through the pointer (direct or not) returns 2; the inline
    # replacement taken when not a Xen PV guest returns 3
    assert booted.call("alt_call_nested") == (2 if booted.has("xenpv") else 3)
    assert booted.call("alt_call_native") == 2 and booted.call("alt_call_nop") == 2
    assert booted.call("pv_read_value") == 42 and booted.call("pv_add", 40, 2) == 42


def test_functions_behave_the_same_after_patching(booted):
    call, sym = booted.call, booted.image.sym
    assert call("hweight32", 0xF0F0_0001) == 9
    assert call("smp_locks_exercise") == 0x1234
    assert call("dispatch", 2, 7) == 15
    assert call("dispatch", 1, 7) & 0xFFFFFFFF == -6 & 0xFFFFFFFF      # op_neg(7) + 1
    assert call("dispatch_tail", sym("op_twice"), 5) == 10
    assert call("dispatch_compose", sym("op_inc"), sym("op_twice"), 3) == 12
    assert call("asm_call_indirect", sym("probe_ret2")) == 3
    # tp_memcpy: call memcpy_orig, or rep movsb with ERMS/FSRM
    scratch = booted.sim.stack_base + 0x200
    booted.sim.mem_write(scratch, b"textpoke!" + bytes(16))
    call("tp_memcpy", scratch + 16, scratch, 9)
    assert booted.sim.mem_read(scratch + 16, 9) == b"textpoke!"


def test_selftests_pass(booted):
    assert [(t.name, t.passed) for t in booted.r.selftests] == \
        [("int3_selftest", True), ("alt_reloc_selftest", True)]
    assert booted.r.ok


# ----------------------------------------------------------------- bytes
def test_pre_and_post_bytes(booted):
    sim = booted.sim
    groups: dict[int, list] = {}
    for a in booted.r.alternatives:
        groups.setdefault(a.instr, []).append(a)
    for instr, entries in groups.items():
        first, last = entries[0], entries[-1]
        off = instr - booted.text.addr
        assert first.old == booted.before[off:off + first.instrlen]       # as built
        assert sim.text_read(instr, last.instrlen) == last.final           # as left
        assert len({a.instrlen for a in entries}) == 1                     # nested padding
        for prev, nxt in zip(entries, entries[1:]):
            assert nxt.old == prev.final          # later entries see earlier ones
        for a in entries:
            assert a.replacement == sim.text_read(a.repl, a.replacementlen) if a.replacementlen \
                else a.replacement == b""
            if not a.taken:
                # NOPs merged at most; every non-NOP instruction kept
                assert _non_nops(a.final, a.instr) == _non_nops(a.old, a.instr)
    # text outside the alternative, retpoline, return and lock sites is untouched
    touched = set()
    for a in booted.r.alternatives:
        touched.update(range(a.instr, a.instr + a.instrlen))
    for s in booted.r.retpolines + booted.r.returns + booted.r.smp_locks:
        touched.update(range(s.addr, s.addr + max(1, len(s.old))))
    after = sim.text_read(booted.text.addr, len(booted.text.data))
    for i, (x, y) in enumerate(zip(booted.before, after)):
        if x != y:
            assert booted.text.addr + i in touched, hex(booted.text.addr + i)


def _non_nops(code: bytes, addr: int) -> list[bytes]:
    out, off = [], 0
    while off < len(code):
        insn = insn_decode_kernel(code[off:], addr + off)
        if not (insn.mnemonic == "nop" and code[off] != 0xF3) and insn.flow != "int3":
            if insn.opcode not in (b"\xeb", b"\xe9"):      # a jump over merged NOPs
                out.append(insn.raw)
        off += insn.length
    return out


def test_specific_rewrites():
    b = _boot(MODERN)
    sym, read = b.image.sym, b.sim.text_read
    # JMP32 to a label outside the replacement: relocated and shrunk to JMP8 + INT3s
    site = sym("alt_probe_jmp_shrink") + 5
    insn = insn_decode_kernel(read(site, 5), site)
    assert read(site, 5)[0] == 0xEB and read(site + 2, 3) == b"\xcc" * 3
    assert insn.branch_target == site + 5 + 5          # the "1:" label after "mov $1"
    # direct calls: the pointer's value, nop_func -> NOP6, NULL -> BUG_func
    native = sym("alt_call_native")
    assert read(native, 6) == text_gen_insn(CALL_INSN_OPCODE, native, sym("pv_native_two")) + b"\x90"
    assert read(sym("alt_call_nop") + 5, 6) == x86_nops[6]
    null = sym("alt_call_null")
    assert read(null, 6) == text_gen_insn(CALL_INSN_OPCODE, null, sym("BUG_func")) + b"\x90"
    # NOP runs longer than ASM_NOP_MAX become a JMP8 over INT3s
    nops40 = sym("alt_probe_nops_40")
    assert read(nops40, 7) == bytes.fromhex("b802000000") + bytes([0xEB, 36])
    assert read(nops40 + 7, 36) == b"\xcc" * 36
    # a CALL + RIP-relative LEA replacement still reaches both targets
    cr = [a for a in b.r.alternatives if a.symbol == "alt_probe_call_rip+0x5"][0]
    lea = insn_decode_kernel(cr.final, cr.instr)
    call = insn_decode_kernel(cr.final[lea.length:], cr.instr + lea.length)
    assert lea.end + lea.displacement_value == sym("probe_two")
    assert call.branch_target == sym("probe_load")


def test_pause_is_never_a_nop():
    for feats, want in (([], 1), (["xenpv"], 2)):
        b = _boot(feats)
        site = [a for a in b.r.alternatives if a.symbol == "alt_probe_pause"][0]
        assert b.call("alt_probe_pause") == want
        if not want - 1:
            # original kept: mov; pause; nop; nop -> mov; pause; NOP2
            assert site.old == bytes.fromhex("b801000000f3909090")
            assert site.final == bytes.fromhex("b801000000f3906690")


def test_retpolines_and_returns():
    sym_rax = "__x86_indirect_thunk_rax"
    # no mitigation: indirect calls inline, returns become RET + INT3 padding
    b = _boot([])
    for s in b.r.retpolines:
        assert s.action == "patched"
        insn = insn_decode_kernel(s.new, s.addr)
        assert insn.flow == "indirect"
    assert {s.new for s in b.r.returns} == {b"\xc3\xcc\xcc\xcc\xcc"}
    thunk = b.image.sym(sym_rax)
    assert b.sim.text_read(thunk, 3) == bytes.fromhex("ffe0cc")      # jmp *%rax; int3
    # retpoline: call sites keep the thunk, which keeps its retpoline body
    b = _boot(["retpoline"])
    assert {s.action for s in b.r.retpolines} == {"kept"}
    assert b.sim.text_read(b.image.sym(sym_rax), 1) == b"\xe8"
    # retpoline,lfence: "lfence; call *%reg" where it fits (not for r11: 6 bytes)
    b = _boot(["retpoline", "retpoline_lfence", "rethunk"])
    acts = {s.symbol: s for s in b.r.retpolines}
    assert acts["dispatch+0x32"].new == bytes.fromhex("0faee8ffd0")
    assert acts["asm_call_indirect+0x3"].action == "kept"
    assert b.sim.text_read(b.image.sym(sym_rax), 6) == bytes.fromhex("0faee8ffe0cc")
    assert {s.action for s in b.r.returns} == {"unchanged"}      # return thunk wanted


def test_counts_and_events():
    b = _boot(MODERN)
    c = b.r.counts()
    assert c[".altinstructions"]["entries"] == len(b.tables.alt_instructions)
    assert c[".return_sites"]["patched"] == len(b.tables.return_sites)
    assert c[".smp_locks"]["patched"] == len(b.tables.smp_locks)
    assert c["__mcount_loc"]["entries"] == len(b.tables.mcount_loc)
    early = [e for e in b.core.events if e.phase == "early"]
    written = sum(a.written for a in b.r.alternatives) + c[".retpoline_sites"]["patched"] \
        + c[".return_sites"]["patched"]
    assert len(early) == written
    d = b.r.as_dict()
    assert d["ok"] and len(d["alternatives"]) == c[".altinstructions"]["entries"]


# ------------------------------------------------------------- refusals
def _snapshot(sim):
    return [sim.text_read(r.start, r.end - r.start) for r in sim.text_ranges]


def test_longer_replacement_is_refused_and_nothing_written():
    sim, image, tables = boot_kernel_image(1)
    core = TextPoke(sim)
    good = tables.alt_instructions[0]                       # alt_probe_always
    bad = tables.alt_instructions[1]._replace(instrlen=3, replacementlen=5)
    snap = _snapshot(sim)
    with pytest.raises(AlternativeError) as ei:
        apply_alternatives(core, [good, bad], [], image=image)
    assert ei.value.index == bad.index and ei.value.addr == bad.instr
    assert "does not fit" in str(ei.value)
    assert _snapshot(sim) == snap and not list(core.events)
    # the same entry in the boot tables: the whole boot refuses, text untouched
    bad_tables = dataclasses.replace(tables, alt_instructions=tables.alt_instructions + (bad,))
    with pytest.raises(AlternativeError):
        alternative_instructions(core, image, bad_tables, MODERN)
    assert _snapshot(sim) == snap and not list(core.events)
    assert sim.call(image.sym("alt_probe_always")) == 1


def test_direct_call_on_a_site_that_is_not_an_indirect_call():
    sim, image, tables = boot_kernel_image(1)
    core = TextPoke(sim)
    call = image.sym("alt_probe_call")
    a = [e for e in tables.alt_instructions if e.instr == call][0]   # call -> call
    bad = a._replace(flags=2, instrlen=6)       # ALT_FLAG_DIRECT_CALL on "call rel32"
    snap = _snapshot(sim)
    with pytest.raises(AlternativeError, match="call \\*disp32"):
        apply_alternatives(core, [bad], [], image=image)
    mov = tables.alt_instructions[0]._replace(flags=2)
    with pytest.raises(AlternativeError, match="not a 5-byte CALL"):
        apply_alternatives(core, [mov], [], image=image)
    assert _snapshot(sim) == snap


def test_retpoline_through_rsp_is_refused():
    sim, image, tables = boot_kernel_image(1)
    core = TextPoke(sim)
    site = tables.retpoline_sites[1].addr
    rsp_thunk = image.sym("__x86_indirect_thunk_array") + 4 * 32
    sim.text_write_early(site, text_gen_insn(CALL_INSN_OPCODE, site, rsp_thunk))
    snap = _snapshot(sim)
    with pytest.raises(AlternativeError, match="%rsp"):
        apply_retpolines(core, tables.retpoline_sites, [], image=image)
    assert _snapshot(sim) == snap
    # a site whose target is not a thunk is skipped, as the kernel warns and skips
    odd = RetpolineSite(addr=image.sym("alt_probe_call"))   # call probe_ret1
    (rec,) = apply_retpolines(core, [odd], [], image=image)
    assert rec.action == "skipped" and "not a retpoline thunk" in rec.reason
    # an image with sites but without the thunks they name is refused, text untouched
    with pytest.raises(AlternativeError, match="no __x86_indirect_thunk_array") as ei:
        apply_retpolines(core, tables.retpoline_sites, [], image={})
    assert ei.value.table == ".retpoline_sites"
    with pytest.raises(AlternativeError, match="no __x86_return_thunk"):
        apply_returns(core, tables.return_sites, [], image={})
    assert _snapshot(sim) == snap


def test_seal_endbr_is_the_real_kernels_pass_on_the_machine():
    """The bundled image has no .ibt_endbr_seal (no IBT); the pass that seals
    a real kernel's ENDBRs runs on the machine all the same: an ENDBR64 becomes
    the 4-byte NOP, a site without one is left and recorded."""
    sim, image, _tables = boot_kernel_image(1)
    core = TextPoke(sim)
    assert apply_seal_endbr(core, ()) == ()
    a = image.sym("alt_probe_always")
    sim.text_write_early(a, b"\xf3\x0f\x1e\xfa")
    b = a + 4
    before_b = sim.text_read(b, 4)
    recs = apply_seal_endbr(core, [a, b], image=image)
    assert sim.text_read(a, 4) == b"\x66\x0f\x1f\x00" and recs[0].action == "patched"
    assert sim.text_read(b, 4) == before_b and recs[1].action == "skipped"


def test_boot_after_cpus_started_refuses_without_writing():
    sim, image, tables = boot_kernel_image(1)
    core = TextPoke(sim)
    sim.start_cpu(0, image.sym("alt_probe_always"))
    snap = _snapshot(sim)
    with pytest.raises(MachineError, match="text_poke_early"):
        alternative_instructions(core, image, tables, MODERN, selftests=False)
    assert _snapshot(sim) == snap


# ------------------------------------------------------------ self-tests
def test_int3_selftest_failure_stops_the_boot_before_patching():
    sim, image, tables = boot_kernel_image(1)
    core = TextPoke(sim)
    wrong = dict(image.symbols, int3_selftest_ip=image.sym("int3_selftest_ip") + 1)
    fake = types.SimpleNamespace(symbols=wrong, sizes=image.sizes)
    snap = _snapshot(sim)
    t = int3_selftest(core, fake)
    assert t.passed is False and "not emulated" in t.detail
    with pytest.raises(SelfTestError) as ei:
        alternative_instructions(core, fake, tables, MODERN)
    assert ei.value.result is not None and not ei.value.result.alternatives
    assert _snapshot(sim) == snap
    # no handler is left behind
    assert list(sim.trap_handlers) == [core.smp_text_poke_int3_handler]


def test_reloc_selftest_reports_an_unpatched_site_and_missing_symbols():
    sim, image, tables = boot_kernel_image(1)
    core = TextPoke(sim)
    t = alt_reloc_selftest(core, image)
    assert t.passed is False and t.value == 0          # nothing patched yet
    assert int3_selftest(core, {}).passed is None
    assert alt_reloc_selftest(core, {}).passed is None
    # non-strict: recorded, not raised
    no_always = dataclasses.replace(tables, alt_instructions=())
    r = alternative_instructions(core, image, no_always, [], strict=False)
    assert not r.ok and r.selftests[-1].value == 0


# -------------------------------------------------------------- SMP locks
def test_smp_unlock_lock_round_trip():
    b = _boot(MODERN, ncpus=2, present=1)           # one present, two possible
    locks = [lk.addr for lk in b.tables.smp_locks]
    assert b.r.uniproc_patched and len(b.r.smp_locks) == len(locks)
    assert all(b.sim.text_read(a, 1) == b"\x3e" for a in locks)
    assert b.call("smp_locks_exercise") == 0x1234
    with b.core.text_mutex:
        assert alternatives_text_reserved(b.r.smp, locks[0], locks[0] + 1)
        assert not alternatives_text_reserved(b.r.smp, b.text.addr, b.text.addr + 1)
    back = alternatives_enable_smp(b.r.smp, image=b.image)
    assert [s.action for s in back] == ["patched"] * len(locks)
    assert all(b.sim.text_read(a, 1) == b"\xf0" for a in locks)
    assert b.call("smp_locks_exercise") == 0x1234
    assert alternatives_enable_smp(b.r.smp) == ()                # already SMP
    pokes = [e for e in b.core.events if e.phase == "poke"]
    assert [(e.old, e.new) for e in pokes] == [(b"\xf0", b"\x3e")] * len(locks) + \
        [(b"\x3e", b"\xf0")] * len(locks)


def test_smp_locks_on_smp_and_up_machines():
    b = _boot(MODERN, ncpus=2)                     # both present: LOCK stays
    assert not b.r.uniproc_patched and b.r.smp_locks == ()
    assert all(b.sim.text_read(lk.addr, 1) == b"\xf0" for lk in b.tables.smp_locks)
    b = _boot(MODERN, ncpus=2, present=1, noreplace_smp=True)
    assert not b.r.uniproc_patched
    b = _boot(MODERN, ncpus=1)                     # one possible CPU: never relocked
    assert all(b.sim.text_read(lk.addr, 1) == b"\x3e" for lk in b.tables.smp_locks)
    with pytest.raises(MachineError, match="single possible CPU"):
        alternatives_enable_smp(b.r.smp)
    with pytest.raises(TextMutexError):
        alternatives_smp_unlock(b.core, b.tables.smp_locks, b.r.alternatives and (0, 1 << 40))
    with pytest.raises(ValueError):
        alternative_instructions(b.core, b.image, b.tables, [], ncpus=3)


# ------------------------------------------------------ debug-alternative
def test_debug_alternative_records():
    assert parse_debug_alternative(None) == DA_ALL
    assert parse_debug_alternative("0x14") == DA_RETPOLINE | DA_SMP
    assert parse_debug_alternative("alt,smp") == DA_ALT | DA_SMP
    assert parse_debug_alternative("junk") == DA_ALL
    b = _boot([], debug_alternative=DA_RETPOLINE | DA_SMP)
    kinds = {d.kind for d in b.r.debug}
    assert kinds == {"retpoline", "smp"}
    assert any("retpoline at: dispatch+0x32" in d.message for d in b.r.debug)
    b = _boot(MODERN, debug_alternative=DA_ALL)
    msgs = [d.message for d in b.r.debug if d.kind == "alt"]
    assert any(m.startswith("feat: 9*32+9") for m in msgs)
    assert any("final_insn" in m for m in msgs) and any("optimized NOPs" in m for m in msgs)
    assert b.r.as_dict(debug_mask=DA_SMP)["debug_alternative"] and \
        all(d["kind"] == "smp" for d in b.r.as_dict(debug_mask=DA_SMP)["debug_alternative"])
