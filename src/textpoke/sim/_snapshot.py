# SPDX-License-Identifier: GPL-2.0-only
"""Reusing a booted sim machine: :meth:`snapshot` takes the machine as it
is (no CPU started, nothing scheduled), :meth:`restore` brings it back to
exactly that state under a new seed, so the next run behaves as on a
machine created afresh with that seed -- without creating the Unicorn
engines again, and keeping their translation caches warm.

What a restore puts back: every data region's bytes; the text pages
written since the snapshot, in memory and in every CPU's view (and the
translations made from them are dropped); every vCPU's registers
(Unicorn's context), state and counters; the scheduler (steps, seed, rng,
tasks, oopses, trace); the trap chain, CPU listeners and owner.  A machine
whose shape changed (a CPU plugged or unplugged, a data region added) is
refused: create a new one.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass
from typing import Any

from .._errors import MachineError
from ._rng import CountingRandom
from ._ucfast import changed_span, fast_cpu
from ._vcpu import IDLE, _close_quietly

__all__ = ["SimSnapshot"]

#: restore compares and puts back text in spans of this many bytes
_SPAN = 64


@dataclass(slots=True)
class SimSnapshot:
    text: list[bytes]
    data: list[bytes]
    contexts: list[Any]
    nvcpus: int
    hooks: list[int]
    trap_handles: list
    trap_seq: int
    listeners: list
    owner: Any
    smp_started: bool
    preempt_addr: int | None


class _Snapshots:
    """SimMachine's reuse half (a mixin)."""

    _dirty: set[tuple[int, int]] | None = None

    def _mark_dirty(self, idx: int, off: int, n: int) -> None:
        """Text [off, off+n) of region idx was written: restore puts back the
        64-byte spans it touched (a view can differ from the snapshot only
        there: it is refilled from memory, or written with it)."""
        d = self._dirty
        if d is not None and n > 0:
            for span in range(off // _SPAN, (off + n - 1) // _SPAN + 1):
                d.add((idx, span))

    def snapshot(self) -> SimSnapshot:
        """The machine as it is now, for :meth:`restore`: only before any CPU
        started, with no task, trap or oops in flight."""
        self._check_open()
        if self.smp_started or self._tasks or self.oopses or self.steps:
            raise MachineError("a snapshot is taken before anything ran")
        seq = next(self._trap_seq)
        self._trap_seq = itertools.count(seq)
        snap = SimSnapshot(
            text=[r.mv.tobytes() for r in self._text],
            data=[r.mv.tobytes() for r in self._data],
            contexts=[c.uc.context_save() if c.uc is not None else None for c in self.vcpus],
            nvcpus=len(self.vcpus), hooks=[len(c._hooks) for c in self.vcpus],
            trap_handles=list(self._trap_handles), trap_seq=seq,
            listeners=list(self._cpu_listeners), owner=self.owner,
            smp_started=self.smp_started, preempt_addr=self.preempt_addr)
        self._dirty = set()
        return snap

    def restore(self, snap: SimSnapshot, *, seed: int, trace: bool = False,
                flush_translations: bool = False) -> None:
        """Back to *snap*, as a machine created with *seed* (and *trace*).

        Translations stay cached across restores (those of changed text are
        dropped), but an engine never reclaims the space of dropped ones
        until its buffer is full: *flush_translations* empties it, which a
        long-lived machine should do now and then to keep its memory flat."""
        self._check_open()
        if (len(self.vcpus) != snap.nvcpus or len(self._online) != snap.nvcpus
                or len(self._data) != len(snap.data) or self._dirty is None
                or [len(c._hooks) for c in self.vcpus] != snap.hooks):
            raise MachineError("the machine changed shape since its snapshot; create a new one")
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            _close_quietly(t.gen)
        for c in self.vcpus:
            task, c.trap_task, c.trap_regs = c.trap_task, None, None
            if task is not None:
                _close_quietly(task)
        # text: the spans written since, in memory and in every view; a
        # view's translations are dropped only for the spans that differ
        views = [(c, c.views) for c in self.vcpus]
        for idx, span in sorted(self._dirty):
            r = self._text[idx]
            lo = span * _SPAN
            hi = min(lo + _SPAN, r.size)
            old = snap.text[idx][lo:hi]
            r.mv[lo:hi] = old
            for c, vs in views:
                at = ctypes.addressof(vs[idx]) + lo
                a, b = changed_span(ctypes.string_at(at, hi - lo), old)
                if b:
                    # translations over the bytes that differ, no more
                    ctypes.memmove(at + a, old[a:b], b - a)
                    fast_cpu(c).remove_cache(r.start + lo + a, r.start + lo + b)
        self._dirty = set()
        for r, b in zip(self._data, snap.data):
            r.mv[:] = b
        for c, ctx in zip(self.vcpus, snap.contexts):
            if flush_translations:
                c.uc.ctl_flush_tb()
            c.uc.context_restore(ctx)
            c.state = IDLE
            c.stale = set()
            c.ipis = []
            c.pending_intr = None
            c.fault = None
            c.instructions = c.slices = c.traps = c.ipis_taken = c.refreshes = 0
        self._trap_handles[:] = snap.trap_handles
        for h in snap.trap_handles:
            h.active = True
        self._rebuild_chain()
        self._trap_seq = itertools.count(snap.trap_seq)
        self._cpu_listeners[:] = snap.listeners
        self.owner = snap.owner
        self.seed = seed
        self.rng = CountingRandom(seed)
        self._int3_pokes = set()
        self.steps = 0
        self.oopses = []
        self.trace = [] if trace else None
        self.smp_started = snap.smp_started
        self.preempt_addr = snap.preempt_addr
        self.ipi_broadcasts = 0
        self._last_text = (0, self._text[0])
