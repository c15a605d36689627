# SPDX-License-Identifier: GPL-2.0-only
"""Text of a live process: its executable mappings as text ranges, reads
through a page cache that our own writes keep current, and writes grouped
into runs (one ``pwrite`` per run, each read back).  A mixin of
LiveMachine."""

from __future__ import annotations

import os
from typing import Sequence

from .._core._machine import PAGE_SIZE, TextRange
from .._errors import BadAddressError, MachineError, VerifyMismatchError
from ._errors import ProcessChanged
from ._process import Mapping, read_maps

_SKIP_MAPS = frozenset({"[vdso]", "[vsyscall]", "[uprobes]", "[vvar]"})
_INT3 = 0xCC


class _Text:
    """LiveMachine's text reads and writes (a mixin)."""

    def refresh_maps(self) -> list[TextRange]:
        """Re-read /proc/PID/maps (after the process mapped or unmapped code)."""
        maps = read_maps(self.pid)
        exe = self._ident.exe
        ranges, first = [], None
        for m in maps:
            if not m.executable or m.path in _SKIP_MAPS:
                continue
            anon = not m.path.startswith("/")
            name = os.path.basename(m.path) if not anon else (m.path or f"[anon:{m.start:#x}]")
            r = TextRange(m.start, m.end, name, core=not anon)
            if first is None and m.path == exe:
                first = r
            else:
                ranges.append(r)
        if first is None:
            if not ranges:
                raise MachineError(f"pid {self.pid} has no executable mapping")
            first = ranges.pop(0)
        self._maps = maps
        self._ranges = [first] + ranges
        self._pages.clear()
        return self._ranges

    def text_range_of(self, addr: int, size: int = 1) -> TextRange:
        try:
            return super().text_range_of(addr, size)
        except BadAddressError:
            if self._closed:
                raise
            self.refresh_maps()           # mapped since we last looked?
            return super().text_range_of(addr, size)

    def _mapping_of(self, addr: int) -> Mapping | None:
        for m in self._maps:
            if m.start <= addr < m.end:
                return m
        return None

    def text_read(self, addr: int, size: int) -> bytes:
        # Fast path: within one cached page (the cache is emptied by close()
        # and at every task).  Every read of a batch takes it.
        page = addr & ~(PAGE_SIZE - 1)
        chunk = self._pages.get(page)
        if chunk is not None and addr + size <= page + PAGE_SIZE:
            off = addr - page
            return chunk[off:off + size]
        self._check_open()
        pages = self._pages
        out = []
        a, end = addr, addr + size
        while a < end:
            page = a & ~(PAGE_SIZE - 1)
            chunk = pages.get(page)
            if chunk is None:
                m = self._mapping_of(a)
                if m is None or not m.executable:
                    self.text_range_of(a, min(end, page + PAGE_SIZE) - a)   # refresh or raise
                    m = self._mapping_of(a)
                if m is not None and m.writable:       # the process may write here: no cache
                    n = min(end, page + PAGE_SIZE) - a
                    out.append(self._mem.read(a, n))
                    a += n
                    continue
                chunk = self._mem.read(page, PAGE_SIZE)
                pages[page] = chunk
            off = a - page
            n = min(end - a, PAGE_SIZE - off)
            out.append(chunk[off:off + n])
            a += n
        return out[0] if len(out) == 1 else b"".join(out)


    # ------------------------------------------------------------- writing
    def _check_write(self) -> None:
        self._check_open()
        if self._exec_seen:
            raise ProcessChanged(self.pid, "the process called exec: its text is another "
                                 "program's", self._ident.name)
        self._ident.check()

    def _runs(self, writes: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytearray]]:
        """Group writes into runs: nearby writes (less than a page apart, in
        one read-only mapping) share one pwrite, the bytes between them
        taken from the text as it is (read once per run, then each write
        laid over it in order: not one read per gap -- 10,000 sites)."""
        groups: list[tuple[int, int, list[tuple[int, bytes]]]] = []
        cur_start, cur_end, cur, cur_map = -1, -1, None, None
        int3_sites = self._int3_sites
        count = 0
        for addr, data in writes:
            count += 1
            n = len(data)
            if n == 0:
                continue
            if n == 1 and data[0] == _INT3:
                int3_sites.add(addr)
            m = cur_map
            if m is None or not (m.start <= addr and addr + n <= m.end):
                m = self._mapping_of(addr)
            if m is None or not m.executable or addr + n > m.end:
                self.text_range_of(addr, n)       # refresh maps, or BadAddressError
                m = self._mapping_of(addr)
                if m is None or not m.executable or addr + n > m.end:
                    raise BadAddressError(f"[{addr:#x}, +{n}) is not in an executable mapping "
                                          f"of pid {self.pid}")
            if (cur is not None and m is cur_map and not m.writable and cur_start <= addr
                    and addr - cur_end < PAGE_SIZE):
                cur.append((addr, data))
                if addr + n > cur_end:
                    cur_end = addr + n
                continue
            if cur is not None:
                groups.append((cur_start, cur_end, cur))
            cur_start, cur_end, cur, cur_map = addr, addr + n, [(addr, data)], m
        if cur is not None:
            groups.append((cur_start, cur_end, cur))
        self.stats.pokes += count
        runs: list[tuple[int, bytearray]] = []
        for k, (start, end, ws) in enumerate(groups):
            if len(ws) == 1:
                runs.append((start, bytearray(ws[0][1])))
                continue
            buf = bytearray(self.text_read(start, end - start))
            # the runs are written in order: an earlier run's bytes inside
            # this one's span (writes out of address order) are what the
            # text will hold by then, not what it holds now
            for s0, e0, ws0 in groups[:k]:
                if s0 < end and start < e0:
                    for a, d in ws0:
                        lo, hi = max(a, start), min(a + len(d), end)
                        if lo < hi:
                            buf[lo - start:hi - start] = d[lo - a:hi - a]
            for a, d in ws:
                off = a - start
                buf[off:off + len(d)] = d
            runs.append((start, buf))
        return runs

    def _write_runs(self, runs: list[tuple[int, bytearray]]) -> None:
        mem, pages = self._mem, self._pages
        for start, buf in runs:
            data = bytes(buf)
            mem.write(start, data)
            self.stats.writes += 1
            back = mem.read(start, len(data))
            # keep the page cache current with what memory now holds
            a, end = start, start + len(data)
            while a < end:
                page = a & ~(PAGE_SIZE - 1)
                n = min(end, page + PAGE_SIZE) - a
                old = pages.get(page)
                if old is not None:
                    off = a - page
                    pages[page] = old[:off] + back[a - start:a - start + n] + old[off + n:]
                a += n
            if back != data:
                raise VerifyMismatchError(f"pid {self.pid}: text at {start:#x} reads "
                                          f"{back[:16].hex()} after writing {data[:16].hex()}")
