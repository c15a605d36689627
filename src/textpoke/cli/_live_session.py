# SPDX-License-Identifier: GPL-2.0-only
"""The run loop that ``live probe`` and ``live trace`` share: arm, pump
slices until the command's own end (a cap, a duration) or the process's,
turn SIGINT/SIGTERM into a partial report, close whatever happened.

The CLI contract lives here once:

* a :class:`~textpoke._errors.TextPokeError` while arming or pumping is
  recorded (``err``), anything else is a bug and propagates;
* SIGINT/SIGTERM (``KeyboardInterrupt``/``Terminated``) ends the loop and
  is remembered for the exit status (130/143);
* the close runs to its end with signals only recorded
  (:func:`._signals.reporting`), and a close that fails because the
  process went away is described by the command's *fallback*;
* :meth:`Session.refuse` turns an error raised before anything stayed
  written into a one-line refusal (exit 2), :meth:`Session.status` gives
  0/1, or 130/143 whenever a signal arrived.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ._args import UsageError
from ._signals import Terminated, arrived, exit_status, reporting, status_for

__all__ = ["Session", "run_session"]


@dataclass
class Session:
    pid: int
    t0: float = field(default_factory=time.monotonic)
    interrupted: BaseException | None = None
    err: str | None = None
    left: dict = field(default_factory=dict)

    @property
    def was_interrupted(self) -> bool:
        """A signal ended the loop, or arrived while closing/reporting."""
        return self.interrupted is not None or arrived() is not None

    def seconds(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def refuse(self, gone: bool, nothing_written: bool) -> None:
        """An error before anything stayed written in a live process is a
        refusal: one line, exit 2."""
        if self.err is not None and not gone and nothing_written:
            raise UsageError(self.err.split(": ", 1)[1])

    def status(self, ok: bool) -> int:
        if self.interrupted is not None:
            return exit_status(self.interrupted)
        return status_for(0 if ok and self.err is None else 1)


def run_session(target: Any, pid: int, *, arm: Callable[[], None],
                step: Callable[[], bool], fallback: Callable[[Exception], dict],
                alive: Callable[[int], bool]) -> Session:
    """Run *target* (an object with ``machine`` and ``close()``): *arm()*,
    then *step()* (one pump slice and its output; True when the command's
    own end is reached) until it says so or the process has no thread left
    or is gone; then ``target.close()`` (or *fallback(exc)* when the close
    fails) into :attr:`Session.left`."""
    s = Session(pid)
    try:
        arm()
        while True:
            done = step()
            if done or not target.machine.threads or not alive(pid):
                break
    except (KeyboardInterrupt, Terminated) as e:
        s.interrupted = e
    except Exception as e:
        from .._errors import TextPokeError
        if not isinstance(e, TextPokeError):
            raise
        s.err = f"{type(e).__name__}: {e}"
    finally:
        # the disarm runs to its end: a signal from now on is only recorded
        # (and still gives 130/143)
        reporting()
        try:
            s.left = target.close()
        except Exception as e:          # the process went away under us
            s.left = fallback(e)
    return s
