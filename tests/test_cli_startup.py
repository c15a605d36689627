# SPDX-License-Identifier: GPL-2.0-only
"""Start-up: a command imports only what it uses.

``textpoke --version`` and ``--help`` must not load Unicorn, iced-x86 or
the sim (each costs tenths of a second of CPU before any work, more with
``PYTHONDONTWRITEBYTECODE=1``), and no command's ``--help`` may load the
machine it would run.  Checked by what the process imported -- ``python
-X importtime`` names every module a real ``python -m textpoke`` run
loads, up to its os._exit -- never by wall-clock time (the figures are
bench/bench_startup.py's).
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest

#: never needed to parse a command line or print help
MACHINES = ("unicorn", "iced_x86", "textpoke.sim", "textpoke.live._machine", "elftools",
            "zstandard", "textpoke._alternative", "textpoke.kernel")
#: the top level prints plain text: not even rich
TOP = MACHINES + ("rich", "textpoke._core")


def _imported(*argv: str) -> set[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "100"}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "textpoke", *argv],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, (argv, p.returncode, p.stderr[-2000:])
    assert p.stdout.strip(), argv
    mods = set()
    for ln in p.stderr.splitlines():
        if ln.startswith("import time:") and "|" in ln:
            name = ln.rsplit("|", 1)[1].strip()
            if name != "package":           # the header line
                mods.add(name)
    assert "textpoke.cli" in mods, "importtime said nothing: the check would be empty"
    return mods


def _loaded(mods: set[str], which: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == w or m.startswith(w + ".") for w in which))


@pytest.mark.parametrize("argv", [["--version"], ["--help"]], ids=" ".join)
def test_version_and_help_load_no_machine_and_no_rich(argv):
    assert _loaded(_imported(*argv), TOP) == []


COMMAND_HELPS = [["demo"], ["verify"], ["boot"], ["live"], ["live", "toggle"], ["live", "count"],
                 ["keys"], ["static-call"], ["module"], ["kprobe"], ["ftrace"]]


@pytest.mark.parametrize("cmd", COMMAND_HELPS, ids=" ".join)
def test_a_commands_help_loads_no_machine(cmd):
    mods = _imported(*cmd, "--help")
    assert _loaded(mods, MACHINES) == []
    others = {f"textpoke.cli.{m}" for m in ("demo", "verify", "boot", "keys", "static_call",
                                            "module", "kprobe", "ftrace")}
    own = {f"textpoke.cli.{cmd[0].replace('-', '_')}"}
    # keys' on_clients is shared by demo and the client commands
    shared = {"textpoke.cli.keys"} if cmd[0] in ("demo", "static-call", "module", "kprobe",
                                                  "ftrace") else set()
    assert sorted((mods & others) - own - shared) == []


def test_names_repeated_for_fast_parsing_agree():
    """verify's and boot's option values are repeated in the CLI so that
    parsing imports no machine; they must be the machine's own."""
    from textpoke._alternative import DA_ALL, DEFAULT_FEATURES
    from textpoke.lowlevel import MUTATIONS
    from textpoke.cli import boot, verify
    from textpoke.images._kernel import KERNEL_IMAGE
    from textpoke.sim._verify import SCENARIOS, STRATEGIES
    assert verify.SCENARIOS == tuple(SCENARIOS)
    assert verify.STRATEGIES == tuple(STRATEGIES)
    assert verify.MUTATIONS == tuple(MUTATIONS)
    assert boot.DEFAULT_FEATURES == tuple(DEFAULT_FEATURES)
    assert boot.DA_ALL == DA_ALL and boot.KERNEL_IMAGE == KERNEL_IMAGE


# --- live toggle of one fentry site: only the batch and the machine --------------
#: what a one-site fentry toggle never needs: the relocator and its decoder, the
#: counting stubs, the entry planner, the sim and the kernel images' machinery
TOGGLE_NEVER = ("unicorn", "textpoke.sim", "elftools", "zstandard", "textpoke._alternative",
                "textpoke.kernel", "iced_x86", "textpoke._relocate", "textpoke.live._count",
                "textpoke.live._entry", "textpoke.live._toggle", "rich")


@pytest.fixture(scope="module")
def count_target(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
    from helpers import Target, gen, ptrace_skip_reason
    why = ptrace_skip_reason()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("startup")
    t = Target(gen.build(200, d), d / "counts", mode="busy", threads=4)
    yield t
    t.close()


def test_a_one_site_toggle_loads_no_decoder_and_no_relocator(count_target):
    pid = str(count_target.pid)
    for to in ("call:fentry_ret", "nop"):
        mods = _imported("live", "toggle", "--pid", pid, "--functions", "f00007", "--to", to)
        assert "textpoke.live._machine" in mods and "textpoke.live._switch" in mods
        assert _loaded(mods, TOGGLE_NEVER) == []


def test_one_name_is_found_without_reading_every_symbol(count_target):
    """A toggle of one function (and its call target) looks the names up in
    the string tables: no module's whole symbol table is read."""
    from textpoke.live import Symbols, fentry_sites
    with Symbols(count_target.pid) as s:
        sites = fentry_sites(s, "f00007")
        target = s.resolve("fentry_ret")
        assert [x.function for x in sites] == ["f00007"] and sites[0].kind == "nop5"
        assert all(m._symbols is None for m in s.modules())
        # the same answers as the whole table gives
        main = s.main
        assert main.lookup("f00007").addr == sites[0].func_addr
        main.symbols
        assert main.lookup("fentry_ret").addr == target
        assert [x.as_dict() for x in fentry_sites(s, "f0000[7]")] == [x.as_dict() for x in sites]
