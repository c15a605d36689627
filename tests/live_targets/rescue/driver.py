# SPDX-License-Identifier: GPL-2.0-only
"""The patcher the rescue tests SIGKILL: stops one thread of the target,
maps a region of ours there (which brings a rescue), then injects a system
call and announces on stdout each point where it may be killed.

    driver.py PID TID MODE POINT
      MODE  rescue | libc   (libc: the old single-step over libc's syscall)
            boot: POINT (entry | exit | final | none) is a stop of the
                  region's first mmap, run from the bootstrap (no region
                  of ours yet); "boot AT" is said first, the slack used
      POINT syscall: inject read(FD) on a pipe nobody writes yet (the test
                     kills us while the thread is inside it);
            exit | final: inject getpid and block at that stop.
            unreaped-entry | unreaped-exit: inject getpid and block once the
                     thread sits in that syscall stop, before it is reaped
                     (waitid WNOWAIT: the stop keeps its exit_code, which
                     the kernel turns into a signal if we die now).
"""
import os
import signal
import sys

from textpoke.live import _rescue
from textpoke.live._inject import StoppedThread, inject_syscall
from textpoke.live._region import Region
from textpoke.live import read_maps

pid, tid, mode, point = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
fd = int(sys.argv[5]) if len(sys.argv) > 5 else -1


def say(what: str) -> None:
    os.write(1, (what + "\n").encode())


def hook(where: str) -> None:
    if mode == "boot":          # which call: the mmap (9) is the bootstrap's
        from textpoke.live import _ptrace as pt
        where = f"{where} nr {pt.getregs(tid, pt.UserRegs()).orig_rax}"
    say(where)
    if where == point or (mode == "boot" and where == f"{point} nr 9"):
        while True:
            signal.pause()


if os.environ.get("RESCUE_DEBUG"):
    from textpoke.live import _ptrace as pt
    _op, _w = _rescue._syscall_op, None

    def op(t):
        r = _op(t)
        si = pt.getsiginfo(t)
        sys.stderr.write(f"op {r} signo {si.si_signo} code {si.si_code:#x} "
                         f"rip {pt.getregs(t, pt.UserRegs()).rip:#x}\n")
        return r
    _rescue._syscall_op = op

exe = os.readlink(f"/proc/{pid}/exe")
lo = min(m.start for m in read_maps(pid) if m.executable and m.path == exe)
with StoppedThread(pid, tid):
    if mode == "sigstop":
        # held in a signal-delivery-stop (SIGWINCH: ignored by default, so
        # delivering it later changes nothing), as a -pg program's SIGPROF
        # holds threads; then the same as boot
        from textpoke.live import _ptrace as pt
        from textpoke.live._inject import _tgkill, _wait
        _tgkill(pid, tid, signal.SIGWINCH)
        pt.cont(tid, 0)
        code, status = _wait(tid)
        assert status & 0xFF == signal.SIGWINCH and not status >> 8, (code, status)
        say("sigstop")
        mode = "boot"
    if mode == "boot":
        from textpoke.live._inject import _bootstrap
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        b = _bootstrap(pid, mem)
        os.close(mem)
        say(f"boot {b.at:#x}" if b is not None else "boot none")
        _rescue.stop_hook = hook
    region = Region.map(pid, tid, 4096, 4096, near=(lo, lo))
    say(f"mapped {region.base:#x}")
    _rescue.stop_hook = hook
    if mode == "boot":
        r = 0
    elif point == "none":
        r = inject_syscall(pid, tid, 8, fd, 0, 1)      # lseek on a pipe: -ESPIPE
        r = 0 if r == -29 else r
    elif point == "syscall":
        r = inject_syscall(pid, tid, 0, fd, region.data, 1, rescue=(mode == "rescue"))
    elif point.startswith("unreaped-"):
        from textpoke.live._inject import _wait
        calls = []

        def wait(t):
            calls.append(t)
            if len(calls) == (1 if point == "unreaped-entry" else 2):
                os.waitid(os.P_PID, t, os.WSTOPPED | os.WNOWAIT | 0x40000000)   # __WALL
                hook(point)
            return _wait(t)
        r = inject_syscall(pid, tid, 39, rescue=(mode == "rescue"), wait=wait)
    else:
        r = inject_syscall(pid, tid, 39, rescue=(mode == "rescue"))
    say(f"result {r}")
