# SPDX-License-Identifier: GPL-2.0-only
"""The text-patching core: text_poke*, and the INT3-based SMP batch.

Machine-agnostic: everything here talks to a :class:`~textpoke.Machine`.
Names follow the kernel after the 2025 clean-up series so that a kernel
engineer finds each piece where expected; the differences are Python ones:
errors are raised (and the text left alone) where the kernel would BUG().
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ._emulate import (PtRegs, int3_emulate_call, int3_emulate_jcc, int3_emulate_jmp,
                       int3_emulate_ret)
from .._errors import (BadAddressError, BadInstructionError, MachineClosedError, MachineError,
                       OverlapError, TextPokeError, VerifyMismatchError)
from ._events import TextPokeEventLog
from ._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, INT3_INSN_SIZE, JMP8_INSN_OPCODE,
                    JMP32_INSN_OPCODE, RET_INSN_OPCODE, TEXT_POKE_MAX_OPCODE_SIZE,
                    insn_decode_kernel, is_jcc32, x86_nops)
from ._machine import PAGE_SIZE, Machine, Task, TrapPriority, WaitUntil
from ._types import (_S32_MAX, _S32_MIN, TEXT_POKE_ARRAY_MAX, Protocol, SmpTextPokeLoc, TextMutex,
                     TextPokeArray, TextPokeStats)

__all__ = ["TextPoke"]

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


#: Opcode forms decoded without iced: first byte -> (length, opcode, immediate size).
_FAST_FORMS = {
    CALL_INSN_OPCODE: (5, CALL_INSN_OPCODE, 4),
    JMP32_INSN_OPCODE: (5, JMP32_INSN_OPCODE, 4),
    JMP8_INSN_OPCODE: (2, JMP8_INSN_OPCODE, 1),
    RET_INSN_OPCODE: (1, RET_INSN_OPCODE, 0),
    INT3_INSN_OPCODE: (1, INT3_INSN_OPCODE, 0),
    **{op: (2, op, 1) for op in range(0x70, 0x80)},
}
_NOP2, _NOP5 = x86_nops[2], x86_nops[5]
_BYTE = tuple(bytes((i,)) for i in range(256))
_BYTES_LIKE = (bytes, bytearray, memoryview)


class TextPoke:
    """The text-patching state of one machine (one per machine).

    ``keep_sorted`` (default) inserts batch entries in address order instead
    of flushing when an address arrives out of order, as the kernel does;
    pass ``keep_sorted=False`` for the kernel's behaviour.  ``mutations``
    remove protocol steps (see :data:`MUTATIONS`), for verification only.

    A TextPoke is a context manager; :meth:`close` finishes or rolls back
    whatever is pending and unregisters its INT3 handler.
    """

    def __init__(self, machine: Machine, *, keep_sorted: bool = True,
                 mutations: Iterable[str] = (), events_capacity: int | None = None) -> None:
        self.protocol = Protocol.build(keep_sorted=keep_sorted, mutations=mutations)
        #: entries per batch before it is flushed: the kernel's page of 256
        #: (TEXT_POKE_ARRAY_MAX), unless the machine declares more
        self.array_max = machine.text_poke_array_max or TEXT_POKE_ARRAY_MAX
        if machine.owner is not None:
            raise MachineError(f"the {machine.name} machine already has a TextPoke; "
                               "close it first (one text-patching state per machine)")
        machine._check_open()
        self.machine = machine
        self.keep_sorted = keep_sorted
        self.mutations = self.protocol.mutations
        self.text_mutex = TextMutex(self._drop_queued)
        self.text_poke_array = TextPokeArray()
        self.text_poke_array_refs: dict[int, int] = dict.fromkeys(machine.cpus, 0)
        self.events = (TextPokeEventLog() if events_capacity is None
                       else TextPokeEventLog(events_capacity))
        self.stats = TextPokeStats()
        self._stext = machine.stext
        self._inflight: _Inflight | None = None
        #: address -> the first byte the text should hold there once no
        #: batch is in flight (old if rolled back, new if done): what
        #: :meth:`int3_left` reads back against
        self._expect: dict[int, int] = {}
        self._closed = False
        machine.owner = self
        machine.subscribe_cpus(self._on_cpu_change)
        self._trap = machine.register_trap_handler(self.smp_text_poke_int3_handler,
                                                   priority=TrapPriority.TEXT_POKE,
                                                   name="smp_text_poke_int3_handler")

    # ---------------------------------------------------------------- lifetime
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish or roll back a batch in flight, drop entries that were
        queued but never flushed (the text is untouched by them),
        unregister the INT3 handler and let go of the machine.  Idempotent.

        A batch in flight is one whose task was interrupted while a
        scheduler held it: the machine is first asked to abandon its tasks,
        so that nothing else writes while the batch is recovered."""
        if self._closed:
            return
        try:
            st = self._inflight
            if st is not None and not st.done:
                self.machine.abandon_tasks()
                self._recover_now(st, None)
        finally:
            self._closed = True
            self.text_poke_array.vec.clear()
            self._trap.unregister()
            self.machine.unsubscribe_cpus(self._on_cpu_change)
            if self.machine.owner is self:
                self.machine.owner = None

    def int3_left(self) -> int:
        """INT3s of this core's batches that the text still holds, read
        back from the machine: sites whose first byte reads INT3 although
        neither their old nor their new instruction starts with one.  0
        after any batch, finished or interrupted, that the core could
        finish or roll back.  (An INT3 a client put there on purpose --
        an armed kprobe -- is the site's new byte and is not counted.)"""
        read = self.machine.text_read
        return sum(1 for addr, want in self._expect.items()
                   if want != INT3_INSN_OPCODE and read(addr, 1)[0] == INT3_INSN_OPCODE)

    def __enter__(self) -> "TextPoke":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise MachineClosedError("this TextPoke is closed")

    def _on_cpu_change(self, event: str, cpu: int) -> None:
        refs = self.text_poke_array_refs
        if event == "add":
            st = self._inflight
            # A CPU that comes up mid-batch may meet our INT3s: it holds a
            # batch reference like the others, until the batch drops them.
            refs[cpu] = 1 if st is not None and not st.done and st.phase != "drop" else 0
        elif event == "remove":
            refs.pop(cpu, None)    # a vanished CPU never blocks a wait

    def _drop_queued(self) -> int:
        """text_mutex's last release: queued entries that no batch took."""
        vec = self.text_poke_array.vec
        st = self._inflight
        if not vec or (st is not None and st.vec is vec and not st.done):
            return 0
        n = len(vec)
        vec.clear()
        self.stats.dropped += n
        return n

    # ------------------------------------------------------------------ helpers
    def text_poke_addr(self, tpl: SmpTextPokeLoc) -> int:
        return self._stext + tpl.rel_addr

    def _check_poke_range(self, addr: int, size: int) -> None:
        self.machine.text_range_of(addr, size)
        first_page = addr // PAGE_SIZE
        last_page = (addr + size - 1) // PAGE_SIZE
        if last_page - first_page > 1:
            raise BadAddressError(
                f"a poke of {size} bytes at {addr:#x} spans {last_page - first_page + 1} pages; "
                "text_poke maps at most two (use text_poke_copy for large ranges)")

    def _poke(self, addr: int, data: bytes, phase: str, old: bytes | None = None) -> Task:
        """``__text_poke``: write through the alias, verify, record.  The
        range must already be checked (once per call or per batch)."""
        m = self.machine
        if old is None:
            old = m.text_read(addr, len(data))
        yield from m.text_poke_write(addr, data)
        back = m.text_read(addr, len(data))
        if back != data:
            raise VerifyMismatchError(f"text at {addr:#x} reads {back.hex()} after writing {data.hex()}")
        self.events.record(addr, old, data, phase, m.now())
        return addr

    def _poke_all(self, writes: list[tuple[int, bytes]], phase: str) -> Task:
        """Several plain pokes (text_poke, _copy, _set) as one: if one fails
        -- a write that does not read back, a machine error -- every range
        already written and the failing one are put back as they were before
        the error propagates, so the text holds old bytes or new ones, never
        a third value.  If even that fails, the error says where."""
        m = self.machine
        done: list[tuple[int, bytes]] = []
        try:
            for addr, data in writes:
                old = m.text_read(addr, len(data))
                done.append((addr, old))
                yield from self._poke(addr, data, phase, old)
        except Exception as err:
            bad = []
            for addr, old in reversed(done):
                try:
                    if m.text_read(addr, len(old)) != old:
                        yield from m.text_poke_write(addr, old)
                        if m.text_read(addr, len(old)) != old:
                            bad.append(addr)
                except Exception:
                    bad.append(addr)
            if bad:
                err.add_note("restoring the old bytes failed too: text at "
                             + ", ".join(f"{a:#x}" for a in bad) + " may hold neither the old "
                             "nor the new bytes")
            elif isinstance(err, TextPokeError) and len(err.args) == 1:
                err.args = (f"{err.args[0]}; the old bytes were put back",)
            raise
        for addr, data in writes:
            self._forget(addr, len(data))
        return writes[0][0] if writes else None

    def _forget(self, addr: int, size: int) -> None:
        """Text rewritten outside the batch (text_poke*, a module's text
        freed): its batch sites are no longer what :meth:`int3_left`
        checks."""
        expect = self._expect
        if expect:
            for a in [a for a in expect if addr <= a < addr + size]:
                del expect[a]

    def _run(self, task: Task) -> Any:
        """Drive a task on the machine.  Whatever escapes -- an error, or a
        KeyboardInterrupt / SystemExit / signal raised while the machine
        serviced its CPUs -- a batch left in flight is finished or rolled
        back before it propagates."""
        self._check_open()
        try:
            return self.machine.run_task(task)
        except BaseException as err:
            st = self._inflight
            if st is not None and not st.done:
                self._recover_now(st, err)
            task.close()
            raise

    # ------------------------------------------------------- single-threaded API
    def text_poke(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        """Write a few bytes of text through the alias mapping.  Not safe
        against CPUs executing them: use the SMP batch for live code."""
        self.text_mutex.assert_held("text_poke")
        data = _take(opcode, length, "opcode", empty_ok=False)
        self._check_poke_range(addr, len(data))
        return self._run(self._poke_all([(addr, data)], "poke"))

    def text_poke_kgdb(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        """As text_poke, for a debugger that has stopped the world and cannot
        take text_mutex."""
        data = _take(opcode, length, "opcode", empty_ok=False)
        self._check_poke_range(addr, len(data))
        return self._run(self._poke_all([(addr, data)], "kgdb"))

    def _chunks(self, addr: int, size: int) -> Iterator[tuple[int, int]]:
        done = 0
        while done < size:
            ptr = addr + done
            n = min(2 * PAGE_SIZE - ptr % PAGE_SIZE, size - done)
            yield done, n
            done += n

    def _check_not_core(self, addr: int, size: int, what: str, core_ok: bool) -> None:
        rng = self.machine.text_range_of(addr, max(1, size))
        if rng.core and not core_ok:
            raise BadAddressError(f"{what} refuses core kernel text at {addr:#x} ({rng.name}); "
                                  "it is for module, JIT and execmem text")

    def text_poke_copy_locked(self, addr: int, opcode: bytes, length: int | None = None,
                              core_ok: bool = False) -> int:
        """Copy a large range, two pages at a time.  Core kernel text is
        refused unless *core_ok* (this is for module/JIT memory)."""
        self.text_mutex.assert_held("text_poke_copy_locked")
        data = _take(opcode, length, "opcode", empty_ok=False)
        self._check_not_core(addr, len(data), "text_poke_copy", core_ok)
        self._run(self._poke_all([(addr + off, data[off:off + n])
                                  for off, n in self._chunks(addr, len(data))], "copy"))
        return addr

    def text_poke_copy(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        with self.text_mutex:
            return self.text_poke_copy_locked(addr, opcode, length, core_ok=False)

    def text_poke_set(self, addr: int, c: int, length: int) -> int:
        """Fill a range of module/JIT text with byte *c* (e.g. INT3 over
        freed JIT code).  Core kernel text is refused, as in the kernel."""
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"text_poke_set: the fill byte c must be an int, not {type(c).__name__}")
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"text_poke_set: length must be an int, not {type(length).__name__}")
        if not 0 <= c <= 0xFF:
            raise BadInstructionError(f"text_poke_set: fill byte {c} is not in 0..255")
        if length <= 0:
            raise BadInstructionError(f"text_poke_set: length {length}: nothing to write "
                                      "(give at least one byte)")
        with self.text_mutex:
            self._check_not_core(addr, length, "text_poke_set", False)
            self._run(self._poke_all([(addr + off, bytes([c]) * n)
                                      for off, n in self._chunks(addr, length)], "set"))
            return addr

    def text_poke_early(self, addr: int, opcode: bytes, length: int | None = None) -> None:
        """Direct write while no other CPU runs (boot, alternatives)."""
        data = _take(opcode, length, "opcode")
        self.machine.text_range_of(addr, len(data))
        old = self.machine.text_read(addr, len(data))
        self.machine.text_write_early(addr, data)
        self.events.record(addr, old, data, "early", self.machine.now())
        self._forget(addr, len(data))

    # ------------------------------------------------------------- SMP batch
    def _make_tpl(self, addr: int, opcode: bytes, length: int, emulate: bytes | None) -> SmpTextPokeLoc:
        """The rules of ``__smp_text_poke_batch_add``, as refusals."""
        if length == 6:
            if not (opcode[0] == 0x0F and 0x80 <= opcode[1] <= 0x8F):
                raise BadInstructionError(
                    f"length 6 is reserved for Jcc.d32 (0f 8x), got {opcode.hex(' ')}")
        elif not 1 <= length <= TEXT_POKE_MAX_OPCODE_SIZE:
            raise BadInstructionError(f"site length {length} not in 1..5 (or 6 for Jcc.d32)")
        self.machine.text_range_of(addr, length)
        rel = addr - self._stext
        if not _S32_MIN <= rel <= _S32_MAX and not self.machine.wide_text:
            raise BadAddressError(f"{addr:#x} is beyond ±2 GiB of _stext")
        text = opcode[1:6] if length == 6 else opcode[:length].ljust(5, b"\0")
        emu = opcode if emulate is None else emulate
        op, disp, ilen = _decode_fast(emu)
        if op < 0:
            op, disp, ilen = self._decode_slow(emu, addr)
        if op in (RET_INSN_OPCODE, JMP32_INSN_OPCODE, JMP8_INSN_OPCODE) and emu[:2] != _NOP2:
            if ilen > length:
                raise BadInstructionError(
                    f"{_describe(emu, addr)} is {ilen} bytes, longer than the site ({length})")
            pad = opcode[ilen:length]
            if pad.count(INT3_INSN_OPCODE) != len(pad):
                raise BadInstructionError(
                    f"bytes after {_describe(emu, addr)} must be INT3 padding, got {pad.hex(' ')}")
        elif ilen != length:
            raise BadInstructionError(
                f"site length {length} disagrees with {_describe(emu, addr)} ({ilen} bytes)")
        return SmpTextPokeLoc(rel, disp, length, op, text)

    @staticmethod
    def _decode_slow(emu: bytes, addr: int) -> tuple[int, int, int]:
        """iced-x86 for everything the table does not know; refuses what
        cannot stand in while a site is patched."""
        try:
            insn = insn_decode_kernel(emu, addr)
        except BadInstructionError as e:
            raise BadInstructionError(f"cannot decode the instruction to emulate: {e}") from None
        if is_jcc32(insn):
            return insn.opcode[1] - 0x10, insn.immediate_value, insn.length
        raise BadInstructionError(
            f"cannot emulate {insn.text!r} ({emu[:insn.length].hex(' ')}): only CALL, JMP, Jcc, "
            "RET, INT3 and the kernel's NOP2/NOP5 can stand in while a site is patched")

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
        data = _take(opcode, length, "opcode")
        if emulate is not None:
            emulate = _take(emulate, None, "emulate")
        tpl = self._make_tpl(addr, data, len(data), emulate)
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

    # ------------------------------------------------------------- recovery
    def _recover(self, st: _Inflight, err: BaseException | None) -> Task:
        """Finish (when every tail is in place: only first bytes are left)
        or roll back (earlier) the batch *st*; then drop its references.
        A failure here is added to *err* as a note and never hides it."""
        try:
            if st.phase in ("first", "drop"):
                try:
                    yield from self._batch_finish_forward(st)
                    _say_finished(err, [self.text_poke_addr(t) for t in st.vec])
                except GeneratorExit:
                    raise
                except Exception as again:
                    _note(err, f"finishing the interrupted batch failed ({again!r}); rolling back")
                    yield from self._batch_rollback(st)
            elif st.phase in ("int3", "tail"):
                yield from self._batch_rollback(st)
            yield from self._batch_drop_refs(st, wait=True)
        except GeneratorExit:
            raise
        except BaseException as again:
            if err is None:
                raise
            _note(err, f"recovering the batch failed too: {again!r}; text at the batch's sites "
                       "may still hold INT3 (check with a read-back)")
        finally:
            st.done = True

    def _recover_now(self, st: _Inflight, err: BaseException | None) -> None:
        """Recover *st* outside the task that ran it (the machine let go of
        that task, or it is being closed).  Shielded: an interrupt arriving
        while the machine services its CPUs is noted on *err* and recovery
        goes on from where it was."""
        self.stats.recoveries += 1
        rec = _Resumable(self._recover(st, err))
        for _attempt in range(64):
            try:
                self.machine.run_task(rec.task())
                return
            except BaseException as again:
                if rec.finished:
                    if err is None:
                        raise        # nothing else to report it on
                    return           # its failure is already a note on err
                if isinstance(again, Exception):
                    # the machine itself failed while recovering
                    if err is None:
                        raise
                    _note(err, f"recovering the batch stopped: {again!r}; text at the batch's "
                               "sites may still hold INT3 (check with a read-back)")
                    return
                _note(err, f"interrupted again while recovering ({again!r}); recovery went on")
        _note(err, "gave up recovering the batch after 64 interruptions")

    def _batch_finish_forward(self, st: _Inflight) -> Task:
        """Every tail is written and synced: write the first bytes still
        missing, then sync -- always: the interrupted write may have stored
        its byte without the sync that should follow it."""
        m = self.machine
        for tpl in st.vec:
            addr = self.text_poke_addr(tpl)
            byte = tpl.new_bytes()[:1]
            if byte[0] != INT3_INSN_OPCODE and m.text_read(addr, 1) != byte:
                yield from self._poke(addr, byte, "first")
            self._expect[addr] = byte[0]
        yield from self._sync()
        self.stats.finished_forward += 1

    def _batch_rollback(self, st: _Inflight) -> Task:
        """Put every site touched so far back as it was, with the same
        discipline.  The entries stay in the array meanwhile, so a CPU
        reaching an INT3 still emulates (the new instruction: old or new is
        fine while a site is in flux).

        The interrupted write may have landed without the sync that should
        have followed it, so the syncs here depend on what the text may
        hold, not only on what this rollback writes."""
        m = self.machine
        self.stats.rollbacks += 1
        touched = list(zip(st.vec, st.olds))
        if not touched:
            return
        wrote = False
        tails_differ = False
        for tpl, old in touched:          # 1. every site starts with INT3
            addr = self.text_poke_addr(tpl)
            cur = m.text_read(addr, tpl.len)
            if cur[1:] != old[1:]:
                tails_differ = True
            if cur != old and cur[0] != INT3_INSN_OPCODE:
                yield from self._poke(addr, b"\xcc", "int3")
                wrote = True
        if wrote or tails_differ:
            yield from self._sync()
        for tpl, old in touched:          # 2. old tails back
            addr = self.text_poke_addr(tpl)
            if tpl.len > 1 and m.text_read(addr + 1, tpl.len - 1) != old[1:]:
                yield from self._poke(addr + 1, old[1:], "tail")
        if tails_differ or st.phase == "tail":
            yield from self._sync()
        for tpl, old in touched:          # 3. old first bytes back
            addr = self.text_poke_addr(tpl)
            if m.text_read(addr, 1) != old[:1]:
                yield from self._poke(addr, old[:1], "first")
            self._expect[addr] = old[0]
        yield from self._sync()           # no CPU may keep a stale INT3
        now = m.now()
        for tpl, old in touched[:st.announced]:   # the log says the site is old again
            self.events.record(self.text_poke_addr(tpl), tpl.new_bytes(), old, "rollback", now)

    # ------------------------------------------------------------ INT3 handler
    def _lookup(self, ip: int) -> SmpTextPokeLoc | None:
        # Bisect: the array is sorted (an unsorted one -- the "unordered"
        # mutation -- makes this miss, exactly as the kernel's bsearch would).
        vec = self.text_poke_array.vec
        rel = ip - self._stext
        i = self._insert_index(rel)
        return vec[i] if i < len(vec) and vec[i].rel_addr == rel else None

    def smp_text_poke_int3_handler(self, regs: PtRegs) -> Task:
        """First handler on the INT3 chain: emulate the site being patched.
        Returns True when the trap was ours and has been dealt with."""
        if regs.user_mode:
            return False
        refs = self.text_poke_array_refs
        cpu = regs.cpu
        if not refs.get(cpu, 0):       # try_get_text_poke_array()
            return False
        refs[cpu] += 1
        self.stats.int3_hits += 1
        try:
            yield
            ip = regs.ip - INT3_INSN_SIZE
            tpl = self._lookup(ip)
            yield
            if tpl is None:
                return False
            ip += tpl.len
            op = tpl.opcode
            if op == INT3_INSN_OPCODE:
                self.stats.int3_passed_on += 1
                return False        # someone wants this INT3; not ours to consume
            if op == RET_INSN_OPCODE:
                int3_emulate_ret(regs)
            elif op == CALL_INSN_OPCODE:
                int3_emulate_call(regs, ip + tpl.disp)
            elif op in (JMP32_INSN_OPCODE, JMP8_INSN_OPCODE):
                int3_emulate_jmp(regs, ip + tpl.disp)
            elif 0x70 <= op <= 0x7F:
                int3_emulate_jcc(regs, op & 0xF, ip, tpl.disp)
            else:  # _make_tpl admits nothing else
                raise MachineError(f"corrupt text_poke_array entry opcode {op:#x}")
            self.stats.int3_emulated += 1
            yield
            return True
        finally:
            if cpu in refs:            # put_text_poke_array(); the CPU may have gone
                refs[cpu] -= 1


def _decode_fast(emu: bytes) -> tuple[int, int, int]:
    """(opcode, displacement, length) for the few forms a batch sees all
    the time, by table; opcode -1 when iced-x86 has to decide."""
    if not emu:
        raise BadInstructionError("cannot decode an empty instruction")
    form = _FAST_FORMS.get(emu[0])
    if form is not None:
        length, op, isz = form
        if len(emu) < length:
            raise BadInstructionError(f"truncated instruction {emu.hex(' ')}")
        if isz == 4:
            return op, int.from_bytes(emu[1:5], "little", signed=True), length
        if isz == 1:
            return op, int.from_bytes(emu[1:2], "little", signed=True), length
        return op, 0, length
    if emu[:5] == _NOP5 and len(emu) >= 5:
        return JMP32_INSN_OPCODE, 0, 5      # NOP5 behaves as JMP32 +0
    if emu[:2] == _NOP2:
        return JMP8_INSN_OPCODE, 0, 2       # NOP2 behaves as JMP8 +0
    return -1, 0, 0


def _describe(emu: bytes, addr: int) -> str:
    try:
        return repr(insn_decode_kernel(emu, addr).text)
    except BadInstructionError:
        return emu.hex(" ")


def _take(opcode: object, length: int | None, name: str, empty_ok: bool = True) -> bytes:
    if not isinstance(opcode, _BYTES_LIKE):
        raise TypeError(f"{name} must be a bytes-like object (bytes, bytearray, memoryview), "
                        f"not {type(opcode).__name__}")
    data = bytes(opcode)
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int or None, not {type(length).__name__}")
        if length < 0 or length > len(data):
            raise BadInstructionError(f"length {length} but only {len(data)} {name} bytes given")
        data = data[:length]
    if not data and not empty_ok:
        raise BadInstructionError(f"no {name} bytes to write (an empty poke is refused)")
    return data


def _say_finished(err: BaseException | None, addrs: list[int]) -> None:
    """*err* stopped a batch after its tails were in place, and the batch
    was finished, not rolled back: the text changed.  Say which sites are
    new -- in the message of an error of ours, as a note on anything else
    -- and keep them as ``err.new_sites``."""
    if err is None:
        return
    shown = ", ".join(f"{a:#x}" for a in addrs[:8]) + (f", ... ({len(addrs)} sites)"
                                                       if len(addrs) > 8 else "")
    text = f"the batch was finished, not rolled back: the new bytes are in place at {shown}"
    try:
        err.new_sites = list(addrs)       # type: ignore[attr-defined]
    except AttributeError:
        pass
    if isinstance(err, TextPokeError) and len(err.args) == 1 and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]}; {text}",)
    else:
        err.add_note(text)


def _note(err: BaseException | None, text: str) -> None:
    if err is not None:
        err.add_note(text)


def _is_signal(exc: BaseException) -> bool:
    """An exception a signal handler raised (not an error of the machine)."""
    return not isinstance(exc, Exception)


class _Resumable:
    """A task that can be driven again after its driver was interrupted:
    the step it was waiting on (a WaitUntil) is yielded again first, so
    that no wait is skipped."""

    _START = object()

    def __init__(self, gen: Task) -> None:
        self.gen = gen
        self.pending: Any = self._START
        self.finished = False

    def task(self) -> Task:
        gen = self.gen
        try:
            item = next(gen) if self.pending is self._START else self.pending
            while True:
                self.pending = item
                yield item
                item = gen.send(None)
        except StopIteration as stop:
            self.finished = True
            return stop.value
        except BaseException:
            if gen.gi_frame is None:     # the recovery itself raised
                self.finished = True
            raise
