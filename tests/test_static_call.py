# SPDX-License-Identifier: GPL-2.0-only
"""Static calls on the sim machine: static_call_selftest and every site
kind on four running vCPUs, and refusals."""

from __future__ import annotations

import pytest

from textpoke import StaticCallError, UnknownCallError, x86_nops
from textpoke._static_call._calls import RETINSN, TRAMP_UD, XOR5RAX
from textpoke.images._tables import static_call_table
from textpoke.selftests import static_call_selftest
from textpoke.sim import ClientMachine


@pytest.fixture
def cm():
    with ClientMachine(cpus=4, seed=5) as m:
        yield m


def test_calls_and_sites_found(cm):
    calls = cm.calls
    assert set(calls.calls) >= {"sc_op", "sc_hook", "sc_ret0", "sc_cond", "sc_selftest"}
    assert calls.static_call_query("sc_op") == cm.sym("sc_double")
    assert calls.static_call_query("sc_hook") == 0
    kinds = {(s.site.tail, cm.sim.text_read(s.site.addr, 2)[0]) for c in calls.calls.values()
             for s in c.sites}
    assert (False, 0xE8) in kinds and (True, 0xE9) in kinds and (True, 0x0F) in kinds
    sec = cm.image.section(".static_call_sites")
    assert static_call_table(sec.data, sec.addr, sec.addr, sec.end) == list(cm.tables.static_call_sites)


def test_static_call_selftest_on_four_running_cpus(cm):
    r = static_call_selftest(cm)
    assert r.passed, [c for c in r.cases if not c["passed"]] + r.bad
    assert r.oopses == 0 and r.bad == []
    assert all(cm.calls_made(i) > 0 for i in range(len(cm.probes)))
    assert cm.core.stats.int3_hits > 0


def _site(cm, call, tail=None, first=None):
    for s in cm.calls.call(call).sites:
        b = cm.sim.text_read(s.site.addr, 1)[0]
        if (tail is None or s.site.tail == tail) and (first is None or b == first):
            return s.site.addr
    raise AssertionError("no such site")


def test_every_form_is_written(cm):
    calls = cm.calls
    tramp = calls.call("sc_hook").tramp
    call_site, tail_site = _site(cm, "sc_hook", False), _site(cm, "sc_hook", True)
    calls.static_call_update("sc_hook", None)
    assert cm.sim.text_read(call_site, 5) == x86_nops[5]          # NULL call: NOP5
    assert cm.sim.text_read(tail_site, 5) == RETINSN              # NULL tail call: RET
    assert cm.sim.text_read(tramp, 5) == RETINSN
    calls.static_call_update("sc_hook", "sc_hook_fn")
    f = cm.sym("sc_hook_fn")
    assert cm.sim.text_read(call_site, 5) == b"\xe8" + (f - call_site - 5).to_bytes(4, "little", signed=True)
    assert cm.sim.text_read(tail_site, 5) == b"\xe9" + (f - tail_site - 5).to_bytes(4, "little", signed=True)
    assert cm.sim.text_read(tramp + 5, 3) == TRAMP_UD
    # return 0
    site = _site(cm, "sc_ret0", False)
    calls.static_call_update("sc_ret0", "__static_call_return0")
    assert cm.sim.text_read(site, 5) == XOR5RAX
    # Jcc.d32 tail call: NULL goes to __static_call_return
    jcc = cm.sym("sc_jcc_site")
    calls.static_call_update("sc_cond", None)
    b = cm.sim.text_read(jcc, 6)
    assert b[:2] == b"\x0f\x84"
    assert jcc + 6 + int.from_bytes(b[2:], "little", signed=True) == cm.sym("__static_call_return")
    # already new: nothing poked
    n0 = cm.core.stats.batches
    assert calls.static_call_update("sc_cond", None) == 0 and cm.core.stats.batches == n0


def test_bad_trampoline_signature_refused(cm):
    calls = cm.calls
    tramp = calls.call("sc_op").tramp
    cm.core.text_poke_early(tramp + 5, b"\x90\x90\x90")
    snap = {a: cm.sim.text_read(a, 6) for a in [tramp] + [s.site.addr for s in calls.call("sc_op").sites]}
    b0 = cm.core.stats.batches
    with pytest.raises(StaticCallError, match="signature") as ei:
        calls.static_call_update("sc_op", "sc_square")
    assert ei.value.found == b"\x90\x90\x90" and ei.value.new == TRAMP_UD
    assert {a: cm.sim.text_read(a, 6) for a in snap} == snap and cm.core.stats.batches == b0
    assert calls.static_call_query("sc_op") == cm.sym("sc_double")


def test_unexpected_site_bytes_refused(cm):
    calls = cm.calls
    site = _site(cm, "sc_op", False)
    cm.core.text_poke_early(site, bytes.fromhex("6690" "0f1f00"))      # NOP2 + NOP3: not a form
    snap = {a: cm.sim.text_read(a, 6) for a in
            [calls.call("sc_op").tramp] + [s.site.addr for s in calls.call("sc_op").sites]}
    with pytest.raises(StaticCallError) as ei:
        calls.static_call_update("sc_op", "sc_square")
    msg = str(ei.value)
    assert "sc_call_op" in msg and "66 90 0f 1f 00" in msg
    want = b"\xe8" + (cm.sym("sc_square") - site - 5).to_bytes(4, "little", signed=True)
    assert want.hex(" ") in msg and ei.value.new == want
    assert {a: cm.sim.text_read(a, 6) for a in snap} == snap


def test_unknown_call_or_function_refused(cm):
    with pytest.raises(UnknownCallError, match="nope"):
        cm.calls.static_call_update("nope", "sc_square")
    with pytest.raises(UnknownCallError, match="no_func"):
        cm.calls.static_call_update("sc_op", "no_func")


def test_cli_static_call_json_and_exit_codes(capsys):
    import json

    from textpoke.cli import main
    assert main(["static-call", "--selftest", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["selftest"]["passed"] and d["oopses"] == 0 and d["syncs"] > 0
    assert main(["static-call", "--update", "sc_op", "sc_square", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["actions"][0]["pokes"] == 5
    assert main(["static-call", "--update", "sc_op", "nothing_here"]) == 2
    assert main(["static-call", "--update", "nope", "sc_square"]) == 2


def test_update_to_the_current_function_does_nothing_even_over_bad_bytes(cm):
    calls = cm.calls
    site = _site(cm, "sc_op", False)
    calls.static_call_update("sc_op", "sc_square")       # the sites now follow the key
    calls.static_call_update("sc_op", "sc_double")
    cm.core.text_poke_early(site, bytes.fromhex("6690" "0f1f00"))      # not a static-call form
    b0, ev0 = cm.core.stats.batches, len(cm.core.events)
    # __static_call_update returns before validating when key->func is unchanged
    assert calls.static_call_update("sc_op", "sc_double") == 0
    assert cm.sim.text_read(site, 5) == bytes.fromhex("66900f1f00")
    assert cm.core.stats.batches == b0 and len(cm.core.events) == ev0
    with pytest.raises(StaticCallError):                               # a real change still checks
        calls.static_call_update("sc_op", "sc_square")


def test_rethunk_follows_the_boots_features_and_return_thunk():
    from textpoke._alternative import DEFAULT_FEATURES
    with ClientMachine(cpus=2, seed=5, features=DEFAULT_FEATURES + ("rethunk",)) as m:
        calls = m.calls
        thunk = m.sym("__x86_return_thunk")
        assert calls.return_thunk == thunk
        tail = _site(m, "sc_hook", True)
        calls.static_call_update("sc_hook", "sc_hook_fn")
        calls.static_call_update("sc_hook", None)
        assert m.sim.text_read(tail, 5) == b"\xe9" + (thunk - tail - 5).to_bytes(4, "little",
                                                                                 signed=True)
        jcc = m.sym("sc_jcc_site")
        calls.static_call_update("sc_cond", None)
        b = m.sim.text_read(jcc, 6)
        assert jcc + 6 + int.from_bytes(b[2:], "little", signed=True) == thunk


def test_its_return_thunk_only_in_the_lower_half_of_a_line(cm):
    from textpoke import StaticCalls
    from textpoke._static_call._calls import RET
    fake_its = cm.sym("__x86_return_thunk") + 0x40
    syms = dict(cm.image.symbols, its_return_thunk=fake_its)
    calls = StaticCalls(cm.core, cm.tables.static_call_sites, syms, rethunk="its_return_thunk")
    low, high = 0x1000000, 0x1000020                      # bit 5 clear / set
    assert calls.transform(low, RET, 0, b"\xc3\xcc")[0] == \
        b"\xe9" + (fake_its - low - 5).to_bytes(4, "little", signed=True)
    assert calls.transform(high, RET, 0, b"\xc3\xcc")[0] == RETINSN
    # any other thunk is taken everywhere
    other = StaticCalls(cm.core, cm.tables.static_call_sites, syms, rethunk=fake_its + 0x40)
    assert other.transform(high, RET, 0, b"\xc3\xcc")[0][0] == 0xE9
    with pytest.raises(UnknownCallError):
        StaticCalls(cm.core, cm.tables.static_call_sites, syms, rethunk="srso_return_thunk")


# ------------------------------------------------------------------ call-depth tracking
def _target(cm, addr):
    b = cm.sim.text_read(addr, 5)
    return b[0], addr + 5 + int.from_bytes(b[1:], "little", signed=True)


def test_call_depth_call_sites_go_through_the_functions_thunk():
    # arch/x86/kernel/static_call.c __static_call_transform: a CALL site's
    # destination passes through callthunks_translate_call_dest
    # (arch/x86/kernel/callthunks.c): once call-depth thunks are initialised,
    # a core-text function not on the skip list is called through its
    # accounting thunk -- skl_call_thunk_template relocated into the padding
    # just before it, written there by patch_dest when that still holds NOPs.
    # Tail sites and the trampoline still jump to the function.  A function
    # whose padding is not NOPs is called directly.
    from textpoke import StaticCalls
    with ClientMachine(cpus=2, seed=3) as cm:
        calls = StaticCalls.from_image(cm.core, cm.image, cm.tables, call_depth=True)
        assert calls.thunks_initialized
        t0 = cm.sym("skl_call_thunk_template")
        size = cm.sym("skl_call_thunk_tail") - t0
        sq, dbl = cm.sym("sc_square"), cm.sym("sc_double")
        assert cm.sim.text_read(sq - size, size) == b"\x90" * size
        depth = cm.sym("__x86_call_depth")
        cm.sim.mem_write(depth, (1 << 60).to_bytes(8, "little"))
        i = cm.add_probe("sc_call_op", arg=7, allow=[15, 50])    # op(7) + 1
        cm.start()
        cm.wait_passes(1)
        calls.static_call_update("sc_op", "sc_square")
        c = calls.call("sc_op")
        tails = [s.site.addr for s in c.sites if s.site.tail]
        plain = [s.site.addr for s in c.sites if not s.site.tail]
        assert plain and tails
        assert {_target(cm, a) for a in plain} == {(0xE8, sq - size)}
        assert {_target(cm, a) for a in tails} == {(0xE9, sq)}
        assert _target(cm, c.tramp) == (0xE9, sq)
        # the thunk: the template's one RIP-relative instruction, moved
        thunk = cm.sim.text_read(sq - size, size)
        tmpl = cm.sim.text_read(t0, size)
        assert thunk[:3] == tmpl[:3] and thunk[7:] == tmpl[7:]
        assert sq + int.from_bytes(thunk[3:7], "little", signed=True) == depth
        assert calls.thunks_made == {sq - size: sq}
        assert not cm.expect({i: 50})
        assert cm.sim.read_u64(depth) < 1 << 60          # the thunks ran
        calls.static_call_update("sc_op", "sc_double")
        assert {_target(cm, a) for a in plain} == {(0xE8, dbl - size)}
        assert not cm.expect({i: 15})
        # back to a function whose thunk is already there: not written again
        n = len(cm.core.events)
        calls.static_call_update("sc_op", "sc_square")
        assert all(not (sq - size <= e.addr < sq) for e in list(cm.core.events)[n:])
        assert not cm.expect({i: 50})
    # no NOP padding before the function: called directly
    with ClientMachine(cpus=1, seed=3) as cm:
        calls = StaticCalls.from_image(cm.core, cm.image, cm.tables, call_depth=True)
        f = cm.sym("sc_call_op_twice")
        assert cm.sim.text_read(f - size, size) != b"\x90" * size
        calls.static_call_update("sc_op", "sc_call_op_twice")
        assert {_target(cm, s.site.addr) for s in calls.call("sc_op").sites
                if not s.site.tail} == {(0xE8, f)}
        assert calls.thunks_made == {}
    # without call-depth tracking (the bundled boot's default): direct calls
    with ClientMachine(cpus=1, seed=3) as cm:
        calls = cm.kernel.calls
        assert not calls.thunks_initialized
        calls.static_call_update("sc_op", "sc_square")
        assert {_target(cm, s.site.addr) for s in calls.call("sc_op").sites
                if not s.site.tail} == {(0xE8, sq)}
