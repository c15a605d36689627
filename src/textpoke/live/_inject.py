# SPDX-License-Identifier: GPL-2.0-only
"""Executable memory in a traced process, by injected system calls.

:func:`inject_syscall` runs one system call in a thread that is in a
ptrace-stop held by the caller (nobody else may wait for it meanwhile):

1. save every register (``PTRACE_GETREGS``: all general registers, rip,
   eflags, orig_rax, the segment bases; a system call touches no FPU/vector
   state, so those are not saved);
2. set rax = number, rdi/rsi/rdx/r10/r8/r9 = arguments, **orig_rax = -1**
   (so that a thread stopped inside an interrupted system call is not
   "restarted" by the kernel into ours, nor ours into its), and rip = the
   address of a ``syscall`` instruction (``0f 05``) found in the target's own
   executable text -- libc first -- so that nothing is written to text;
3. ``PTRACE_SINGLESTEP``: the thread executes that one instruction and
   stops with SIGTRAP after it; rax holds the result;
4. restore every saved register.  Resuming the thread then lets the kernel
   finish (or restart) whatever system call the thread was in, exactly as if
   nothing had happened.  A different signal that arrives during the step
   is not lost: it is sent back to the thread (``tgkill``) after the
   registers are restored.

Once the process has a region of ours, the call runs instead from that
region's *rescue* (:mod:`._rescue`: ``PTRACE_SYSCALL``, no trap flag, and
code that puts every register back by itself if the patcher dies in the
middle).  With no region of ours to run from (the first ``mmap`` of a
command, the ``munmap`` of the last region, every call of ``live
recover``) the same routine runs from a one-slot *bootstrap* written for
the call into the slack after an executable segment of a mapped file
(:class:`._rescue.Bootstrap`), its bytes put back after.  Steps 3-4 above
remain only for a thread held in a signal-delivery-stop, a process with
no such slack, and ``rescue=False``.
Either way a thread that was in an event stop (interrupt, group stop) is
left in one again.

The mapping of our own regions, and the check that no thread is in one
before it is unmapped, are :mod:`._region`'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
from typing import Callable, Sequence

from . import _ptrace as pt
from . import _rescue
from .._errors import MachineError
from ._process import Mapping, read_maps, start_time, state_of

__all__ = ["InjectError", "SYS_mmap", "SYS_mprotect", "SYS_munmap", "find_syscall_insn",
           "inject_syscall", "StoppedThread", "clean_bootstrap", "register_rescue",
           "forget_rescues"]

SYS_mmap, SYS_mprotect, SYS_munmap = 9, 10, 11
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
PAGE = 4096
_MASK = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)


class InjectError(MachineError):
    """An injected system call could not be run, or failed in the target."""


def _tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.syscall(234, pid, tid, sig) < 0:          # SYS_tgkill
        e = ctypes.get_errno()
        if e != errno.ESRCH:
            raise OSError(e, os.strerror(e))


_syscall_cache: dict[tuple[int, int], int] = {}


def find_syscall_insn(pid: int, maps: Sequence[Mapping] | None = None) -> int:
    """The address of a ``syscall`` instruction (0f 05) in the target's
    executable file-backed text: libc first, then any other mapping.
    (Any 0f 05 byte pair will do: the thread executes only those two bytes
    and stops.)"""
    key = (pid, start_time(pid))
    hit = _syscall_cache.get(key)
    if hit is not None:
        return hit
    maps = list(maps) if maps is not None else read_maps(pid)
    cands = [m for m in maps if m.executable and m.path and not m.path.startswith("[")]
    cands.sort(key=lambda m: ("libc" not in os.path.basename(m.path), m.start))
    cands += [m for m in maps if m.executable and m.path == "[vdso]"]
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for m in cands:
            for off in range(m.start, m.end, 1 << 16):
                try:
                    buf = os.pread(fd, min(1 << 16, m.end - off) + 1, off)
                except OSError:
                    break
                i = buf.find(b"\x0f\x05")
                if i >= 0 and off + i + 2 <= m.end:
                    _syscall_cache[key] = off + i
                    return off + i
    finally:
        os.close(fd)
    raise InjectError(f"no syscall instruction found in the executable mappings of process {pid}")


#: The rescues (see :mod:`._rescue`) of the regions we mapped, per process:
#: ``pid -> [(start_time, Rescue)]``.
_rescues: dict[int, list] = {}
#: system calls that may unmap or change the rescue they would run from
_RANGE_CALLS = (SYS_mmap, SYS_mprotect, SYS_munmap, 25, 28)     # + mremap, madvise


def register_rescue(rescue) -> None:
    _rescues.setdefault(rescue.pid, []).append((start_time(rescue.pid), rescue))


def forget_rescues(pid: int, lo: int, hi: int) -> None:
    """Forget every rescue of *pid* that overlaps [lo, hi) (being unmapped)."""
    left = [(st, r) for st, r in _rescues.get(pid, ()) if not (r.span[0] < hi and lo < r.span[1])]
    if left:
        _rescues[pid] = left
    else:
        _rescues.pop(pid, None)


def _pick_rescue(pid: int, nr: int, args: Sequence[int], fd: int):
    entries = _rescues.get(pid)
    if not entries:
        return None
    st = start_time(pid)
    for when, r in list(entries):
        if when != st or not r.intact(fd):        # another process, an exec, unmapped
            entries.remove((when, r))
            continue
        if nr in _RANGE_CALLS and len(args) >= 2:
            lo, hi = args[0], args[0] + max(args[1], 1)
            if nr == SYS_mmap and not (len(args) > 3 and args[3] & 0x10):   # not MAP_FIXED
                return r
            # mprotect may make the data page writable, never touch the code page
            a = r.code_page if nr == SYS_mprotect else r.span[0]
            if a < hi and lo < r.span[1]:
                continue
        return r
    return None


_boot_cache: dict[tuple[int, int], int | None] = {}


def _bootstrap(pid: int, fd: int):
    """The process's :class:`._rescue.Bootstrap` (a slack found once per
    process), or None when no executable segment has room."""
    key = (pid, start_time(pid))
    if key not in _boot_cache:
        try:
            at = _rescue.find_slack(pid, read_maps(pid), fd, _rescue.Bootstrap.SIZE)
        except OSError:
            at = None
        _boot_cache[key] = at
    at = _boot_cache[key]
    return None if at is None else _rescue.Bootstrap(pid, at)


def clean_bootstrap(pid: int) -> bool:
    """Put the file's bytes back where a patcher killed during a bootstrap
    call left the routine (see :class:`._rescue.Bootstrap`): only when the
    slack holds exactly our code.  Call it with no call in flight in the
    process (``live recover``, once done).  True if something was put back."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        b = _bootstrap(pid, fd)
        if b is None:
            return False
        code = b.code()
        if os.pread(fd, len(code), b.at) != code:
            return False
        m = next((m for m in read_maps(pid) if m.start <= b.at < m.end), None)
        if m is None or not m.path.startswith("/"):
            return False
        with open(m.path, "rb") as f:
            f.seek(m.offset + b.at - m.start)
            orig = f.read(b.SIZE)
        if len(orig) != b.SIZE:
            return False
        return os.pwrite(fd, orig, b.at) == len(orig)
    except OSError:
        return False
    finally:
        os.close(fd)


def inject_syscall(pid: int, tid: int, nr: int, *args: int, syscall_at: int | None = None,
                   wait: Callable[[int], tuple[int, int]] | None = None,
                   rescue: bool = True) -> int:
    """Run system call *nr*(*args*) in thread *tid* of *pid*, which must be in
    a ptrace-stop owned by the caller; return its result (a negative errno
    is returned as is: the caller decides).  Every register is restored
    afterwards and the thread is left in a ptrace-stop again.

    When the process has a region of ours with a rescue (every
    :meth:`._region.Region.map` since the rescue exists), the call runs from the
    rescue's slot for the thread (:mod:`._rescue`): the patcher can be
    SIGKILLed at any moment and the thread still goes on exactly where it
    was stopped.  Without such a region (the first mmap of a command, the
    munmap of the last region) it runs from a bootstrap in a segment's
    slack the same way.  Only a thread in a signal-delivery-stop (or no
    slack, or *rescue* False) single-steps a ``syscall`` of libc, where a
    kill during that one instruction can still kill the target.

    *wait(tid)* waits for the thread's next stop and returns
    ``(si_code, si_status)`` (default: ``waitid`` on the thread)."""
    if len(args) > 6:
        raise ValueError("a system call takes at most 6 arguments")
    wait = wait or _wait
    saved = pt.getregs(tid, pt.UserRegs())
    regs = pt.UserRegs.from_buffer_copy(saved)
    a = list(args) + [0] * (6 - len(args))
    regs.rax = nr
    regs.orig_rax = _MASK                       # -1: no restart of anything
    regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = (x & _MASK for x in a)
    deferred: list[int] = []
    at_event = _interrupt_stop(tid)
    held_sig = 0
    if rescue and not at_event:
        # a signal-delivery-stop (a signal on its way -- a -pg program's
        # SIGPROF held every thread this way): the signal aside, an event
        # stop, so the call runs from a rescue; the signal is queued again
        # after, and the thread left in its delivery stop as it was
        held_sig = _to_event_stop(tid, wait, deferred)
        at_event = bool(held_sig)
    if rescue and at_event:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            resc = _pick_rescue(pid, nr, [x & _MASK for x in args], fd) if _rescues.get(pid) else None
            old = None
            if resc is None:
                # no region of ours to run from (the first mmap, the last
                # munmap, live recover): a one-slot rescue in a segment's slack
                resc = _bootstrap(pid, fd)
                if resc is not None:
                    try:
                        old = os.pread(fd, resc.SIZE, resc.at)
                        code = resc.code()
                        if (len(old) != resc.SIZE or os.pwrite(fd, code, resc.at) != len(code)
                                or os.pread(fd, len(code), resc.at) != code):
                            raise OSError(errno.EIO, "the bootstrap did not verify")
                    except OSError:
                        if old is not None and len(old) == resc.SIZE:
                            with contextlib.suppress(OSError):
                                os.pwrite(fd, old, resc.at)
                        resc = old = None            # the single step below
            if resc is not None:
                def write(addr: int, data: bytes) -> None:
                    if os.pwrite(fd, data, addr) != len(data) or os.pread(fd, len(data), addr) != data:
                        raise InjectError(f"write at {addr:#x} in process {pid} did not verify")
                back = False                 # the thread stopped with its registers back
                try:
                    result = _rescue.run_syscall(pid, tid, resc, regs, saved, wait, write, deferred)
                    back = True
                except _rescue.InjectFailed as e:
                    try:
                        pt.setregs(tid, saved)
                        back = True
                    except OSError:
                        pass
                    raise InjectError(str(e)) from None
                except BaseException:
                    try:
                        pt.setregs(tid, saved)
                        back = True
                    except OSError:
                        pass
                    raise
                finally:
                    # the slack's bytes back once the thread cannot run the
                    # routine any more (else they stay: unused bytes)
                    if old is not None and back:
                        with contextlib.suppress(OSError):
                            os.pwrite(fd, old, resc.at)
                    if held_sig and back:
                        _back_to_signal_stop(pid, tid, held_sig, wait, deferred)
                    for sig in deferred:
                        _tgkill(pid, tid, sig)
                if nr in (SYS_munmap, 25) or (nr == SYS_mmap and len(args) > 3 and args[3] & 0x10):
                    if not result >> 63:
                        forget_rescues(pid, args[0], args[0] + max(args[1], 1))
                return result - (1 << 64) if result >> 63 else result
        finally:
            os.close(fd)
    if syscall_at is None:
        syscall_at = find_syscall_insn(pid)
    regs.rip = syscall_at
    try:
        pt.setregs(tid, regs)
        while True:
            pt.singlestep(tid)
            code, status = wait(tid)
            if code in (pt.CLD_EXITED, pt.CLD_KILLED, pt.CLD_DUMPED):
                raise InjectError(f"thread {tid} of process {pid} ended during an injected syscall")
            if code == pt.CLD_TRAPPED and (status & 0xFF) == signal.SIGTRAP:
                after = pt.getregs(tid, pt.UserRegs())
                if after.rip == syscall_at + 2:
                    result = after.rax
                    break
                if after.rip == syscall_at:        # stopped before executing: step again
                    continue
                raise InjectError(f"injected syscall in thread {tid} stopped at {after.rip:#x}, "
                                  f"not after the syscall at {syscall_at:#x}")
            # another signal (or a group stop) before the step completed:
            # keep it for the thread, step again
            sig = status & 0xFF
            if code == pt.CLD_TRAPPED and sig and (status >> 8) == 0:
                deferred.append(sig)
    finally:
        try:
            pt.setregs(tid, saved)
        finally:
            for sig in deferred:
                _tgkill(pid, tid, sig)
    if at_event:
        _back_to_event_stop(tid, wait)
    if nr == SYS_munmap and len(args) >= 2 and not result >> 63:
        forget_rescues(pid, args[0], args[0] + max(args[1], 1))
    return result - (1 << 64) if result >> 63 else result


def _interrupt_stop(tid: int) -> bool:
    """Is *tid* in a PTRACE_EVENT_STOP (an interrupt or a group stop)?  The
    rescue path leaves the thread in one; a thread in a signal-delivery-stop
    keeps the single step, which leaves it in a (SIGTRAP) signal-delivery-
    stop, so that the signal its tracer resumes it with is still delivered
    (at an event stop the kernel drops it)."""
    try:
        si = pt.getsiginfo(tid)
    except OSError:         # a group stop of a seized thread has no siginfo
        return True
    return (si.si_code >> 8) == pt.PTRACE_EVENT_STOP


def _to_event_stop(tid: int, wait: Callable[[int], tuple[int, int]], deferred: list[int]) -> int:
    """From a signal-delivery-stop to an event stop: its signal suppressed
    (returned, for :func:`_back_to_signal_stop`), an interrupt taken in the
    same pass of the kernel's signal loop (no user code runs).  Another
    signal met on the way goes to *deferred*.  0 if *tid* is in no
    signal-delivery-stop."""
    try:
        si = pt.getsiginfo(tid)
    except OSError:
        return 0
    sig = si.si_signo
    if not sig or (si.si_code > 0 and si.si_code >> 8):     # an event stop's code
        return 0
    pt.interrupt(tid)
    pt.cont(tid, 0)
    while True:
        code, status = wait(tid)
        if code in (pt.CLD_EXITED, pt.CLD_KILLED, pt.CLD_DUMPED):
            raise InjectError(f"thread {tid} ended before an injected system call")
        if code == pt.CLD_TRAPPED and (status >> 8) == pt.PTRACE_EVENT_STOP:
            return sig
        if code == pt.CLD_TRAPPED and not status >> 8 and status & 0xFF:
            deferred.append(status & 0xFF)
        pt.cont(tid, 0)


def _back_to_signal_stop(pid: int, tid: int, sig: int, wait: Callable[[int], tuple[int, int]],
                         deferred: list[int]) -> None:
    """From the event stop an injected call ended in, back to a delivery
    stop of *sig* (queued again with tgkill: si_code SI_TKILL now), where
    the tracer resumes the thread with the signal as it meant to."""
    _tgkill(pid, tid, sig)
    pt.cont(tid, 0)
    while True:
        code, status = wait(tid)
        if code in (pt.CLD_EXITED, pt.CLD_KILLED, pt.CLD_DUMPED):
            raise InjectError(f"thread {tid} ended after an injected system call")
        if code == pt.CLD_TRAPPED and not status >> 8 and (status & 0xFF) == sig:
            return
        if code == pt.CLD_TRAPPED and not status >> 8 and status & 0xFF:
            deferred.append(status & 0xFF)
        pt.cont(tid, 0)


def _back_to_event_stop(tid: int, wait: Callable[[int], tuple[int, int]]) -> None:
    """From the SIGTRAP stop the single step ended in (registers already
    restored) back to an event stop, as the thread was: get_signal takes
    the interrupt in the same loop, before any restart of the thread's own
    system call, so nothing runs in user mode in between."""
    pt.interrupt(tid)
    sig = 0
    while True:
        pt.cont(tid, sig)
        code, status = wait(tid)
        if code in (pt.CLD_EXITED, pt.CLD_KILLED, pt.CLD_DUMPED):
            raise InjectError(f"thread {tid} ended after an injected system call")
        if code == pt.CLD_TRAPPED and (status >> 8) == pt.PTRACE_EVENT_STOP:
            return
        # a signal on the way: it must not be lost, nor delivered while we
        # still look for our stop -- give it back at the next resume
        sig = status & 0xFF if (code == pt.CLD_TRAPPED and not status >> 8) else 0


def _wait(tid: int) -> tuple[int, int]:
    """The next stop of *tid*.  Polls, looking at the thread in /proc now
    and then: a thread group leader that died while others live is never
    reported by waitid (the kernel delays it), and must not hang us."""
    import time
    info = pt.SigInfo()
    nap, waited, look = 20e-6, 0.0, 0.05
    while True:
        info.si_pid = 0
        r = pt.waitid(tid, info, False)
        if r == -errno.EINTR:
            continue
        if r < 0:
            raise InjectError(f"waitid({tid}): {os.strerror(-r)}")
        if info.si_pid:
            return info.si_code, info.si_status
        time.sleep(nap)
        waited += nap
        nap = min(nap * 1.5, 1e-3)
        if waited >= look:
            look += 0.05
            if state_of(tid) in ("", "Z", "X"):
                raise InjectError(f"thread {tid} ended during an injected system call")


class StoppedThread:
    """One thread of a process held in a ptrace-stop without the live
    machine: seize, interrupt, wait; on exit, detach (the thread resumes).
    For injecting a system call when no :class:`LiveMachine` is attached;
    it stops only that thread."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        self.pid, self.tid = pid, tid or pid

    def __enter__(self) -> "StoppedThread":
        pt.seize(self.tid, _rescue.SEIZE_OPTIONS)
        try:
            pt.interrupt(self.tid)
            while True:
                code, status = _wait(self.tid)
                if code == pt.CLD_TRAPPED and (status >> 8) == pt.PTRACE_EVENT_STOP:
                    break
                if code in (pt.CLD_EXITED, pt.CLD_KILLED, pt.CLD_DUMPED):
                    raise InjectError(f"thread {self.tid} ended")
                # a signal-delivery-stop: give the signal to the thread, wait on
                pt.cont(self.tid, status & 0xFF)
                pt.interrupt(self.tid)
        except BaseException:
            self._detach()
            raise
        return self

    def syscall(self, nr: int, *args: int) -> int:
        return inject_syscall(self.pid, self.tid, nr, *args)

    def regs(self) -> pt.UserRegs:
        return pt.getregs(self.tid, pt.UserRegs())

    def _detach(self) -> None:
        try:
            pt.detach(self.tid)
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        self._detach()
