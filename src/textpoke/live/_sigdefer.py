# SPDX-License-Identifier: GPL-2.0-only
"""Signal deferral: while the live machine drives a task or detaches, the
signals that end a patcher (SIGINT, SIGTERM, ...) stay blocked except
while it waits for a thread, so their exception surfaces at a wait,
between two protocol steps, never inside the bookkeeping of a thread's
stop.  And the tracer-thread rule of ptrace.  A mixin of LiveMachine."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from .._errors import MachineError

_DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                       signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2})


class _SignalDeferral:
    """LiveMachine's signal deferral (a mixin)."""

    # ------------------------------------------------------------- signals
    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        if self._sigmask_depth:
            self._sigmask_depth += 1
            try:
                yield
            finally:
                self._sigmask_depth -= 1
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
        self._old_mask = old
        self._sigmask_depth = 1
        try:
            yield
        finally:
            self._sigmask_depth = 0
            self._old_mask = None
            signal.pthread_sigmask(signal.SIG_SETMASK, old)   # a pending signal raises here

    def _check_tracer(self) -> None:
        if threading.get_ident() != self._tracer:
            raise MachineError("a LiveMachine must be used from the thread that attached it "
                               "(ptrace requests come from the tracing thread only)")
