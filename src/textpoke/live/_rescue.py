# SPDX-License-Identifier: GPL-2.0-only
"""Injected system calls that a dying tracer cannot turn into a crash.

The plain way to run a system call in a stopped thread (rip = a ``syscall``
instruction of libc, ``PTRACE_SINGLESTEP``) has two ways to kill the target
if the tracer is SIGKILLed in the middle:

* the kernel does not clear the trap flag it set for the single step when
  the tracer goes away (``exit_ptrace`` -> ``__ptrace_detach`` unlinks the
  tracee without the arch's ``ptrace_disable``), so the thread takes a
  SIGTRAP right after the system call, untraced: the default action kills
  the whole process;
* even without the trap flag, the thread would go on at ``syscall + 2``
  inside libc with the injected registers: whatever code follows runs
  with garbage.

A *rescue* is two pages at the end of an injected region of ours
(:meth:`textpoke.live._region.Region.map` adds them): a data page of
:data:`NSLOTS` slots and a code page with one small routine per slot::

    syscall                         ; the injected system call
    lea   rsp, [rip + slot.scratch] ; a stack of our own: the thread's red
    push  qword [rip + slot.rflags] ; zone below its rsp may be live
    popfq
    mov   rax, [rip + slot.rax]     ; ... every general register but rsp
    mov   rsp, [rip + slot.rsp]
    jmp   qword [rip + slot.rip]

The tracer writes the thread's registers into the slot, points rip at the
slot's ``syscall`` and resumes with ``PTRACE_SYSCALL`` -- no trap flag
anywhere.  In the normal case it reads the result at the syscall-exit stop,
asks for a ``PTRACE_INTERRUPT`` stop (which the thread takes in the
kernel's signal path, where it was stopped in the first place) and puts
every register back there; the thread never executes the restore part.
If the tracer vanishes at any moment after the registers were set, the
thread finishes the system call, runs the restore part and continues
exactly where it was stopped.

A thread that was stopped inside an interrupted system call (orig_rax !=
-1 and rax = -ERESTARTSYS / -ERESTARTNOINTR / -ERESTARTNOHAND /
-ERESTART_RESTARTBLOCK):

* tracer alive: its registers are restored in an interrupt stop in the
  signal path, so the kernel itself restarts (or fails with EINTR) the call
  on resume, exactly as it would have without us;
* tracer gone: the slot holds what the kernel does when no signal handler
  runs -- rip backed up by 2 (onto the thread's own ``syscall``) and rax =
  orig_rax (``restart_syscall`` for -ERESTART_RESTARTBLOCK) -- so the
  interrupted call is restarted.  No signal is being delivered there, so
  a restart (never -EINTR) is what the kernel would have chosen too.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Callable

from . import _ptrace as pt

__all__ = ["NSLOTS", "SLOT", "RESCUE_PAGES", "rescue_code", "slot_image", "run_syscall",
           "Rescue", "Bootstrap", "find_slack"]

PAGE = 4096
RESCUE_PAGES = 2                 # the data page, then the code page
SLOT = 256                       # bytes of data and of code per slot
NSLOTS = PAGE // SLOT
_MASK = (1 << 64) - 1

# data slot layout
_RFLAGS, _RIP, _RSP, _GPR = 0, 8, 16, 24
#: the general registers restored by the stub, in slot order, with their
#: ModRM register number (8-15 take REX.R)
_REGS = (("rax", 0), ("rbx", 3), ("rcx", 1), ("rdx", 2), ("rsi", 6), ("rdi", 7),
         ("rbp", 5), ("r8", 8), ("r9", 9), ("r10", 10), ("r11", 11), ("r12", 12),
         ("r13", 13), ("r14", 14), ("r15", 15))
_SCRATCH_TOP = 224               # 16-byte aligned, below the end of the slot
_STACK = _GPR + 8 * len(_REGS)   # own_stack: where the thread's rsp goes for popfq
#: below the thread's rsp: past its red zone (128 bytes), 16-byte aligned --
#: memory a signal frame may overwrite at any time, so nobody keeps data there
_BELOW_RED_ZONE = 256
SYSCALL_LEN = 2

PTRACE_SYSCALL = 24
#: Every seize of a thread we may run a system call in must ask for
#: ``PTRACE_O_TRACESYSGOOD``.  A thread that reached a syscall stop the
#: tracer has not yet reaped (waited for) keeps the stop's code as its
#: exit_code; if the tracer dies then, the kernel's ptrace_report_syscall
#: sends that code back to the thread as a signal (``send_sig``, si_code
#: SI_KERNEL).  Without the option it is SIGTRAP -- the target dies of it
#: (the guard takes an SI_KERNEL SIGTRAP for an INT3, finds no site and
#: chains to the default); with it, SIGTRAP|0x80 is no valid signal and
#: nothing is sent.  A reaped stop has exit_code 0 (the wait cleared it).
PTRACE_O_TRACESYSGOOD = 0x01
SEIZE_OPTIONS = PTRACE_O_TRACESYSGOOD
PTRACE_GET_SYSCALL_INFO = 0x420E
_OP_ENTRY, _OP_EXIT = 1, 2

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
SYS_restart_syscall = 219
MAGIC = b"textpoke-rescue1"


def _rel(target: int, end: int) -> bytes:
    return struct.pack("<i", target - end)


def slot_code(code_at: int, data_at: int, own_stack: bool = False) -> bytes:
    """The routine of one slot at *code_at* whose data is at *data_at*.
    *own_stack*: popfq through the thread's own stack below its red zone
    (the slot's word at ``_STACK``), for a slot in memory the thread cannot
    write (:class:`Bootstrap`); else through the slot's scratch words."""
    out = bytearray(b"\x0f\x05")                                  # syscall
    def emit(prefix: bytes, target: int) -> None:
        at = code_at + len(out) + len(prefix) + 4
        out.extend(prefix + _rel(target, at))
    if own_stack:
        emit(b"\x48\x8b\x25", data_at + _STACK)                  # mov rsp, [rip+d]
    else:
        emit(b"\x48\x8d\x25", data_at + _SCRATCH_TOP)            # lea rsp, [rip+d]
    emit(b"\xff\x35", data_at + _RFLAGS)                          # push qword [rip+d]
    out.append(0x9D)                                               # popfq
    for i, (_name, n) in enumerate(_REGS):                         # mov reg, [rip+d]
        rex = 0x48 | (0x04 if n >= 8 else 0)
        emit(bytes([rex, 0x8B, ((n & 7) << 3) | 5]), data_at + _GPR + 8 * i)
    emit(b"\x48\x8b\x25", data_at + _RSP)                          # mov rsp, [rip+d]
    emit(b"\xff\x25", data_at + _RIP)                              # jmp qword [rip+d]
    assert len(out) <= SLOT
    return bytes(out)


def rescue_code(code_page: int, data_page: int) -> bytes:
    """The whole code page: one routine per slot, INT3-free padding is not
    needed (nothing jumps between routines); the rest is zero."""
    page = bytearray(PAGE)
    for i in range(NSLOTS):
        c = slot_code(code_page + i * SLOT, data_page + i * SLOT)
        page[i * SLOT:i * SLOT + len(c)] = c
    return bytes(page)


def resume_regs(saved: pt.UserRegs) -> dict[str, int]:
    """Where the thread must go on if nobody restores its registers: the
    saved ones, with the kernel's restart of an interrupted system call
    applied (see the module doc)."""
    r = {n: getattr(saved, n) for n, _ in _REGS}
    r["rip"], r["rsp"], r["eflags"] = saved.rip, saved.rsp, saved.eflags
    if saved.orig_rax != _MASK:
        err = (-saved.rax) & _MASK
        if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            r["rax"], r["rip"] = saved.orig_rax, saved.rip - SYSCALL_LEN
        elif err == ERESTART_RESTARTBLOCK:
            r["rax"], r["rip"] = SYS_restart_syscall, saved.rip - SYSCALL_LEN
    return r


def slot_image(saved: pt.UserRegs, own_stack: bool = False) -> bytes:
    r = resume_regs(saved)
    head = struct.pack("<3Q", r["eflags"] & _MASK, r["rip"] & _MASK, r["rsp"] & _MASK)
    regs = struct.pack(f"<{len(_REGS)}Q", *(r[n] & _MASK for n, _ in _REGS))
    if own_stack:
        regs += struct.pack("<Q", ((r["rsp"] - _BELOW_RED_ZONE) & ~15) & _MASK)
    return head + regs


class Rescue:
    """The two rescue pages of one region: *data_page* (rw-) then
    *code_page* (r-x)."""

    def __init__(self, pid: int, data_page: int) -> None:
        self.pid, self.data_page, self.code_page = pid, data_page, data_page + PAGE

    @property
    def span(self) -> tuple[int, int]:
        return self.data_page, self.code_page + PAGE

    def code(self) -> bytes:
        return rescue_code(self.code_page, self.data_page)

    def slot_of(self, tid: int) -> tuple[int, int]:
        i = tid % NSLOTS
        return self.code_page + i * SLOT, self.data_page + i * SLOT

    def intact(self, fd: int) -> bool:
        """The code is still ours (not unmapped by someone else, no exec)."""
        want = self.code()
        try:
            return os.pread(fd, len(want), self.code_page) == want
        except OSError:
            return False


class Bootstrap:
    """A one-slot rescue for a process with no region of ours (the first
    ``mmap`` of a command, ``live recover``) or whose last region is being
    unmapped: written for the one call into the slack of an executable
    file mapping -- the bytes between the end of an executable PT_LOAD
    segment and the end of its last page, which belong to no section and
    which nothing executes or reads -- and the old bytes put back after.
    The write makes a private copy of that page (``/proc/PID/mem``, as a
    debugger's breakpoint does).  The slot's data is there too (read only:
    the routine pops the flags through the thread's own stack, below its
    red zone).  If the patcher dies in the middle, the routine's bytes stay
    in that slack, unused.  ``live recover`` runs its calls the same way."""

    own_stack = True

    CODE = 136                   # the routine's bytes (134), then its data
    SIZE = CODE + 8 * (3 + len(_REGS) + 1)

    def __init__(self, pid: int, at: int) -> None:
        self.pid, self.at = pid, at

    def slot_of(self, tid: int) -> tuple[int, int]:
        return self.at, self.at + self.CODE

    def code(self) -> bytes:
        c = slot_code(self.at, self.at + self.CODE, own_stack=True)
        assert len(c) <= self.CODE
        return c


def find_slack(pid: int, maps, fd: int, need: int) -> int | None:
    """An address with *need* bytes of slack after an executable PT_LOAD
    segment in one of the process's file mappings (see :class:`Bootstrap`),
    or None.  The ELF headers are read from the process's memory (the
    mapping of the file at offset 0)."""
    by_path: dict[str, list] = {}
    for m in maps:
        if m.path and not m.path.startswith("[") and m.inode:
            by_path.setdefault(m.path, []).append(m)
    order = sorted(by_path, key=lambda p: ("libc" not in os.path.basename(p), p))
    for path in order:
        ms = by_path[path]
        head = next((m for m in ms if m.offset == 0), None)
        if head is None:
            continue
        try:
            eh = os.pread(fd, 64, head.start)
            if len(eh) < 64 or eh[:4] != b"\x7fELF" or eh[4] != 2:
                continue
            phoff, = struct.unpack_from("<Q", eh, 32)
            phentsize, phnum = struct.unpack_from("<HH", eh, 54)
            ph = os.pread(fd, phentsize * phnum, head.start + phoff)
        except OSError:
            continue
        if len(ph) < phentsize * phnum or phentsize < 56:
            continue
        loads = []
        for i in range(phnum):
            p_type, p_flags, p_off, p_vaddr, _pa, p_filesz, p_memsz, _al = struct.unpack_from(
                "<IIQQQQQQ", ph, i * phentsize)
            if p_type == 1:
                loads.append((p_flags, p_off, p_vaddr, p_filesz, p_memsz))
        if not loads:
            continue
        # the load bias: the mapping at offset 0 holds the lowest segment
        first = min(loads, key=lambda x: x[2])
        bias = head.start - (first[2] & ~(PAGE - 1))
        for p_flags, p_off, p_vaddr, p_filesz, p_memsz in loads:
            if not p_flags & 1 or p_filesz != p_memsz:
                continue
            end = bias + p_vaddr + p_memsz
            m = next((m for m in ms if m.start < end <= m.end and m.executable), None)
            if m is None:
                continue
            # no other segment may lie in the same page past the end
            page_end = (end + PAGE - 1) & ~(PAGE - 1)
            if any(bias + v < page_end and bias + v + ms_ > end
                   for _f, _o, v, _fs, ms_ in loads if bias + v >= end):
                continue
            at = (end + 63) & ~63
            if at + need <= min(page_end, m.end):
                return at
    return None


def _syscall_op(tid: int) -> int:
    """1 at a syscall-entry stop, 2 at a syscall-exit stop, else 0: the
    stop's siginfo has si_code SIGTRAP (or SIGTRAP|0x80 with
    PTRACE_O_TRACESYSGOOD) only at syscall stops; at the entry stop the
    kernel has set rax to -ENOSYS, at the exit it holds the result."""
    try:
        si = pt.getsiginfo(tid)
    except OSError:
        return 0
    if si.si_signo != signal.SIGTRAP or si.si_code not in (signal.SIGTRAP, signal.SIGTRAP | 0x80):
        return 0
    return 1 if pt.getregs(tid, pt.UserRegs()).rax == (-38) & _MASK else 2


class InjectFailed(Exception):
    pass


#: Tests only: called with "entry", "exit", "final" at those stops (the
#: last one before the registers are put back), to kill the patcher there.
stop_hook: Callable[[str], None] | None = None


def run_syscall(pid: int, tid: int, rescue: Rescue, regs: pt.UserRegs, saved: pt.UserRegs,
                wait: Callable[[int], tuple[int, int]], write: Callable[[int, bytes], None],
                deferred: list[int]) -> int:
    """Run the system call set up in *regs* (rax, arguments) in *tid*
    (stopped, *saved* its registers) through its rescue slot; leave the
    thread in an interrupt stop with *saved* restored.  Returns rax as the
    kernel left it (unsigned).  Signals that arrive meanwhile are appended
    to *deferred* (suppressed; the caller sends them back)."""
    code_at, data_at = rescue.slot_of(tid)
    write(data_at, slot_image(saved, getattr(rescue, "own_stack", False)))   # before rip points at it
    regs.rip = code_at
    regs.orig_rax = _MASK
    pt.setregs(tid, regs)
    after = code_at + SYSCALL_LEN
    result = None
    phase = 0                                  # 0 before entry, 1 inside, 2 after exit
    while True:
        if phase < 2:
            pt.ptrace(PTRACE_SYSCALL, tid, 0, 0)
        else:
            pt.cont(tid, 0)
        code, status = wait(tid)
        if code in (pt.CLD_EXITED, pt.CLD_KILLED, pt.CLD_DUMPED):
            raise InjectFailed(f"thread {tid} of process {pid} ended during an injected syscall")
        sig, event = status & 0xFF, status >> 8
        if code != pt.CLD_TRAPPED:
            continue
        if event == pt.PTRACE_EVENT_STOP:
            if phase == 2:                     # the stop we asked for: in the signal path
                break
            continue                           # a group stop on the way: go on
        if event:
            continue
        if sig in (signal.SIGTRAP, signal.SIGTRAP | 0x80) and phase < 2:
            op = _syscall_op(tid)
            if op and phase == 0:             # the entry (rax = -ENOSYS)
                phase = 1
                if stop_hook is not None:
                    stop_hook("entry")
                continue
            if op and phase == 1:
                now = pt.getregs(tid, pt.UserRegs())
                if now.rip != after:
                    raise InjectFailed(f"injected syscall in thread {tid} left at {now.rip:#x}, "
                                       f"not at {after:#x}")
                result = now.rax
                phase = 2
                if stop_hook is not None:
                    stop_hook("exit")
                pt.interrupt(tid)
                continue
        if sig:                                # a signal-delivery-stop: keep it for later
            deferred.append(sig)
    if stop_hook is not None:
        stop_hook("final")
    pt.setregs(tid, saved)
    assert result is not None
    return result
