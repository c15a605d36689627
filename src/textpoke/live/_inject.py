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

:class:`Region` maps a region for code and data with ``mmap`` at a chosen
address (``MAP_FIXED_NOREPLACE``: it fails rather than replace anything)
within ±2 GiB of the code that will call into it (a CALL rel32 must reach),
writes code through /proc/PID/mem, and unmaps it with ``munmap`` only when
:meth:`Region.in_use` finds no thread that could still be inside it
(:func:`threads_inside`, which the live machine's ``quiesce`` uses too):

* no thread's rip is in the region, and
* no 8-byte word in the top of any thread's stack (from rsp - 128, the red
  zone, to rsp + ``STACK_SCAN`` bytes, within the stack's mapping) points
  into the region -- which catches return addresses and the rip saved in a
  signal frame by a signal that interrupted a thread in the region (a
  handler on a ``sigaltstack`` is not covered).

The caller must have made the region unreachable first (every site that
called into it switched back, and a sync since).  A stale word that merely
looks like a pointer makes the check refuse; the caller then keeps the
region (a page or two left mapped costs nothing; unmapping code a thread
still runs would kill it).

A :class:`Region` is the mapping only: handing out chunks of executable
memory is :class:`textpoke._execmem.ExecMem`'s job on every machine (on
live over a region that :meth:`LiveMachine.execmem_range` maps with this
class).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import signal
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from . import _ptrace as pt
from . import _rescue
from .._errors import MachineError
from ._process import Mapping, read_maps, start_time, state_of

__all__ = ["InjectError", "SYS_mmap", "SYS_mprotect", "SYS_munmap", "find_syscall_insn",
           "inject_syscall", "Region", "StoppedThread", "pick_address", "STACK_SCAN",
           "threads_inside"]

SYS_mmap, SYS_mprotect, SYS_munmap = 9, 10, 11
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
PAGE = 4096
STACK_SCAN = 64 * 1024
_S32 = 1 << 31
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
    :meth:`Region.map` since the rescue exists), the call runs from the
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


#: Below this, a region's addresses look like the small integers a stack is
#: full of: a counter of 4,000,000 on a thread's stack would read as a return
#: address into a stub region at 0x3d0000 and keep it from being freed.
LOW_INTEGERS = 1 << 30


def pick_address(maps: Sequence[Mapping], size: int, lo_site: int, hi_site: int) -> int:
    """A free, page-aligned address for *size* bytes from which every CALL
    in [lo_site, hi_site] reaches the whole region with a rel32.  Prefer the
    gap just below the code (above it the heap grows), then above the
    highest mapping near it; above :data:`LOW_INTEGERS` where the code's
    reach allows (a non-PIE at 0x400000: between 1 and 2 GiB)."""
    try:
        return _pick(maps, size, lo_site, hi_site, LOW_INTEGERS)
    except InjectError:
        return _pick(maps, size, lo_site, hi_site, 0x10000)


def _pick(maps: Sequence[Mapping], size: int, lo_site: int, hi_site: int, floor: int) -> int:
    size = -(-size // PAGE) * PAGE
    # every site s calls a target t with |t - (s + 5)| < 2**31
    lo_ok = max(hi_site + 5 - _S32 + PAGE, floor)
    hi_ok = lo_site + 5 + _S32 - PAGE          # region end must stay below
    spans = sorted((m.start, m.end) for m in maps)
    gaps = []
    prev = 0x10000                            # vm.mmap_min_addr's usual value
    for s, e in spans:
        if s > prev:
            gaps.append((prev, s))
        prev = max(prev, e)
    gaps.append((prev, 0x7FFFFFFFF000))
    heap = [m for m in maps if m.path == "[heap]"]
    below = [(a, b) for a, b in gaps if b <= lo_site]
    for a, b in reversed(below):            # the nearest gap below, at its top
        top = min(b, hi_ok) - PAGE            # a guard page under the code
        start = (top - size) // PAGE * PAGE
        if start >= max(a, lo_ok):
            return start
    for a, b in gaps:
        if a < lo_site:
            continue
        if heap and a <= heap[0].end:         # leave the heap room to grow
            a = max(a, heap[0].end + (64 << 20))
        start = max(-(-(a + PAGE) // PAGE) * PAGE, -(-lo_ok // PAGE) * PAGE)
        if start + size <= min(b, hi_ok) and start >= lo_ok:
            return start
    raise InjectError(f"no free {size:#x}-byte gap within ±2 GiB of {lo_site:#x}-{hi_site:#x}")


def threads_inside(pid: int, threads: Iterable[tuple[int, pt.UserRegs]],
                   rip_ranges: Sequence[tuple[int, int]], word_ranges: Sequence[tuple[int, int]],
                   maps: Sequence[Mapping] | None = None,
                   read: Callable[[int, int], bytes] | None = None) -> list[str]:
    """Why some (stopped) thread may be inside one of the ranges: its rip in
    a ``[lo, hi)`` of *rip_ranges*, or an 8-byte word on the top of its
    stack (from rsp - 128, the red zone, to rsp + :data:`STACK_SCAN`, within
    the stack's mapping) pointing into one of *word_ranges* -- a return
    address, or the rip a signal frame saved.  Empty: none is."""
    maps = list(maps) if maps is not None else read_maps(pid)
    fd = -1
    if read is None:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        read = lambda addr, size: os.pread(fd, size, addr)   # noqa: E731
    why = []
    # sorted starts, for a bisect per word (live count passes a range per
    # entry it moves: 8,192 words x 1,000 ranges per thread otherwise)

    def index(ranges: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        rs = sorted(ranges)
        ends, top = [], 0
        for _a, b in rs:
            top = max(top, b)
            ends.append(top)            # the furthest end of any range starting so far
        return [a for a, _b in rs], ends

    def inside(v: int, idx: tuple[list[int], list[int]]) -> bool:
        i = bisect.bisect_right(idx[0], v)      # the ranges starting at or below v
        return i > 0 and v < idx[1][i - 1]

    ridx, widx = index(rip_ranges), index(word_ranges)
    try:
        for tid, regs in threads:
            rip = inside(regs.rip, ridx) or None
            if rip is not None:
                why.append(f"thread {tid} runs at {regs.rip:#x}")
                continue
            lo = max(regs.rsp - 128, 0)
            stack = next((m for m in maps if m.start <= regs.rsp < m.end), None)
            hi = min(regs.rsp + STACK_SCAN, stack.end if stack else regs.rsp + 4096)
            try:
                buf = read(lo, hi - lo)
            except OSError:
                why.append(f"thread {tid}: its stack at {regs.rsp:#x} cannot be read")
                continue
            words = struct.unpack_from(f"<{len(buf) // 8}Q", buf)
            for i, w in enumerate(words):
                if inside(w, widx):
                    why.append(f"thread {tid}: stack word at {lo + 8 * i:#x} "
                               f"(rsp{lo + 8 * i - regs.rsp:+d}, rip {regs.rip:#x}) = {w:#x} "
                               "points into it")
                    break
    finally:
        if fd >= 0:
            os.close(fd)
    return why


@dataclass
class Region:
    """A region of executable memory (``code_size`` bytes, r-x) followed by
    ``data_size`` bytes of data (rw-), mapped in a stopped thread's process.
    A region from :meth:`map` counts its rescue's two pages (rw-, then r-x)
    as the last of ``data_size``: its user asked for two pages less."""

    pid: int
    base: int
    code_size: int
    data_size: int
    mapped: bool = True
    syscall_at: int = 0
    rescue: object = field(default=None, repr=False)
    _fd: int = field(default=-1, repr=False)

    @property
    def end(self) -> int:
        return self.base + self.code_size + self.data_size

    @property
    def data(self) -> int:
        return self.base + self.code_size

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.end

    @classmethod
    def map(cls, pid: int, tid: int, code_size: int, data_size: int, *, near: tuple[int, int],
            maps: Sequence[Mapping] | None = None,
            wait: Callable[[int], tuple[int, int]] | None = None,
            before: Callable[[int, int, int], None] | None = None) -> "Region":
        """mmap code+data (rounded to pages) within rel32 reach of every
        address in *near* = (lowest, highest) call site, in thread *tid*."""
        code_size = -(-code_size // PAGE) * PAGE
        data_size = -(-data_size // PAGE) * PAGE if data_size else 0
        # the rescue (see ._rescue): its data page, then its code page, after
        # the data; they count as data for everybody else (journal, unmap)
        rescue_at = code_size + data_size
        data_size += _rescue.RESCUE_PAGES * PAGE
        maps = list(maps) if maps is not None else read_maps(pid)
        syscall_at = find_syscall_insn(pid, maps)
        total = code_size + data_size
        want = pick_address(maps, total, *near)
        if before is not None:          # e.g. a journal: written before the region exists
            before(want, code_size, data_size)
        # mapped r-x as a whole: the code and the rescue code are final at
        # once, and this mmap is the one call of the region that runs
        # without its own rescue (from another region's, or the bootstrap);
        # /proc/PID/mem writes through the protection
        got = inject_syscall(pid, tid, SYS_mmap, want, total, PROT_READ | PROT_EXEC,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1 & _MASK, 0,
                             syscall_at=syscall_at, wait=wait)
        if got < 0:
            raise InjectError(f"mmap({want:#x}, {total:#x}) in process {pid} failed: "
                              f"{os.strerror(-got)}")
        if got != want:              # a kernel without MAP_FIXED_NOREPLACE took it as a hint
            inject_syscall(pid, tid, SYS_munmap, got, total, syscall_at=syscall_at, wait=wait)
            raise InjectError(f"mmap placed the region at {got:#x}, not at {want:#x}")
        region = cls(pid, got, code_size, data_size, syscall_at=syscall_at)
        resc = _rescue.Rescue(pid, got + rescue_at)
        try:
            region.write(resc.code_page, resc.code())
        except BaseException:
            inject_syscall(pid, tid, SYS_munmap, got, total, syscall_at=syscall_at, wait=wait)
            region.close()
            raise
        register_rescue(resc)
        region.rescue = resc
        # the data (and the rescue's slots) writable: through the rescue
        r = inject_syscall(pid, tid, SYS_mprotect, got + code_size, rescue_at - code_size + PAGE,
                           PROT_READ | PROT_WRITE, syscall_at=syscall_at, wait=wait)
        if r < 0:
            inject_syscall(pid, tid, SYS_munmap, got, total, syscall_at=syscall_at, wait=wait)
            region.close()
            raise InjectError(f"mprotect(rw-) in process {pid} failed: {os.strerror(-r)}")
        return region

    # --- contents ---------------------------------------------------------
    def _mem(self) -> int:
        if self._fd < 0:
            self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def write(self, addr: int, data: bytes) -> None:
        """Write (code or data) through /proc/PID/mem and read it back."""
        if not (self.base <= addr and addr + len(data) <= self.end):
            raise InjectError(f"write of {len(data)} bytes at {addr:#x} is outside the region")
        fd = self._mem()
        n = os.pwrite(fd, data, addr)
        if n != len(data) or os.pread(fd, len(data), addr) != data:
            raise InjectError(f"write at {addr:#x} in process {self.pid} did not verify")

    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self._mem(), size, addr)

    # --- freeing ----------------------------------------------------------
    def in_use(self, threads: Iterable[tuple[int, pt.UserRegs]],
               maps: Sequence[Mapping] | None = None) -> list[str]:
        """Reasons the region may still be in use, given the registers of
        every (stopped) thread: rip inside, or a stack word pointing into
        its code (see the module doc).  Empty: safe to unmap."""
        return threads_inside(self.pid, threads, [(self.base, self.end)],
                              [(self.base, self.base + self.code_size)], maps, self.read)

    def unmap(self, tid: int, wait: Callable[[int], tuple[int, int]] | None = None) -> None:
        """munmap in thread *tid* (stopped).  The caller checked :meth:`in_use`."""
        if not self.mapped:
            return
        r = inject_syscall(self.pid, tid, SYS_munmap, self.base, self.end - self.base,
                           syscall_at=self.syscall_at or None, wait=wait)
        if r < 0:
            raise InjectError(f"munmap({self.base:#x}) in process {self.pid} failed: {os.strerror(-r)}")
        self.mapped = False
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
