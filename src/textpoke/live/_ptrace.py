# SPDX-License-Identifier: GPL-2.0-only
"""ptrace(2), waitid(2) and the x86-64 register set, over ctypes and libc.

Why ctypes and not python-ptrace (0.9.9, the maintained binding on PyPI):
it knows PTRACE_ATTACH but none of PTRACE_SEIZE, PTRACE_INTERRUPT,
PTRACE_LISTEN or PTRACE_PEEKSIGINFO, and its debugger stops every thread on
attach (SIGSTOP) -- the one thing a live patcher must not do.  What is
needed here is a dozen requests and one structure; ctypes over libc gives
all of it with no dependency and no hidden waits.

Every call raises :class:`OSError` with the errno on failure (callers map
ESRCH / EPERM to the typed errors of :mod:`textpoke.live`).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["UserRegs", "SigInfo", "ptrace", "seize", "interrupt", "cont", "listen", "detach",
           "singlestep", "getregs", "setregs", "geteventmsg", "peek_pending", "waitid",
           "PTRACE_O_TRACECLONE", "PTRACE_O_TRACEEXIT", "PTRACE_O_TRACEEXEC",
           "PTRACE_EVENT_CLONE", "PTRACE_EVENT_EXEC", "PTRACE_EVENT_EXIT", "PTRACE_EVENT_STOP",
           "CLD_EXITED", "CLD_KILLED", "CLD_DUMPED", "CLD_TRAPPED", "CLD_STOPPED",
           "CLD_CONTINUED", "SI_KERNEL", "SI_USER"]

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209

PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEEXIT = 0x40

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128

P_PID = 1
WNOHANG = 0x1
WSTOPPED = 0x2
WEXITED = 0x4
__WALL = 0x40000000

CLD_EXITED, CLD_KILLED, CLD_DUMPED, CLD_TRAPPED, CLD_STOPPED, CLD_CONTINUED = range(1, 7)
SI_USER = 0
SI_KERNEL = 0x80

# The live machine is x86-64 Linux with glibc, whose C library is always
# libc.so.6; ctypes.util.find_library would run ``ldconfig -p`` in a child
# process on every command just to say so.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_waitid = _libc.waitid
_waitid.restype = ctypes.c_int
_waitid.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int)


class UserRegs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64 (what PTRACE_GETREGS fills)."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n, _ in self._fields_}


class SigInfo(ctypes.Structure):
    """The head of ``siginfo_t`` (128 bytes) as waitid and PEEKSIGINFO fill it."""

    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("si_pid", ctypes.c_int), ("si_uid", ctypes.c_uint),
                ("si_status", ctypes.c_int), ("_rest", ctypes.c_char * 100)]


class _PeekArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_ulonglong), ("flags", ctypes.c_uint), ("nr", ctypes.c_int)]


def _err(what: str, tid: int) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}({tid}): {os.strerror(e)}")


def ptrace(req: int, tid: int, addr: int | None = 0, data: object = 0) -> int:
    ctypes.set_errno(0)
    r = _ptrace(req, tid, addr, data)
    if r == -1 and ctypes.get_errno():
        raise _err(f"ptrace {req:#x}", tid)
    return r


def seize(tid: int, options: int) -> None:
    ptrace(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    ptrace(PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_CONT, tid, 0, sig)


def listen(tid: int) -> None:
    ptrace(PTRACE_LISTEN, tid)


def singlestep(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_DETACH, tid, 0, sig)


def getregs(tid: int, regs: UserRegs) -> UserRegs:
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def setregs(tid: int, regs: UserRegs) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def geteventmsg(tid: int) -> int:
    v = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(v))
    return v.value


def getsiginfo(tid: int) -> SigInfo:
    si = SigInfo()
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(si))
    return si


def peek_pending(tid: int, max_n: int = 8) -> list[SigInfo]:
    """The signals queued (not yet delivered) on the thread's private queue."""
    arr = (SigInfo * max_n)()
    args = _PeekArgs(0, 0, max_n)
    n = ptrace(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(arr))
    return [arr[i] for i in range(n)]


def waitid(tid: int, info: SigInfo, block: bool) -> int:
    """``waitid(P_PID, tid, info, WEXITED|WSTOPPED|__WALL[|WNOHANG])``.

    The result lands in *info* (``si_pid`` is 0 when nothing was
    reported): it survives an exception raised by a signal handler right
    after the call returns, so a reaped status is never lost.  Returns 0,
    or -errno (EINTR, ECHILD) without raising."""
    flags = WEXITED | WSTOPPED | __WALL | (0 if block else WNOHANG)
    r = _waitid(P_PID, tid, ctypes.addressof(info), flags)
    if r < 0:
        return -ctypes.get_errno()
    return 0
