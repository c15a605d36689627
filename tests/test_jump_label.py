# SPDX-License-Identifier: GPL-2.0-only
"""Static keys on the sim machine: the kernel's static-keys test on four
running vCPUs, a key of 1,000 sites, reference counts and refusals."""

from __future__ import annotations

import pytest

import dataclasses

from textpoke import JumpLabelError, StaticKeyWarning, StaticKeys, UnknownKeyError, x86_nops
from textpoke.images._tables import jump_table
from textpoke.selftests import many_key_flip, static_keys_selftest
from textpoke.sim import ClientMachine


@pytest.fixture
def cm():
    with ClientMachine(cpus=4, seed=3) as m:
        yield m


def test_table_parsed_into_keys(cm):
    keys = cm.keys
    assert len(keys.key("jl_key_many_1000").sites) == 1000
    assert len(keys.key("jl_key_many_100").sites) == 100
    assert len(keys.key("jl_key_shared").sites) == 3
    sizes = {s.size for k in keys.keys.values() for s in k.sites}
    assert sizes == {2, 5}                       # NOP2/JMP8 and NOP5/JMP32 sites both present
    # initial counts come from the guest's keys
    assert keys.static_key_enabled("tk_true_key") and not keys.static_key_enabled("tk_false_key")
    assert keys.key("tk_true_key").initial and not keys.key("tk_false_key").initial
    # every site holds its key's state already (the compiler chose it)
    for k in keys.keys.values():
        for s in k.sites:
            assert keys.site_state(s.entry) == keys.jump_label_type(s.entry)


def test_parser_agrees_with_read_tables(cm):
    sec = cm.image.section("__jump_table")
    assert jump_table(sec.data, sec.addr, sec.addr, sec.end) == list(cm.tables.jump_table)


def test_static_keys_selftest_on_four_running_cpus(cm):
    r = static_keys_selftest(cm)
    assert r.passed, [c for c in r.cases if not c["passed"]] + r.bad
    assert r.oopses == 0 and r.bad == []
    assert len(r.cases) >= 3 * 18
    # the CPUs really ran the probes and really raced the patcher
    assert all(cm.calls_made(i) > 0 for i in range(len(cm.probes)))
    assert cm.core.stats.int3_hits > 0


def test_key_of_1000_sites_while_cpus_run_them(cm):
    r = many_key_flip(cm, 1000, flips=2)
    assert r.passed, r.cases + r.bad
    for c in r.cases:
        assert c["entries"] == 1000
        assert c["batches"] == 4                 # ceil(1000 / 256)
        assert c["syncs"] <= 3 * 4
    assert r.oopses == 0


def test_one_site_key_costs_one_batch(cm):
    cm.start()
    b0, s0 = cm.core.stats.batches, cm.core.stats.syncs
    cm.keys.static_key_enable("jl_key_many_1")
    assert cm.core.stats.batches - b0 == 1 and cm.core.stats.syncs - s0 <= 3
    e = cm.keys.key("jl_key_many_1").sites[0].entry
    assert cm.sim.text_read(e.code, 5)[0] == 0xE9


def test_likely_and_unlikely_write_opposite_code(cm):
    keys = cm.keys
    k = keys.key("jl_key_shared")
    keys.static_key_enable(k)
    forms = {s.entry.branch: keys.site_state(s.entry) for s in k.sites}
    assert forms == {False: 1, True: 0}          # unlikely sites jump, likely ones fall through
    keys.static_key_disable(k)
    forms = {s.entry.branch: keys.site_state(s.entry) for s in k.sites}
    assert forms == {False: 0, True: 1}


def test_reference_counts(cm):
    keys = cm.keys
    b0 = cm.core.stats.batches
    keys.static_branch_inc("jl_key_many_1")
    keys.static_branch_inc("jl_key_many_1")
    assert keys.static_key_count("jl_key_many_1") == 2
    with pytest.warns(StaticKeyWarning, match="count is 2"):
        keys.static_key_enable("jl_key_many_1")          # already on: nothing (and a WARN)
    with pytest.warns(StaticKeyWarning, match="count is 2"):
        keys.static_key_disable("jl_key_many_1")         # count 2: left alone (and a WARN)
    assert keys.static_key_count("jl_key_many_1") == 2
    keys.warnings.clear()
    keys.static_branch_dec("jl_key_many_1")
    assert keys.static_key_enabled("jl_key_many_1")
    keys.static_branch_dec("jl_key_many_1")
    assert not keys.static_key_enabled("jl_key_many_1")
    assert cm.core.stats.batches - b0 == 2               # only 0->1 and 1->0 patch
    # a dec at 0 is the kernel's WARN and nothing else: no raise, no change
    with pytest.warns(StaticKeyWarning, match="already 0"):
        keys.static_branch_dec("jl_key_many_1")
    assert keys.static_key_count("jl_key_many_1") == 0 and len(keys.warnings) == 1
    assert cm.core.stats.batches - b0 == 2
    # the count is mirrored into the guest's struct static_key
    keys.static_branch_inc("jl_key_many_1")
    assert int.from_bytes(cm.sim.mem_read(keys.key("jl_key_many_1").addr, 4), "little") == 1


def test_unexpected_old_bytes_refused_with_nothing_written(cm):
    keys = cm.keys
    k = keys.key("jl_key_many_100")
    bad = k.sites[57].entry.code
    cm.core.text_poke_early(bad, bytes.fromhex("0f1f440001"))   # a NOP5, but not the expected one
    before = {s.entry.code: cm.sim.text_read(s.entry.code, 5) for s in k.sites}
    b0, ev0 = cm.core.stats.batches, len(cm.core.events)
    with pytest.raises(JumpLabelError) as ei:
        keys.static_key_enable(k)
    msg = str(ei.value)
    assert "jl_many_100+0x" in msg and ei.value.site.startswith("jl_many_100+0x")
    assert "0f 1f 44 00 01" in msg and x86_nops[5].hex(" ") in msg
    assert ei.value.found == bytes.fromhex("0f1f440001") and ei.value.expected == x86_nops[5]
    assert {a: cm.sim.text_read(a, 5) for a in before} == before
    assert cm.core.stats.batches == b0 and len(cm.core.events) == ev0
    assert not keys.static_key_enabled(k)


def test_unknown_key_refused(cm):
    with pytest.raises(UnknownKeyError, match="no_such_key"):
        cm.keys.static_key_enable("no_such_key")
    with pytest.raises(UnknownKeyError):
        cm.keys.key(0x1234)


def test_refuses_a_site_that_is_not_a_nop_or_jmp(cm):
    e = cm.keys.key("jl_key_many_1").sites[0].entry
    cm.core.text_poke_early(e.code, b"\xcc" * 5)
    with pytest.raises(JumpLabelError, match="neither a 2- nor a 5-byte"):
        StaticKeys.from_image(cm.core, cm.image, cm.tables)


def test_cli_keys_selftest_json_and_exit_codes(capsys):
    import json

    from textpoke.cli import main
    assert main(["keys", "--selftest", "--cpus", "4", "--seed", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["selftest"]["passed"] and len(d["selftest"]["cases"]) > 50
    assert d["oopses"] == 0 and d["batches"] > 0 and d["syncs"] <= 3 * d["batches"]
    assert main(["keys", "--enable", "no_such_key"]) == 2
    with pytest.raises(SystemExit) as ei:
        main(["keys", "--cpus", "99"])
    assert ei.value.code == 2
    assert main(["keys", "--enable", "jl_key_many_100", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["actions"][0]["entries"] == 100 and d["actions"][0]["batches"] == 1


def _watch_key_during_writes(cm, key):
    """Record what the guest reads in *key*'s ``enabled`` each time the
    machine writes text."""
    m, seen = cm.core.machine, []
    orig_one, orig_many = m.text_poke_write, m.text_poke_write_many

    def one(addr, data):
        seen.append(int.from_bytes(m.mem.read(key.addr, 4), "little", signed=True))
        return orig_one(addr, data)

    def many(writes):
        seen.append(int.from_bytes(m.mem.read(key.addr, 4), "little", signed=True))
        return orig_many(writes)

    m.text_poke_write, m.text_poke_write_many = one, many
    return seen


@pytest.mark.parametrize("how", ["enable", "inc"])
def test_guest_reads_minus_one_while_enabling_and_zero_while_disabling(cm, how):
    keys = cm.keys
    k = keys.key("jl_key_many_100")
    seen = _watch_key_during_writes(cm, k)
    (keys.static_key_enable if how == "enable" else keys.static_branch_inc)(k)
    # every text write of the enable happened while the guest read -1
    assert seen and set(seen) == {-1}
    assert int.from_bytes(cm.sim.mem_read(k.addr, 4), "little", signed=True) == 1
    seen.clear()
    (keys.static_key_disable if how == "enable" else keys.static_branch_dec)(k)
    assert seen and set(seen) == {0}
    assert int.from_bytes(cm.sim.mem_read(k.addr, 4), "little", signed=True) == 0


def test_refused_enable_leaves_the_guest_key_at_its_old_value(cm):
    keys = cm.keys
    k = keys.key("jl_key_many_100")
    cm.core.text_poke_early(k.sites[3].entry.code, b"\xcc" * 5)
    with pytest.raises(JumpLabelError):
        keys.static_key_enable(k)
    assert int.from_bytes(cm.sim.mem_read(k.addr, 4), "little", signed=True) == 0


def test_init_and_exit_sites_are_not_updated_after_boot(cm):
    keys = cm.keys
    k = keys.key("jl_key_many_100")
    # mark one site as init text (jump_label_init's mark), and move one
    # outside every text range (built-in __exit code is not kernel text)
    init_site = k.sites[10]
    k.sites[10] = dataclasses.replace(init_site, entry=init_site.entry._replace(init=True))
    exit_site = k.sites[20]
    outside = max(r.end for r in cm.core.machine.text_ranges) + 0x1000
    k.sites[20] = dataclasses.replace(exit_site, entry=exit_site.entry._replace(
        code=outside, target=outside + 0x20))
    before = cm.sim.text_read(init_site.entry.code, 5)
    with pytest.warns(StaticKeyWarning, match="can't patch jump_label"):
        keys.static_key_enable(k)
    assert keys.site_state(k.sites[0].entry) == keys.jump_label_type(k.sites[0].entry)
    assert cm.sim.text_read(init_site.entry.code, 5) == before       # init: left alone
    assert keys.updates == 1 and keys.entries_patched == 98
    # while booting, init sites are written (the outside one never is)
    with pytest.warns(StaticKeyWarning):
        keys.static_key_disable(k)
    keys.booting = True
    with pytest.warns(StaticKeyWarning):
        keys.static_key_enable(k)
    assert cm.sim.text_read(init_site.entry.code, 5) != before
