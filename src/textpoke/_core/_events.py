# SPDX-License-Identifier: GPL-2.0-only
"""The poke event log: the role ``perf_event_text_poke`` plays in the kernel.

Every write to text is recorded (address, old bytes, new bytes, phase,
time), and the batch also records one ``"batch"`` event per site at the
moment the kernel emits its perf event: after the tail is written, while
only INT3 is visible, so that a trace decoder can switch from old to new
code at that timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = ["TextPokeEvent", "TextPokeEventLog", "PHASES"]

#: int3/tail/first: the three writes of the batch protocol;
#: batch: the per-site record (old and new whole instruction);
#: poke/kgdb/copy/set/early: the single-threaded APIs.
PHASES = ("int3", "tail", "first", "batch", "poke", "kgdb", "copy", "set", "early")


@dataclass(frozen=True, slots=True)
class TextPokeEvent:
    addr: int
    old: bytes
    new: bytes
    phase: str
    time: float
    seq: int

    def as_dict(self) -> dict:
        return {"addr": self.addr, "old": self.old.hex(), "new": self.new.hex(),
                "phase": self.phase, "time": self.time, "seq": self.seq}


class TextPokeEventLog:
    """An append-only, bounded log with listeners."""

    def __init__(self, maxlen: int | None = 100_000) -> None:
        self._events: list[TextPokeEvent] = []
        self._maxlen = maxlen
        self._seq = 0
        self._listeners: list[Callable[[TextPokeEvent], None]] = []
        self.counts: dict[str, int] = {p: 0 for p in PHASES}

    def record(self, addr: int, old: bytes, new: bytes, phase: str, time: float) -> None:
        ev = TextPokeEvent(addr, bytes(old), bytes(new), phase, time, self._seq)
        self._seq += 1
        self.counts[phase] = self.counts.get(phase, 0) + 1
        if self._maxlen is not None and len(self._events) >= self._maxlen:
            del self._events[: self._maxlen // 2]
        self._events.append(ev)
        for fn in self._listeners:
            fn(ev)

    def subscribe(self, fn: Callable[[TextPokeEvent], None]) -> None:
        self._listeners.append(fn)

    def unsubscribe(self, fn: Callable[[TextPokeEvent], None]) -> None:
        self._listeners.remove(fn)

    def __iter__(self) -> Iterator[TextPokeEvent]:
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def clear(self) -> None:
        self._events.clear()
