# SPDX-License-Identifier: GPL-2.0-only
"""The SMP batch: entries queued (``smp_text_poke_batch_add``, kept in
address order) and the protocol that applies them (INT3 -> sync -> tails
-> sync -> first bytes -> sync -> drop references).  A part of
:class:`~textpoke._core._textpoke.TextPoke` (its state and the INT3
handler that reads this batch live there); what happens when a batch is
cut short is :mod:`._recovery`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from .._errors import OverlapError, VerifyMismatchError
from ._entries import make_loc, take_bytes
from ._insn import INT3_INSN_OPCODE
from ._machine import Task, WaitUntil
from ._types import SmpTextPokeLoc

if TYPE_CHECKING:
    from ._textpoke import TextPoke

__all__: list[str] = []


@dataclass(slots=True)
class _Inflight:
    """What a running batch has done so far: enough for anyone (the batch
    itself, a wrapper that caught an interrupt, ``close()``) to finish or
    roll it back by reading the text."""

    vec: list[SmpTextPokeLoc]
    olds: list[bytes] = field(default_factory=list)   # whole old insn per site touched
    phase: str = "refs"          # refs -> int3 -> tail -> first -> drop
    dropped: set[int] = field(default_factory=set)     # CPUs whose batch ref is put
    announced: int = 0           # sites whose "batch" event (old -> new) is in the log
    done: bool = False


_BYTE = tuple(bytes((i,)) for i in range(256))


class _Batch:
    """The SMP batch of :class:`TextPoke` (a mixin)."""

    # ------------------------------------------------------ queueing entries
    def _insert_index(self, rel: int) -> int:
        """Where an entry at *rel* goes in the (sorted) array."""
        vec = self.text_poke_array.vec
        lo, hi = 0, len(vec)
        while lo < hi:
            mid = (lo + hi) // 2
            if vec[mid].rel_addr < rel:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _prepare_add(self, addr: int, opcode: bytes, length: int | None,
                     emulate: bytes | None) -> tuple[SmpTextPokeLoc, bool]:
        """Check one site; say whether the batch must be flushed first."""
        self.text_mutex.assert_held("smp_text_poke_batch_add")
        data = take_bytes(opcode, length, "opcode")
        if emulate is not None:
            emulate = take_bytes(emulate, None, "emulate")
        tpl = make_loc(self.machine, self._stext, addr, data, len(data), emulate)
        arr = self.text_poke_array.vec
        flush = False
        if arr:
            if len(arr) >= self.array_max:
                self.stats.flushes_full += 1
                flush = True
            elif self.protocol.order == "flush" and arr[-1].rel_addr > tpl.rel_addr:
                self.stats.flushes_unordered += 1
                flush = True
        return tpl, flush

    def smp_text_poke_batch_add_task(self, addr: int, opcode: bytes, length: int | None = None,
                                     emulate: bytes | None = None) -> Task:
        """Queue one site; may first flush the batch (when full, or in
        kernel-order mode when *addr* is out of order)."""
        tpl, flush = self._prepare_add(addr, opcode, length, emulate)
        if flush:
            yield from self._batch_process()
        self._queue(tpl)

    def _queue(self, tpl: SmpTextPokeLoc) -> None:
        arr = self.text_poke_array.vec
        order = self.protocol.order
        rel, end = tpl.rel_addr, tpl.rel_addr + tpl.len
        if order == "append":
            i = len(arr)
            near = arr                  # unsorted: every entry may overlap
        elif not arr or arr[-1].rel_addr < rel:
            i = len(arr)                # in order (the common case): after the last
            near = arr[-1:]
        else:
            i = self._insert_index(rel)
            near = arr[max(0, i - 1):i + 1]   # sorted, disjoint: neighbours suffice
        for other in near:
            if other.rel_addr < end and rel < other.rel_addr + other.len:
                raise OverlapError(
                    f"site [{self.text_poke_addr(tpl):#x}, +{tpl.len}) overlaps queued site at "
                    f"{self.text_poke_addr(other):#x} (+{other.len})")
        arr.insert(i, tpl)

    def smp_text_poke_batch_finish_task(self) -> Task:
        if self.text_poke_array.vec:
            yield from self._batch_process()

    def smp_text_poke_single_task(self, addr: int, opcode: bytes, length: int | None = None,
                                  emulate: bytes | None = None) -> Task:
        yield from self.smp_text_poke_batch_add_task(addr, opcode, length, emulate)
        yield from self.smp_text_poke_batch_finish_task()

    def smp_text_poke_batch_add(self, addr: int, opcode: bytes, length: int | None = None,
                                emulate: bytes | None = None) -> None:
        """Queue *opcode* for *addr*.  While the site is in flux a CPU that
        reaches it emulates *emulate* (default: the new instruction)."""
        self._check_open()
        tpl, flush = self._prepare_add(addr, opcode, length, emulate)
        if flush:
            self._run(self._batch_process())
        self._queue(tpl)

    def smp_text_poke_batch_finish(self) -> None:
        """Apply every queued site with the INT3 protocol."""
        self._run(self.smp_text_poke_batch_finish_task())

    def smp_text_poke_single(self, addr: int, opcode: bytes, length: int | None = None,
                             emulate: bytes | None = None) -> None:
        """Patch one site now; any pending batch is applied with it."""
        self._run(self.smp_text_poke_single_task(addr, opcode, length, emulate))

    def smp_text_poke_sync_each_cpu(self) -> None:
        self._run(self._sync())

    def _sync(self) -> Task:
        self.stats.syncs += 1
        yield from self.machine.sync_each_cpu()

    @contextlib.contextmanager
    def batch(self) -> Iterator["TextPoke"]:
        """``with core.batch(): core.smp_text_poke_batch_add(...)`` -- takes
        text_mutex and finishes the batch on exit.

        If the block raises, the entries still queued are dropped (never
        written).  Entries that were already applied because the array
        filled up (every ``TEXT_POKE_ARRAY_MAX`` entries) or, with
        ``keep_sorted=False``, because an address came out of order, stay
        applied: each flush is a complete batch of its own."""
        with self.text_mutex:
            try:
                yield self
            except BaseException:
                n = len(self.text_poke_array.vec)
                self.text_poke_array.vec.clear()
                self.stats.dropped += n
                raise
            self.smp_text_poke_batch_finish()

    # ------------------------------------------------------ the batch protocol
    def _batch_process(self) -> Task:
        """INT3 -> sync -> tails -> sync -> first bytes -> sync -> drop refs.

        Whatever stops it part-way -- a machine failure, an interrupt thrown
        into the task, the task being closed -- the batch is finished or
        rolled back (whichever leaves no INT3 sooner) before the exception
        propagates, so no INT3 of ours and no half-written instruction is
        left, and no reference is forced below what running handlers hold."""
        self.text_mutex.assert_held("smp_text_poke_batch_process")
        vec = self.text_poke_array.vec
        st = _Inflight(vec)
        self._inflight = st
        refs = self.text_poke_array_refs
        stats = self.stats
        stats.batches += 1
        stats.sites += len(vec)
        if self.protocol.wait_refs:
            for cpu in self.machine.cpus:
                refs[cpu] = refs.get(cpu, 0) + 1
        else:                       # the kernel's atomic_set: only safe because it waits
            for cpu in self.machine.cpus:
                refs[cpu] = 1
        try:
            yield  # the refs are published before any INT3 can be seen
            yield from self._batch_steps(st)
            yield from self._batch_drop_refs(st, wait=self.protocol.wait_refs)
        except GeneratorExit:
            if not st.done:        # closed mid-batch: it cannot yield any more
                self._recover_now(st, None)
            raise
        except BaseException as err:
            if not st.done:
                yield from self._recover(st, err)
            raise
        finally:
            st.done = True
            if self._inflight is st:
                self._inflight = None
            vec.clear()

    def _batch_steps(self, st: _Inflight) -> Task:
        # Each phase is one write_many over the batch's independent sites,
        # then a read-back and an event per write: this is the per-site
        # cost of the whole batch, so it is written out by hand.
        m = self.machine
        read, now = m.text_read, m.now
        write_many = m.text_poke_write_many
        record = self.events.record
        proto = self.protocol
        vec, olds = st.vec, st.olds
        stext = self._stext
        int3 = b"\xcc"

        st.phase = "int3"
        addrs = [stext + tpl.rel_addr for tpl in vec]
        for tpl, addr in zip(vec, addrs):
            old = read(addr, tpl.len)
            tpl.old = old[0]
            olds.append(old)
        yield from write_many([(addr, int3) for addr in addrs])
        expect = self._expect
        for addr, old in zip(addrs, olds):
            expect[addr] = old[0]         # until the new first byte lands
        t = now()
        for addr, old in zip(addrs, olds):
            if read(addr, 1) != int3:
                raise VerifyMismatchError(f"text at {addr:#x} is not INT3 after writing it")
            record(addr, old[:1], int3, "int3", t)
        if proto.sync_after_int3:
            yield from self._sync()

        st.phase = "tail"
        news = [tpl.new_bytes() for tpl in vec]
        tails = [(addr + 1, new[1:]) for addr, new in zip(addrs, news) if len(new) > 1]
        if tails:
            yield from write_many(tails)
        t = now()
        for addr, old, new in zip(addrs, olds, news):
            if len(new) > 1:
                tail = new[1:]
                if read(addr + 1, len(tail)) != tail:
                    raise VerifyMismatchError(f"text at {addr + 1:#x} does not read {tail.hex()} "
                                              "after writing it")
                record(addr + 1, old[1:], tail, "tail", t)
            # From here until the first byte lands only INT3 is visible, so
            # this is the instant at which a trace switches old -> new.
            record(addr, old, new, "batch", t)
            st.announced += 1
        if tails and proto.sync_after_tails:
            yield from self._sync()

        st.phase = "first"
        firsts = [(addr, _BYTE[new[0]]) for addr, new in zip(addrs, news)
                  if new[0] != INT3_INSN_OPCODE]
        if firsts:
            yield from write_many(firsts)
        t = now()
        for addr, first in firsts:
            if read(addr, 1) != first:
                raise VerifyMismatchError(f"text at {addr:#x} does not read {first.hex()} "
                                          "after writing it")
            record(addr, int3, first, "first", t)
        for addr, new in zip(addrs, news):
            expect[addr] = new[0]
        if firsts and proto.sync_after_first:
            yield from self._sync()

    def _batch_drop_refs(self, st: _Inflight, wait: bool = True) -> Task:
        """Put this batch's reference on every CPU, then wait for handlers
        still running on any of them.  Idempotent per CPU."""
        st.phase = "drop"
        refs = self.text_poke_array_refs
        for cpu in list(refs):
            if cpu in st.dropped:
                continue
            st.dropped.add(cpu)
            if cpu not in refs:        # vanished meanwhile
                continue
            if refs[cpu] > 0:
                refs[cpu] -= 1
            yield
            if wait and refs.get(cpu, 0):
                yield WaitUntil(lambda c=cpu: refs.get(c, 0) == 0,
                                f"INT3 handlers on cpu{cpu} to finish")
        st.done = True
