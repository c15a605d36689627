# SPDX-License-Identifier: GPL-2.0-only
"""The cache of parsed symbol tables (textpoke.live._symcache): an entry is
used only for the very file it was read from, gives what parsing gives, and
a damaged or foreign entry is ignored."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")


def _rows_of_every_module(pid: int):
    from textpoke.live import Symbols
    with Symbols(pid) as s:
        return {m.path: (m._rows(), [(x.name, x.addr, x.size, x.func, x.ifunc) for x in m.symbols])
                for m in s.modules()}


def test_cached_rows_are_the_parsed_rows(tmp_path, monkeypatch):
    from textpoke.live import _symcache
    monkeypatch.setenv("TEXTPOKE_CACHE", str(tmp_path))
    monkeypatch.setenv("TEXTPOKE_LIVE_SYMBOL_CACHE", "0")
    parsed = _rows_of_every_module(os.getpid())
    assert not (tmp_path / "live-symbols").exists()          # off: nothing written
    assert any(len(r[0][0]) > 100 for r in parsed.values())   # a real table is compared
    monkeypatch.setenv("TEXTPOKE_LIVE_SYMBOL_CACHE", "1")
    assert _rows_of_every_module(os.getpid()) == parsed       # parsed, and stored
    files = list((tmp_path / "live-symbols").iterdir())
    assert len(files) == len(parsed)
    monkeypatch.setattr(_symcache, "store", None)             # not written again: read
    assert _rows_of_every_module(os.getpid()) == parsed


def _key(n: int = 0):
    st = os.stat(sys.executable)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, 1234 + n)


def test_an_entry_is_for_its_file_only(tmp_path, monkeypatch):
    from textpoke.live import _symcache
    monkeypatch.setenv("TEXTPOKE_CACHE", str(tmp_path / "cache"))
    rows = (["a", "b\ufffd", "c"], [1, 2, 2**64 - 1], [0, 5, 9], [2, 10, 1])
    k = _key()
    _symcache.store(k, rows)
    assert _symcache.load(k) == rows
    # one field of the identity differs: size, mtime, ctime, the tables' CRC
    for i in (2, 3, 4, 5):
        other = list(k)
        other[i] += 1
        assert _symcache.load(tuple(other)) is None
    # written again for the changed file: the new entry replaces the old one
    new = k[:5] + (99,)
    _symcache.store(new, (["z"], [7], [1], [1]))
    assert _symcache.load(new) == (["z"], [7], [1], [1]) and _symcache.load(k) is None
    assert len(list((tmp_path / "cache" / "live-symbols").iterdir())) == 1
    # the key is what Module uses: its file's fstat and the CRC
    assert _symcache.key(os.stat(sys.executable), 1234) == k


@pytest.mark.parametrize("damage", ["truncate", "magic", "names"])
def test_a_damaged_entry_is_ignored(tmp_path, monkeypatch, damage):
    from textpoke.live import _symcache
    monkeypatch.setenv("TEXTPOKE_CACHE", str(tmp_path / "cache"))
    rows = (["x", "y"], [16, 32], [1, 2], [2, 2])
    _symcache.store(_key(), rows)
    assert _symcache.load(_key()) == rows
    [entry] = list((tmp_path / "cache" / "live-symbols").iterdir())
    data = entry.read_bytes()
    if damage == "truncate":
        data = data[:-1]
    elif damage == "magic":
        data = b"X" + data[1:]
    else:                                   # one name too many
        data = data[:-1] + b"\0"
    entry.write_bytes(data)
    assert _symcache.load(_key()) is None


def test_the_cache_keeps_the_newest_entries(tmp_path, monkeypatch):
    from textpoke.live import _symcache
    monkeypatch.setenv("TEXTPOKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_symcache, "MAX_ENTRIES", 4)
    rows = (["x"], [1], [1], [2])
    keys = [(1, ino, 10, 20, 30, 40) for ino in range(7)]
    d = tmp_path / "cache" / "live-symbols"
    for i, k in enumerate(keys):
        _symcache.store(k, rows)
        os.utime(d / f"1-{k[1]:x}.syms", ns=(i * 10**9, i * 10**9))   # written in this order
    assert len(list(d.iterdir())) == 4
    assert [_symcache.load(k) is not None for k in keys] == [False] * 3 + [True] * 4
