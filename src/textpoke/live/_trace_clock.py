# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``'s clock: the TSC the runtime stamps events with, and
its conversion to the target's ``CLOCK_MONOTONIC`` (:class:`TscTime`).
See :mod:`._trace` for the design."""

from __future__ import annotations

import os
import time
from typing import Callable

__all__ = ["host_tsc", "tsc_disabled", "tsc_variant_reason", "TscTime"]


def host_tsc() -> Callable[[], int]:
    """The host's own RDTSC (the traced threads' clock: the TSC is one
    clock on every CPU where it is invariant), as a callable."""
    import ctypes
    import mmap
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(bytes.fromhex("0f3148c1e2204809d0c3"))     # rdtsc; shl; or; ret
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._buf = buf                   # keep the page
    return fn


def tsc_variant_reason(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """None when the TSC is one clock for every thread (invariant: it runs
    at a constant rate, in every C-state, synchronised across CPUs --
    ``constant_tsc`` and ``nonstop_tsc`` on every CPU), else why not."""
    try:
        with open(cpuinfo) as f:
            flags = [set(line.split(":", 1)[1].split()) for line in f
                     if line.startswith("flags")]
    except OSError as e:
        return f"{cpuinfo}: {e.strerror}"
    if not flags:
        return f"no CPU flags in {cpuinfo}"
    missing = sorted({w for fl in flags for w in ("tsc", "constant_tsc", "nonstop_tsc")
                      if w not in fl})
    return f"no {', '.join(missing)} in {cpuinfo}" if missing else None


def _timens_monotonic(pid: int | str) -> int:
    """The monotonic offset (ns) of *pid*'s time namespace (0 if none)."""
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            for line in f:
                w = line.split()
                if w and w[0] in ("monotonic", "1"):
                    return int(w[1]) * 1_000_000_000 + int(w[2])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TscTime:
    """TSC readings of the target's threads -> the target's
    ``CLOCK_MONOTONIC`` (ns): (TSC, CLOCK_MONOTONIC) pairs sampled on the
    host (:meth:`sample`; the TSC is the same on every CPU where it is
    invariant), a reading placed by linear interpolation between the pairs
    around it (past the last, the last two pairs' rate goes on).  The last
    :attr:`KEEP` pairs at least are kept (a sample per read of the rings,
    every 20 ms: the list would grow without end)."""

    KEEP = 256

    def __init__(self, pid: int) -> None:
        self._rdtsc = host_tsc()
        self.offset = _timens_monotonic(pid) - _timens_monotonic("self")
        self.c: list[int] = []
        self.t: list[int] = []
        self._first: tuple[int, int] | None = None
        self.sample()

    def sample(self) -> None:
        """One more pair: CLOCK_MONOTONIC between two RDTSCs, the tightest
        of a few tries, its TSC the middle of the two."""
        rd, now = self._rdtsc, time.clock_gettime_ns
        best = None
        for _ in range(5):
            a = rd()
            t = now(time.CLOCK_MONOTONIC)
            b = rd()
            if b >= a and (best is None or b - a < best[0]):
                best = (b - a, (a + b) // 2, t)
        if best is None:
            return
        _w, c, t = best
        if not self.c or (c > self.c[-1] and t > self.t[-1]):
            self.c.append(c)
            self.t.append(t + self.offset)
            if self._first is None:
                self._first = (c, t + self.offset)
            if len(self.c) > 2 * self.KEEP:
                # an event is read at most a read or two after the pair
                # that follows it: the oldest pairs are no longer needed
                del self.c[:-self.KEEP], self.t[:-self.KEEP]

    def ns(self, c: int) -> int:
        import bisect
        cs, ts = self.c, self.t
        if len(cs) < 2:
            self.sample()
            if len(cs) < 2:
                return ts[0]
        j = min(max(bisect.bisect_right(cs, c) - 1, 0), len(cs) - 2)
        return ts[j] + (c - cs[j]) * (ts[j + 1] - ts[j]) // (cs[j + 1] - cs[j])

    def hz(self) -> float:
        """The TSC's rate over the session (cycles per second)."""
        if len(self.c) < 2 or self._first is None:
            return 0.0
        c0, t0 = self._first
        return (self.c[-1] - c0) * 1e9 / (self.t[-1] - t0)


#: prctl(2): PR_GET_TSC and what it stores (PR_TSC_ENABLE, PR_TSC_SIGSEGV)
SYS_prctl, PR_GET_TSC, PR_TSC_ENABLE, PR_TSC_SIGSEGV = 157, 25, 1, 2
#: where the answer is stored: below the stopped thread's red zone (128
#: bytes under rsp, the ABI's), where a signal frame would go -- nothing
#: of the thread's lives there
_SCRATCH = 512


def tsc_disabled(m, tids) -> str | None:
    """With *tids* stopped (a :class:`LiveMachine`'s ``stopped()``): why an
    RDTSC in one of them would not run -- a thread that made
    ``prctl(PR_SET_TSC, PR_TSC_SIGSEGV)`` gets SIGSEGV for it (the flag is
    per thread, and a new thread inherits its creator's) -- or None.  Asked
    of every thread with an injected ``prctl(PR_GET_TSC, scratch)``.
    Shared: ``live trace`` (its TSC clock, ``--profile``) and ``live
    probe``'s optimised recorder (``rdtscp``) ask it before mapping."""
    import struct

    from .._errors import TextPokeError
    from ._inject import find_syscall_insn, inject_syscall
    at = find_syscall_insn(m.pid)
    for tid in tids:
        slot = (m.get_regs(tid).rsp - _SCRATCH) & ~7
        try:
            old = m.mem.read(slot, 4)
            m.mem.write(slot, b"\xff\xff\xff\xff")
            rc = inject_syscall(m.pid, tid, SYS_prctl, PR_GET_TSC, slot, syscall_at=at)
            mode = struct.unpack("<i", m.mem.read(slot, 4))[0]
            m.mem.write(slot, old)
        except (OSError, TextPokeError) as e:
            return f"thread {tid}: its TSC mode cannot be read ({e})"
        if rc < 0:
            return f"thread {tid}: prctl(PR_GET_TSC) failed: {os.strerror(-rc)}"
        if mode != PR_TSC_ENABLE:
            return (f"thread {tid} has RDTSC disabled (prctl PR_SET_TSC, "
                    f"{'PR_TSC_SIGSEGV' if mode == PR_TSC_SIGSEGV else mode})")
    return None
