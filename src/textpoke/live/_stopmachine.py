# SPDX-License-Identifier: GPL-2.0-only
"""Stop-machine on a live process: hold every thread in a ptrace-stop,
step any thread out of a range about to be written, write, let them all
go; and :meth:`stopped` for callers that need a quiet process (injected
system calls, register reads).  A mixin of LiveMachine."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

from .._errors import MachineError
from . import _ptrace as P
from ._thread import _HELD, _LISTEN, _RUN


class _StopMachine:
    """LiveMachine's stop-machine (a mixin)."""

    # ------------------------------------------------------------- stop-machine
    def _hold_all(self) -> None:
        """Stop every thread and keep it stopped (``stopped()``)."""
        self._unpark_ready()
        self._holding = True
        pending = {}
        for tid, t in list(self._threads.items()):
            t.want_hold = True
            if t.state == _RUN and self._interrupt(t):
                pending[tid] = t
            elif t.state == _LISTEN and self._interrupt(t):
                pending[tid] = t
        try:
            for tid, t in pending.items():
                while self._threads.get(tid) is t and t.state in (_RUN, _LISTEN):
                    self._wait(tid, True)
        except BaseException:
            self._release_held()
            raise

    def _release_held(self) -> None:
        self._holding = False
        for tid, t in list(self._threads.items()):
            t.want_hold = False
            if t.state == _HELD:
                sig, t.hold_sig = t.hold_sig, 0
                if sig < 0:
                    try:
                        P.listen(tid)
                        t.state = _LISTEN
                    except OSError:
                        self._vanished(tid)
                else:
                    self._resume(t, sig)

    def _step_out_of(self, runs: list[tuple[int, bytearray]]) -> None:
        """Get every held thread out of the ranges (strictly inside one) by
        letting it run a moment and stopping it again -- never by a single
        step: the kernel does not clear the trap flag (nor the syscall-exit
        trap) when the tracer dies, and a thread left in a step's SIGTRAP
        stop gets that SIGTRAP delivered, so a patcher SIGKILLed around a
        step killed the target.  A thread run out is stopped again by an
        interrupt (an event stop, nothing pending); a signal it was held
        with stays held, to be delivered when it is let go."""
        def inside(tid: int) -> bool:
            rip = P.getregs(tid, self._regs).rip
            return any(s < rip < s + len(b) for s, b in runs)

        nap = 50e-6
        for _ in range(64):
            out = [t for tid, t in list(self._threads.items())
                   if t.state == _HELD and inside(tid)]
            if not out:
                return
            kept = {}
            for t in out:
                if t.hold_sig < 0:          # group-stopped: it cannot run now
                    continue
                kept[t.tid], t.hold_sig = t.hold_sig, 0
                self._resume(t, 0)
            time.sleep(nap)
            nap = min(nap * 2, 5e-3)
            for tid, sig in kept.items():
                t = self._threads.get(tid)
                if t is None:
                    continue
                if t.state == _RUN and not t.pending_int:
                    self._interrupt(t)
                while self._threads.get(tid) is t and t.state == _RUN:
                    self._wait(tid, True)
                if sig and self._threads.get(tid) is t:
                    if t.state == _HELD and t.hold_sig == 0:
                        t.hold_sig = sig
                    else:                   # a second signal came: queue the first again
                        from ._inject import _tgkill
                        with contextlib.suppress(OSError):
                            _tgkill(self.pid, tid, sig)
        stuck = [tid for tid, t in self._threads.items() if t.state == _HELD and inside(tid)]
        if stuck:
            raise MachineError(f"thread {stuck[0]} stays inside a range being written")

    def step_out_of_range(self, lo: int, hi: int) -> None:
        """Get every held thread whose RIP is in [lo, hi) out of it (inside
        :meth:`stopped`): run a moment and stopped again, see :meth:`_step_out_of`."""
        self._step_out_of([(lo - 1, bytearray(hi - lo + 1))])

    @contextlib.contextmanager
    def stopped(self) -> Iterator[list[int]]:
        """Hold every thread stopped for the duration (for code that must
        see or change a quiet process: injected syscalls, register reads).
        Yields the thread ids held."""
        self._check_open()
        self._check_tracer()
        with self._signals_deferred():
            self._hold_all()
            try:
                # a vfork child last: callers inject into the first that works
                yield sorted((tid for tid, t in self._threads.items() if t.state == _HELD),
                             key=lambda tid: self._threads[tid].child_of != 0)
            finally:
                self._release_held()

    def get_regs(self, tid: int) -> P.UserRegs:
        """A copy of a stopped thread's registers (see :meth:`stopped`)."""
        return P.UserRegs.from_buffer_copy(P.getregs(tid, P.UserRegs()))

    def set_regs(self, tid: int, regs: P.UserRegs) -> None:
        P.setregs(tid, regs)


    def write_stopped(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write with every thread stopped and none strictly inside a
        range written (stepped out first): for putting back whole what a
        dead patcher left (``live recover``)."""
        self._check_write()
        self._check_tracer()
        # one run per write (never merged: a thread may run the code between
        # two sites, it must only not stand strictly inside one)
        runs = [r for w in writes for r in self._runs((w,))]
        with self._signals_deferred():
            self._hold_all()
            try:
                self._step_out_of(runs)
                self._write_runs(runs)
            finally:
                self._release_held()


    def _hold_all_quietly(self) -> None:
        with contextlib.suppress(MachineError):
            self._hold_all()
