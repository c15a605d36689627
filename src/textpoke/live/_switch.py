# SPDX-License-Identifier: GPL-2.0-only
"""One batch of site writes on a live machine (``live toggle``, ``count``,
``recover``), in a module of its own: ``live toggle`` of a few fentry
sites imports this and the core, not the counting stubs or the relocator."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

__all__ = ["switch_sites"]

_NOP5 = b"\x0f\x1f\x44\x00\x00"


def switch_sites(machine, writes: Sequence[tuple[int, bytes]],
                 progress: Callable[[int, int], None] | None = None, *,
                 entries: Sequence = ()) -> dict:
    """Apply *writes* (address, new bytes) as ONE batch of the core on
    *machine*; return the core's stats.  The core finishes or rolls back
    the batch on any error or signal.

    New bytes that are not one instruction of their length (an ordinary
    entry's original first bytes, put back over the JMP into its stub) are
    emulated, while their site holds the INT3, as the JMP or CALL there now
    (the trampoline runs the same instructions).  *entries*: the
    :class:`EntrySite` among the sites switched to their JMP, whose tails
    are written only once no thread is inside (:func:`quiescent_tails`)."""
    from .._core._textpoke import TextPoke
    core = TextPoke(machine)
    if entries:      # the relocator and its decoder only when entries are switched
        from ._entry import quiescent_tails
    try:
        with quiescent_tails(machine, entries) if entries else contextlib.nullcontext():
            with core.batch():
                n = len(writes)
                for i, (addr, new) in enumerate(writes):
                    core.smp_text_poke_batch_add(addr, new, emulate=_emulate_for(machine, addr, new))
                    if progress and (i % 256 == 0 or i + 1 == n):
                        progress(i + 1, n)
        return core.stats.as_dict()
    finally:
        core.close()


def _emulate_for(m, addr: int, new: bytes) -> bytes | None:
    """None (emulate the new instruction: a CALL, JMP or NOP5) unless *new*
    is anything else -- an ordinary entry's original bytes, which the core
    cannot emulate: then the CALL/JMP rel32 the site holds now (its
    trampoline runs those same instructions)."""
    if new[:1] in (b"\xe8", b"\xe9") or new == _NOP5 or len(new) != 5:
        return None
    cur = m.text_read(addr, 5)
    return cur if cur[:1] in (b"\xe8", b"\xe9") else None
