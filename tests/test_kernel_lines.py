# SPDX-License-Identifier: GPL-2.0-only
"""Kernel lines and payloads, offline and fast: the bzImage payload
decompressors (zstd, the legacy lz4 format of Debian's 6.1) stream their
output under a cap, so a small bomb is refused before it is held whole."""

from __future__ import annotations

import os

import lz4.block
import pytest
import zstandard

from textpoke.images import ImageError, _bzimage
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


# ------------------------------------------------------------- kernel lines
from pathlib import Path  # noqa: E402

from textpoke._alternative._apply import recompute_jump as _recompute_jump  # noqa: E402
from textpoke._alternative._reloc import nops_pass  # noqa: E402
from textpoke.kernel import CpuCaps, KernelBootError  # noqa: E402
from textpoke.images._lines import LINE_61, LINE_612, LINES, line_of  # noqa: E402


def test_the_line_comes_from_the_banner_and_is_checked_against_the_symbols():
    syms = {"__alt_instructions": 1}
    assert line_of("6.1.0-57-cloud-amd64", syms) is LINE_61
    assert line_of("6.12.118+deb12-rt-amd64", syms) is LINE_612
    assert line_of("6.12.118+deb12-amd64", syms) is LINE_612
    # a 6.12 banner over 6.1's paravirt table, or a 6.1 one over call-depth sites
    with pytest.raises(ImageError, match="__parainstructions"):
        line_of("6.12.118+deb12-cloud-amd64", {**syms, "__parainstructions": 2})
    with pytest.raises(ImageError, match="__call_sites"):
        line_of("6.1.0-57-cloud-amd64", {**syms, "__call_sites": 2})


@pytest.mark.parametrize("version", ["6.6.63-amd64", "5.10.0-33-amd64", "6.13.1", "4.19.0"])
def test_an_unknown_line_is_refused_in_one_line_naming_the_known(version):
    with pytest.raises(ImageError) as e:
        line_of(version, {"__alt_instructions": 1}, "vmlinuz-x")
    msg = str(e.value)
    assert "\n" not in msg and version in msg
    assert "knows the 6.1 and 6.12 lines" in msg
    assert [ln.name for ln in LINES] == ["6.1", "6.12"]


def test_feature_numbers_are_the_lines_own():
    # ITS's synthetic feature is 21*32+5 in 6.1 and 21*32+6 in 6.12
    words = [0] * 24
    words[21] = 1 << 5
    assert CpuCaps(words, LINE_61).has("indirect_thunk_its")
    assert not CpuCaps(words, LINE_612).has("indirect_thunk_its")
    # names set before the line is known are replayed under its numbering
    c = CpuCaps()
    c.set("clear_cpu_buf")
    c.set("always")
    c61 = c.for_line(LINE_61)
    assert c61.has("clear_cpu_buf") and c61.has("always")
    assert c61.number("clear_cpu_buf") == 11 * 32 + 18 != c.number("clear_cpu_buf")
    # a feature 6.1 lacks is absent there; a name no line has is an error
    assert not c61.has("call_depth")
    with pytest.raises(KernelBootError):
        c61.has("no_such_feature")
    with pytest.raises(KernelBootError, match="6.1"):
        CpuCaps(line=LINE_61).set("call_depth")


def test_61_optimize_nops_merges_only_runs_of_0x90():
    b = bytearray(b"\xe8\x01\x02\x03\x04" + b"\x90" * 3)
    nops_pass(b, len(b), LINE_61)
    assert b == b"\xe8\x01\x02\x03\x04\x0f\x1f\x00"
    b = bytearray(b"\x90" * 11)
    nops_pass(b, 11, LINE_61)                  # 8 + 3, no JMP over padding
    assert b == bytes.fromhex("0f1f840000000000") + b"\x0f\x1f\x00"
    b = bytearray(b"\x66\x90\x90\x90")          # a 2-byte NOP is not a run of 0x90s
    nops_pass(b, 4, LINE_61)
    assert b == b"\x66\x90\x66\x90"
    # 6.12's merges any NOP run and jumps over long ones
    b = bytearray(b"\x66\x90" + b"\x90" * 20)
    nops_pass(b, len(b), LINE_612)
    assert b[:2] == b"\xeb\x14"
    b = bytearray(b"\x66\x90" + b"\x90" * 20)
    nops_pass(b, len(b), LINE_61)
    assert b[:2] == b"\x66\x90" and b[2:10] == bytes.fromhex("0f1f840000000000")


def test_61_recompute_jump_short_ahead_long_behind():
    site, repl = 0x1000, 0x9000
    # replacement JMP to site+0x40: from the site it reaches with rel8
    b = bytearray(b"\xe9") + ((site + 0x40) - (repl + 5)).to_bytes(4, "little", signed=True)
    _recompute_jump(b, site, repl)
    assert b == bytes([0xEB, 0x40 - 2]) + b"\x0f\x1f\x00"
    # a target behind the site takes rel32 even when near
    b = bytearray(b"\xe9") + ((site - 0x10) - (repl + 5)).to_bytes(4, "little", signed=True)
    _recompute_jump(b, site, repl)
    assert b[0] == 0xE9 and int.from_bytes(b[1:5], "little", signed=True) == -0x10 - 5


def _cached(series: str) -> Path | None:
    root = Path.home() / ".cache/textpoke/kernel"
    found = sorted(root.glob(f"{series}*-cloud-amd64/vmlinuz")) if root.exists() else []
    return found[-1] if found else None


def test_debians_61_image_loads_as_the_61_line():
    img = _cached("6.1.0-")
    if img is None or not (img.parent / "System.map").exists():
        pytest.skip("Debian's 6.1 cloud kernel is not cached (make kernel-images fetches it)")
    from textpoke.kernel import load_kernel
    k = load_kernel(img, img.parent / "System.map")
    assert k.compression == "lz4" and k.line is LINE_61
    assert k.table(".altinstructions").entry_size == 12
    assert k.table(".parainstructions").count > 1000
    assert ".call_sites" not in k.tables


def test_an_image_of_an_unknown_line_is_refused_by_boot_in_one_line(tmp_path):
    """Debian's 6.12 image with its banner rewritten to a 6.66 kernel: the
    loader and ``textpoke boot --image`` refuse it in one line naming the
    lines textpoke knows (exit 2, no traceback)."""
    import subprocess
    import sys
    img = _cached("6.12.")
    if img is None or not (img.parent / "System.map").exists():
        pytest.skip("Debian's 6.12 cloud kernel is not cached (make kernel-images fetches it)")
    from textpoke.images._bzimage import extract_elf
    _, elf, _ = extract_elf(img.read_bytes())
    version = img.parent.name.encode()
    assert elf.count(b"Linux version " + version) >= 1
    fake = version.replace(b"6.12.", b"6.66.", 1)
    elf = elf.replace(b"Linux version " + version, b"Linux version " + fake)
    f = tmp_path / "vmlinux-6.66"
    f.write_bytes(elf)
    r = subprocess.run([sys.executable, "-m", "textpoke", "boot", "--image", str(f),
                        "--system-map", str(img.parent / "System.map"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "knows the 6.1 and 6.12 lines" in lines[0], r.stderr
    assert "Linux 6.66" in lines[0]
