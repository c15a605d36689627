# SPDX-License-Identifier: GPL-2.0-only
"""Detaching from a live process: settle every thread's stops, let a
thread with our SIGTRAP still queued take it while we trace it, resume
parked threads at their sites, remove the guard, detach every thread and
any straggler.  A mixin of LiveMachine."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from .._errors import MachineError
from . import _ptrace as P
from ._errors import NoSuchProcess
from ._process import list_tids, ppid_of, state_of, tracer_of
from ._thread import _HELD


class _Detach:
    """LiveMachine's detach (a mixin)."""

    # ------------------------------------------------------------- lifetime
    def _release(self) -> None:
        try:
            with self._signals_deferred():
                try:
                    if self._regions and self._threads and not self._exec_seen:
                        with contextlib.suppress(OSError, MachineError):
                            self._free_regions()
                    if self._guard is not None and self._threads and not self._exec_seen:
                        with contextlib.suppress(OSError, MachineError):
                            self.guard_kept = self._guard_remove()
                    if self.journal is not None:
                        if self._exec_seen:
                            self.journal.remove()     # that text is gone with the old program
                        elif not self.journal.empty() and self._target_gone():
                            self.journal.remove()     # died meanwhile: nothing to recover
                        else:
                            self.journal.close()
                finally:
                    self._detach_all()
        finally:
            self._ident.close()
            if self._mem is not None:
                self._mem.close()
            self._pages.clear()

    def _detach_all(self) -> None:
        """Stop every thread, settle what it reports, and detach it; a thread
        with our SIGTRAP still queued takes it first (handled here)."""
        if not self._threads and not self._exiting:
            return
        with contextlib.suppress(OSError, MachineError):
            self._drain()
        with contextlib.suppress(OSError, MachineError):
            self._unpark_ready(all_=True)
        for _round in range(8):
            self._hold_all_quietly()
            with contextlib.suppress(OSError, MachineError):
                self._unpark_ready(all_=True)       # held now, back at their sites
            again = False
            for tid, t in list(self._threads.items()):
                if t.state != _HELD:
                    continue
                try:
                    pend = P.peek_pending(tid)
                except OSError:
                    pend = []
                if any(s.si_signo == signal.SIGTRAP and s.si_code == P.SI_KERNEL for s in pend):
                    # let it take the queued SIGTRAP while we still trace it
                    sig, t.hold_sig = t.hold_sig, 0
                    self._resume_keep_hold(t, sig)
                    again = True
            if not again:
                break
        for tid, t in list(self._threads.items()):
            try:
                P.detach(tid, max(t.hold_sig, 0) if t.state == _HELD else 0)
            except OSError:
                pass
        self._threads.clear()
        self._detach_stragglers()
        self._detach_children()
        leader_parent = ppid_of(self.pid)
        for tid in list(self._exiting):
            if tid == self.pid and leader_parent == os.getpid():
                continue               # our own child: its parent (us) reaps it, not the tracer
            si = P.SigInfo()
            P.waitid(tid, si, False)
        self._exiting.clear()

    def _detach_stragglers(self) -> None:
        """Let go of threads still traced by us that the table no longer
        holds: one born (and attached by the kernel, TRACECLONE) while the
        others were being detached, or one whose PTRACE_DETACH failed
        because it was not in a ptrace-stop yet.  Left traced, such a thread
        stays stopped for a tracer that no longer waits for it, and its
        process cannot be reaped until the tracer exits (seen on a loaded
        box: a churning target hung its parent's wait())."""
        me = threading.get_native_id()
        deadline = time.monotonic() + 2.0       # never block a close on a dying process
        while time.monotonic() < deadline:
            # a zombie thread is the exit path's business (below), not ours
            try:
                tids = list_tids(self.pid)
            except NoSuchProcess:
                return
            left = [tid for tid in tids
                    if tracer_of(tid) == me and state_of(self.pid, tid) not in ("Z", "X")]
            if not left:
                return
            for tid in left:
                try:
                    P.detach(tid, 0)          # already in a ptrace-stop
                    continue
                except OSError:
                    pass
                # running or not stopped yet: stop it (a newborn reports its
                # first stop anyway), collect that stop without blocking
                with contextlib.suppress(OSError):
                    P.interrupt(tid)
                si = P.SigInfo()
                P.waitid(tid, si, False)
                with contextlib.suppress(OSError):
                    P.detach(tid, 0)
            time.sleep(0.001)
