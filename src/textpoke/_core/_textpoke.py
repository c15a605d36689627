# SPDX-License-Identifier: GPL-2.0-only
"""The text-patching core: text_poke*, and the INT3-based SMP batch.

Machine-agnostic: everything here talks to a :class:`~textpoke.Machine`.
Names follow the kernel after the 2025 clean-up series so that a kernel
engineer finds each piece where expected; the differences are Python ones:
errors are raised (and the text left alone) where the kernel would BUG().
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

from ._emulate import (PtRegs, int3_emulate_call, int3_emulate_jcc, int3_emulate_jmp,
                       int3_emulate_ret)
from .._errors import (BadAddressError, BadInstructionError, MachineError, OverlapError,
                      TextMutexError, VerifyMismatchError)
from ._events import TextPokeEventLog
from ._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, INT3_INSN_SIZE, JMP8_INSN_OPCODE,
                    JMP32_INSN_OPCODE, RET_INSN_OPCODE, TEXT_POKE_MAX_OPCODE_SIZE,
                    insn_decode_kernel, is_jcc32, x86_nops)
from ._machine import PAGE_SIZE, Machine, Task, TrapPriority, WaitUntil

__all__ = [
    "TEXT_POKE_ARRAY_MAX", "MUTATIONS", "TextMutex", "SmpTextPokeLoc", "TextPokeArray",
    "TextPokeStats", "TextPoke",
]

#: One page of 16-byte entries, as in the kernel.
SMP_TEXT_POKE_LOC_SIZE = 16
TEXT_POKE_ARRAY_MAX = PAGE_SIZE // SMP_TEXT_POKE_LOC_SIZE

#: Protocol steps that ``verify`` can remove, to show that each one matters.
MUTATIONS = ("no-sync-1", "no-sync-2", "no-sync-3", "no-refs-wait", "unordered")

_S32_MIN, _S32_MAX = -(1 << 31), (1 << 31) - 1


class TextMutex:
    """``text_mutex``: a re-entrant lock that knows its owner, so that the
    places the kernel asserts it with lockdep can refuse to run without it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1

    def release(self) -> None:
        if self._owner != threading.get_ident():
            raise TextMutexError("text_mutex released by a thread that does not hold it")
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    def __enter__(self) -> "TextMutex":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    def assert_held(self, what: str) -> None:
        if not self.held():
            raise TextMutexError(f"{what}() must be called with text_mutex held")


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

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class TextPoke:
    """The text-patching state of one machine.

    ``keep_sorted`` (default) inserts batch entries in address order instead
    of flushing when an address arrives out of order, as the kernel does;
    pass ``keep_sorted=False`` for the kernel's behaviour.
    """

    def __init__(self, machine: Machine, *, keep_sorted: bool = True,
                 mutations: tuple[str, ...] | frozenset[str] = ()) -> None:
        bad = set(mutations) - set(MUTATIONS)
        if bad:
            raise ValueError(f"unknown mutation(s) {sorted(bad)}; known: {', '.join(MUTATIONS)}")
        self.machine = machine
        self.keep_sorted = keep_sorted
        self.mutations = frozenset(mutations)
        self.text_mutex = TextMutex()
        self.text_poke_array = TextPokeArray()
        self.text_poke_array_refs: dict[int, int] = {cpu: 0 for cpu in machine.cpus}
        self.events = TextPokeEventLog()
        self.stats = TextPokeStats()
        self._stext = machine.stext
        if machine.owner is not None:
            raise MachineError(f"the {machine.name} machine already has a TextPoke; "
                               "close it first (one text-patching state per machine)")
        machine._check_open()
        machine.owner = self
        self._trap = machine.register_trap_handler(self.smp_text_poke_int3_handler,
                                                   priority=TrapPriority.TEXT_POKE,
                                                   name="smp_text_poke_int3_handler")

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Finish or roll back whatever is pending, unregister the INT3
        handler and let go of the machine.  Idempotent."""
        if getattr(self, "_closed", False):
            return
        try:
            self.text_poke_array.vec.clear()
        finally:
            self._closed = True
            self._trap.unregister()
            if self.machine.owner is self:
                self.machine.owner = None

    def __enter__(self) -> "TextPoke":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _poke(self, addr: int, data: bytes, phase: str) -> Task:
        """``__text_poke``: write through the alias, verify, record."""
        self._check_poke_range(addr, len(data))
        old = self.machine.text_read(addr, len(data))
        yield from self.machine.text_poke_write(addr, data)
        back = self.machine.text_read(addr, len(data))
        if back != data:
            raise VerifyMismatchError(f"text at {addr:#x} reads {back.hex()} after writing {data.hex()}")
        self.events.record(addr, old, data, phase, self.machine.now())
        return addr

    # ------------------------------------------------------- single-threaded API
    def text_poke(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        """Write a few bytes of text through the alias mapping.  Not safe
        against CPUs executing them: use the SMP batch for live code."""
        self.text_mutex.assert_held("text_poke")
        data = _take(opcode, length)
        return self.machine.run_task(self._poke(addr, data, "poke"))

    def text_poke_kgdb(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        """As text_poke, for a debugger that has stopped the world and cannot
        take text_mutex."""
        data = _take(opcode, length)
        return self.machine.run_task(self._poke(addr, data, "kgdb"))

    def _chunks(self, addr: int, size: int) -> Iterator[tuple[int, int]]:
        done = 0
        while done < size:
            ptr = addr + done
            n = min(2 * PAGE_SIZE - ptr % PAGE_SIZE, size - done)
            yield done, n
            done += n

    def text_poke_copy_locked(self, addr: int, opcode: bytes, length: int | None = None,
                              core_ok: bool = False) -> int:
        """Copy a large range, two pages at a time.  Core kernel text is
        refused unless *core_ok* (this is for module/JIT memory)."""
        self.text_mutex.assert_held("text_poke_copy_locked")
        data = _take(opcode, length)
        rng = self.machine.text_range_of(addr, max(1, len(data)))
        if rng.core and not core_ok:
            raise BadAddressError(f"text_poke_copy refuses core kernel text at {addr:#x} ({rng.name})")

        def task() -> Task:
            for off, n in self._chunks(addr, len(data)):
                yield from self._poke(addr + off, data[off:off + n], "copy")
            return addr
        return self.machine.run_task(task())

    def text_poke_copy(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        with self.text_mutex:
            return self.text_poke_copy_locked(addr, opcode, length, core_ok=False)

    def text_poke_set(self, addr: int, c: int, length: int) -> int:
        """Fill a range with byte *c* (e.g. INT3 over freed JIT text)."""
        if not 0 <= c <= 0xFF:
            raise ValueError(f"fill byte {c} out of range")
        with self.text_mutex:
            self.machine.text_range_of(addr, length)

            def task() -> Task:
                for off, n in self._chunks(addr, length):
                    yield from self._poke(addr + off, bytes([c]) * n, "set")
                return addr
            return self.machine.run_task(task())

    def text_poke_early(self, addr: int, opcode: bytes, length: int | None = None) -> None:
        """Direct write while no other CPU runs (boot, alternatives)."""
        data = _take(opcode, length)
        self.machine.text_range_of(addr, len(data))
        old = self.machine.text_read(addr, len(data))
        self.machine.text_write_early(addr, data)
        self.events.record(addr, old, data, "early", self.machine.now())

    # ------------------------------------------------------------- SMP batch
    def _make_tpl(self, addr: int, opcode: bytes, length: int, emulate: bytes | None) -> SmpTextPokeLoc:
        """The rules of ``__smp_text_poke_batch_add``, as refusals."""
        if length == 6:
            if not (opcode[:1] == b"\x0f" and 0x80 <= opcode[1] <= 0x8F):
                raise BadInstructionError(
                    f"length 6 is reserved for Jcc.d32 (0f 8x), got {opcode.hex(' ')}")
        elif not 1 <= length <= TEXT_POKE_MAX_OPCODE_SIZE:
            raise BadInstructionError(f"site length {length} not in 1..5 (or 6 for Jcc.d32)")
        self.machine.text_range_of(addr, length)
        rel = addr - self._stext
        if not _S32_MIN <= rel <= _S32_MAX:
            raise BadAddressError(f"{addr:#x} is beyond ±2 GiB of _stext")
        text = bytes(opcode[1:6]) if length == 6 else bytes(opcode[:length]).ljust(5, b"\0")
        emu = bytes(emulate) if emulate is not None else bytes(opcode)
        try:
            insn = insn_decode_kernel(emu, addr)
        except BadInstructionError as e:
            raise BadInstructionError(f"cannot decode the instruction to emulate: {e}") from None
        op = insn.opcode[0]
        if is_jcc32(insn):
            op = insn.opcode[1] - 0x10
        if op in (RET_INSN_OPCODE, JMP32_INSN_OPCODE, JMP8_INSN_OPCODE):
            if insn.length > length:
                raise BadInstructionError(
                    f"{insn.text!r} is {insn.length} bytes, longer than the site ({length})")
            pad = bytes(opcode[insn.length:length])
            if any(b != INT3_INSN_OPCODE for b in pad):
                raise BadInstructionError(
                    f"bytes after {insn.text!r} must be INT3 padding, got {pad.hex(' ')}")
        elif insn.length != length:
            raise BadInstructionError(
                f"site length {length} disagrees with {insn.text!r} ({insn.length} bytes)")
        disp = 0
        if op in (INT3_INSN_OPCODE, RET_INSN_OPCODE):
            pass
        elif op in (CALL_INSN_OPCODE, JMP32_INSN_OPCODE, JMP8_INSN_OPCODE) or 0x70 <= op <= 0x7F:
            disp = insn.immediate_value
        elif length == 2 and emu[:2] == x86_nops[2]:
            op = JMP8_INSN_OPCODE        # NOP2 behaves as JMP8 +0
        elif length == 5 and emu[:5] == x86_nops[5]:
            op = JMP32_INSN_OPCODE       # NOP5 behaves as JMP32 +0
        else:
            raise BadInstructionError(
                f"cannot emulate {insn.text!r} ({emu[:insn.length].hex(' ')}): only CALL, JMP, Jcc, "
                "RET, INT3 and the kernel's NOP2/NOP5 can stand in while a site is patched")
        return SmpTextPokeLoc(rel_addr=rel, disp=disp, len=length, opcode=op, text=text)

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

    def _overlapping(self, tpl: SmpTextPokeLoc) -> SmpTextPokeLoc | None:
        vec = self.text_poke_array.vec
        if self.keep_sorted and "unordered" not in self.mutations:
            i = self._insert_index(tpl.rel_addr)
            near = vec[max(0, i - 1):i + 1]      # sorted, non-overlapping: neighbours suffice
        else:
            near = vec
        for other in near:
            if other.rel_addr < tpl.rel_addr + tpl.len and tpl.rel_addr < other.rel_addr + other.len:
                return other
        return None

    def smp_text_poke_batch_add_task(self, addr: int, opcode: bytes, length: int | None = None,
                                     emulate: bytes | None = None) -> Task:
        """Queue one site; may first flush the batch (when full, or in
        kernel-order mode when *addr* is out of order)."""
        self.text_mutex.assert_held("smp_text_poke_batch_add")
        data = _take(opcode, length)
        tpl = self._make_tpl(addr, data, len(data), emulate)
        arr = self.text_poke_array.vec
        if arr:
            full = len(arr) >= TEXT_POKE_ARRAY_MAX
            unordered = self.text_poke_addr(arr[-1]) > addr
            if full or (unordered and not self.keep_sorted and "unordered" not in self.mutations):
                if full:
                    self.stats.flushes_full += 1
                else:
                    self.stats.flushes_unordered += 1
                yield from self._batch_process()
        other = self._overlapping(tpl)
        if other is not None:
            raise OverlapError(
                f"site [{addr:#x}, +{tpl.len}) overlaps queued site at "
                f"{self.text_poke_addr(other):#x} (+{other.len})")
        if self.keep_sorted and "unordered" not in self.mutations:
            arr.insert(self._insert_index(tpl.rel_addr), tpl)
        else:
            arr.append(tpl)

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
        self.machine.run_task(self.smp_text_poke_batch_add_task(addr, opcode, length, emulate))

    def smp_text_poke_batch_finish(self) -> None:
        """Apply every queued site with the INT3 protocol."""
        self.machine.run_task(self.smp_text_poke_batch_finish_task())

    def smp_text_poke_single(self, addr: int, opcode: bytes, length: int | None = None,
                             emulate: bytes | None = None) -> None:
        """Patch one site now; any pending batch is applied with it."""
        self.machine.run_task(self.smp_text_poke_single_task(addr, opcode, length, emulate))

    def smp_text_poke_sync_each_cpu(self) -> None:
        self.machine.run_task(self._sync())

    def _sync(self) -> Task:
        self.stats.syncs += 1
        yield from self.machine.sync_each_cpu()

    @contextlib.contextmanager
    def batch(self) -> Iterator["TextPoke"]:
        """``with core.batch(): core.smp_text_poke_batch_add(...)`` -- takes
        text_mutex, finishes on exit; on an exception the queued (unwritten)
        entries are dropped and the text is left as it was."""
        with self.text_mutex:
            try:
                yield self
            except BaseException:
                self.text_poke_array.vec.clear()
                raise
            self.smp_text_poke_batch_finish()

    def _batch_process(self) -> Task:
        """INT3 -> sync -> tails -> sync -> first bytes -> sync -> drop refs.

        Should the machine fail part-way (a write that does not verify, a
        machine error), every site already touched is put back to its old
        bytes through the same INT3 discipline before the error propagates,
        so that no INT3 of ours and no half-written instruction is left."""
        self.text_mutex.assert_held("smp_text_poke_batch_process")
        vec = self.text_poke_array.vec
        refs = self.text_poke_array_refs
        self.stats.batches += 1
        self.stats.sites += len(vec)
        olds: list[bytes] = []      # whole old instruction of each site touched so far
        for cpu in refs:
            refs[cpu] = 1
        clean = False
        try:
            yield  # the refs are published before any INT3 can be seen
            try:
                yield from self._batch_steps(vec, olds)
            except Exception as err:
                try:
                    yield from self._batch_rollback(vec, olds)
                except Exception as again:
                    raise err from again
                raise
            yield from self._batch_drop_refs(wait="no-refs-wait" not in self.mutations)
            clean = True
        finally:
            vec.clear()
            if not clean:        # after a failure no reference may outlive the batch
                for cpu in refs:
                    refs[cpu] = 0

    def _batch_steps(self, vec: list[SmpTextPokeLoc], olds: list[bytes]) -> Task:
        m = self.machine
        mut = self.mutations
        for tpl in vec:
            addr = self.text_poke_addr(tpl)
            old = m.text_read(addr, tpl.len)
            tpl.old = old[0]
            olds.append(old)
            yield from self._poke(addr, bytes([INT3_INSN_OPCODE]), "int3")
        if "no-sync-1" not in mut:
            yield from self._sync()

        do_sync = 0
        for tpl, old in zip(vec, olds):
            addr = self.text_poke_addr(tpl)
            new = tpl.new_bytes()
            if tpl.len > INT3_INSN_SIZE:
                yield from self._poke(addr + 1, new[1:], "tail")
                do_sync += 1
            # From here until the first byte lands only INT3 is visible, so
            # this is the instant at which a trace switches old -> new.
            self.events.record(addr, old, new, "batch", m.now())
        if do_sync and "no-sync-2" not in mut:
            yield from self._sync()

        do_sync = 0
        for tpl in vec:
            byte = tpl.new_bytes()[0]
            if byte == INT3_INSN_OPCODE:
                continue
            yield from self._poke(self.text_poke_addr(tpl), bytes([byte]), "first")
            do_sync += 1
        if do_sync and "no-sync-3" not in mut:
            yield from self._sync()

    def _batch_drop_refs(self, wait: bool) -> Task:
        refs = self.text_poke_array_refs
        for cpu in refs:
            refs[cpu] -= 1
            yield
            if refs[cpu] and wait:
                yield WaitUntil(lambda c=cpu: refs[c] == 0, f"INT3 handlers on cpu{cpu} to finish")

    def _batch_rollback(self, vec: list[SmpTextPokeLoc], olds: list[bytes]) -> Task:
        """Put the first len(olds) sites back as they were.  The entries stay
        in the array meanwhile, so a CPU reaching an INT3 still emulates
        (the new instruction: old or new is fine while a site is in flux)."""
        m = self.machine
        self.stats.rollbacks += 1
        touched = list(zip(vec, olds))
        wrote = False
        for tpl, old in touched:          # 1. every site starts with INT3
            addr = self.text_poke_addr(tpl)
            cur = m.text_read(addr, tpl.len)
            if cur != old and cur[0] != INT3_INSN_OPCODE:
                yield from self._poke(addr, bytes([INT3_INSN_OPCODE]), "int3")
                wrote = True
        if wrote:
            yield from self._sync()
        wrote = False
        for tpl, old in touched:          # 2. old tails back
            addr = self.text_poke_addr(tpl)
            if tpl.len > 1 and m.text_read(addr + 1, tpl.len - 1) != old[1:]:
                yield from self._poke(addr + 1, old[1:], "tail")
                wrote = True
        if wrote:
            yield from self._sync()
        wrote = False
        for tpl, old in touched:          # 3. old first bytes back
            addr = self.text_poke_addr(tpl)
            if m.text_read(addr, 1) != old[:1]:
                yield from self._poke(addr, old[:1], "first")
                wrote = True
        if wrote:
            yield from self._sync()
        yield from self._batch_drop_refs(wait=True)

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
            refs[cpu] -= 1             # put_text_poke_array()


def _take(opcode: bytes, length: int | None) -> bytes:
    data = bytes(opcode)
    if length is None:
        return data
    if length < 0 or length > len(data):
        raise BadInstructionError(f"length {length} but only {len(data)} opcode bytes given")
    return data[:length]
