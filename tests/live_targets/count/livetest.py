# SPDX-License-Identifier: GPL-2.0-only
"""Shared by the live tests (tests/test_live_*.py) and benches: a target's
text and state as /proc shows them -- read directly, not through textpoke,
so a check does not trust the code it checks -- and the live CLI run as a
user runs it (a new process)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

__all__ = ["site_bytes", "peek_u64", "proc_state", "sigtrap_caught", "live_cli", "FENTRY_FLAGS",
           "build_c", "toggle_driver", "SRC_ENV", "killed_at_end"]

#: the environment of a driver script run with ``python -c``: this tree's textpoke
SRC_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src")}
#: a program whose functions start with a NOP5 fentry site (and __mcount_loc)
FENTRY_FLAGS = ("-fno-pie", "-no-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")
#: the forms build_c makes: a plain (PIE) build and an fentry one
FORMS = {"plain": (), "fentry": FENTRY_FLAGS}


def site_bytes(pid: int, addrs: list[int], n: int = 5) -> list[bytes]:
    """The *n* bytes at each of *addrs* in process *pid* (/proc/PID/mem)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        out = []
        for a in addrs:
            f.seek(a)
            out.append(f.read(n))
        return out


def peek_u64(pid: int, addr: int) -> int:
    """The little-endian 64-bit word at *addr* in process *pid*."""
    return int.from_bytes(site_bytes(pid, [addr], 8)[0], "little")


def proc_state(pid: int) -> str:
    """The state letter of process *pid* (R, S, T, t, Z, X...) from
    /proc/PID/stat, or "" once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def sigtrap_caught(pid: int) -> bool:
    """Whether process *pid* has a handler of its own for SIGTRAP (SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTRAP - 1)))
    raise AssertionError("no SigCgt line")


def live_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``textpoke live ARGS...`` in a new process, its output captured."""
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *args],
                          capture_output=True, text=True, timeout=timeout)


def build_c(d: Path, source: str, forms: dict[str, tuple[str, ...]] | None = None,
            name: str = "t.c") -> Path:
    """*source* written to *d*/*name* and built with ``gcc -O1 -pthread``
    once per form (``d/<form>``, default :data:`FORMS`); the test is skipped
    where gcc is missing.  Returns *d*."""
    import pytest
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the targets")
    (d / name).write_text(source)
    for form, flags in (FORMS if forms is None else forms).items():
        subprocess.run(["gcc", "-O1", "-pthread", *flags, "-o", str(d / form), str(d / name)],
                       check=True)
    return d


def toggle_driver(patch: str) -> str:
    """A driver script for ``python -c SCRIPT PID``: *patch* (dedented; it
    wraps a function of textpoke's to stop or kill the driver where a test
    wants), then ``textpoke live toggle`` of the target's ``f0*`` functions
    to ``call:fentry_ret``, the driver's exit status the command's."""
    return textwrap.dedent(patch) + textwrap.dedent("""
        import sys
        from textpoke.cli import main
        sys.exit(main(["live", "toggle", "--pid", sys.argv[1], "--functions", "f0*",
                       "--to", "call:fentry_ret"]))
    """)


@contextlib.contextmanager
def killed_at_end(d: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """A patcher's driver *d*, SIGKILLed where the block ends (the point the
    test stopped it at) and reaped, whatever the block raised."""
    try:
        yield d
        d.send_signal(signal.SIGKILL)
        d.wait(timeout=30)
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()
