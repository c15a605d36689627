# SPDX-License-Identifier: GPL-2.0-only
"""Kernel lines and payloads, offline and fast: the bzImage payload
decompressors (zstd, the legacy lz4 format of Debian's 6.1) stream their
output under a cap, so a small bomb is refused before it is held whole."""

from __future__ import annotations

import os

import lz4.block
import pytest
import zstandard

from textpoke.images import ImageError
from textpoke.images import _bzimage
from textpoke.images._bzimage import LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC, decompress_payload


def lz4_legacy(data: bytes, trailer: bool = True) -> bytes:
    """*data* in the legacy lz4 format as the kernel build writes it."""
    out = bytearray(LZ4_LEGACY_MAGIC.to_bytes(4, "little"))
    for off in range(0, len(data), LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[off:off + LZ4_LEGACY_BLOCK], store_size=False)
        out += len(block).to_bytes(4, "little") + block
    if trailer:
        out += (len(data) & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(out)


def payload() -> bytes:
    # a little over two lz4 blocks, part random so it is not all one match
    return (os.urandom(3000) + bytes(LZ4_LEGACY_BLOCK)) * 2 + b"\x7fELF tail"


def test_lz4_legacy_round_trip_with_and_without_the_size_trailer():
    d = payload()
    assert decompress_payload(lz4_legacy(d)) == d
    assert decompress_payload(lz4_legacy(d, trailer=False)) == d
    # two streams one after the other (a repeated magic) read as one
    two = (lz4_legacy(b"abc" * 100, trailer=False) + lz4_legacy(b"xyz" * 100, trailer=False)
           + (600).to_bytes(4, "little"))
    assert decompress_payload(two) == b"abc" * 100 + b"xyz" * 100


def test_lz4_legacy_refuses_truncation_corruption_and_a_wrong_trailer():
    good = lz4_legacy(payload())
    with pytest.raises(ImageError, match="lz4 payload does not decompress"):
        decompress_payload(good[:len(good) // 2])
    bad = bytearray(good)
    bad[20:40] = b"\xff" * 20
    with pytest.raises(ImageError, match="lz4 payload does not decompress"):
        decompress_payload(bytes(bad))
    wrong = good[:-4] + (123).to_bytes(4, "little")
    with pytest.raises(ImageError, match="trailer"):
        decompress_payload(wrong)


def test_a_zstd_bomb_is_refused_while_streaming(monkeypatch):
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))
    assert len(bomb) < 64 << 10
    seen = []
    real_add = _bzimage._Capped.add

    def add(self, piece):
        seen.append(self.size + len(piece))
        return real_add(self, piece)
    monkeypatch.setattr(_bzimage._Capped, "add", add)
    with pytest.raises(ImageError, match="more than 16 MiB"):
        decompress_payload(bomb, limit=16 << 20)
    # refused within one step past the cap, never near the 256 MiB it holds
    assert seen[-1] > 16 << 20 and seen[-1] < 64 << 20
    # below the cap the same stream decompresses, its trailer ignored
    small = zstandard.ZstdCompressor().compress(b"kernel" * 1000) + b"\x01\x02\x03\x04"
    assert decompress_payload(small) == b"kernel" * 1000


def test_an_lz4_bomb_is_refused_block_by_block(monkeypatch):
    seen = []
    real_add = _bzimage._Capped.add

    def add(self, piece):
        seen.append(self.size + len(piece))
        return real_add(self, piece)
    monkeypatch.setattr(_bzimage._Capped, "add", add)
    bomb = lz4_legacy(bytes(8 * LZ4_LEGACY_BLOCK), trailer=False)
    assert len(bomb) < 512 << 10
    with pytest.raises(ImageError, match="more than 20 MiB"):
        decompress_payload(bomb, limit=20 << 20)
    assert seen[-1] == 3 * LZ4_LEGACY_BLOCK


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2"])
def test_stdlib_formats_stream_under_the_cap_too(kind):
    import bz2
    import gzip
    import lzma
    data = bytes(12 << 20)
    comp = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress}[kind](data)
    assert decompress_payload(comp + b"\0\0\0\x02") == data
    with pytest.raises(ImageError, match="more than 4 MiB"):
        decompress_payload(comp, limit=4 << 20)
    with pytest.raises(ImageError, match="does not decompress"):
        decompress_payload(comp[:len(comp) // 2])
