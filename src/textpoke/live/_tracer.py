# SPDX-License-Identifier: GPL-2.0-only
"""The live machine's tracer half: attaching to every thread, following
clones and exits, and reporting their ptrace-stops (a mixin of
:class:`~textpoke.live._machine.LiveMachine`; see its module docstring).

A thread of the table (:mod:`._thread`: its record and states) is running
(``_RUN``), held in a ptrace-stop by us (``_HELD``), parked on an INT3 of
ours (``_PARK``, see :mod:`._traps`) or group-stopped and let go with
``PTRACE_LISTEN`` (``_LISTEN``).  Every wait polls and looks at the thread
in /proc now and then, so that a thread that died, or sits in a stop
nobody will report again, can never hang the patcher.  The children that
share the process's memory (vfork, posix_spawn) are :mod:`._children`'s,
the rewind of a trap before its stop is reaped :mod:`._rewind`'s."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from .._errors import MachineError
from . import _fork, _ptrace as P
from ._children import _Children, _in_vfork_wait
from ._errors import ACCESS_HINT, AccessDenied, NoSuchProcess
from ._process import list_tids, shares_memory, state_of, tracer_of
from ._process import ppid_of
from ._record import Record
from ._rewind import _PTRACE_SETSIGINFO, _Rewind  # noqa: F401 (._traps imports it from here)
from ._sigdefer import _DEFERRED
from ._thread import _HELD, _LISTEN, _OPTIONS, _PARK, _RUN, _VFORK, PTRACE_EVENT_VFORK, _Thread

__all__ = ["LiveStats"]

_GROUP_STOP_SIGS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class LiveStats(Record):
    """What the machine did (the core keeps its own ``TextPoke.stats``)."""

    # counters, each 0 unless given (a slotted record: equal when every
    # counter is, its repr every counter, not hashable)
    __slots__ = ("attached", "threads_added", "threads_removed", "syncs", "interrupts", "writes",
                 "pokes", "traps", "traps_emulated", "traps_parked", "traps_rewound",
                 "signals_passed", "group_stops", "single_steps", "quiesce_waits",
                 "children_followed", "children_released")

    attached: int
    threads_added: int
    threads_removed: int
    syncs: int
    interrupts: int
    writes: int            # pwrite calls on /proc/PID/mem (text)
    pokes: int             # (addr, bytes) pokes asked for
    traps: int             # SIGTRAP stops at one of our INT3 sites
    traps_emulated: int
    traps_parked: int
    traps_rewound: int     # our INT3 was already gone: resumed at the site
    signals_passed: int    # signals (SIGTRAPs included) delivered unchanged
    group_stops: int
    single_steps: int
    quiesce_waits: int     # looks of quiesce() that found a thread inside
    children_followed: int   # vfork (or CLONE_VM) children traced while they share the text
    children_released: int   # of them, detached at their exec or exit stop

    def __init__(self, **counts: int) -> None:
        for k in self.__slots__:
            setattr(self, k, counts.pop(k, 0))
        if counts:
            raise TypeError(f"LiveStats has no counter {next(iter(counts))!r}")

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class _Tracer(_Children, _Rewind):
    """LiveMachine's thread table and ptrace-stop handling (a mixin)."""

    # ------------------------------------------------------------- attach
    def _attach(self) -> None:
        me = os.getpid()
        while True:
            new = [t for t in list_tids(self.pid) if t not in self._threads]
            if not new:
                break
            for tid in new:
                try:
                    P.seize(tid, _OPTIONS)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        if tid == self.pid:
                            raise NoSuchProcess(self.pid, "process vanished while attaching",
                                                self._ident.name) from None
                        continue                 # a thread that just exited
                    if e.errno == errno.EPERM and self._threads and tracer_of(tid) == me:
                        pass                     # auto-attached already (a clone of a seized thread)
                    elif e.errno == errno.EPERM:
                        other = tracer_of(tid)
                        why = (f"already traced by pid {other}" if other and other != me
                               else ACCESS_HINT)
                        raise AccessDenied(self.pid, f"PTRACE_SEIZE refused: {why}",
                                           self._ident.name) from None
                    else:
                        raise MachineError(f"PTRACE_SEIZE of thread {tid} failed: {e}") from None
                self._threads[tid] = _Thread(tid)
                self.stats.attached += 1
        self._ident.check()
        self._attach_children()


    # ------------------------------------------------------------- threads
    def _interrupt(self, t: _Thread) -> bool:
        try:
            P.interrupt(t.tid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                self._vanished(t.tid)
                return False
            raise MachineError(f"PTRACE_INTERRUPT of thread {t.tid} failed: {e}") from None
        self.stats.interrupts += 1
        t.pending_int = 1
        return True

    def _resume(self, t: _Thread, sig: int = 0) -> None:
        if sig:
            self.stats.signals_passed += 1
        try:
            if t.pending_int:
                P.interrupt(t.tid)
            P.cont(t.tid, sig)
            t.state = _RUN
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise MachineError(f"PTRACE_CONT of thread {t.tid} failed: {e}") from None
            self._lost(t)          # killed in its stop: its exit stop and death are to come

    def _add_thread(self, tid: int) -> _Thread:
        t = self._threads.get(tid)
        if t is None:
            t = _Thread(tid)
            t.state = _HELD        # it is in its initial stop until we see and resume it
            t.want_hold = self._holding
            self._threads[tid] = t
            self.stats.threads_added += 1
            self._cpus_changed("add", tid)
        return t

    def _vanished(self, tid: int) -> None:
        self.__dict__.get("_prerewound", {}).pop(tid, None)
        t = self._threads.pop(tid, None)
        self._sync_wait.pop(tid, None)
        if t is not None:
            if t.child_of:
                self._child_gone(t)
                return
            self.stats.threads_removed += 1
            self._cpus_changed("remove", tid)

    def _drain(self) -> None:
        """Handle a status a previous wait reaped but could not handle."""
        si = self._si
        if si.si_pid:
            pid, code, status = si.si_pid, si.si_code, si.si_status
            si.si_pid = 0
            self._handle(pid, code, status)

    def _wait(self, tid: int, block: bool, interruptible: bool = False) -> bool:
        """Wait for (or poll) one thread; handle what it reports.  Only an
        *interruptible* wait lets the deferred signals in (a task's waits,
        between protocol steps); the others are short and must not be cut.

        A blocking wait polls (WNOHANG, sleeping 20 us growing to 1 ms) and
        looks at the thread in /proc now and then, so that a thread that
        died, or sits in a stop nobody will report again, can never hang
        the patcher."""
        self._drain()
        si = self._si
        if not block:
            return self._poll(tid)
        old = self._old_mask if interruptible else None
        nap, waited, next_look = 20e-6, 0.0, 0.05
        try:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            while True:
                si.si_pid = 0
                r = self._reap(tid, si)
                if r < 0 or si.si_pid:
                    break
                time.sleep(nap)
                waited += nap
                nap = min(nap * 1.5, 1e-3)
                if waited >= next_look:
                    next_look += 0.05
                    t = self._threads.get(tid)
                    # (a vfork child is a process of its own, not in our task list)
                    st = state_of(tid) if t is not None and t.child_of else state_of(self.pid, tid)
                    if st in ("", "Z", "X"):
                        r = -errno.ECHILD
                        break
                    if st == "D" and t is not None and not t.child_of \
                            and _in_vfork_wait(self.pid, tid):
                        # asleep until a child we do not trace execs or
                        # exits: in the kernel, returning only through it
                        # (and stopping for the interrupt due first) --
                        # never waited for, which could be for ever
                        t.state, t.asleep = _VFORK, True
                        return True
                    if st == "t" and waited >= 0.2:
                        # stopped for us, yet nothing to report: a stop we
                        # lost track of -- let it go on
                        t = self._threads.get(tid)
                        with contextlib.suppress(OSError):
                            P.cont(tid, 0)
                            if t is not None:
                                t.pending_int = 0
                                t.state = _RUN
                            return True
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
        return self._after_wait(tid, r)

    def _poll(self, tid: int) -> bool:
        si = self._si
        si.si_pid = 0
        return self._after_wait(tid, self._reap(tid, si))

    def _after_wait(self, tid: int, r: int) -> bool:
        si = self._si
        if r == -errno.ECHILD:
            si.si_pid = 0
            self._exiting.discard(tid)
            self._vanished(tid)
            return True
        if r < 0 or not si.si_pid:
            return False          # EINTR: the signal's exception is raised by the caller's next step
        self._drain()
        return True

    def _service(self) -> None:
        """One round of waiting, for a task's WaitUntil."""
        for tid in list(self._sync_wait):
            t = self._threads.get(tid)
            if t is not None and t.state == _RUN and t.pending_int:
                self._wait(tid, True, interruptible=True)
                return
        got = False
        for tid in list(self._threads) + list(self._exiting):
            if tid == self.pid and tid in self._exiting and ppid_of(tid) == os.getpid():
                continue           # our own child: its death is its parent's (our) to reap
            got |= self._wait(tid, False)
        if not got:
            time.sleep(0.0002)

    def _handle(self, tid: int, code: int, status: int) -> None:
        if code in (P.CLD_EXITED, P.CLD_KILLED, P.CLD_DUMPED):
            self._exiting.discard(tid)
            self._vanished(tid)
            return
        if code != P.CLD_TRAPPED:
            return
        t = self._threads.get(tid)
        if t is None:
            if tid in self._exiting:
                return
            t = self._add_thread(tid)       # a new thread's first stop, before its parent's event
        t.stops += 1
        t.state = _HELD
        t.asleep = False
        sig, event = status & 0xFF, status >> 8
        if event == P.PTRACE_EVENT_STOP:
            t.pending_int = 0
            if sig not in _GROUP_STOP_SIGS and self._int3_sites and self._trap_queued(tid):
                # The interrupt stop came first and our SIGTRAP is still
                # queued: let the thread take it now (no user code runs in
                # between), so it never waits, unreported, for a later call.
                self._resume(t)
                if self._threads.get(tid) is t:
                    self._wait(tid, True)
                return
            if sig in _GROUP_STOP_SIGS:
                self.stats.group_stops += 1
                if t.want_hold:
                    t.hold_sig = -1        # let go with PTRACE_LISTEN: still group-stopped
                    return
                try:
                    P.listen(tid)
                    t.state = _LISTEN
                except OSError:
                    self._vanished(tid)
                return
            if t.want_hold:
                t.hold_sig = 0
                return
            self._resume(t)
        elif event == P.PTRACE_EVENT_CLONE:
            try:
                new = P.geteventmsg(tid)
            except OSError:
                new = 0
            if new and not t.child_of and not os.path.exists(f"/proc/{self.pid}/task/{new}"):
                # clone() without CLONE_THREAD (and an exit signal other
                # than SIGCHLD): another process -- followed as a vfork
                # child if it shares the memory (its exec is not ours),
                # else a copy, put back as a fork's
                if shares_memory(self.pid, new):
                    nt = self._add_child(new, tid)
                    if nt.stops == 0:
                        self._wait(new, True)
                else:
                    _fork.release_child(self, new)
            elif new:
                nt = self._add_thread(new)
                if nt.stops == 0:
                    self._wait(new, True)         # its first stop comes at once
            self._resume(t)
        elif t.child_of and event in (P.PTRACE_EVENT_EXIT, P.PTRACE_EVENT_EXEC):
            self._release_child(t)
        elif event == PTRACE_EVENT_VFORK:
            try:
                child = P.geteventmsg(tid)
            except OSError:
                child = 0
            if not child or t.child_of:
                # (a child's own vfork: its child is not followed -- a child
                # execs or exits, it does not spawn)
                self._resume(t)
                return
            ct = self._add_child(child, tid)
            t.state, t.vchild = _VFORK, child
            if ct.stops == 0:
                self._wait(child, True)           # its first stop comes at once
        elif event == P.PTRACE_EVENT_EXIT:
            self._threads.pop(tid, None)
            self._exiting.add(tid)
            self._sync_wait.pop(tid, None)
            self.stats.threads_removed += 1
            self._cpus_changed("remove", tid)
            with contextlib.suppress(OSError):
                P.cont(tid, 0)
        elif event == P.PTRACE_EVENT_EXEC:
            self._exec_seen = True
            self._resume(t)
        elif event == _fork.PTRACE_EVENT_FORK:
            try:
                child = P.geteventmsg(tid)
            except OSError:
                child = 0
            if child and not t.child_of and shares_memory(self.pid, child):
                # clone(CLONE_VM) with SIGCHLD: not a copy but the same
                # memory (putting the copy's sites back would tear the
                # parent's): followed like a vfork child, parent running
                ct = self._add_child(child, tid)
                if ct.stops == 0:
                    self._wait(child, True)
            elif child:
                _fork.release_child(self, child)
            self._resume(t)
        elif event:
            self._resume(t)
        elif sig == signal.SIGTRAP:
            self._on_sigtrap(t)
            if t.child_of and self._threads.get(tid) is t and (
                    t.state == _PARK or (t.state == _HELD and t.hold_sig == 0)):
                self._child_to_event_stop(t)
        else:
            if t.want_hold:
                t.hold_sig = sig       # delivered when let go
                return
            self._resume(t, sig)



    def _reap_exiting(self) -> None:
        """Reap threads that passed their exit stop (a traced thread stays a
        zombie until its tracer waits for it)."""
        for tid in list(self._exiting):
            if tid != self.pid:
                self._wait(tid, False)


    def _settle(self) -> None:
        """Reap the interrupt stops still due (a thread that stopped for a
        trap first takes its interrupt stop when resumed), so that no thread
        sits in a stop nobody reports between two calls."""
        for tid, t in list(self._threads.items()):
            while t.state == _RUN and t.pending_int and self._threads.get(tid) is t:
                self._wait(tid, True)


    def _resume_keep_hold(self, t: _Thread, sig: int) -> None:
        t.want_hold = True
        try:
            if t.pending_int:
                P.interrupt(t.tid)
            P.cont(t.tid, sig)
            t.state = _RUN
        except OSError:
            self._vanished(t.tid)
            return
        while self._threads.get(t.tid) is t and t.state == _RUN:
            # its next stop is the queued SIGTRAP, handled (rewound) and held
            if not self._wait(t.tid, True):
                with contextlib.suppress(OSError):
                    P.interrupt(t.tid)


