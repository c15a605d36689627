# SPDX-License-Identifier: GPL-2.0-only
"""Regions of our own in a traced process: mapped by injected system calls
(:mod:`._inject`), freed only once no thread can be inside.

:class:`Region` maps a region for code and data with ``mmap`` at a chosen
address (``MAP_FIXED_NOREPLACE``: it fails rather than replace anything)
within ±2 GiB of the code that will call into it (a CALL rel32 must reach),
writes code through /proc/PID/mem, and unmaps it with ``munmap`` only when
:meth:`Region.in_use` finds no thread that could still be inside it
(:func:`threads_inside`, which the live machine's ``quiesce`` uses too):

* no thread's rip is in the region, and
* no 8-byte word in the top of any thread's stack (from rsp - 128, the red
  zone, to rsp + ``STACK_SCAN`` bytes, within the stack's mapping) points
  into the region -- which catches return addresses and the rip saved in a
  signal frame by a signal that interrupted a thread in the region (a
  handler on a ``sigaltstack`` is not covered).

The caller must have made the region unreachable first (every site that
called into it switched back, and a sync since).  A stale word that merely
looks like a pointer makes the check refuse; the caller then keeps the
region (a page or two left mapped costs nothing; unmapping code a thread
still runs would kill it).

A :class:`Region` is the mapping only: handing out chunks of executable
memory is :class:`textpoke._execmem.ExecMem`'s job on every machine (on
live over a region that :meth:`LiveMachine.execmem_range` maps with this
class).
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from . import _inject
from . import _ptrace as pt
from . import _rescue
from ._inject import (_MASK, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PAGE, PROT_EXEC,
                      PROT_READ, PROT_WRITE, SYS_mmap, SYS_mprotect, SYS_munmap, InjectError,
                      find_syscall_insn, register_rescue)
from ._process import Mapping, read_maps

__all__ = ["Region", "pick_address", "STACK_SCAN", "LOW_INTEGERS", "threads_inside"]

STACK_SCAN = 64 * 1024
_S32 = 1 << 31


def inject_syscall(*args, **kw) -> int:
    """:func:`._inject.inject_syscall`, looked up at each call (a test
    wraps it there to stop a command at a chosen call)."""
    return _inject.inject_syscall(*args, **kw)


#: Below this, a region's addresses look like the small integers a stack is
#: full of: a counter of 4,000,000 on a thread's stack would read as a return
#: address into a stub region at 0x3d0000 and keep it from being freed.
LOW_INTEGERS = 1 << 30


def pick_address(maps: Sequence[Mapping], size: int, lo_site: int, hi_site: int) -> int:
    """A free, page-aligned address for *size* bytes from which every CALL
    in [lo_site, hi_site] reaches the whole region with a rel32.  Prefer the
    gap just below the code (above it the heap grows), then above the
    highest mapping near it; above :data:`LOW_INTEGERS` where the code's
    reach allows (a non-PIE at 0x400000: between 1 and 2 GiB)."""
    try:
        return _pick(maps, size, lo_site, hi_site, LOW_INTEGERS)
    except InjectError:
        return _pick(maps, size, lo_site, hi_site, 0x10000)


def _pick(maps: Sequence[Mapping], size: int, lo_site: int, hi_site: int, floor: int) -> int:
    size = -(-size // PAGE) * PAGE
    # every site s calls a target t with |t - (s + 5)| < 2**31
    lo_ok = max(hi_site + 5 - _S32 + PAGE, floor)
    hi_ok = lo_site + 5 + _S32 - PAGE          # region end must stay below
    spans = sorted((m.start, m.end) for m in maps)
    gaps = []
    prev = 0x10000                            # vm.mmap_min_addr's usual value
    for s, e in spans:
        if s > prev:
            gaps.append((prev, s))
        prev = max(prev, e)
    gaps.append((prev, 0x7FFFFFFFF000))
    heap = [m for m in maps if m.path == "[heap]"]
    below = [(a, b) for a, b in gaps if b <= lo_site]
    for a, b in reversed(below):            # the nearest gap below, at its top
        top = min(b, hi_ok) - PAGE            # a guard page under the code
        start = (top - size) // PAGE * PAGE
        if start >= max(a, lo_ok):
            return start
    for a, b in gaps:
        if a < lo_site:
            continue
        if heap and a <= heap[0].end:         # leave the heap room to grow
            a = max(a, heap[0].end + (64 << 20))
        start = max(-(-(a + PAGE) // PAGE) * PAGE, -(-lo_ok // PAGE) * PAGE)
        if start + size <= min(b, hi_ok) and start >= lo_ok:
            return start
    raise InjectError(f"no free {size:#x}-byte gap within ±2 GiB of {lo_site:#x}-{hi_site:#x}")


def threads_inside(pid: int, threads: Iterable[tuple[int, pt.UserRegs]],
                   rip_ranges: Sequence[tuple[int, int]], word_ranges: Sequence[tuple[int, int]],
                   maps: Sequence[Mapping] | None = None,
                   read: Callable[[int, int], bytes] | None = None) -> list[str]:
    """Why some (stopped) thread may be inside one of the ranges: its rip in
    a ``[lo, hi)`` of *rip_ranges*, or an 8-byte word on the top of its
    stack (from rsp - 128, the red zone, to rsp + :data:`STACK_SCAN`, within
    the stack's mapping) pointing into one of *word_ranges* -- a return
    address, or the rip a signal frame saved.  Empty: none is."""
    maps = list(maps) if maps is not None else read_maps(pid)
    fd = -1
    if read is None:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        read = lambda addr, size: os.pread(fd, size, addr)   # noqa: E731
    why = []
    # sorted starts, for a bisect per word (live count passes a range per
    # entry it moves: 8,192 words x 1,000 ranges per thread otherwise)

    def index(ranges: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        rs = sorted(ranges)
        ends, top = [], 0
        for _a, b in rs:
            top = max(top, b)
            ends.append(top)            # the furthest end of any range starting so far
        return [a for a, _b in rs], ends

    def inside(v: int, idx: tuple[list[int], list[int]]) -> bool:
        i = bisect.bisect_right(idx[0], v)      # the ranges starting at or below v
        return i > 0 and v < idx[1][i - 1]

    ridx, widx = index(rip_ranges), index(word_ranges)
    try:
        for tid, regs in threads:
            rip = inside(regs.rip, ridx) or None
            if rip is not None:
                why.append(f"thread {tid} runs at {regs.rip:#x}")
                continue
            lo = max(regs.rsp - 128, 0)
            stack = next((m for m in maps if m.start <= regs.rsp < m.end), None)
            hi = min(regs.rsp + STACK_SCAN, stack.end if stack else regs.rsp + 4096)
            try:
                buf = read(lo, hi - lo)
            except OSError:
                why.append(f"thread {tid}: its stack at {regs.rsp:#x} cannot be read")
                continue
            words = struct.unpack_from(f"<{len(buf) // 8}Q", buf)
            for i, w in enumerate(words):
                if inside(w, widx):
                    why.append(f"thread {tid}: stack word at {lo + 8 * i:#x} "
                               f"(rsp{lo + 8 * i - regs.rsp:+d}, rip {regs.rip:#x}) = {w:#x} "
                               "points into it")
                    break
    finally:
        if fd >= 0:
            os.close(fd)
    return why


@dataclass
class Region:
    """A region of executable memory (``code_size`` bytes, r-x) followed by
    ``data_size`` bytes of data (rw-), mapped in a stopped thread's process.
    A region from :meth:`map` counts its rescue's two pages (rw-, then r-x)
    as the last of ``data_size``: its user asked for two pages less."""

    pid: int
    base: int
    code_size: int
    data_size: int
    mapped: bool = True
    syscall_at: int = 0
    rescue: object = field(default=None, repr=False)
    _fd: int = field(default=-1, repr=False)

    @property
    def end(self) -> int:
        return self.base + self.code_size + self.data_size

    @property
    def data(self) -> int:
        return self.base + self.code_size

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.end

    @classmethod
    def map(cls, pid: int, tid: int, code_size: int, data_size: int, *, near: tuple[int, int],
            maps: Sequence[Mapping] | None = None,
            wait: Callable[[int], tuple[int, int]] | None = None,
            before: Callable[[int, int, int], None] | None = None) -> "Region":
        """mmap code+data (rounded to pages) within rel32 reach of every
        address in *near* = (lowest, highest) call site, in thread *tid*."""
        code_size = -(-code_size // PAGE) * PAGE
        data_size = -(-data_size // PAGE) * PAGE if data_size else 0
        # the rescue (see ._rescue): its data page, then its code page, after
        # the data; they count as data for everybody else (journal, unmap)
        rescue_at = code_size + data_size
        data_size += _rescue.RESCUE_PAGES * PAGE
        maps = list(maps) if maps is not None else read_maps(pid)
        syscall_at = find_syscall_insn(pid, maps)
        total = code_size + data_size
        want = pick_address(maps, total, *near)
        if before is not None:          # e.g. a journal: written before the region exists
            before(want, code_size, data_size)
        # mapped r-x as a whole: the code and the rescue code are final at
        # once, and this mmap is the one call of the region that runs
        # without its own rescue (from another region's, or the bootstrap);
        # /proc/PID/mem writes through the protection
        got = inject_syscall(pid, tid, SYS_mmap, want, total, PROT_READ | PROT_EXEC,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1 & _MASK, 0,
                             syscall_at=syscall_at, wait=wait)
        if got < 0:
            raise InjectError(f"mmap({want:#x}, {total:#x}) in process {pid} failed: "
                              f"{os.strerror(-got)}")
        if got != want:              # a kernel without MAP_FIXED_NOREPLACE took it as a hint
            inject_syscall(pid, tid, SYS_munmap, got, total, syscall_at=syscall_at, wait=wait)
            raise InjectError(f"mmap placed the region at {got:#x}, not at {want:#x}")
        region = cls(pid, got, code_size, data_size, syscall_at=syscall_at)
        resc = _rescue.Rescue(pid, got + rescue_at)
        try:
            region.write(resc.code_page, resc.code())
        except BaseException:
            inject_syscall(pid, tid, SYS_munmap, got, total, syscall_at=syscall_at, wait=wait)
            region.close()
            raise
        register_rescue(resc)
        region.rescue = resc
        # the data (and the rescue's slots) writable: through the rescue
        r = inject_syscall(pid, tid, SYS_mprotect, got + code_size, rescue_at - code_size + PAGE,
                           PROT_READ | PROT_WRITE, syscall_at=syscall_at, wait=wait)
        if r < 0:
            inject_syscall(pid, tid, SYS_munmap, got, total, syscall_at=syscall_at, wait=wait)
            region.close()
            raise InjectError(f"mprotect(rw-) in process {pid} failed: {os.strerror(-r)}")
        return region

    # --- contents ---------------------------------------------------------
    def _mem(self) -> int:
        if self._fd < 0:
            self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def write(self, addr: int, data: bytes) -> None:
        """Write (code or data) through /proc/PID/mem and read it back."""
        if not (self.base <= addr and addr + len(data) <= self.end):
            raise InjectError(f"write of {len(data)} bytes at {addr:#x} is outside the region")
        fd = self._mem()
        n = os.pwrite(fd, data, addr)
        if n != len(data) or os.pread(fd, len(data), addr) != data:
            raise InjectError(f"write at {addr:#x} in process {self.pid} did not verify")

    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self._mem(), size, addr)

    # --- freeing ----------------------------------------------------------
    def in_use(self, threads: Iterable[tuple[int, pt.UserRegs]],
               maps: Sequence[Mapping] | None = None) -> list[str]:
        """Reasons the region may still be in use, given the registers of
        every (stopped) thread: rip inside, or a stack word pointing into
        its code (see the module doc).  Empty: safe to unmap."""
        return threads_inside(self.pid, threads, [(self.base, self.end)],
                              [(self.base, self.base + self.code_size)], maps, self.read)

    def unmap(self, tid: int, wait: Callable[[int], tuple[int, int]] | None = None) -> None:
        """munmap in thread *tid* (stopped).  The caller checked :meth:`in_use`."""
        if not self.mapped:
            return
        r = inject_syscall(self.pid, tid, SYS_munmap, self.base, self.end - self.base,
                           syscall_at=self.syscall_at or None, wait=wait)
        if r < 0:
            raise InjectError(f"munmap({self.base:#x}) in process {self.pid} failed: {os.strerror(-r)}")
        self.mapped = False
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
