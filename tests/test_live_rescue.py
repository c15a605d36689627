# SPDX-License-Identifier: GPL-2.0-only
"""SIGKILL of the patcher in the middle of an injected system call leaves
the thread exactly where it was (live/_rescue.py).

The target (tests/live_targets/rescue/target.c) has a spinner that checks
every general register, rsp and the direction flag on each turn of its
loop, and a reader blocked in read(2) (an interrupted system call to be
restarted).  A driver process (the "patcher") stops one of them, maps a
region of ours, injects a system call and is SIGKILLed at a stop the test
waits for: inside the system call (/proc/TID/syscall shows our read), at
the syscall-exit stop, or at the last stop before it would have put the
registers back -- or in the syscall-entry or -exit stop before the driver
reaped it (the kernel then sends the stop's code to the thread as a
signal: SIGTRAP unless every seize asked for PTRACE_O_TRACESYSGOOD).  The target must live, the spinner must go on counting
with no register changed, the reader's read must be restarted (never
return -ERESTARTSYS or EINTR).  The old way (single step over libc's
``syscall``) is run too, to show the test has teeth: the target dies."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "live_targets" / "rescue"
sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason() or (None if shutil.which("gcc") else "no gcc")
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")
LIMIT = 30.0        # a failsafe only: every wait below waits for a state


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    out = tmp_path_factory.mktemp("rescue") / "target"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(out), str(HERE / "target.c")], check=True)
    return out


class Target:
    def __init__(self, exe: Path) -> None:
        self.p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE)
        f = self.p.stdout.readline().split()
        self.spins, self.bad, self.got, self.bad2 = (int(x, 16) for x in f[:4])
        self.spinner, self.reader, self.pi_r, self.pi_w, self.pa_w = (int(x) for x in f[4:])
        self.mem = os.open(f"/proc/{self.p.pid}/mem", os.O_RDONLY)

    def word(self, addr: int) -> int:
        got = os.pread(self.mem, 8, addr)
        if len(got) < 8:                 # the process is gone
            self.p.wait(timeout=LIMIT)
            raise AssertionError(f"target died ({self.p.returncode})")
        return struct.unpack("<Q", got)[0]

    def alive(self) -> bool:
        return self.p.poll() is None

    def until(self, what: str, cond) -> None:
        end = time.monotonic() + LIMIT
        while not cond():
            if not self.alive():
                raise AssertionError(f"target died ({self.p.returncode}) waiting for {what}")
            assert time.monotonic() < end, f"never saw {what}"
            time.sleep(0.002)

    def write_pipe(self, fd: int) -> None:
        w = os.open(f"/proc/{self.p.pid}/fd/{fd}", os.O_WRONLY)
        try:
            os.write(w, b"x")
        finally:
            os.close(w)

    def close(self) -> None:
        os.close(self.mem)
        if self.alive():
            self.p.kill()
        self.p.wait()


def in_syscall(tid_path: str, nr: int, arg0: int) -> bool:
    try:
        f = open(f"{tid_path}/syscall").read().split()
    except OSError:
        return False
    return len(f) > 2 and f[0] == str(nr) and int(f[1], 16) == arg0


def drive(t: Target, tid: int, mode: str, point: str):
    d = subprocess.Popen([sys.executable, str(HERE / "driver.py"), str(t.p.pid), str(tid), mode,
                          point, str(t.pi_r)], stdout=subprocess.PIPE, bufsize=0,  # unbuffered: select sees every line
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    return d


def wait_line(d, want: str) -> list[str]:
    seen = []
    end = time.monotonic() + LIMIT
    while True:
        assert time.monotonic() < end, f"driver never said {want!r}: {seen}"
        r, _, _ = select.select([d.stdout], [], [], 1.0)
        if not r:
            continue
        line = d.stdout.readline().decode().strip()
        assert line, f"driver ended ({d.wait()}) before {want!r}: {seen}"
        seen.append(line)
        if line == want:
            return seen


@contextlib.contextmanager
def driven(t: Target, tid: int, mode: str, point: str) -> Iterator[subprocess.Popen]:
    """The driver run on thread *tid*; whatever happens, not left running."""
    d = drive(t, tid, mode, point)
    try:
        yield d
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()
        d.stdout.close()


def kill_driver_at(t: Target, tid: int, mode: str, point: str) -> None:
    with driven(t, tid, mode, point) as d:
        if point == "none":             # nobody kills it: the registers put back by us
            assert wait_line(d, "result 0")[-1] == "result 0" and d.wait() == 0
            return
        if point == "syscall":
            path = f"/proc/{t.p.pid}/task/{tid}"
            if mode == "rescue":
                wait_line(d, "entry")
            t.until("the injected read", lambda: in_syscall(path, 0, t.pi_r))
        else:
            wait_line(d, point)
        d.kill()
        d.wait()
    if point == "syscall":          # let the injected read finish, untraced now
        t.write_pipe(t.pi_w)


def mmap_killed_at(t: Target, mode: str, point: str) -> list[str]:
    """The driver's first mmap (nr 9) on the spinner, run to its end
    (*point* ``none``) or the driver killed at *point* of it; what the
    driver said."""
    with driven(t, t.spinner, mode, point) as d:
        seen = wait_line(d, "result 0" if point == "none" else f"{point} nr 9")
        if point != "none":
            d.kill()
        d.wait()
    return seen


def spinner_goes_on(t: Target) -> None:
    s0 = t.word(t.spins)
    t.until("the spinner counting on", lambda: t.word(t.spins) > s0 + 100_000 or t.word(t.bad))
    assert t.word(t.bad) == 0, "a register of the spinner changed"


def reader_goes_on(t: Target) -> None:
    g0 = t.word(t.got)
    t.write_pipe(t.pa_w)
    t.until("the reader's read", lambda: t.word(t.got) > g0 or t.word(t.bad2))
    assert t.word(t.bad2) == 0, f"the reader's read returned {t.word(t.bad2) - (1 << 64)}"
    assert t.word(t.got) == g0 + 1


@pytest.mark.parametrize("who", ["spinner", "reader"])
@pytest.mark.parametrize("point", ["none", "syscall", "exit", "final", "unreaped-entry",
                                   "unreaped-exit"])
def test_kill_mid_injected_syscall_leaves_thread_as_it_was(exe, who, point):
    t = Target(exe)
    try:
        tid = t.spinner if who == "spinner" else t.reader
        kill_driver_at(t, tid, "rescue", point)
        spinner_goes_on(t)
        reader_goes_on(t)
        reader_goes_on(t)
        assert t.alive()
        assert open(f"/proc/{t.p.pid}/status").read().count("TracerPid:\t0") == 1
    finally:
        t.close()


def test_without_rescue_a_kill_mid_syscall_kills_the_target(exe):
    """The old path (still the first mmap's): the teeth of the test above."""
    t = Target(exe)
    try:
        kill_driver_at(t, t.spinner, "libc", "syscall")
        t.p.wait(timeout=LIMIT)
        assert t.p.returncode == -signal.SIGTRAP
    finally:
        t.close()


def _file_bytes_at(pid: int, addr: int, n: int) -> bytes:
    """What the file mapped at *addr* holds there (the slack the bootstrap
    borrows must read as the file again afterwards)."""
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        if lo <= addr < hi and len(f) > 5:
            with open(f[5], "rb") as fh:
                fh.seek(int(f[2], 16) + addr - lo)
                return fh.read(n)
    raise AssertionError(f"{addr:#x} is in no file mapping")


@pytest.mark.parametrize("point", ["none", "entry", "exit", "final"])
def test_first_mmap_runs_from_the_bootstrap(exe, point):
    """The first mmap of a process with no region of ours used to single-
    step libc's syscall (a kill there: SIGTRAP, see the test above); it
    runs from a one-slot rescue in a segment's slack now, and the slack
    reads as the file again once the call is done."""
    t = Target(exe)
    try:
        seen = mmap_killed_at(t, "boot", point)
        boot = next(x for x in seen if x.startswith("boot "))
        assert boot != "boot none", "no slack found in the target's executable segments"
        at = int(boot.split()[1], 16)
        spinner_goes_on(t)
        reader_goes_on(t)
        assert t.alive()
        from textpoke.live._inject import clean_bootstrap
        from textpoke.live._rescue import Bootstrap
        if point != "none":
            # killed mid-call: the routine stays in the slack until recover
            # (which calls this) puts the file's bytes back
            assert os.pread(t.mem, 8, at) != _file_bytes_at(t.p.pid, at, 8)
            assert clean_bootstrap(t.p.pid)
        assert not clean_bootstrap(t.p.pid)        # nothing of ours there now
        assert os.pread(t.mem, Bootstrap.SIZE, at) == _file_bytes_at(t.p.pid, at, Bootstrap.SIZE)
    finally:
        t.close()


@pytest.mark.parametrize("point", ["none", "exit"])
def test_a_thread_in_a_signal_delivery_stop_runs_from_the_rescue(exe, point):
    """A thread held in a signal-delivery-stop (a signal on its way) used to
    run an injected call by single-stepping libc, which a kill turned into
    a SIGTRAP (a -pg program's SIGPROF held every thread this way in the
    survival campaign); its signal is set aside now, the call runs from the
    bootstrap or a rescue, and the signal is queued again after."""
    t = Target(exe)
    try:
        assert "sigstop" in mmap_killed_at(t, "sigstop", point)
        spinner_goes_on(t)
        reader_goes_on(t)
        assert t.alive()
    finally:
        t.close()
