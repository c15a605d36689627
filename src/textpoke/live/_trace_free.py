# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``'s region freed: no thread in the tracer's code (its rip,
or a signal frame returning there), then unmapped.  Also used by
``live recover`` for a region a killed tracer left."""

from __future__ import annotations

import contextlib
import struct
import time

from .._errors import TextPokeError
from ._process import alive
from ._trace_profile import unhook_returns

__all__ = ["alive", "free_region", "group_of", "threads_in_region", "threads_in_regions"]


#: what a signal frame's return address (``pretcode``) points at: glibc's
#: ``__restore_rt``, ``mov $15, %rax; syscall`` (rt_sigreturn)
_RESTORER = bytes.fromhex("48c7c00f0000000f05")
#: where ``uc_mcontext.rip`` lies in an x86-64 ``rt_sigframe`` (pretcode 8,
#: ucontext's flags, link and stack 40, then r8..rcx and rsp: 16 words)
_SIGFRAME_RIP = 8 + 40 + 16 * 8


def threads_in_region(m, r, tids) -> list[str]:
    """:func:`threads_in_regions` of one region."""
    return threads_in_regions(m, [r], tids)


def threads_in_regions(m, regions, tids) -> list[str]:
    """With *tids* stopped: why a thread may still be in the tracer's code
    -- its rip there, or a signal frame (delivered while it ran there) that
    will return there.  Other words on a stack that point into the code are
    dead: the runtime's only CALLs are ftrace_caller's into its callbacks,
    which call nothing, so a live return address into it exists only while
    the thread's rip is there or a signal interrupted it there; what else
    is found (the return address of an earlier call, left in the red zone
    or in a frame's slot not written since) is never run."""
    from ._region import STACK_SCAN
    from ._symbols import read_maps
    codes = [(r.base, r.base + r.code_size) for r in regions]
    maps = read_maps(m.pid)
    why = []
    for tid in tids:
        regs = m.get_regs(tid)
        if any(r.base <= regs.rip < r.end for r in regions):
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
            if not any(lo <= w < hi for lo, hi in codes):
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


def group_of(m, r) -> list:
    """The regions of *r*'s trace session besides *r* (its bridges, or the
    runtime's region and the other bridges of a bridge), as the journal
    links them (``group``: the runtime region's base), still mapped."""
    from ._region import Region
    from ._symbols import read_maps
    regions = m.journal.data.get("regions", [])
    me = next((e for e in regions if e["base"] == r.base), None)
    if me is None:
        return []
    g = me.get("group", r.base)
    mapped = {x.start for x in read_maps(m.pid)}
    return [Region(m.pid, e["base"], e["code_size"], e["data_size"])
            for e in regions if e["base"] != r.base and e.get("group", e["base"]) == g
            and e["kind"] == "trace" and e["base"] in mapped]


def free_region(m, r, *, unmap: bool = True, attempts: int = 50,
                unhook: dict | None = None) -> list[str]:
    """Wait (every thread stopped and looked at, a thread inside stepped
    out, then let run) until no thread is in the tracer's code
    (:func:`threads_in_regions`); then unmap *r* in a stopped thread unless
    *unmap* is false.  *unhook* (the profiler's return hooks, see
    :func:`unhook_returns`) is undone first, with the threads stopped.

    The regions of the same session (:func:`group_of`: a site out of the
    runtime's reach goes through a bridge, and the bridge and the runtime's
    region jump into each other) are waited for and unmapped with it: a
    thread in one is about to enter the other.  Returns why they are still
    in use (empty: done)."""
    from .._errors import MachineError
    from ._inject import InjectError, find_syscall_insn
    group = [r] + group_of(m, r)
    runs = [(x.base - 1, bytearray(x.code_size + 1)) for x in group]
    why: list[str] = []
    for attempt in range(attempts):
        with m.stopped() as tids:
            try:
                # out of every region of the group: a bridge's first half
                # leads into the runtime's region, whose pads lead back
                # into the bridge's second half
                m._step_out_of(runs)
            except MachineError as e:       # a long way out: let it run on
                why = [str(e)]
            else:
                if unhook:
                    unhook_returns(m.mem, unhook)
                why = threads_in_regions(m, group, tids)
            if not why:
                if not unmap:
                    return []
                errs = []
                sc = r.syscall_at or find_syscall_insn(m.pid)
                for x in group:
                    x.syscall_at = x.syscall_at or sc
                    for tid in sorted(tids, key=lambda t: t != m.pid):
                        try:
                            x.unmap(tid)
                            break
                        except (InjectError, OSError) as e:
                            errs.append(f"munmap of {x.base:#x} in thread {tid} failed: {e}")
                    else:
                        return errs
                for x in group[1:]:
                    with contextlib.suppress(Exception):
                        m.journal.drop_region(x.base, flush=False)
                return []
        let_run(m, 0.0005 * (attempt + 1))
    return why


def let_run(m, seconds: float) -> None:
    """Let the threads run for *seconds* with their stops serviced -- not a
    bare sleep: a thread that stops meanwhile (a signal to pass on, the
    interrupt still due from a look, a new thread) would sit in that stop
    until the next look.  A -pg program's thread, resumed with its SIGPROF
    and stopped by the interrupt still due at the handler's first
    instruction, sat there through every look (its signal frame returning
    into the runtime: the region kept, 1 close in 4 with a busy thread)."""
    from .._core._machine import WaitUntil
    end = time.monotonic() + seconds

    def task():
        yield WaitUntil(lambda: time.monotonic() >= end or not m.threads, "threads to run")
    m.run_task(task())


