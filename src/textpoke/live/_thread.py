# SPDX-License-Identifier: GPL-2.0-only
"""A thread of the live machine's table: how it is seized (the ptrace
options), the states it can be in, and its record (:class:`_Thread`).

A thread is running (``_RUN``), held in a ptrace-stop by us (``_HELD``),
parked on an INT3 of ours (``_PARK``, see :mod:`._traps`), group-stopped
and let go with ``PTRACE_LISTEN`` (``_LISTEN``), or, having vforked, kept
until its child is done (``_VFORK``, see :mod:`._children`)."""

from __future__ import annotations

from . import _fork, _ptrace as P

# + PTRACE_O_TRACESYSGOOD (0x01): a thread in a syscall stop of an injected
# system call (live/_rescue.py) when the patcher dies must not be sent the
# stop's SIGTRAP (see _rescue.SEIZE_OPTIONS)
# TRACEFORK: a forked child's copy of sites in flight is put back (._fork)
# TRACEVFORK: a vfork child (posix_spawn, subprocess) shares the text; it is
# followed until its exec or exit (see _Thread.child_of, ._children)
PTRACE_O_TRACEVFORK = 0x04
PTRACE_EVENT_VFORK = 2
_OPTIONS = P.PTRACE_O_TRACECLONE | P.PTRACE_O_TRACEEXIT | P.PTRACE_O_TRACEEXEC | 0x01 \
    | _fork.PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK

# thread states; _VFORK: a thread that vforked, kept in its PTRACE_EVENT_VFORK
# stop until its child has exec'd or exited (see _Thread.child_of)
_RUN, _HELD, _PARK, _LISTEN, _VFORK = "run", "held", "park", "listen", "vfork"


class _Thread:
    __slots__ = ("tid", "state", "stops", "park_site", "park_regs", "hold_sig", "want_hold",
                 "pending_int", "child_of", "vchild", "asleep")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.state = _RUN
        self.stops = 0              # ptrace-stops reported so far
        self.park_site = 0
        self.park_regs: P.UserRegs | None = None
        self.hold_sig = 0           # signal to deliver when a held thread is let go
        self.want_hold = False      # keep it stopped at its next interrupt stop
        # An interrupt stop (PTRACE_EVENT_STOP) is due.  Any ptrace-stop
        # clears the kernel's pending interrupt, and one sent while the
        # thread sits in a stop we have not seen yet stays pending past it;
        # so before resuming a thread from any other stop while one is due,
        # the interrupt is sent again: exactly one interrupt stop follows.
        self.pending_int = 0
        # A child that shares the process's memory but is another process
        # (vfork, posix_spawn; clone(CLONE_VM) without CLONE_THREAD): the id
        # of the thread that made it, 0 for the process's own threads.  It
        # runs the same text, so it is a CPU of the machine like a thread
        # (announced, synced, held, its traps handled -- the core's INT3
        # handler claims a trap only on a CPU it knows) until its exec or
        # exit stop, where it is detached.
        self.child_of = 0
        self.vchild = 0             # _VFORK: the child it waits for
        # _VFORK, not in a ptrace-stop but asleep in the kernel's vfork wait
        # (it vforked before we came): it wakes by itself when its child is
        # done, and stops for any interrupt due before it runs user code
        self.asleep = False
