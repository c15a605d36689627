# SPDX-License-Identifier: GPL-2.0-only
"""The poke event log: the role ``perf_event_text_poke`` plays in the kernel.

Every write to text is recorded (address, old bytes, new bytes, phase,
time).  The batch also records one ``"batch"`` event per site at the moment
the kernel emits its perf event -- after the tail is written, while only
INT3 is visible -- so that a trace decoder can switch from old to new code
at that timestamp; and when a batch is rolled back, one ``"rollback"`` event
per site takes the site back from new to old.  Replaying the log's
``batch``/``rollback``/single-poke events in order therefore gives the text
as it is.

The log is a ring of :data:`DEFAULT_CAPACITY` events (a parameter).  When
it is full the oldest event is overwritten and :attr:`TextPokeEventLog.lost`
counts it, as perf reports lost records -- nothing disappears silently.
Listeners see every event, lost or not.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, NamedTuple

__all__ = ["TextPokeEvent", "TextPokeEventLog", "PHASES", "DEFAULT_CAPACITY"]

#: int3/tail/first: the three writes of the batch protocol;
#: batch: the per-site record (old and new whole instruction);
#: rollback: a site of a failed or cancelled batch put back (new -> old);
#: poke/kgdb/copy/set/early: the single-threaded APIs.
PHASES = ("int3", "tail", "first", "batch", "rollback", "poke", "kgdb", "copy", "set", "early")

#: Events kept by default (the newest); older ones are counted in ``lost``.
DEFAULT_CAPACITY = 65_536


class TextPokeEvent(NamedTuple):
    addr: int
    old: bytes
    new: bytes
    phase: str
    time: float
    seq: int

    def as_dict(self) -> dict:
        return {"addr": self.addr, "old": self.old.hex(), "new": self.new.hex(),
                "phase": self.phase, "time": self.time, "seq": self.seq}


_make = TextPokeEvent._make


class TextPokeEventLog:
    """A bounded ring of events with a lost-event counter and listeners."""

    def __init__(self, capacity: int | None = DEFAULT_CAPACITY) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"event log capacity must be >= 1 or None, not {capacity}")
        self.capacity = capacity
        self._events: deque[tuple] = deque(maxlen=capacity)
        self._seq = 0
        self._listeners: list[Callable[[TextPokeEvent], None]] = []
        self.counts: dict[str, int] = dict.fromkeys(PHASES, 0)

    @property
    def lost(self) -> int:
        """Events overwritten because the ring was full (or cleared)."""
        return self._seq - len(self._events)

    @property
    def total(self) -> int:
        """Events ever recorded."""
        return self._seq

    def record(self, addr: int, old: bytes, new: bytes, phase: str, time: float) -> None:
        # Kept as a plain tuple (cheap: this is per write of every batch);
        # made a TextPokeEvent when someone looks.
        ev = (addr, old, new, phase, time, self._seq)
        self._seq += 1
        self.counts[phase] += 1
        self._events.append(ev)
        if self._listeners:
            event = _make(ev)
            for fn in self._listeners:
                fn(event)

    def subscribe(self, fn: Callable[[TextPokeEvent], None]) -> None:
        self._listeners.append(fn)

    def unsubscribe(self, fn: Callable[[TextPokeEvent], None]) -> None:
        self._listeners.remove(fn)

    def __iter__(self) -> Iterator[TextPokeEvent]:
        return map(_make, tuple(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def clear(self) -> None:
        """Forget the kept events (they count as lost; counts stay)."""
        self._events.clear()
