# SPDX-License-Identifier: GPL-2.0-only
"""The batch's data: ``struct smp_text_poke_loc``, ``text_poke_array``,
``text_mutex``, the protocol's steps and the statistics -- what the kernel
keeps in alternative.c's statics, as types."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from .._errors import TextMutexError
from ._machine import PAGE_SIZE

__all__ = [
    "SMP_TEXT_POKE_LOC_SIZE", "TEXT_POKE_ARRAY_MAX", "MUTATIONS", "Protocol", "TextMutex",
    "SmpTextPokeLoc", "TextPokeArray", "TextPokeStats",
]

#: One page of 16-byte entries, as in the kernel.
SMP_TEXT_POKE_LOC_SIZE = 16
TEXT_POKE_ARRAY_MAX = PAGE_SIZE // SMP_TEXT_POKE_LOC_SIZE

#: The protocol steps ``verify`` can remove, to show that each one matters:
#: mutation name -> what it removes.
MUTATIONS: dict[str, str] = {
    "no-sync-1": "the sync after writing INT3",
    "no-sync-2": "the sync after writing the tails",
    "no-sync-3": "the sync after writing the first bytes",
    "no-refs-wait": "waiting for text_poke_array_refs to drop",
    "unordered": "keeping the array sorted (entries are appended as they come)",
}

_S32_MIN, _S32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class Protocol:
    """The steps of the batch protocol, decided once when a TextPoke is
    made: every flag is True for the real protocol.  ``order`` is how the
    array stays sorted for the handler's bisection: ``"insert"`` (default:
    each entry inserted in place), ``"flush"`` (the kernel: flush the batch
    when an address arrives out of order) or ``"append"`` (the
    ``unordered`` mutation: nothing keeps it sorted)."""

    sync_after_int3: bool = True
    sync_after_tails: bool = True
    sync_after_first: bool = True
    wait_refs: bool = True
    order: str = "insert"

    @classmethod
    def build(cls, *, keep_sorted: bool = True, mutations: Iterable[str] = ()) -> "Protocol":
        muts = frozenset(mutations)
        bad = muts - MUTATIONS.keys()
        if bad:
            raise ValueError(f"unknown mutation(s) {sorted(bad)}; known: {', '.join(MUTATIONS)}")
        order = "append" if "unordered" in muts else ("insert" if keep_sorted else "flush")
        return cls("no-sync-1" not in muts, "no-sync-2" not in muts, "no-sync-3" not in muts,
                   "no-refs-wait" not in muts, order)

    @property
    def mutations(self) -> frozenset[str]:
        """The mutation names this protocol corresponds to."""
        out = set()
        for flag, name in ((self.sync_after_int3, "no-sync-1"), (self.sync_after_tails, "no-sync-2"),
                           (self.sync_after_first, "no-sync-3"), (self.wait_refs, "no-refs-wait")):
            if not flag:
                out.add(name)
        if self.order == "append":
            out.add("unordered")
        return frozenset(out)


class TextMutex:
    """``text_mutex``: a re-entrant lock that knows its owner, so that the
    places the kernel asserts it with lockdep can refuse to run without it.

    Entries queued for the batch belong to the critical section that queued
    them.  Releasing the mutex for the last time with entries still queued
    drops them (they were never written: the text is untouched) and is an
    error: ``release()`` raises :class:`TextMutexError` after releasing;
    leaving a ``with`` block that is already propagating an exception adds
    a note to that exception instead.  So a failed add can never be applied
    later by an unrelated batch."""

    def __init__(self, on_last_release: "Callable[[], int] | None" = None) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0
        self._on_last_release = on_last_release

    def acquire(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1

    def _release(self) -> int:
        if self._owner != threading.get_ident():
            raise TextMutexError("text_mutex released by a thread that does not hold it")
        dropped = 0
        if self._depth == 1 and self._on_last_release is not None:
            dropped = self._on_last_release()
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()
        return dropped

    def release(self) -> None:
        dropped = self._release()
        if dropped:
            raise TextMutexError(_dropped_message(dropped))

    def __enter__(self) -> "TextMutex":
        self.acquire()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        dropped = self._release()
        if dropped:
            if exc is None:
                raise TextMutexError(_dropped_message(dropped))
            exc.add_note(_dropped_message(dropped))

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    def assert_held(self, what: str) -> None:
        if self._owner != threading.get_ident():
            raise TextMutexError(f"{what}() must be called with text_mutex held")


def _dropped_message(n: int) -> str:
    return (f"text_mutex released with {n} batch entr{'y' if n == 1 else 'ies'} queued and not "
            "finished; dropped (the text is untouched). Finish the batch "
            "(smp_text_poke_batch_finish) before releasing, or use core.batch()")


@dataclass(slots=True)
class SmpTextPokeLoc:
    """``struct smp_text_poke_loc`` -- one site of a batch (``tpl``)."""

    rel_addr: int           # s32, relative to _stext
    disp: int               # s32 branch displacement to emulate
    len: int                # 1..5, or 6 for Jcc.d32
    opcode: int             # the instruction to emulate; Jcc.d32 mapped to Jcc.d8
    text: bytes             # new bytes (for len 6: bytes 1..5; byte 0 is 0x0F)
    old: int = 0            # the first byte the INT3 replaced

    def new_bytes(self) -> bytes:
        if self.len == 6:
            return b"\x0f" + self.text
        return self.text[: self.len]


class TextPokeArray:
    """``text_poke_array``: the pending batch, kept sorted by address."""

    def __init__(self) -> None:
        self.vec: list[SmpTextPokeLoc] = []

    @property
    def nr_entries(self) -> int:
        return len(self.vec)


@dataclass(slots=True)
class TextPokeStats:
    syncs: int = 0
    batches: int = 0
    sites: int = 0
    int3_hits: int = 0
    int3_emulated: int = 0
    int3_passed_on: int = 0
    flushes_full: int = 0
    flushes_unordered: int = 0
    rollbacks: int = 0
    recoveries: int = 0
    finished_forward: int = 0
    dropped: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


