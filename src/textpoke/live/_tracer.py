# SPDX-License-Identifier: GPL-2.0-only
"""The live machine's tracer half: attaching to every thread, following
clones and exits, and reporting their ptrace-stops (a mixin of
:class:`~textpoke.live._machine.LiveMachine`; see its module docstring).

A thread of the table is in one of four states: running (``_RUN``), held in
a ptrace-stop by us (``_HELD``), parked on an INT3 of ours (``_PARK``, see
:mod:`._traps`) or group-stopped and let go with ``PTRACE_LISTEN``
(``_LISTEN``).  Every wait polls and looks at the thread in /proc now and
then, so that a thread that died, or sits in a stop nobody will report
again, can never hang the patcher."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time

from .._errors import MachineError
from . import _fork, _ptrace as P
from ._errors import ACCESS_HINT, AccessDenied, NoSuchProcess
from ._process import list_tids, shares_memory, state_of, tracer_of
from ._process import ppid_of
from ._sigdefer import _DEFERRED

__all__ = ["LiveStats"]

# + PTRACE_O_TRACESYSGOOD (0x01): a thread in a syscall stop of an injected
# system call (live/_rescue.py) when the patcher dies must not be sent the
# stop's SIGTRAP (see _rescue.SEIZE_OPTIONS)
# TRACEFORK: a forked child's copy of sites in flight is put back (._fork)
# TRACEVFORK: a vfork child (posix_spawn, subprocess) shares the text; it is
# followed until its exec or exit (see _Thread.child_of)
PTRACE_O_TRACEVFORK = 0x04
PTRACE_EVENT_VFORK = 2
_OPTIONS = P.PTRACE_O_TRACECLONE | P.PTRACE_O_TRACEEXIT | P.PTRACE_O_TRACEEXEC | 0x01 \
    | _fork.PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK
_GROUP_STOP_SIGS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

# thread states; _VFORK: a thread that vforked, kept in its PTRACE_EVENT_VFORK
# stop until its child has exec'd or exited (see _Thread.child_of)
_RUN, _HELD, _PARK, _LISTEN, _VFORK = "run", "held", "park", "listen", "vfork"


class LiveStats:
    """What the machine did (the core keeps its own ``TextPoke.stats``)."""

    # counters, each 0 unless given (a slotted dataclass, written out: the
    # dataclass machinery cost a millisecond of every command's start)
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

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.as_dict() == other.as_dict()    # type: ignore[attr-defined]

    __hash__ = None                                  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "LiveStats(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


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


_WNOWAIT = 0x01000000
_PTRACE_SETSIGINFO = 0x4203

#: test-only: called with ("peek" | "marked" | "rewound" | "reaped", tid) at
#: the steps of a trap's rewind before its stop is reaped (see _Tracer._reap);
#: the tests kill the patcher there
_test_hook = None


def _peek(tid: int, info: P.SigInfo) -> int:
    """``waitid(WNOHANG|WNOWAIT)``: what the thread reports, left unreaped."""
    info.si_pid = 0
    r = P._waitid(P.P_PID, tid, ctypes.addressof(info),
                  P.WEXITED | P.WSTOPPED | P.__WALL | P.WNOHANG | _WNOWAIT)
    return -ctypes.get_errno() if r < 0 else 0


def _in_vfork_wait(pid: int, tid: int) -> bool:
    """Thread *tid* sleeps in the kernel's wait for its vfork child."""
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan", "rb") as f:
            return f.read() in (b"kernel_clone", b"wait_for_vfork_done")
    except OSError:
        return False


class _Tracer:
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

    # ------------------------------------------------------------- children
    # A vfork child runs on the parent's memory, text included, until it
    # execs or exits: it can reach an INT3 of a batch in flight, a site
    # being switched back, a trampoline being freed.  Not traced, it met
    # them alone (posix_spawn's child resets every signal handler, the
    # guard's included, so an INT3 killed it).  So it is traced
    # (PTRACE_O_TRACEVFORK: the kernel attaches it, stopped before its
    # first instruction) and is one more thread of the table -- synced,
    # held, its traps handled -- until its exec or exit stop, where it is
    # detached.  Its parent is kept in its PTRACE_EVENT_VFORK stop
    # meanwhile (_VFORK): resumed, it would sleep in the kernel until the
    # child is done (a killable wait: no interrupt stop until then), and
    # a sync waiting for that stop would wait on the child; kept in the
    # event stop it is a thread in the kernel that returns only through
    # it, which is all a sync asks.  If the patcher dies there, the
    # kernel resumes it into that wait (an event stop delivers no signal).

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

    def _drain(self) -> None:
        """Handle a status a previous wait reaped but could not handle."""
        si = self._si
        if si.si_pid:
            pid, code, status = si.si_pid, si.si_code, si.si_status
            si.si_pid = 0
            self._handle(pid, code, status)

    # ------------------------------------------------------------- rewind
    # A thread's SIGTRAP stop at one of our INT3s, once reaped, has lost its
    # signal: a patcher killed from then on has the kernel resume the thread
    # with none, wherever its rip points -- at site+1, the middle of an
    # instruction, until the trap handling has put it back.  Not yet reaped,
    # the stop still holds the SIGTRAP, and the kernel delivers it when the
    # tracer dies (with the siginfo as PTRACE_SETSIGINFO last left it): the
    # guard (._guard) takes it.  So while the guard is in the target the
    # stop is peeked first (WNOWAIT), the thread rewound while the stop
    # still holds its signal, and only then reaped:
    #   peeked        -> SIGTRAP delivered, rip = site+1: the guard sets it
    #                    to rip-1, the site
    #   siginfo marked -> si_addr = the site (an INT3's own is 0): the guard
    #                    sets rip to it, whether or not rip is rewound yet
    #   rip = site    -> the same, rip unchanged
    #   reaped        -> no signal; the thread runs the site again: the INT3
    #                    again (the guard, as for any trap) or the bytes put
    #                    back whole
    # The trap chain gets the registers as they were at the trap.
    # Not for a vfork child (posix_spawn resets every handler, the guard's
    # too: a SIGTRAP delivered to it kills it): its stop is reaped first.

    def _rewinds_early(self) -> bool:
        """The guard is installed and is this version's (it reads the
        rewound site from si_addr; one adopted from an older patcher may not)."""
        g = self._guard
        if not g or not g.get("installed") or g.get("restored") or self.journal is None:
            return False
        base = g["base"]
        if self.__dict__.get("_guard_checked") != base:
            from . import _guard as G
            try:
                ok = self._mem.read(base, len(G.CODE)) == G.CODE
            except OSError:
                ok = False
            self._guard_checked, self._guard_marks = base, ok
        return self._guard_marks

    def _rewind_unreaped(self, tid: int) -> None:
        """*tid* sits, unreaped, in a SIGTRAP stop: if it trapped on an INT3
        of ours that the guard knows, mark its siginfo with the site and put
        its rip there (see above); the registers and siginfo at the trap are
        kept for the trap handling (:meth:`_Traps._sigtrap_stop`)."""
        pre = self.__dict__.setdefault("_prerewound", {})
        t = self._threads.get(tid)
        if tid in pre or t is None or t.child_of:
            return
        try:
            regs = P.getregs(tid, P.UserRegs())
            site = regs.rip - 1
            # an INT3 the guard knows: a batch's, or a client's it was told
            # of (kprobes: Machine.guard_int3_sites)
            if str(site) not in self.journal.data["sites"]:
                return
            if site not in self._int3_sites:
                try:
                    if self.text_read(site, 1)[0] != 0xCC:
                        return
                except Exception:
                    return
            si = P.getsiginfo(tid)
            if si.si_signo != signal.SIGTRAP or si.si_code != P.SI_KERNEL \
                    or si.si_pid or si.si_uid:
                return
            if _test_hook is not None:
                _test_hook("peek", tid)
            mark = P.SigInfo.from_buffer_copy(si)
            mark.si_pid, mark.si_uid = site & 0xFFFFFFFF, site >> 32
            P.ptrace(_PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(mark))
            pre[tid] = (P.UserRegs.from_buffer_copy(regs), si)
            if _test_hook is not None:
                _test_hook("marked", tid)
            at = P.UserRegs.from_buffer_copy(regs)
            at.rip = site
            P.setregs(tid, at)
        except OSError:
            return                  # gone from its stop: the reap says how
        if _test_hook is not None:
            _test_hook("rewound", tid)

    def _reap(self, tid: int, info: P.SigInfo) -> int:
        """``waitid(WNOHANG)`` on *tid*; a SIGTRAP stop is rewound before it
        is reaped while the guard is in the target (see above)."""
        if not self._rewinds_early():
            return P.waitid(tid, info, False)
        r = _peek(tid, info)
        if r < 0 or not info.si_pid:
            return r
        if info.si_code == P.CLD_TRAPPED and info.si_status == signal.SIGTRAP:
            self._rewind_unreaped(tid)
        r = P.waitid(tid, info, False)
        pre = self.__dict__.get("_prerewound")
        if pre and tid in pre:
            if r < 0 or not info.si_pid:
                return r            # (reaped by the next call: still the same stop)
            if info.si_code != P.CLD_TRAPPED or info.si_status != signal.SIGTRAP:
                del pre[tid]        # not that stop any more (killed meanwhile)
            elif _test_hook is not None:
                _test_hook("reaped", tid)
        return r

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


