# SPDX-License-Identifier: GPL-2.0-only
"""The text-patching core: :class:`TextPoke`, one per machine -- its
lifetime, text_mutex, the plain pokes (text_poke, _copy, _set, _early)
and the INT3 handler it puts first on the machine's trap chain.

Machine-agnostic: everything here talks to a :class:`~textpoke.Machine`.
Names follow the kernel after the 2025 clean-up series so that a kernel
engineer finds each piece where expected; the differences are Python ones:
errors are raised (and the text left alone) where the kernel would BUG().

The class is assembled from its concerns: the INT3-based SMP batch and its
handler (:mod:`._batch`), the finishing or rolling back of a batch cut
short (:mod:`._recovery`); what a batch entry may be is :mod:`._entries`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from .._errors import (BadAddressError, BadInstructionError, MachineClosedError, MachineError,
                       TextPokeError, VerifyMismatchError)
from ._batch import _Batch, _Inflight
from ._entries import take_bytes
from ._events import TextPokeEventLog
from ._emulate import (PtRegs, int3_emulate_call, int3_emulate_jcc, int3_emulate_jmp,
                       int3_emulate_ret)
from ._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, INT3_INSN_SIZE, JMP8_INSN_OPCODE,
                    JMP32_INSN_OPCODE, RET_INSN_OPCODE)
from ._machine import PAGE_SIZE, Machine, Task, TrapPriority
from ._recovery import _Recovery
from ._types import TEXT_POKE_ARRAY_MAX, Protocol, SmpTextPokeLoc, TextMutex, TextPokeArray, TextPokeStats

__all__ = ["TextPoke"]


class TextPoke(_Batch, _Recovery):
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
        data = take_bytes(opcode, length, "opcode", empty_ok=False)
        self._check_poke_range(addr, len(data))
        return self._run(self._poke_all([(addr, data)], "poke"))

    def text_poke_kgdb(self, addr: int, opcode: bytes, length: int | None = None) -> int:
        """As text_poke, for a debugger that has stopped the world and cannot
        take text_mutex."""
        data = take_bytes(opcode, length, "opcode", empty_ok=False)
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
        data = take_bytes(opcode, length, "opcode", empty_ok=False)
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
        data = take_bytes(opcode, length, "opcode")
        self.machine.text_range_of(addr, len(data))
        old = self.machine.text_read(addr, len(data))
        self.machine.text_write_early(addr, data)
        self.events.record(addr, old, data, "early", self.machine.now())
        self._forget(addr, len(data))

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
