# SPDX-License-Identifier: GPL-2.0-only
"""Addresses by name and fentry sites of real processes built here by GCC:
a non-PIE executable built with -pg -mfentry -mnop-mcount -mrecord-mcount
(``__mcount_loc``), a PIE built with -fpatchable-function-entry=5, and libc.

Every expected address is computed independently of textpoke: link-time
addresses from ``nm``, the load bias from /proc/PID/maps, bytes from the
file versus /proc/PID/mem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, gen, ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N = 40


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    d = tmp_path_factory.mktemp("live_sym")
    return d, gen.build(N, d), gen.build(N, d, pie=True)


@pytest.fixture(scope="module")
def nonpie(builds):
    d, exe, _ = builds
    with Target(exe, d / "out1") as t:
        yield t


@pytest.fixture(scope="module")
def pie(builds):
    d, _, exe = builds
    with Target(exe, d / "out2") as t:
        yield t


def _nm(path: str, dynamic: bool = False) -> dict[str, int]:
    out = subprocess.run(["nm", "-D" if dynamic else "-n", "--defined-only", path],
                         capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtWi":
            syms.setdefault(parts[2].split("@")[0], int(parts[0], 16))
    return syms


def _first_mapping(pid: int, path: str) -> int:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and f[5] == path and int(f[2], 16) == 0:
            return int(f[0].split("-")[0], 16)
    raise AssertionError(f"{path} has no mapping of offset 0")


def _mem(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def test_nonpie_symbols_are_link_addresses(nonpie):
    from textpoke.live import Symbols
    exe = os.readlink(f"/proc/{nonpie.pid}/exe")
    nm = _nm(exe)
    with Symbols(nonpie.pid) as s:
        assert s.main.path == exe and s.main.etype == "ET_EXEC" and s.main.bias == 0
        for name in ("f00000", "f00017", f"f{N - 1:05d}", "main"):
            assert s.resolve(name) == nm[name]


def test_pie_symbols_carry_the_load_bias(pie):
    from textpoke.live import Symbols
    exe = os.readlink(f"/proc/{pie.pid}/exe")
    nm = _nm(exe)
    base = _first_mapping(pie.pid, exe)
    assert base > 0x10000            # really relocated: the test means something
    with Symbols(pie.pid) as s:
        assert s.main.pie and s.main.bias == base
        for name in ("f00000", "f00023", "main"):
            assert s.resolve(name) == base + nm[name]
        # a number is a number
        assert s.resolve(hex(base + 0x1234)) == base + 0x1234
        assert s.resolve(str(base)) == base


def test_library_symbol(pie):
    from textpoke.live import Symbols
    with Symbols(pie.pid) as s:
        libc = s.module("libc")
        assert os.path.basename(libc.path).startswith("libc.so")
        nm = _nm(libc.path, dynamic=True)
        addr = s.resolve("libc:malloc")
        assert addr == _first_mapping(pie.pid, libc.path) + nm["malloc"]
        # the same bytes in the process as in the file at the symbol's offset
        assert _mem(pie.pid, addr, 16) == libc.file_bytes_at(addr, 16)
        # the full file name works too, and a bare name searches every module
        assert s.resolve(f"{os.path.basename(libc.path)}:malloc") == addr
        assert s.resolve("malloc") == addr
        assert s.resolve("libc:malloc+0") == addr


def test_offset_must_be_an_instruction_boundary(nonpie):
    from textpoke.live import SymbolError, Symbols
    with Symbols(nonpie.pid) as s:
        f = s.resolve("f00003")
        # the NOP5 fentry site is 5 bytes: +5 is the next instruction
        assert s.resolve("f00003+5") == f + 5
        assert s.resolve("f00003+0x5") == f + 5
        for off in (1, 2, 4, 6, 7):
            with pytest.raises(SymbolError, match="not an instruction boundary"):
                s.resolve(f"f00003+{off}")
        size = s.lookup("f00003").size
        with pytest.raises(SymbolError, match="outside"):
            s.resolve(f"f00003+{size}")


def test_unknown_names_are_refused(nonpie):
    from textpoke.live import SymbolError, Symbols
    with Symbols(nonpie.pid) as s:
        with pytest.raises(SymbolError, match="no symbol 'no_such_function'"):
            s.resolve("no_such_function")
        with pytest.raises(SymbolError, match="no module 'libnothere'"):
            s.resolve("libnothere:malloc")
        with pytest.raises(SymbolError, match="bad address"):
            s.resolve("f00001+")
        with pytest.raises(SymbolError, match="no symbol"):
            s.resolve("libc:f00001")      # exists, but not in libc


def test_glob(nonpie):
    from textpoke.live import Symbols
    with Symbols(nonpie.pid) as s:
        got = [f.name for f in s.functions("f0001?")]
        assert got == [f"f{i:05d}" for i in range(10, 20)]
        assert len(s.functions("f0*")) == N
        # a bare glob searches every module (fopen is libc's); lib: narrows it
        everywhere = s.functions("f*")
        assert {f.module.short for f in everywhere} > {s.main.short}
        assert len(s.functions(os.path.basename(s.main.path) + ":f0*")) == N
        assert [f.name for f in s.functions("f00002")] == ["f00002"]
        assert s.functions("nothing*") == []
        libc = s.functions("libc:pthread_mutex_lock")
        assert len(libc) == 1 and libc[0].module.short.startswith("libc")
        assert s.symbolize(s.resolve("f00005") + 5) == "f00005+0x5"


def test_module_part_may_be_a_glob(nonpie):
    """``libc*:mall*``, ``*:f0001?``: the module part is a glob over the
    modules' file names (and paths); a glob naming no module, or a symbol
    found at two addresses in the modules a glob names, is refused."""
    from textpoke.live import SymbolError, Symbols
    with Symbols(nonpie.pid) as s:
        libc = s.module("libc")
        nm = _nm(libc.path, dynamic=True)
        base = _first_mapping(nonpie.pid, libc.path)
        got = s.functions("libc*:mall*")
        assert got and {f.module.path for f in got} == {libc.path}
        assert {f.name for f in got} == {n for n in nm if n.startswith("mall")}
        assert s.resolve("libc*:malloc") == base + nm["malloc"]
        assert s.resolve("*:malloc") == base + nm["malloc"]
        # '*' is every module: the same as no module part
        assert [f.addr for f in s.functions("*:f0001?")] == [f.addr for f in s.functions("f0001?")]
        main = os.path.basename(s.main.path)
        assert len(s.functions(main[:3] + "*:f0*")) == N
        assert len(s.functions("*/" + main + ":f0*")) == N          # the path matches too
        with pytest.raises(SymbolError, match="no module matching 'nothere\\*'"):
            s.functions("nothere*:f0*")
        with pytest.raises(SymbolError, match="no module matching"):
            s.resolve("nothere*:malloc")
        assert s.functions("libc*:no_such_fn*") == []


def test_symbol_refusals_are_one_plain_line(nonpie):
    """Every refusal of a name or a write: exit 2, one line, no class name,
    no traceback -- also for a module glob."""
    pid = str(nonpie.pid)
    cases = [("sites", "--pid", pid, "--functions", "nothere*:f0*"),
             ("count", "--pid", pid, "--functions", "nothere*:f0*", "--duration", "0.1"),
             ("toggle", "--pid", pid, "--functions", "nothere*:f0*", "--to", "nop"),
             ("poke", "--pid", pid, "nothere*:malloc", "90"),
             ("poke", "--pid", pid, "no_such_function", "90"),
             ("poke", "--pid", pid, "f00003+2", "90"),
             ("poke", "--pid", pid, "f00003", "cc")]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "textpoke", "live", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert "Error:" not in err and "Refused:" not in err, (args, err)


def test_mcount_sites(nonpie):
    from textpoke.live._fentry import NOP5, fentry_sites
    from textpoke.live import Symbols
    exe = os.readlink(f"/proc/{nonpie.pid}/exe")
    nm = _nm(exe)
    with Symbols(nonpie.pid) as s:
        sites = fentry_sites(s, "f*")
        assert [x.function for x in sites] == [f"f{i:05d}" for i in range(N)]
        for x in sites:
            assert x.source == "mcount" and x.kind == "nop5" and x.found == NOP5 and x.patchable
            assert x.addr == nm[x.function]       # -mfentry: the first instruction
        # main is built without instrumentation (no_instrument_function): no site
        assert all(x.function != "main" for x in fentry_sites(s))
        assert len(fentry_sites(s, "f0000[0-4]")) == 5


def test_patchable_entries_are_flagged(pie):
    from textpoke.live import Symbols, fentry_sites
    with Symbols(pie.pid) as s:
        sites = fentry_sites(s, "f0*")
        assert len(sites) == N
        for x in sites:
            assert x.source == "patchable" and x.addr == s.resolve(x.function)
            # patchable now: switched with every thread stopped (test_live_forms.py)
            assert x.kind == "5xnop1" and x.patchable and x.found == b"\x90" * 5


def test_stray_int3_is_found(nonpie):
    """The target is idle (window mode, no window open), so writing a byte of
    a site through /proc/PID/mem and restoring it is safe."""
    from textpoke.live import Symbols, fentry_sites
    with Symbols(nonpie.pid) as s:
        site = fentry_sites(s, "f00009")[0]
        with open(f"/proc/{nonpie.pid}/mem", "r+b", buffering=0) as f:
            f.seek(site.addr)
            f.write(b"\xcc")
            try:
                again = fentry_sites(s, "f0000*")
                kinds = {x.function: x.kind for x in again}
                assert kinds["f00009"] == "int3" and again[-1].stray_int3
                assert sum(k == "int3" for k in kinds.values()) == 1
            finally:
                f.seek(site.addr)
                f.write(site.found[:1])
        assert fentry_sites(s, "f00009")[0].kind == "nop5"
    assert nonpie.alive()
