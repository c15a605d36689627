# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``'s region freed: no thread in the tracer's code (its rip,
or a signal frame returning there), then unmapped.  Also used by
``live recover`` for a region a killed tracer left."""

from __future__ import annotations

import struct
import time

from .._errors import TextPokeError
from ._trace_profile import unhook_returns

__all__ = ["alive", "free_region", "threads_in_region"]


#: what a signal frame's return address (``pretcode``) points at: glibc's
#: ``__restore_rt``, ``mov $15, %rax; syscall`` (rt_sigreturn)
_RESTORER = bytes.fromhex("48c7c00f0000000f05")
#: where ``uc_mcontext.rip`` lies in an x86-64 ``rt_sigframe`` (pretcode 8,
#: ucontext's flags, link and stack 40, then r8..rcx and rsp: 16 words)
_SIGFRAME_RIP = 8 + 40 + 16 * 8


def threads_in_region(m, r, tids) -> list[str]:
    """With *tids* stopped: why a thread may still be in the tracer's code
    -- its rip there, or a signal frame (delivered while it ran there) that
    will return there.  Other words on a stack that point into the code are
    dead: the runtime's only CALLs are ftrace_caller's into its callbacks,
    which call nothing, so a live return address into it exists only while
    the thread's rip is there or a signal interrupted it there; what else
    is found (the return address of an earlier call, left in the red zone
    or in a frame's slot not written since) is never run."""
    from ._inject import STACK_SCAN
    from ._symbols import read_maps
    lo, hi = r.base, r.base + r.code_size
    maps = read_maps(m.pid)
    why = []
    for tid in tids:
        regs = m.get_regs(tid)
        if r.base <= regs.rip < r.end:
            why.append(f"thread {tid} runs at {regs.rip:#x}")
            continue
        stack = next((x for x in maps if x.start <= regs.rsp < x.end), None)
        top = min(regs.rsp + STACK_SCAN, stack.end if stack else regs.rsp + 4096)
        try:
            buf = m.mem.read(regs.rsp, top - regs.rsp)
        except OSError:
            why.append(f"thread {tid}: its stack at {regs.rsp:#x} cannot be read")
            continue
        for i, (w,) in enumerate(struct.iter_unpack("<Q", buf[:len(buf) // 8 * 8])):
            if not lo <= w < hi:
                continue
            at = regs.rsp + 8 * i
            frame = at - _SIGFRAME_RIP
            try:
                pret = struct.unpack("<Q", m.mem.read(frame, 8))[0]
                if m.mem.read(pret, len(_RESTORER)) == _RESTORER:
                    why.append(f"thread {tid}: a signal frame at {frame:#x} returns to "
                               f"{w:#x}")
                    break
            except (OSError, TextPokeError, struct.error):
                continue
    return why


def free_region(m, r, *, unmap: bool = True, attempts: int = 50,
                unhook: dict | None = None) -> list[str]:
    """Wait (every thread stopped and looked at, a thread inside stepped
    out, then let run) until no thread is in the tracer's code
    (:func:`threads_in_region`); then unmap *r* in a stopped thread unless
    *unmap* is false.  *unhook* (the profiler's return hooks, see
    :func:`unhook_returns`) is undone first, with the threads stopped.
    Returns why it is still in use (empty: done)."""
    from .._errors import MachineError
    from ._inject import InjectError, find_syscall_insn
    why: list[str] = []
    for attempt in range(attempts):
        with m.stopped() as tids:
            try:
                m.step_out_of_range(r.base, r.base + r.code_size)
            except MachineError as e:       # a long way out: let it run on
                why = [str(e)]
            else:
                if unhook:
                    unhook_returns(m.mem, unhook)
                why = threads_in_region(m, r, tids)
            if not why:
                if not unmap:
                    return []
                errs = []
                if not r.syscall_at:
                    r.syscall_at = find_syscall_insn(m.pid)
                for tid in sorted(tids, key=lambda t: t != m.pid):
                    try:
                        r.unmap(tid)
                        return []
                    except (InjectError, OSError) as e:
                        errs.append(f"munmap in thread {tid} failed: {e}")
                return errs
        time.sleep(0.0005 * (attempt + 1))
    return why


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2:][:1] not in (b"Z", b"X")
    except OSError:
        return False
