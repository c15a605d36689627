# SPDX-License-Identifier: GPL-2.0-only
"""One CLI contract for every command: bad values are refused by the parser
with one line naming the option and exit 2; a runtime error is one line and
exit 2; --version; the bounds are stated in --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from textpoke import __version__, cli
from textpoke.images import ImageError


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:            # argparse exits itself on a usage error
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


BAD = [
    # (argv, the option the message must name)
    (("demo", "--cpus", "0"), "--cpus"),
    (("demo", "--cpus", "-3"), "--cpus"),
    (("demo", "--cpus", "100000"), "--cpus"),
    (("demo", "--cpus", "four"), "--cpus"),
    (("demo", "--line-size", "0"), "--line-size"),
    (("demo", "--line-size", "3"), "--line-size"),
    (("demo", "--line-size", "-1"), "--line-size"),
    (("demo", "--line-size", "100000"), "--line-size"),
    (("demo", "--toggles", "-5"), "--toggles"),
    (("demo", "--seed", "-1"), "--seed"),
    (("verify", "--jobs", "0"), "--jobs"),
    (("verify", "--jobs", "-1"), "--jobs"),
    (("verify", "--schedules", "-1"), "--schedules"),
    (("verify", "--schedules", "0"), "--schedules"),
    (("verify", "--seed", "-7"), "--seed"),
    (("verify", "--cpus", "0"), "--cpus"),
    (("verify", "--cpus", "65"), "--cpus"),
    (("verify", "--line-size", "48"), "--line-size"),
    (("verify", "--replay", "-1", "--scenario", "call"), "--replay"),
    (("verify", "--scenario", "bogus"), "--scenario"),
    (("verify", "--strategy", "clever"), "--strategy"),
    (("verify", "--mutation", "no-sync-7"), "--mutation"),
    (("verify", "--strategy", "naive", "--mutation", "no-sync-1"), "--mutation"),
    (("verify", "--replay", "5"), "--replay"),
    (("boot", "--cpus", "0"), "--cpus"),
    (("boot", "--cpus", "100000"), "--cpus"),
    (("boot", "--cpu-features", "erms,warp_drive"), "warp_drive"),
    (("boot", "--disasm", "no_such_function"), "no_such_function"),
    (("frobnicate",), "COMMAND"),
]


@pytest.mark.parametrize("argv, option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_and_exit_2(capsys, argv, option):
    rc, out, err = _main(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert option in err and "error" in err and "Traceback" not in err


def test_a_bad_value_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "textpoke", "verify", "--line-size", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and not p.stdout
    assert p.stderr.count("\n") == 1 and "--line-size" in p.stderr and "power of two" in p.stderr


def test_runtime_error_is_one_line_exit_2(capsys, monkeypatch):
    import textpoke.sim._demo as demo

    def unreadable(name):
        raise ImageError(f"{name}: cannot read the image")
    monkeypatch.setattr(demo, "load_bundled", unreadable)
    rc, out, err = _main(capsys, "demo", "--toggles", "1")
    assert rc == 2 and out == ""
    assert err.strip() == "textpoke demo: ImageError: kernel.elf: cannot read the image"


def test_version(capsys):
    rc, out, _ = _main(capsys, "--version")
    assert rc == 0 and out.strip() == f"textpoke {__version__}"


@pytest.mark.parametrize("command, needles", [
    ("demo", ["--cpus N", "1..64", "--line-size", "power of two in 1..4096", "--toggles",
              "0..1_000_000_000", "--seed", "0..2**64-1", "exit status"]),
    ("verify", ["--jobs", "1..1024", "--schedules", "1..10_000_000_000", "--replay", "--trace",
                "no-sync-1,", "xline", "130", "143"]),
    ("boot", ["--cpus N", "1..64", "(default: xmm2, rdtscp, lfence_rdtsc, popcnt"]),
])
def test_help_states_the_bounds(capsys, command, needles):
    rc, out, _ = _main(capsys, command, "--help")
    assert rc == 0
    flat = " ".join(out.split())
    for n in needles:
        assert n in flat, n



def test_every_option_has_help():
    import argparse
    ap = cli.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert {"demo", "verify", "boot", "keys", "static-call"} <= set(sub.choices)

    def walk(name, p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):   # e.g. live poke|sites|...
                for sub_name, sp in a.choices.items():
                    walk(f"{name} {sub_name}", sp)
                continue
            assert a.help and a.help.strip(), (name, a.option_strings)
    for name, p in sub.choices.items():
        walk(name, p)


def test_every_command_is_listed(capsys):
    rc, out, _ = _main(capsys, "--help")
    assert rc == 0
    for name in ("demo", "verify", "boot", "keys", "static-call"):
        assert name in out
