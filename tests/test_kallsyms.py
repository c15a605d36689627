# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's own symbols (kallsyms) and the one symbolizer.

Synthetic tables, written the way ``scripts/kallsyms`` lays them out (both
table orders, relative offsets with and without absolute per-CPU symbols,
absolute addresses, a name of more than 127 tokens), are found by their
shape in surrounding bytes and decoded back exactly.  On Debian's cached
6.12 cloud kernel: the image loads with no ``System.map``; a map that is
not the image's is refused in one line; ``boot --image`` gives the same
dump with and without ``--system-map``.  Opt-in (TEXTPOKE_KERNEL_TESTS=1):
every symbol decoded from each kernel equals its ``System.map``'s.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from textpoke.images import ImageError
from textpoke.images._kallsyms import decode_kallsyms, find_kallsyms
from textpoke.images._symbols import Symbols, with_prefix
from textpoke.images._system_map import parse_system_map, symbol_differences

KERNEL_BASE = 0xffffffff81000000


# ----------------------------------------------------------- a kallsyms writer
def _tokens_for(names: list[str], avoid: str = "YZ") -> list[str]:
    """256 tokens: every character used at its own code, the other codes
    learned from frequent substrings (never containing *avoid*)."""
    tokens: list[str | None] = [None] * 256
    used = sorted({c for n in names for c in n})
    for c in used:
        tokens[ord(c)] = c
    counts: Counter = Counter()
    for n in names:
        for k in (2, 3, 4, 6):
            for i in range(len(n) - k + 1):
                s = n[i:i + k]
                if not any(c in s for c in avoid):
                    counts[s] += 1
    learned = iter([s for s, _ in counts.most_common()] + [f"q{i}w" for i in range(256)])
    have = set(used)
    for code in range(256):
        if tokens[code] is None:
            t = next(learned)
            while t in have:
                t = next(learned)
            have.add(t)
            tokens[code] = t
    return tokens  # type: ignore[return-value]


def _encode(name: str, tokens: list[str]) -> bytes:
    by_len = sorted(range(256), key=lambda c: -len(tokens[c]))
    out = bytearray()
    i = 0
    while i < len(name):
        c = next(c for c in by_len if name.startswith(tokens[c], i))
        out.append(c)
        i += len(tokens[c])
    return bytes(out)


def _align(buf: bytearray) -> None:
    buf += bytes(-len(buf) % 8)


def kallsyms_blob(entries: list[tuple[int, str, str]], *, order: str = "6.12",
                  mode: str = "percpu", junk: bytes = b"") -> bytes:
    """The kallsyms tables for *entries* (address, type, name; in kallsyms
    order) as the kernel links them into .rodata, after *junk*."""
    names = [t + n for _, t, n in entries]
    tokens = _tokens_for(names)
    n = len(entries)
    enc = bytearray()
    markers = []
    for i, s in enumerate(names):
        if i % 256 == 0:
            markers.append(len(enc))
        codes = _encode(s, tokens)
        ln = len(codes)
        enc += bytes([ln]) if ln < 0x80 else bytes([(ln & 0x7f) | 0x80, ln >> 7])
        enc += codes
    table = bytearray()
    index = []
    for t in tokens:
        index.append(len(table))
        table += t.encode() + b"\0"
    addrs = [a for a, _, _ in entries]
    if mode == "absolute":
        offs = struct.pack(f"<{n}Q", *addrs)
        base = None
    elif mode == "percpu":
        base = min(a for a in addrs if a >= KERNEL_BASE)
        offs = struct.pack(f"<{n}i", *[a if a < KERNEL_BASE else base - 1 - a for a in addrs])
    else:
        base = min(addrs)
        offs = struct.pack(f"<{n}I", *[a - base for a in addrs])
    seqs = b"".join(i.to_bytes(3, "big") for i in sorted(range(n), key=lambda i: names[i][1:]))

    out = bytearray(junk)
    _align(out)

    def put(data: bytes) -> None:
        out.extend(data)
        _align(out)

    def offsets() -> None:
        put(offs)
        if base is not None:
            put(struct.pack("<Q", base))

    if order == "6.1":
        offsets()
    put(struct.pack("<I", n))
    put(bytes(enc))
    put(struct.pack(f"<{len(markers)}I", *markers))
    if order == "6.1":
        put(seqs)
    put(bytes(table))
    put(struct.pack("<256H", *index))
    if order == "6.12":
        offsets()
        put(seqs)
    out += b"\x90" * 64
    return bytes(out)


def _entries(n: int = 700, percpu: int = 20) -> list[tuple[int, str, str]]:
    """Symbols sorted as kallsyms sorts them, names with every digit."""
    ents = [(0x40 * i, "A", f"pcpu_var{i}") for i in range(percpu)]
    a = KERNEL_BASE
    for i in range(n):
        ents.append((a, "T" if i % 3 else "t", f"do_thing_{i}_{i * 7 % 10}"))
        if i % 50 == 0:
            ents.append((a, "T", f"__pfx_alias{i}"))   # a second name, same address
        a += 0x10 + (i % 5) * 8
    ents.append((a, "D", "linux_banner"))
    ents.append((a + 0x100, "R", "Z" + "YZ" * 80))    # 161 tokens: a two-byte length
    ents.append((a + 0x200, "B", "_end"))
    return ents


JUNK = (b"\x11" * 37 + b"".join(bytes((c, 0)) for c in b"0123456789") + b"xx\0" * 9
        + bytes(range(256)) * 3)


@pytest.mark.parametrize("order,mode", [("6.12", "percpu"), ("6.12", "relative"),
                                        ("6.1", "percpu"), ("6.1", "absolute")])
def test_synthetic_tables_are_found_and_decoded_exactly(order, mode):
    ents = _entries(percpu=20 if mode == "percpu" else 0)
    blob = kallsyms_blob(ents, order=order, mode=mode, junk=JUNK)
    lay = find_kallsyms(blob)
    assert lay.order == order and lay.num_syms == len(ents)
    assert lay.absolute == (mode == "absolute")
    assert lay.percpu_absolute == (mode == "percpu")
    syms = decode_kallsyms(blob)
    assert list(syms.entries()) == ents
    assert syms["linux_banner"] == ents[-3][0] and syms["Z" + "YZ" * 80] == ents[-2][0]
    assert syms.type_of("do_thing_2_4") == "T" and syms.type_of("do_thing_3_1") == "t"


def test_tables_are_found_between_other_data_only_when_whole():
    ents = _entries()
    blob = bytearray(kallsyms_blob(ents, junk=JUNK))
    lay = find_kallsyms(bytes(blob))
    # a marker off by one: the names no longer walk to it
    bad = bytearray(blob)
    struct.pack_into("<I", bad, lay.markers + 4, struct.unpack_from("<I", blob, lay.markers + 4)[0] + 1)
    with pytest.raises(ImageError, match="kallsyms_markers"):
        decode_kallsyms(bytes(bad))
    # the token index disagreeing with the table
    bad = bytearray(blob)
    struct.pack_into("<H", bad, lay.token_index + 2 * 60, 3)
    with pytest.raises(ImageError, match="no kallsyms tables"):
        find_kallsyms(bytes(bad))
    # the addresses out of order
    bad = bytearray(blob)
    bad[lay.offsets + 4 * 30:lay.offsets + 4 * 31] = bad[lay.offsets + 4 * 40:lay.offsets + 4 * 41]
    with pytest.raises(ImageError, match="no kallsyms tables"):
        find_kallsyms(bytes(bad))
    with pytest.raises(ImageError, match="CONFIG_KALLSYMS"):
        find_kallsyms(JUNK * 10)


# ----------------------------------------------------------------- Symbols
def test_one_address_many_names_kallsyms_order():
    # strong before weak, names before linker-provided bounds, fewer
    # leading underscores first; then input order
    ents = [(0x20, "W", "weak_fn"), (0x20, "T", "__start_foo"), (0x20, "t", "__x"),
            (0x20, "t", "x"), (0x10, "T", "first"), (0x30, "T", "x")]
    s = Symbols.from_entries(ents, source="test")
    assert [n for _, _, n in s.entries()] == ["first", "x", "__x", "__start_foo", "weak_fn", "x"]
    assert s["x"] == 0x20                      # a name's lowest address
    assert s.name_at(0x20) == "x" and s.name_at(0x21) is None
    assert s.describe(0x27) == "x+0x7" and s.describe(0x30) == "x" and s.describe(0x5) == "0x5"
    assert s.symbolize(0x31) == ("x", 1) and s.symbolize(0x31, lo=0x40) is None
    assert s.size("first") == 0x10 and s.size("x") == 0x10
    assert s.prefixed("__") == [("__start_foo", 0x20), ("__x", 0x20)]
    assert with_prefix({"__b": 2, "__a": 1, "c": 3}, "__") == [("__a", 1), ("__b", 2)]
    assert with_prefix(s, "w") == [("weak_fn", 0x20)]


def test_system_map_parsing_and_refusals():
    text = b"ffffffff81000000 T _text\nffffffff81000000 T startup_64\n" \
           b"ffffffff81000010 t helper\n0000000000001000 D percpu_thing\n"
    s = parse_system_map(text)
    assert s["_text"] == s["startup_64"] == 0xffffffff81000000 and s.type_of("helper") == "t"
    assert s.names[0] == "percpu_thing" and s.source == "<System.map>"
    with pytest.raises(ImageError, match="-dbg"):
        parse_system_map(b"ffffffffffffffff B The real System.map is in the "
                         b"linux-image-<version>-dbg package\n")
    with pytest.raises(ImageError, match="not a System.map"):
        parse_system_map(bytes(range(256)) * 20)


def test_map_against_image_symbols():
    img = Symbols.from_entries([(0x10, "A", "pcpu"), (KERNEL_BASE, "T", "_text"),
                                (KERNEL_BASE + 8, "T", "f"), (KERNEL_BASE + 16, "D", "linux_banner")])
    good = parse_system_map(b"0000000000000010 D pcpu\nffffffff81000000 T _text\n"
                            b"ffffffff81000000 A text_abs\nffffffff81000008 T f\n"
                            b"ffffffff81000010 D linux_banner\nffffffff81000020 D kallsyms_names\n")
    assert symbol_differences(img, good) == []           # per-CPU "A", absolute ones, tables
    moved = parse_system_map(b"0000000000000010 D pcpu\nffffffff81000000 T _text\n"
                             b"ffffffff8100000c T f\nffffffff81000010 D linux_banner\n")
    assert symbol_differences(img, moved) == ["f is 0xffffffff8100000c in the map but "
                                              "0xffffffff81000008 in the image"]
    retyped = parse_system_map(b"0000000000000010 D pcpu\nffffffff81000000 T _text\n"
                               b"ffffffff81000008 t f\nffffffff81000010 D linux_banner\n")
    assert symbol_differences(img, retyped) == ["f is type 't' in the map but 'T' in the image"]
    extra = parse_system_map(b"0000000000000010 D pcpu\nffffffff81000000 T _text\n"
                             b"ffffffff81000008 T f\nffffffff81000009 t g\n"
                             b"ffffffff81000010 D linux_banner\n")
    assert symbol_differences(img, extra) == []
    assert symbol_differences(img, extra, strict=True) == [
        "g at 0xffffffff81000009 is in the map but not in the image"]


# ---------------------------------------------------- Debian's 6.12 cloud kernel
@pytest.fixture(scope="module")
def debian():
    from textpoke.images import KernelUnavailable, ensure_debian_kernel
    try:
        return ensure_debian_kernel()
    except KernelUnavailable as e:
        pytest.skip(f"Debian's 6.12 cloud kernel cannot be fetched here: {e}")


@pytest.fixture(scope="module")
def kernel(debian):
    return debian.load()


def _map_of(syms: Symbols) -> list[str]:
    return [f"{a:016x} {t} {n}" for a, t, n in syms.entries()]


def test_the_image_alone_has_its_symbols(kernel, debian):
    assert kernel.symbol_source == "kallsyms" and kernel.map_path == ""
    syms = kernel.symbols
    assert len(syms.names) > 100_000 and syms.types.count("A") > 100    # per-CPU ones
    assert kernel.read(kernel.sym("linux_banner"), 14) == b"Linux version "
    assert kernel.name_at(kernel.sym("alternative_instructions")) == "alternative_instructions"
    assert kernel.describe(kernel.sym("alternative_instructions") + 5) == "alternative_instructions+0x5"
    assert syms.type_of("alternative_instructions") == "T"
    assert syms.type_of("fixed_percpu_data") == "A" and syms["fixed_percpu_data"] == 0
    assert [n for n, _ in syms.prefixed("__SCT__cond_resched")] == ["__SCT__cond_resched"]


def test_a_map_is_checked_against_the_image(kernel, debian, tmp_path):
    from textpoke.kernel import load_kernel
    lines = _map_of(kernel.symbols)
    ok = load_kernel(debian.vmlinuz, "\n".join(lines).encode())
    assert list(ok.symbols.entries()) == list(kernel.symbols.entries())
    i = next(i for i, l in enumerate(lines) if l.endswith(" T alternative_instructions"))
    bad = list(lines)
    bad[i] = f"{int(lines[i][:16], 16) + 0x10:016x}{lines[i][16:]}"
    with pytest.raises(ImageError) as e:
        load_kernel(debian.vmlinuz, "\n".join(bad).encode())
    msg = str(e.value)
    assert "\n" not in msg and "does not match" in msg and "alternative_instructions" in msg
    # the command line: exit 2, one line
    p = tmp_path / "System.map"
    p.write_text("\n".join(bad) + "\n")
    r = subprocess.run([sys.executable, "-m", "textpoke", "boot", "--image", str(debian.vmlinuz),
                        "--system-map", str(p), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "alternative_instructions" in r.stderr and "Traceback" not in r.stderr


def test_boot_is_the_same_with_and_without_the_system_map(debian, tmp_path):
    """``boot --image`` needs no System.map: with Debian's real one (when the
    -dbg package was fetched) the dump and report are the same."""
    if debian.system_map is None:
        pytest.skip("no System.map cached (ensure_debian_kernel(with_system_map=True))")
    runs = {}
    for name, extra in (("image", []), ("map", ["--system-map", str(debian.system_map)])):
        dump = tmp_path / f"{name}.bin"
        r = subprocess.run([sys.executable, "-m", "textpoke", "boot", "--image",
                            str(debian.vmlinuz), *extra, "--dump", str(dump), "--json",
                            "--no-progress"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        for k in ("seconds", "timings"):
            doc.pop(k, None)
        runs[name] = (dump.read_bytes(), doc)
    assert runs["image"][0] == runs["map"][0] and len(runs["image"][0]) > 40 << 20
    assert runs["image"][1] == runs["map"][1]


def test_fetching_a_kernel_takes_only_its_image_package(debian, tmp_path, monkeypatch):
    """What make test fetches: the -unsigned image package (34 MB), never the
    -dbg one (318 MB) unless a System.map or vmlinux is asked for."""
    import textpoke.images._vmlinux as V
    debs = sorted((V.cache_root() / "kernel" / "debs").glob(
        f"linux-image-{debian.release}-unsigned_*_amd64.deb"))
    if not debs:
        pytest.skip("the image package is not in the cache")
    (tmp_path / "kernel" / "debs").mkdir(parents=True)
    (tmp_path / "kernel" / "debs" / debs[-1].name).symlink_to(debs[-1])
    calls: list[list[str]] = []
    run = V._run

    def recording(argv, **kw):
        calls.append(argv)
        if argv[0] == "apt-get":
            raise AssertionError(f"would download: {argv}")
        return run(argv, **kw)
    monkeypatch.setattr(V, "_run", recording)
    k = V.ensure_debian_kernel(debian.release, cache=tmp_path)
    assert k.system_map is None and k.vmlinux is None
    assert k.vmlinuz.read_bytes() == Path(debian.vmlinuz).read_bytes()
    assert not any("-dbg" in " ".join(c) for c in calls)
    assert V.ensure_debian_kernel(debian.release, cache=tmp_path) == k     # cached now
    assert len(calls) == 1


# ------------------------------------------ opt-in: every symbol, every kernel
#: the kernels to check: TEXTPOKE_KERNELS (as make test-kernel's KERNELS=), else
#: every x86-64 kernel Debian 12 ships that textpoke reads
KERNELS = [k for k in os.environ.get("TEXTPOKE_KERNELS",
                                     "6.12-cloud,6.1-cloud,6.12-rt,6.12-amd64").split(",") if k]


@pytest.mark.kernel
@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="set TEXTPOKE_KERNEL_TESTS=1 (fetches each kernel's -dbg package "
                           "for its System.map)")
@pytest.mark.parametrize("name", KERNELS)
def test_every_image_symbol_equals_the_system_map(name):
    from textpoke.images._bzimage import extract_elf
    from textpoke.images._qemu import resolve_kernel
    from textpoke.images._vmlinux import KernelUnavailable, ensure_debian_kernel, load_system_map
    try:
        k = ensure_debian_kernel(resolve_kernel(name), with_system_map=True)
    except (KernelUnavailable, ValueError) as e:
        pytest.skip(f"{name} cannot be fetched here: {e}")
    _, elf, _ = extract_elf(Path(k.vmlinuz).read_bytes(), str(k.vmlinuz))
    syms = decode_kallsyms(elf)
    smap = load_system_map(k.system_map)
    assert len(syms.names) > 50_000
    assert symbol_differences(syms, smap, strict=True, limit=20) == []
    # entry for entry: the same names at the same addresses in the same order
    kept = [(a, n) for a, t, n in smap.entries() if n in syms]
    assert kept == list(zip(syms.addrs, syms.names))
    # and the image loads with no map, naming addresses the same way
    from textpoke.kernel import load_kernel
    img = load_kernel(k.vmlinuz)
    assert img.symbol_source == "kallsyms" and img.sym("_text") == smap["_text"]
