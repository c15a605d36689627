# SPDX-License-Identifier: GPL-2.0-only
"""LiveMachine groups a batch's writes into runs (one pwrite each): the
runs written in order must leave the text as the writes applied in order
would -- the gaps from the text as it was, overlaps won by the later write
-- nearby writes in a read-only mapping must share a run, and a writable
mapping's writes never carry bytes between them."""

from __future__ import annotations

import random
import types

from textpoke.live import Mapping
from textpoke.live._text import _Text

PAGE = 4096
MAPS = [Mapping(0x10000, 0x30000, "r-xp", 0, "08:01", 1, "/a"),
        Mapping(0x30000, 0x34000, "rwxp", 0, "00:00", 0, ""),
        Mapping(0x34000, 0x50000, "r-xp", 0, "08:01", 2, "/b")]


class _Fake:
    def __init__(self, mem: bytearray) -> None:
        self._maps, self.mem, self._int3_sites, self.pid = MAPS, mem, set(), 1
        self.stats = types.SimpleNamespace(pokes=0)
        self.reads = 0
        self._mapping_of = types.MethodType(_Text._mapping_of, self)

    def text_read(self, a: int, n: int) -> bytes:
        self.reads += 1
        return bytes(self.mem[a:a + n])

    def text_range_of(self, a: int, n: int) -> None:
        raise AssertionError("every write here is in an executable mapping")


def _writes(rng: random.Random):
    out = []
    base = rng.choice([0x10000, 0x2f000, 0x30000, 0x33f00, 0x34000, 0x4e000])
    for _ in range(rng.randint(1, 60)):
        n = rng.choice([1, 1, 5, 5, 6, 2])
        a = max(0x10000, min(base + rng.randint(0, 0x3000), 0x50000 - n))
        m = next(x for x in MAPS if x.start <= a < x.end)
        a = min(a, m.end - n)
        out.append((a, b"\xcc" if n == 1 and rng.random() < 0.5 else rng.randbytes(n)))
    if rng.random() < 0.5:
        out.sort()
    return out


def test_runs_write_what_the_writes_in_order_leave():
    rng = random.Random(16)
    for _ in range(500):
        mem = bytearray(rng.randbytes(0x50000))
        writes = _writes(rng)
        fake = _Fake(mem)
        runs = _Text._runs(fake, writes)
        after = bytearray(mem)
        for a, d in writes:
            after[a:a + len(d)] = d
        written = bytearray(mem)
        for start, buf in runs:                              # pwrite'n in order
            m = next(x for x in MAPS if x.start <= start < x.end)
            assert start + len(buf) <= m.end                 # one mapping per run
            written[start:start + len(buf)] = buf
        assert written == after
        assert fake._int3_sites == {a for a, d in writes if d == b"\xcc"}
        assert fake.stats.pokes == len(writes)
        # the text is read at most once per run
        assert fake.reads <= len(runs)


def test_nearby_writes_share_a_run_except_in_a_writable_mapping():
    fake = _Fake(bytearray(0x50000))
    ro = [(0x10000 + 16 * i, b"\x0f\x1f\x44\x00\x00") for i in range(200)]
    assert len(_Text._runs(fake, ro)) == 1
    far = [(0x10000, b"\x90"), (0x10000 + PAGE + 1, b"\x90")]
    assert len(_Text._runs(fake, far)) == 2
    rw = [(0x30000 + 16 * i, b"\x90") for i in range(10)]
    runs = _Text._runs(fake, rw)
    assert [(s, bytes(b)) for s, b in runs] == [(a, d) for a, d in rw]
