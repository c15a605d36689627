# SPDX-License-Identifier: GPL-2.0-only
"""``live toggle`` on ordinary function entries: what each entry becomes,
the trampolines a ``call:FUNC`` needs, and freeing those no entry uses any
more.  (fentry sites need none of this: their NOP5 becomes a CALL.)

An entry (the 5 bytes after any ENDBR64, covering whole instructions: see
:mod:`._entry`) takes one of three forms:

``orig``      the instructions the file has;
``jmp:FUNC``  ``jmp FUNC``: the function is redirected (FUNC runs instead,
              with the caller's arguments and return address);
``call:FUNC`` ``jmp slot``, the slot of a region mapped in the process:
              ``call *FUNC``, the moved instructions re-encoded, ``jmp``
              back -- FUNC runs first, then the function, as an fentry site
              switched to ``call FUNC`` does (FUNC is entered with the stack
              8 bytes off the ABI's alignment and must keep the argument
              registers, as ``__fentry__`` does).

Every switch is one batch of the INT3 protocol.  Leaving ``orig`` replaces
instructions that are moved (or, for a JMP, dropped), so the tails wait for
the threads to be out of them (:func:`._entry.quiescent_tails`); going back
to ``orig`` emulates the JMP that stands while the INT3 does.  Regions are
journaled (``live recover`` after a SIGKILL puts their entries back and
frees them) until the batch that makes them live has finished; a region
every slot of which is switched away is journaled again and freed after
its batch, once no thread's RIP or stack points into it (kept mapped, and
said why, otherwise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ._entry import (TOGGLE_SLOT, EntrySite, EntryState, ToggleRegion, read_toggle_header,
                     threads_in_region, toggle_data_size, toggle_header, toggle_slot_code)

__all__ = ["EntryToggle", "plan_entries"]

_JMP = 0xE9


def _rel32(op: int, at: int, to: int) -> bytes | None:
    rel = to - (at + 5)
    if not -2**31 <= rel < 2**31:
        return None
    return bytes([op]) + rel.to_bytes(4, "little", signed=True)


@dataclass
class EntryToggle:
    """The entries of one ``live toggle`` and what each becomes."""

    pid: int
    to: str                                    # "nop" (orig), "jmp" or "call"
    target: int | None
    sites: list[EntrySite]
    states: list[EntryState]
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    quiesce: list[EntrySite] = field(default_factory=list)   # leaving orig
    slots: list[EntrySite] = field(default_factory=list)     # need a call trampoline
    freed: list[int] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    new_regions: list[ToggleRegion] = field(default_factory=list)
    _old: dict[int, ToggleRegion] = field(default_factory=dict)

    def already(self) -> int:
        return len(self.sites) - len(self.writes) - len(self.slots)

    # ------------------------------------------------------------------
    def prepare(self, read: Callable[[int, int], bytes]) -> None:
        """Decide each entry's new bytes (or its need of a slot); refuse
        (ValueError, nothing written) a JMP that cannot reach its target."""
        for s, st in zip(self.sites, self.states):
            if self.to == "nop":
                if st.kind != "orig":
                    self.writes.append((s.addr, s.plan.orig[:5]))
            elif self.to == "jmp":
                if st.kind == "jmp" and st.to == self.target:
                    continue
                new = _rel32(_JMP, s.addr, self.target)
                if new is None:
                    raise ValueError(f"jmp target {self.target:#x} is beyond ±2 GiB of "
                                     f"{s.function} at {s.addr:#x}: a JMP rel32 cannot reach it "
                                     "(use call:, whose trampoline calls through a pointer)")
                self.writes.append((s.addr, new))
                if st.kind == "orig":
                    self.quiesce.append(s)
            else:
                if st.kind == "call" and st.to == self.target:
                    continue
                self.slots.append(s)
                if st.kind == "orig":
                    self.quiesce.append(s)
        # regions whose every slot in use is switched away now: freed after the batch
        leaving = {s.addr for s, st in zip(self.sites, self.states) if st.kind == "call"
                   and (s.addr in {a for a, _ in self.writes} or s in self.slots)}
        for r in self._regions(read):
            if all(a in leaving or not self._jumps_to(read, a, r.slot(i))
                   for i, (a, _f) in enumerate(r.pairs)):
                self._old[r.base] = r

    def _regions(self, read) -> list[ToggleRegion]:
        """Every toggle region of ours mapped in the process (the header
        after an anonymous executable mapping): those the entries jump
        into, and any an earlier toggle had to keep mapped."""
        from ._process import read_maps
        out = []
        for m in read_maps(self.pid):
            if m.executable and not m.path:
                r = read_toggle_header(read, m.end)
                if r is not None and m.start <= r.base < m.end:
                    out.append(r)
        return out

    @staticmethod
    def _jumps_to(read, site: int, slot: int) -> bool:
        try:
            return read(site, 5) == _rel32(_JMP, site, slot)
        except Exception:       # noqa: BLE001 -- unreadable: not jumping there
            return False

    # ------------------------------------------------------------------
    def map_slots(self, m, syms) -> None:
        """Map a region per module for the entries that need a trampoline,
        journal it with its entries (before anything jumps to it), write
        the slots and the header; append each entry's JMP to :attr:`writes`."""
        from ._count import _map_region
        by_mod: dict[str, list[EntrySite]] = {}
        for s in self.slots:
            by_mod.setdefault(s.module, []).append(s)
        for modname, group in by_mod.items():
            mod = syms.module(modname)
            lo = min(min(x.start for x in mod.mappings), group[0].addr)
            hi = max(max(x.end for x in mod.mappings), group[-1].addr)
            n = len(group)
            region = _map_region(m, n * TOGGLE_SLOT, toggle_data_size(n), (lo, hi))
            tr = ToggleRegion(region.base, region.code_size, region.data_size,
                              [(s.addr, self.target) for s in group])
            jmps = []
            code = bytearray()
            try:
                for i, s in enumerate(group):
                    body = toggle_slot_code(s.plan, tr.slot(i), self.target)
                    code += body.ljust(TOGGLE_SLOT, b"\xcc")
                    jmp = _rel32(_JMP, s.addr, tr.slot(i))
                    assert jmp is not None          # the region is placed within reach
                    jmps.append((s.addr, jmp))
            except Exception:
                self._unmap(m, region)
                raise
            m.journal.drop_region(region.base, flush=False)    # named before the mmap
            m.journal.add_region("toggle", region.base, region.code_size, region.data_size,
                                 [(a, s.plan.orig[:5], j) for s, (a, j) in zip(group, jmps)])
            region.write(region.base, bytes(code))
            region.write(tr.data, toggle_header(tr))
            region.close()
            self.writes += jmps
            self.new_regions.append(tr)

    def journal_old(self, m) -> None:
        """Journal the regions to free, with their entries: after a SIGKILL,
        'live recover' switches back any still jumping in and frees them."""
        for r in self._old.values():
            m.journal.add_region("toggle", r.base, r.code_size, r.data_size,
                                 [(a, self._orig_of(a), _rel32(_JMP, a, r.slot(i)))
                                  for i, (a, _f) in enumerate(r.pairs) if self._orig_of(a)])

    def _orig_of(self, addr: int) -> bytes:
        for s in self.sites:
            if s.addr == addr:
                return s.plan.orig[:5]
        return b""

    def settle(self, m) -> None:
        """After the batch, finished or rolled back (an error, a signal):
        a region some entry jumps into is the state the entries are in (out
        of the journal: it is meant to stay); one no entry jumps into any
        more is freed once no thread can be in it, then dropped."""
        for r in self.new_regions + list(self._old.values()):
            if any(self._jumps_to(m.mem.read, a, r.slot(i)) for i, (a, _f) in enumerate(r.pairs)):
                m.journal.drop_region(r.base)
                continue
            why = self._free(m, r)
            if why:
                # No entry jumps into it: nothing can enter it again, so it
                # is no leftover (out of the journal, which would stop every
                # later command until 'recover').  A word on a stack may be
                # a return address still live -- FUNC running or asleep -- or
                # a stale copy a later frame left uninitialised (python3's
                # main thread, blocked in read(), kept one): which, cannot be
                # told, so the region stays mapped, and the next toggle of an
                # entry in this process looks at it again.
                self.kept.append(f"trampoline region {r.base:#x} ({(r.code_size + r.data_size) >> 10}"
                                 f" KiB) kept mapped, no entry jumping into it: {why[0]}; the next "
                                 "'live toggle' of an entry frees it once nothing points into it")
            else:
                self.freed.append(r.base)
            m.journal.drop_region(r.base)

    def _free(self, m, r: ToggleRegion, attempts: int = 20) -> list[str]:
        from ._inject import find_syscall_insn
        from ._region import Region
        region = Region(self.pid, r.base, r.code_size, r.data_size,
                        syscall_at=find_syscall_insn(self.pid))
        why: list[str] = []
        try:
            for attempt in range(attempts):
                with m.stopped() as tids:
                    m.step_out_of_range(r.base, r.base + r.code_size)
                    why = threads_in_region(m, tids, r.base, r.base + r.code_size)
                    if not why:
                        return self._unmap_in(region, tids, m.pid)
                # let the threads run (FUNC returns through the slot), look again
                time.sleep(0.001 * (attempt + 1))
            return why
        finally:
            region.close()

    @staticmethod
    def _unmap_in(region, tids: Sequence[int], pid: int) -> list[str]:
        errs = []
        for tid in sorted(tids, key=lambda t: t != pid):
            try:
                region.unmap(tid)
                return []
            except Exception as e:      # noqa: BLE001 -- said, and the region kept
                errs.append(f"munmap in thread {tid} failed: {e}")
        return errs

    def _unmap(self, m, region) -> None:
        """A region just mapped, nothing written to it or jumping into it."""
        with m.stopped() as tids:
            why = self._unmap_in(region, tids, m.pid)
        if not why:
            m.journal.drop_region(region.base)


def plan_entries(pid: int, to: str, target: int | None, sites: Sequence[EntrySite],
                 states: Sequence[EntryState], read: Callable[[int, int], bytes]) -> EntryToggle:
    t = EntryToggle(pid, to, target, list(sites), list(states))
    t.prepare(read)
    return t
