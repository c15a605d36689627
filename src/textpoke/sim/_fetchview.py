# SPDX-License-Identifier: GPL-2.0-only
"""The fetch-view cache model: each vCPU fetches text through a private
copy of every line; the patcher's writes land in physical memory and make
the lines they touch stale in every view; a stale line is refilled when the
scheduler evicts it or when the CPU serialises."""

from __future__ import annotations

import ctypes

from .._core._machine import Task
from .._errors import BadAddressError, MachineError
from ._ucfast import changed_span, fast_cpu
from ._vcpu import VCpu, _Region

__all__: list[str] = []


class _FetchViews:
    """SimMachine's text half (a mixin): reads, the patcher's writes through
    the alias mapping, refills and serialisation of the CPUs' views."""

    def _text_loc(self, addr: int, size: int) -> tuple[int, _Region]:
        if self._closed:
            self._check_open()
        i, r = self._last_text
        if r.start <= addr and addr + size <= r.start + r.size:
            return i, r
        for i, r in enumerate(self._text):
            if r.start <= addr and addr + size <= r.start + r.size:
                self._last_text = (i, r)
                return i, r
        raise BadAddressError(f"[{addr:#x}, +{size}) is not mapped text")

    def text_read(self, addr: int, size: int) -> bytes:
        _, r = self._text_loc(addr, size)
        off = addr - r.start
        return r.mv[off:off + size].tobytes()

    def text_poke_write(self, addr: int, data: bytes) -> Task:
        # The alias mapping (text_poke_mm) reaches the same physical bytes
        # the CPUs fetch from.  Range errors and a closed machine are
        # reported here, before the caller holds a task.
        self._check_open()
        data = bytes(data)
        idx, r = self._text_loc(addr, len(data))
        if self._dirty is not None:
            self._mark_dirty(idx, addr - r.start, len(data))
        if data[:1] == b"\xcc":
            self._int3_pokes.add(addr)
        if self.policy.write_granularity == "byte":
            return self._write_bytes(idx, r, addr, data)
        return self._write_poke(idx, r, addr, data)

    def _write_bytes(self, idx: int, r: _Region, addr: int, data: bytes) -> Task:
        # memcpy stores one byte after another, and any of them may be seen
        # before the next.
        off = addr - r.start
        ls = self.line_size
        mv = r.mv
        for i, b in enumerate(data):
            self._check_open()
            mv[off + i] = b
            line = (idx, (off + i) // ls)
            for c in self._online:
                c.stale.add(line)
            if self.trace is not None:
                self.trace.append(("write", self.steps, None, addr + i, bytes((b,))))
            yield

    def text_poke_write_many(self, writes) -> Task:
        # Byte granularity: exactly the interleavings of one write after
        # another.  Poke granularity: pokes_per_step pokes per step.
        self._check_open()
        if self.policy.write_granularity == "byte":
            for addr, data in writes:
                yield from self.text_poke_write(addr, data)
            return
        per_step = self.policy.pokes_per_step
        online = self._online
        ls = self.line_size
        trace = self.trace
        n_in_step = 0
        for addr, data in writes:
            idx, r = self._text_loc(addr, len(data))
            off = addr - r.start
            n = len(data)
            if self._dirty is not None:
                self._mark_dirty(idx, off, n)
            if data[:1] == b"\xcc":
                self._int3_pokes.add(addr)
            r.mv[off:off + n] = data
            first, last = off // ls, (off + n - 1) // ls
            if first == last:
                line = (idx, first)
                for c in online:
                    c.stale.add(line)
            else:
                lines = [(idx, ln) for ln in range(first, last + 1)]
                for c in online:
                    c.stale.update(lines)
            if trace is not None:
                trace.append(("write", self.steps, None, addr, bytes(data)))
            n_in_step += 1
            if n_in_step >= per_step:
                n_in_step = 0
                yield
                self._check_open()
        if n_in_step:
            yield

    def _write_poke(self, idx: int, r: _Region, addr: int, data: bytes) -> Task:
        # One store of the whole poke; every line it touched goes stale in
        # every view (exactly those lines), then others may look.
        off = addr - r.start
        n = len(data)
        if n:
            r.mv[off:off + n] = data
            ls = self.line_size
            lines = [(idx, ln) for ln in range(off // ls, (off + n - 1) // ls + 1)]
            for c in self._online:
                c.stale.update(lines)
            if self.trace is not None:
                self.trace.append(("write", self.steps, None, addr, data))
        yield

    def text_write_early(self, addr: int, data: bytes) -> None:
        if self.smp_started:
            raise MachineError("text_poke_early() after secondary CPUs started running; "
                               "use the SMP batch")
        data = bytes(data)
        idx, r = self._text_loc(addr, len(data))
        off = addr - r.start
        if self._dirty is not None:
            self._mark_dirty(idx, off, len(data))
        r.mv[off:off + len(data)] = data
        for c in self._online:   # nothing runs yet: views follow at once
            ctypes.memmove(ctypes.addressof(c.views[idx]) + off, data, len(data))
            c.uc.ctl_remove_cache(addr, addr + len(data))


    def view_read(self, cpu: int, addr: int, size: int) -> bytes:
        """What *cpu* would fetch at addr now (its possibly stale view)."""
        idx, r = self._text_loc(addr, size)
        off = addr - r.start
        view = self._vcpu(cpu).views[idx]
        return ctypes.string_at(ctypes.addressof(view) + off, size)


    def _serialise(self, c: VCpu) -> None:
        """sync_core / IRET: every stale line of this CPU's view is refilled
        (adjacent stale lines as one run: one copy, one cache flush)."""
        if c.stale:
            lines = sorted(c.stale)
            c.stale.clear()
            idx, first = lines[0]
            n = 1
            for li, ln in lines[1:]:
                if li == idx and ln == first + n:
                    n += 1
                    continue
                self._refill_run(c, idx, first, n, "sync")
                idx, first, n = li, ln, 1
            self._refill_run(c, idx, first, n, "sync")

    def _refill(self, c: VCpu, line: tuple[int, int], why: str) -> None:
        self._refill_run(c, line[0], line[1], 1, why)

    def _refill_run(self, c: VCpu, idx: int, first: int, nlines: int, why: str) -> None:
        r = self._text[idx]
        off = first * self.line_size
        n = min(nlines * self.line_size, r.size - off)
        dst = ctypes.addressof(c.views[idx]) + off
        lo, hi = changed_span(ctypes.string_at(dst, n), r.mv[off:off + n])
        if hi:
            # Only the translations over bytes that change are dropped (the
            # refill is the same event either way: counted and traced): a
            # block over the rest of the line was made from the same bytes.
            ctypes.memmove(dst + lo, ctypes.addressof(r.buf) + off + lo, hi - lo)
            fast_cpu(c).remove_cache(r.start + off + lo, r.start + off + hi)
        c.refreshes += nlines
        if self.trace is not None:
            self.trace.append(("refill", self.steps, c.id, r.start + off, n, why))
