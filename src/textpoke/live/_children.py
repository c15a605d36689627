# SPDX-License-Identifier: GPL-2.0-only
"""The live machine's vfork children (a mixin of the tracer,
:class:`~textpoke.live._tracer._Tracer`).

A vfork child runs on the parent's memory, text included, until it
execs or exits: it can reach an INT3 of a batch in flight, a site
being switched back, a trampoline being freed.  Not traced, it met
them alone (posix_spawn's child resets every signal handler, the
guard's included, so an INT3 killed it).  So it is traced
(PTRACE_O_TRACEVFORK: the kernel attaches it, stopped before its
first instruction) and is one more thread of the table -- synced,
held, its traps handled -- until its exec or exit stop, where it is
detached.  Its parent is kept in its PTRACE_EVENT_VFORK stop
meanwhile (_VFORK): resumed, it would sleep in the kernel until the
child is done (a killable wait: no interrupt stop until then), and
a sync waiting for that stop would wait on the child; kept in the
event stop it is a thread in the kernel that returns only through
it, which is all a sync asks.  If the patcher dies there, the
kernel resumes it into that wait (an event stop delivers no signal).
The same holds for ``clone(CLONE_VM)`` without ``CLONE_THREAD``
(its parent runs on meanwhile)."""

from __future__ import annotations

import contextlib
import errno
import threading
import time

from . import _ptrace as P
from ._process import shares_memory, state_of, tracer_of
from ._thread import _HELD, _OPTIONS, _RUN, _VFORK, _Thread


def _in_vfork_wait(pid: int, tid: int) -> bool:
    """Thread *tid* sleeps in the kernel's wait for its vfork child."""
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan", "rb") as f:
            return f.read() in (b"kernel_clone", b"wait_for_vfork_done")
    except OSError:
        return False


class _Children:
    """The tracer's children that share the process's memory (a mixin)."""

    def _attach_children(self) -> None:
        """Seize the children already running on the process's memory (a
        thread that vforked before we came sleeps in the kernel until its
        child execs or exits, and a sync waits for it: the child, running
        our text meanwhile, is followed like one made later)."""
        for tid in list(self._threads):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/children", "rb") as f:
                    kids = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for c in kids:
                if c in self._threads or not shares_memory(self.pid, c):
                    continue
                try:
                    P.seize(c, _OPTIONS)
                except OSError:
                    continue              # gone, or not ours to trace
                t = self._add_child(c, tid)
                t.state = _RUN              # seized, not stopped
                t.want_hold = False
                p = self._threads[tid]
                if _in_vfork_wait(self.pid, tid):
                    # no stop can reach it before its child is done: a thread
                    # in the kernel, as a sync asks, until then
                    p.state, p.vchild, p.asleep = _VFORK, c, True

    def _add_child(self, child: int, parent: int) -> _Thread:
        t = self._threads.get(child)
        if t is None:
            t = _Thread(child)
            t.state = _HELD         # in its first stop until we see and resume it
            t.want_hold = self._holding
            t.child_of = parent
            self._threads[child] = t
            self._children.add(child)
            self.stats.children_followed += 1
            # (a tracer gives it a ring of its own, as to a new thread: its
            # events carry its own id, as the kernel's would)
            self._cpus_changed("add", child)
        return t

    def _child_gone(self, t: _Thread) -> None:
        """*t*, a child, left the table (exec, exit, killed): its parent,
        kept in its vfork stop for it, goes on."""
        self._children.discard(t.tid)
        self._children_gone.add(t.tid)
        self._cpus_changed("remove", t.tid)
        p = self._threads.get(t.child_of)
        if p is None or p.state != _VFORK or p.vchild != t.tid:
            return
        p.vchild = 0
        if p.asleep:
            p.asleep = False
            p.state = _RUN          # wakes by itself; a due interrupt stops it
            return
        p.state = _HELD
        if p.want_hold:
            p.hold_sig = 0          # let go with the others (its event stop: no signal)
        else:
            self._resume(p)

    def _release_child(self, t: _Thread) -> None:
        """Detach the child *t* at its exec stop (its memory is a new
        program's now) or its exit stop (it runs no user code again)."""
        self._threads.pop(t.tid, None)
        self._sync_wait.pop(t.tid, None)
        try:
            P.detach(t.tid, 0)
            self.stats.children_released += 1
        except OSError:
            pass                    # gone meanwhile (killed)
        self._child_gone(t)

    def _child_to_event_stop(self, t: _Thread) -> None:
        """A child stopped for our SIGTRAP and kept stopped (parked, or held
        with the trap consumed) is moved from that signal-delivery-stop to
        an interrupt stop, with no user instruction in between (the kernel
        takes a due interrupt trap before it looks for the next signal).
        If the patcher dies, the kernel resumes a tracee in a signal stop
        by delivering its signal: a thread of the process gets the guard's
        handler, but posix_spawn's child has reset every handler to
        SIG_DFL and would die of the SIGTRAP; from an event stop it just
        goes on (at the site, where its rip was set)."""
        tid = t.tid
        try:
            P.interrupt(tid)
            P.cont(tid, 0)
        except OSError:
            self._vanished(tid)
            return
        si = P.SigInfo()
        while True:
            si.si_pid = 0
            r = P.waitid(tid, si, True)
            if r != -errno.EINTR:
                break
        if r < 0 or not si.si_pid:
            self._vanished(tid)
            return
        code, status = si.si_code, si.si_status
        if code == P.CLD_TRAPPED and status >> 8 == P.PTRACE_EVENT_STOP:
            t.stops += 1
            t.pending_int = 0
            return                  # still parked / held, now in an event stop
        self._handle(tid, code, status)     # (killed meanwhile)

    def _detach_children(self) -> None:
        """Detach any child still traced by us that the table lost (a failed
        detach, a child born while the others were detached): left traced,
        it would stop for a tracer that no longer waits, its parent asleep
        in vfork behind it."""
        me = threading.get_native_id()
        for pid in list(self._children):
            if tracer_of(pid) != me or state_of(pid) in ("", "Z", "X"):
                self._children.discard(pid)
                continue
            try:
                P.detach(pid, 0)
            except OSError:
                with contextlib.suppress(OSError):
                    P.interrupt(pid)
                si = P.SigInfo()
                for _ in range(200):        # its interrupt stop, if it can still stop
                    si.si_pid = 0
                    if P.waitid(pid, si, False) < 0 or si.si_pid:
                        break
                    time.sleep(0.001)
                with contextlib.suppress(OSError):
                    P.detach(pid, 0)
            self._children.discard(pid)
