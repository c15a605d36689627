# SPDX-License-Identifier: GPL-2.0-only
"""A traced process forks while sites of ours are in flight.

The child is a copy of the address space as it is at that instant: an INT3
of a batch in flight, tails half written, the SIGTRAP guard's handler (see
:mod:`._guard`) as its action.  Nobody will finish the child's copy: the
patcher writes the parent's text only, and the guard's handler, finding the
site in its table, sends the child's thread back to the INT3 for ever (or,
without the guard, the child dies of SIGTRAP).  So the machine seizes with
``PTRACE_O_TRACEFORK``: the kernel attaches the child and stops it before it
runs, and here every site the journal has in flight whose first byte in the
child is an INT3 gets its old bytes back whole (as ``live recover`` does
for a dead patcher's target), then the child is let go (detached).  What
the batch had finished stays as the parent has it (an entry's ``jmp pad``,
a record's CALL: the child's copy of the runtime, harmless).

A ``vfork`` child (and one of ``clone`` with ``CLONE_VM``) is not handled
here: it shares the parent's memory, so there is no copy to repair; the
tracer follows it instead (``PTRACE_O_TRACEVFORK``, see :mod:`._children`), as
a CPU of the machine until its exec or exit.  Cost of a fork: one stop of the
forking thread and one of the child, while a patcher is attached."""

from __future__ import annotations

import contextlib
import os

from . import _ptrace as P

__all__ = ["PTRACE_O_TRACEFORK", "PTRACE_EVENT_FORK", "release_child", "repair_copy"]

PTRACE_O_TRACEFORK = 0x02
PTRACE_EVENT_FORK = 1


def repair_copy(child: int, sites: dict) -> int:
    """In process *child*'s memory: every journaled site (``{addr: (first,
    old_tail, new_tail)}``, hex) whose first byte is an INT3 gets its first
    byte and old tail back.  Returns how many."""
    if not sites:
        return 0
    n = 0
    fd = os.open(f"/proc/{child}/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        for a, (first, old_tail, _new_tail) in sites.items():
            addr = int(a)
            with contextlib.suppress(OSError):
                if os.pread(fd, 1, addr) == b"\xcc":
                    old = bytes.fromhex(first) + bytes.fromhex(old_tail)
                    if os.pwrite(fd, old, addr) == len(old):
                        n += 1
    finally:
        os.close(fd)
    return n


def release_child(m, child: int) -> int:
    """The fork event's *child* (attached by the kernel): wait for its first
    stop, put back the sites in flight in its copy, detach it.  Returns how
    many sites were put back."""
    si = P.SigInfo()
    while True:
        si.si_pid = 0
        r = P.waitid(child, si, True)
        if r == 0 or r != -4:         # EINTR: again
            break
    if r < 0 or si.si_code != P.CLD_TRAPPED:
        return 0                      # gone already (killed before it ran)
    j = getattr(m, "journal", None)
    n = 0
    try:
        n = repair_copy(child, dict(j.data["sites"]) if j is not None else {})
    finally:
        with contextlib.suppress(OSError):
            P.detach(child, 0)
    return n
