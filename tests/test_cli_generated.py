# SPDX-License-Identifier: GPL-2.0-only
"""A generator, not a list: every option of every command, tried with bad
values derived from what the parser declares about it.

The argparse tree of ``textpoke`` (every command and sub-command) is
walked; for each option that takes a value, values are derived from its
declared type: for an integer range, one below and one above the bounds,
empty, huge, garbage, a hex form that is not hex; for a power of two, a
number in range that is not one; for a choice, a name that is not one; for
an input file, ``/dev/zero``, a directory, a FIFO and a missing path; for
an output file, a directory, ``/dev/full`` and a path in a missing
directory; for any checked text, garbage and a 100,000-character string.
A path is tried only with values that cannot work (a device, a FIFO, a
missing directory, a name longer than the file system takes): a name the
file system takes is the user's to choose, control characters included
(``verify --resume $'\x01x'`` creates that file, as ``tar -f`` or ``cp``
would), so a path option is declared with its kind (``file`` = input,
output, state, dir) and never gets the free-text values below.
Each must be refused with exactly one line on stderr, nothing on stdout,
exit status 2 and no traceback -- and the process that tries them all
runs under a 4 GiB address-space limit and must stay below 1 GiB of RSS
(reading ``/dev/zero`` would blow both).

Seeded and replayable (``TEXTPOKE_CONTRACT_SEED``); the garbage strings
come from the seed.  ``make test`` runs every derived case in one process
(each case costs a parse, milliseconds); ``TEXTPOKE_CONTRACT_LONG=1`` also
runs each case as its own ``python -m textpoke`` process and tries random
pairs of bad values.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile

import pytest

LONG = os.environ.get("TEXTPOKE_CONTRACT_LONG") == "1"
SEED = int(os.environ.get("TEXTPOKE_CONTRACT_SEED", "18"))
RSS_MAX_KB = 1 << 20            # 1 GiB
AS_LIMIT = 4 << 30              # the child's address space: 4 GiB
CASE_SECONDS = 60               # a guard: a case the parser accepts must still be refused fast


def _walk(parser, prefix):
    """(argv prefix, action, parser) for every option taking a value."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _walk(sp, prefix + [name])
        elif a.option_strings and a.nargs != 0 and not isinstance(
                a, (argparse._HelpAction, argparse._VersionAction)):
            yield prefix, a, parser


def _filler(parser, skip) -> list[str]:
    """Valid-looking values for the required arguments other than *skip*,
    so that the bad value is what gets refused."""
    argv: list[str] = []
    for a in parser._actions:
        if a is skip or isinstance(a, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        required = a.required if a.option_strings else a.nargs not in ("?", "*")
        if not required or a.nargs == 0:
            continue
        t = a.type
        if a.choices:
            v = str(list(a.choices)[0])
        elif hasattr(t, "bounds"):
            v = str(t.bounds.hi)         # e.g. a pid that does not exist
        elif hasattr(t, "choices"):
            v = t.choices[0]
        elif a.dest == "bytes":
            v = "90"
        else:
            v = "textpoke_no_such_name"
        n = a.nargs if isinstance(a.nargs, int) else 1
        argv += ([a.option_strings[0]] if a.option_strings else []) + [v] * n
    return argv


def _bad_values(action, rng: random.Random, tmp: str) -> list[str]:
    t = action.type
    garbage = "".join(rng.choice("xyz!@#%^&*()[]{};:'\",.<>/?\\|`~ ") for _ in range(12))
    if action.choices:
        return ["textpoke-no-such-choice", "", garbage]
    if hasattr(t, "choices"):
        return ["textpoke-no-such-choice", "", garbage]
    if hasattr(t, "bounds"):
        b = t.bounds
        vals = [str(b.lo - 1), str(b.hi + 1), "", " ", "9" * 60, f"0x{'f' * 40}", "0x", "0xZZ",
                "1,,2", "-", "12abc", garbage, str(-(rng.randrange(1, 1 << 70)))]
        if getattr(t, "power_of_two", False):
            odd = next((v for v in range(max(b.lo, 3), b.hi + 1) if v & (v - 1)), None)
            if odd is not None:
                vals.append(str(odd))
        return [v for v in vals if not _in_bounds(v, b)]
    if getattr(t, "file", None) == "input":
        return ["/dev/zero", tmp, os.path.join(tmp, "fifo"), os.path.join(tmp, "missing"), ""]
    if getattr(t, "file", None) == "output":
        return [tmp, "/dev/full", os.path.join(tmp, "missing", "x"), "", "n" * 300]
    if getattr(t, "file", None) == "state":
        # read back if it exists, written as the run goes
        return ["/dev/zero", "/dev/full", tmp, os.path.join(tmp, "fifo"),
                os.path.join(tmp, "missing", "x"), "", "n" * 300]
    if getattr(t, "file", None) == "dir":
        return [os.path.join(tmp, "fifo"), "/dev/null", os.path.join(tmp, "missing", "x"), "",
                "n" * 300]
    if getattr(t, "checked", False):
        # what no checked text accepts (a name, a number, a size, a list):
        # control characters, and a value far beyond any length limit
        return ["\x01\x02" + garbage, "x" * 100_000]
    if LONG and t is None and action.nargs is None and not action.choices:
        # free text (a name, a glob): refused by the command once it looks
        # the name up (after building its machine: long form only)
        return ["", "x" * 100_000, "\x01" + garbage]
    return []


def _in_bounds(v: str, b) -> bool:
    try:
        n = int(v, 0) if v.strip().lower().startswith(("0x", "-0x")) else int(v)
    except ValueError:
        return False
    return b.lo <= n <= b.hi


def _cases(rng: random.Random, tmp: str) -> list[list[str]]:
    from textpoke.cli import build_parser
    cases = []
    for prefix, action, parser in _walk(build_parser(), []):
        for v in _bad_values(action, rng, tmp):
            cases.append(prefix + _filler(parser, action) + [action.option_strings[-1], v])
    return cases


def _pairs(cases: list[list[str]], rng: random.Random, n: int) -> list[list[str]]:
    """Two bad values for one command at once."""
    by_cmd: dict[str, list[list[str]]] = {}
    for c in cases:
        by_cmd.setdefault(c[0], []).append(c)
    out = []
    for _ in range(n):
        group = by_cmd[rng.choice(sorted(by_cmd))]
        a, b = rng.choice(group), rng.choice(group)
        out.append(a + b[-2:])
    return out


def _run_all_in_one_process(cases: list[list[str]]) -> dict:
    """Child side: every case through textpoke.cli.main(), output captured."""
    import io
    import signal as sig
    from textpoke import cli

    def alarm(*_):
        raise TimeoutError("case took too long")
    sig.signal(sig.SIGALRM, alarm)
    results = []
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        real = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        sig.alarm(CASE_SECONDS)
        try:
            try:
                rc = cli.main(list(argv))
            except SystemExit as e:
                rc = e.code
            except BaseException as e:      # noqa: BLE001 - reported, not hidden
                import traceback
                traceback.print_exc()
                rc = f"raised {type(e).__name__}"
        finally:
            sig.alarm(0)
            sys.stdout, sys.stderr = real
        results.append({"argv": argv, "rc": rc, "out": out.getvalue()[:2000],
                        "err": err.getvalue()[:2000]})
    return {"results": results,
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _limit_as():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _check(argv, rc, out, err) -> str | None:
    """None if the refusal keeps the contract, else what is wrong."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "Traceback" in err:
        return "a traceback"
    if rc != 2:
        return f"exit {rc}, not 2"
    if out:
        return f"stdout not empty: {out[:200]!r}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr"
    if len(lines[0]) > 1000:
        return f"a refusal of {len(lines[0]):,} characters"
    return None


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="textpoke-gen-") as tmp:
        os.mkfifo(os.path.join(tmp, "fifo"))
        yield tmp


def test_the_generator_covers_every_command(workdir):
    from textpoke.cli import COMMANDS
    cases = _cases(random.Random(SEED), workdir)
    assert {c[0] for c in cases} == set(COMMANDS)
    assert len(cases) > 200


def test_every_derived_bad_value_is_refused_in_one_line(workdir):
    rng = random.Random(SEED)
    cases = _cases(rng, workdir)
    if LONG:
        cases += _pairs(cases, rng, 300)
    print(f"{len(cases)} cases; replay: TEXTPOKE_CONTRACT_SEED={SEED}"
          f"{' TEXTPOKE_CONTRACT_LONG=1' if LONG else ''} pytest {__file__} -k one_line")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_cli_generated as g; "
            "print(json.dumps(g._run_all_in_one_process(json.load(sys.stdin))))")
    p = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)],
                       input=json.dumps(cases), capture_output=True, text=True,
                       preexec_fn=_limit_as, timeout=CASE_SECONDS * 10 + 10 * len(cases),
                       cwd=workdir)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout.splitlines()[-1])
    bad = []
    for r in doc["results"]:
        why = _check(r["argv"], r["rc"], r["out"], r["err"])
        if why:
            bad.append(f"textpoke {' '.join(map(repr, r['argv']))}: {why}\n    {r['err'][:300]}")
    assert not bad, f"{len(bad)} of {len(cases)} cases break the contract:\n" + "\n".join(bad[:40])
    assert doc["maxrss_kb"] < RSS_MAX_KB, doc["maxrss_kb"]


@pytest.mark.skipif(not LONG, reason="one process per case: TEXTPOKE_CONTRACT_LONG=1")
def test_every_derived_bad_value_in_its_own_process(workdir):
    rng = random.Random(SEED)
    cases = _cases(rng, workdir)
    print(f"{len(cases)} processes; replay: TEXTPOKE_CONTRACT_SEED={SEED} "
          f"TEXTPOKE_CONTRACT_LONG=1 pytest {__file__} -k own_process")
    bad = []
    for argv in cases:
        p = subprocess.Popen([sys.executable, "-m", "textpoke", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_limit_as, cwd=workdir)
        out, err = p.communicate(timeout=CASE_SECONDS * 5)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        why = _check(argv, p.returncode, out, err) or (
            f"{rss} KB of RSS" if rss >= RSS_MAX_KB else None)
        if why:
            bad.append(f"textpoke {' '.join(map(repr, argv))}: {why}\n    {err[:300]}")
    assert not bad, f"{len(bad)} of {len(cases)} cases break the contract:\n" + "\n".join(bad[:40])
