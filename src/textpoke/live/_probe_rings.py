# SPDX-License-Identifier: GPL-2.0-only
"""The optimised ``live probe``'s rings: one per thread, in the target's
data memory, found by the recorder (:mod:`._probe_opt`) at ``%gs:0``.

:class:`ProbeRing` is one ring: a 64-byte header (its own address, the
thread id of its writer or 0, the head its writers claim entries with, the
mask) then the entries.  The host keeps the tail; the commit protocol is
in :mod:`._probe_opt`'s doc.

:class:`ThreadRings` maps ``slots`` rings and one spare in one data region
and gives every thread of the process a ring of its own through the
machine's ``PERCPU`` capability (the thread's GS base): the threads there
at the start, and each new one while it is still stopped at its creation
(a CPU-set listener's ``"add"``), before it runs a user instruction.  A
thread that exits gives its ring back once the ring is read to its end.
When every ring is taken, new threads share the spare ring, whose thread
id reads 0 (the recorder then asks ``gettid``; its head's ``lock xadd``
keeps it correct with several writers).

A thread whose GS base is the program's own when the probe starts (the
machine refuses to set it: NotSupportedError) is left alone and shares
the spare ring; one whose base the program sets later, while probed, is
seen by the recorder itself (RDGSBASE and a range check against
:meth:`ThreadRings.headers` before following it: :mod:`._probe_opt`), and
its hits go to the spare ring too.  With *use_gs* False (no FSGSBASE in
user mode: the recorder cannot check a base without following it) no GS
base is touched and every thread shares the spare ring.

At the end, once the rings are unmapped, the live machine puts back every
GS base that still points at a ring (and only those: a base the program
set since is its own) to what it was, 0; ``live recover`` does the same
for a killed prober's threads (:mod:`._recover`).
"""

from __future__ import annotations

import struct

from .._core._machine import Capability
from .._errors import NotSupportedError
from ._probe_opt import ENTRY, ENTRY_SIZE, RING_HDR

__all__ = ["ProbeRing", "ThreadRings", "RING_SLOTS_MAX"]

#: rings of a session beyond the threads there at the start (new threads)
RING_SLOTS_SPARE = 8
RING_SLOTS_MAX = 256
_HEAD = 16


class ProbeRing:
    """The ring of recorded hits at *addr* in the target (*size* entries, a
    power of two): the header (self, tid, head, mask) then the entries.  The
    host keeps the tail; see :mod:`._probe_opt` for the commit protocol."""

    #: drains an uncommitted entry may hold the read up before it is dropped
    #: (a thread killed between its claim and its commit never commits)
    STALL_LIMIT = 200

    def __init__(self, mem, addr: int, size: int) -> None:
        if size < 2 or size & (size - 1):
            raise ValueError(f"ring size {size}: a power of two >= 2")
        self.mem, self.addr, self.size = mem, addr, size
        self.tail = 0
        self.overruns = 0
        self.dropped = 0
        self._stall = (0, 0)

    @staticmethod
    def data_bytes(size: int) -> int:
        return RING_HDR + size * ENTRY_SIZE

    def header(self, tid: int = 0) -> bytes:
        return struct.pack("<QQQQ", self.addr, tid, 0, self.size - 1)

    def head(self) -> int:
        return struct.unpack("<Q", self.mem.read(self.addr + _HEAD, 8))[0]

    def drain(self, *, final: bool = False) -> list[tuple]:
        """The committed entries since the last drain, in claim order (raw
        tuples).  *final*: no writer is left, an uncommitted entry is
        dropped (counted) rather than waited for."""
        head = self.head()
        out: list[tuple] = []
        if head - self.tail > self.size:
            self.overruns += head - self.tail - self.size
            self.tail = head - self.size
        while self.tail < head:
            i0 = self.tail
            n = min(head - i0, self.size - (i0 & (self.size - 1)), 256)
            at = self.addr + RING_HDR + (i0 & (self.size - 1)) * ENTRY_SIZE
            raw = self.mem.read(at, n * ENTRY_SIZE)
            again = self.mem.read(at, n * ENTRY_SIZE)
            stop = False
            for k in range(n):
                i = i0 + k
                s1 = struct.unpack_from("<Q", raw, k * ENTRY_SIZE)[0]
                s2 = struct.unpack_from("<Q", again, k * ENTRY_SIZE)[0]
                if s1 == s2 == i + 1:
                    out.append(ENTRY.unpack_from(raw, k * ENTRY_SIZE))
                elif max(s1, s2) > i + 1:
                    self.overruns += 1          # a later lap took its place
                elif final or self._stalled(i):
                    self.dropped += 1           # claimed, never committed
                else:
                    stop = True
                    break
                self.tail = i + 1
            if stop:
                break
        return out

    def _stalled(self, i: int) -> bool:
        idx, n = self._stall
        n = n + 1 if idx == i else 1
        self._stall = (i, n)
        return n > self.STALL_LIMIT


class ThreadRings:
    """A ring per thread of *machine*'s process (see the module doc):
    :meth:`start` gives the threads there their rings (one that uses its
    GS base itself shares the spare: :attr:`own_gs`), :meth:`drain`
    reads every ring, :meth:`stop` stops following new threads."""

    def __init__(self, machine, size: int, slots: int, *, use_gs: bool = True) -> None:
        machine.require(Capability.DATA, "live probe's rings")
        if use_gs:
            machine.require(Capability.PERCPU, "live probe's per-thread rings")
        self.machine, self.size, self.use_gs = machine, size, use_gs
        self.slots = max(0, min(slots, RING_SLOTS_MAX)) if use_gs else 0
        #: threads left on the spare ring because their GS base is the program's
        self.own_gs: set[int] = set()
        stride = -(-ProbeRing.data_bytes(size) // 64) * 64
        self.base = machine.map_data(stride * (self.slots + 1), "probe-rings")
        self.rings = [ProbeRing(machine.mem, self.base + i * stride, size)
                      for i in range(self.slots + 1)]
        self.spare = self.rings[-1]
        machine.mem.write(self.spare.addr, self.spare.header(0))
        self.free = list(range(self.slots))
        #: tid -> index of its ring (the spare's index for those sharing it)
        self.of: dict[int, int] = {}
        #: entries of rings whose thread exited, read before they were given back
        self._retired: list[tuple] = []
        self._counts = [0, 0, 0]          # tail, overruns, dropped of rings given back
        self._listening = False

    def start(self) -> None:
        """Every thread there its ring, then every new thread as it comes."""
        m = self.machine
        if not self.use_gs:
            return
        m.subscribe_cpus(self._cpu)
        self._listening = True
        for tid in list(m.cpus):
            self._give(tid)

    def stop(self) -> None:
        if self._listening:
            self.machine.unsubscribe_cpus(self._cpu)
            self._listening = False

    def _give(self, tid: int) -> None:
        if tid in self.of:
            return
        if self.free:
            i = self.free.pop(0)
            r = self.rings[i]
            r.tail, r._stall = 0, (0, 0)
            self.machine.mem.write(r.addr, r.header(tid))
        else:
            i = len(self.rings) - 1                 # the spare: tid 0, gettid
        try:
            self.machine.set_percpu_base(tid, self.rings[i].addr)
        except NotSupportedError:
            # the program's own base: left as it is, the recorder's check
            # sends this thread's hits to the spare ring
            if i != len(self.rings) - 1:
                self.free.insert(0, i)
            i = len(self.rings) - 1
            self.own_gs.add(tid)
        self.of[tid] = i

    def _cpu(self, event: str, tid: int) -> None:
        if event == "add":
            self._give(tid)
            return
        i = self.of.pop(tid, None)
        if i is None or i == len(self.rings) - 1:
            return
        # the thread is gone: what it wrote is read to the end, the ring
        # is free for the next thread
        r = self.rings[i]
        self._retired.extend(r.drain(final=True))
        self._counts[0] += r.tail
        self._counts[1] += r.overruns
        self._counts[2] += r.dropped
        r.tail = r.overruns = r.dropped = 0
        self.free.append(i)

    def drain(self, *, final: bool = False) -> list[tuple]:
        """Every committed entry since the last drain, of every ring, in
        TSC order (the clock is one for every CPU: the recorder's rule)."""
        out, self._retired = self._retired, []
        for i in sorted(set(self.of.values()) | {len(self.rings) - 1}):
            out.extend(self.rings[i].drain(final=final))
        out.sort(key=lambda raw: raw[1])
        return out

    def _sum(self, k: int, attr: str) -> int:
        return self._counts[k] + sum(getattr(r, attr) for r in self.rings)

    @property
    def tail(self) -> int:
        """Entries claimed and accounted for (read, overrun or dropped)."""
        return self._sum(0, "tail")

    @property
    def overruns(self) -> int:
        return self._sum(1, "overruns")

    @property
    def dropped(self) -> int:
        return self._sum(2, "dropped")

    def headers(self) -> tuple[int, int]:
        """``[lo, hi)`` holding every ring's header (and no byte of a header
        past the mapping): what the recorder's range check accepts."""
        return self.base, self.spare.addr + RING_HDR

    def span(self) -> tuple[int, int]:
        return self.base, self.base + (self.rings[-1].addr - self.base) + \
            ProbeRing.data_bytes(self.size)
