# SPDX-License-Identifier: GPL-2.0-only
"""The live machine's small records (Symbol, Mapping, FentrySite,
LiveStats) are written out instead of made by @dataclass (its machinery
cost every command's start a few milliseconds): they keep a dataclass's
behaviour -- fields in order, equality and hashing on the compared fields,
immutability where it was frozen, copy and pickle."""

from __future__ import annotations

import copy
import pickle

import pytest


def test_symbol_compares_without_module_and_ifunc_and_is_immutable():
    from textpoke.live import Symbol
    a = Symbol("f", 0x1000, 16, None, True, False)
    b = Symbol("f", 0x1000, 16, "another module", True, True)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Symbol("f", 0x1000, 16, None, False) and a != Symbol("g", 0x1000, 16, None)
    assert Symbol("f", 1, 2, None).func is True and Symbol("f", 1, 2, None).ifunc is False
    assert a.end == 0x1010
    with pytest.raises(AttributeError):
        a.addr = 5
    assert copy.copy(b) == b and copy.copy(b).ifunc is True
    assert repr(a) == "Symbol(name='f', addr=4096, size=16, func=True, ifunc=False)"


def test_mapping_is_an_immutable_hashable_record():
    from textpoke.live import Mapping
    m = Mapping(0x1000, 0x2000, "r-xp", 0, "08:01", 7, "/bin/x")
    n = Mapping(0x1000, 0x2000, "r-xp", 0, "08:01", 7, "/bin/x")
    assert m == n and hash(m) == hash(n) and m != Mapping(0x1000, 0x2000, "r--p", 0, "08:01", 7,
                                                           "/bin/x")
    assert 0x1fff in m and 0x2000 not in m and m.executable and not m.writable
    with pytest.raises(AttributeError):
        m.start = 0
    assert pickle.loads(pickle.dumps(m)) == m and copy.deepcopy(m) == m
    assert (m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) == (
        0x1000, 0x2000, "r-xp", 0, "08:01", 7, "/bin/x")


def test_fentry_site_and_live_stats():
    from textpoke.live import FentrySite, LiveStats
    s = FentrySite(0x401000, "f", 0x401000, "exe", "mcount", b"", "")
    t = FentrySite(0x401000, "f", 0x401000, "exe", "mcount", b"", "")
    assert s == t
    s.kind, s.found = "nop5", bytes.fromhex("0f1f440000")
    assert s != t and s.patchable and s.as_dict()["bytes"] == "0f 1f 44 00 00"
    with pytest.raises(TypeError):
        hash(s)                            # mutable: unhashable, as the dataclass was
    st = LiveStats()
    assert set(st.as_dict().values()) == {0} and "quiesce_waits" in st.as_dict()
    st.syncs += 3
    assert st == LiveStats(syncs=3) and st != LiveStats()
    with pytest.raises(TypeError):
        LiveStats(no_such_counter=1)
