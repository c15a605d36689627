# SPDX-License-Identifier: GPL-2.0-only
"""The function tracer's per-CPU ring buffers, in guest memory.

The guest side is ``images/kernel/ftrace.c``: each vCPU finds its own
``struct ftrace_cpu`` through ``%gs:0`` (this object points every vCPU's GS
base at its record, whose first word points at itself) and appends
``struct trace_entry`` records (timestamp, fentry address, caller's return
address, pid) to its ring, advancing ``head`` after the entry is written.
The host is the only consumer: :meth:`RingBuffer.drain` reads the entries
between ``tail`` and ``head`` and then advances ``tail``.  A host step runs
between guest instructions, so no entry is ever seen half-written.

What a full ring does follows the kernel's ``options/overwrite`` (per
ring here, :attr:`RingBuffer.overwrite`):

- on, the kernel's default: the new event takes the slot of the oldest
  unread one, counted in the CPU's ``overruns`` (the kernel's per-CPU
  ``overrun`` statistic); the host then reads only the newest *size*
  entries.  ``trace``'s header counts these as written
  (``entries-in-buffer/entries-written``: entries + overruns);
- off: the new event is dropped and counted in ``dropped`` (the kernel's
  ``dropped events``), and the oldest entries are the ones kept.

:attr:`RingBuffer.overruns` and :attr:`RingBuffer.dropped_events` are the
two counts, :attr:`RingBuffer.lost` their sum: never silently lost.  The
producer (guest code) never writes ``tail``; a full ring in overwrite mode
is seen by the host as ``head - tail > size``, the oldest
``head - tail - size`` of them gone.

Timestamps are the guest's global event counter (the kernel's ``counter``
trace clock): they order events across CPUs and are printed as integers,
as trace_pipe prints that clock.  :func:`format_trace_line` gives
trace_pipe's ``<task>-<pid> [cpu] ..... ts: func <-caller`` line.

The ring's layout is our own; the semantics follow
``kernel/trace/ring_buffer.c`` and ``kernel/trace/trace_output.c``.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from .._core._machine import Capability

__all__ = ["RingBuffer", "TraceEntry", "format_trace_line", "FTRACE_DATA_BASE",
           "TRACE_ENTRY_SIZE", "FTRACE_CPUS"]

#: where the rings, the profiler's tables and the sorted ip table live
FTRACE_DATA_BASE = 0x0800_0000
FTRACE_CPUS = 8
TRACE_ENTRY_SIZE = 32
_ENTRY = struct.Struct("<QQQQ")
#: entries read at a time from a ring whose producer runs meanwhile
_CHUNK = 256
_CPU_REC = 128
# struct ftrace_cpu field offsets (8 bytes each)
(_SELF, _CPU, _PID, _BUF, _MASK, _HEAD, _TAIL, _OVERRUNS, _HITS, _PROF, _OVERWRITE,
 _DROPPED) = range(12)


@dataclass(frozen=True, slots=True)
class TraceEntry:
    ts: int
    cpu: int
    ip: int
    parent_ip: int
    pid: int


def _page_up(n: int) -> int:
    return (n + 0xFFF) & ~0xFFF


class RingBuffer:
    """Per-CPU rings of *size* entries (a power of two) for every CPU of
    *machine*, set up in the guest's ``ftrace_percpu`` records of *image*;
    the profiler's per-function counters for *nprof* functions sit next to
    them.  *tasks* names each CPU's task: cpu -> (comm, pid).  Needs the
    machine's ``DATA`` (the rings) and ``PERCPU`` (each CPU's record)
    capabilities.  *overwrite* is the kernel's ``options/overwrite``
    (default on, as the kernel's): a full ring overwrites its oldest event
    instead of dropping the new one; :attr:`overwrite` changes it later."""

    def __init__(self, machine, image, *, size: int = 4096, nprof: int = 0,
                 tasks: dict[int, tuple[str, int]] | None = None,
                 base: int | None = FTRACE_DATA_BASE, overwrite: bool = True,
                 slots: int | None = None, mapped_at: int | None = None,
                 cpus: Iterable[int] | None = None) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, not {size}")
        machine.require(Capability.DATA, "ftrace ring buffers")
        machine.require(Capability.PERCPU, "ftrace per-CPU records")
        # (cpus: the CPUs given a ring at the start, default every CPU of
        # the machine; live trace leaves out a thread on its own GS base)
        cpus = list(machine.cpus) if cpus is None else list(cpus)
        #: the image's ``struct ftrace_cpu`` records (the bundled kernel has 8)
        nrec = getattr(image, "sizes", {}).get("ftrace_percpu", FTRACE_CPUS * _CPU_REC) // _CPU_REC
        if slots is None:
            # a CPU's ring is its number's: CPU ids are small
            if any(c >= nrec for c in cpus):
                raise ValueError(f"the image has ftrace records for {nrec} CPUs")
            nslots = max(cpus) + 1
            self.slot = {c: c for c in cpus}
        else:
            # CPU ids that are not small numbers (a process's thread ids): each
            # gets the next free ring, and CPUs that come later (add_cpu) too
            if not len(cpus) <= slots <= nrec:
                raise ValueError(f"{slots} rings for {len(cpus)} CPUs: want from {len(cpus)} "
                                 f"to the image's {nrec} records")
            nslots = slots
            self.slot = {c: i for i, c in enumerate(cpus)}
        self.machine, self.image, self.size = machine, image, size
        self._mem = machine.mem
        self.cpus = cpus
        self.nslots = nslots
        self.percpu = image.sym("ftrace_percpu")
        self.clock = image.sym("trace_clock_counter")
        self.nprof = nprof
        self.prof_stride = _page_up(8 * max(nprof, 1))
        self.ring_stride = size * TRACE_ENTRY_SIZE
        total = self.region_bytes(size, nprof, nslots)
        if mapped_at is not None:
            # memory the caller mapped (and frees) with its own: region_bytes() long
            base = mapped_at
        else:
            # base None: wherever the machine puts it
            base = machine.map_data(_page_up(total), "ftrace", base)
        self.base, self.region_size = base, _page_up(total)
        self.ips_addr = base
        self.prof0 = base + _page_up(8 * max(nprof, 1))
        self.ring0 = self.prof0 + self.prof_stride * nslots
        self.tasks = dict(tasks or {})
        self._overwrite = bool(overwrite)
        for cpu in cpus:
            self._init_cpu(cpu)
        self.comms = {pid: comm for comm, pid in self.tasks.values()}
        self.drained = 0
        #: producers run while the host reads (a process's threads; not a
        #: vCPU between two host steps): see drain_cpu
        self.concurrent = False

    @staticmethod
    def region_bytes(size: int, nprof: int, slots: int) -> int:
        """The data the rings and the profiler's tables take (page-rounded)."""
        prof = _page_up(8 * max(nprof, 1))
        return _page_up(prof + prof * slots + size * TRACE_ENTRY_SIZE * slots)

    def _init_cpu(self, cpu: int) -> None:
        comm, pid = self.tasks.setdefault(cpu, (f"ftrace_work/{cpu}", 1000 + cpu))
        rec = self._rec(cpu)
        s = self.slot[cpu]
        for f, v in ((_SELF, rec), (_CPU, cpu), (_PID, pid), (_BUF, self._ring(cpu)),
                     (_MASK, self.size - 1), (_HEAD, 0), (_TAIL, 0), (_OVERRUNS, 0), (_HITS, 0),
                     (_PROF, self.prof0 + s * self.prof_stride),
                     (_OVERWRITE, int(self._overwrite)), (_DROPPED, 0)):
            self._w(rec + 8 * f, v)
        # this_cpu_ptr(): the guest reads its record at %gs:0
        self.machine.set_percpu_base(cpu, rec)

    def add_cpu(self, cpu: int, comm: str, pid: int) -> bool:
        """Give a CPU that came after the start (a new thread) a ring of its
        own: a free record, zeroed, and its per-CPU base pointed at it.
        False when every ring is taken (the CPU keeps the base it has)."""
        if cpu in self.slot:
            return True
        free = sorted(set(range(self.nslots)) - set(self.slot.values()))
        if not free:
            return False
        self.slot[cpu] = free[0]
        self.tasks[cpu] = (comm, pid)
        self.comms[pid] = comm
        self.cpus.append(cpu)
        if getattr(self, "prof_ips", None):
            self._mem.write(self.prof0 + free[0] * self.prof_stride, bytes(8 * self.nprof))
        self._init_cpu(cpu)
        return True

    def remove_cpu(self, cpu: int) -> tuple[list[TraceEntry], dict[str, int]]:
        """A CPU that is gone (a thread that exited: it runs nothing any
        more): its unread entries and its counts (``overruns``,
        ``dropped``, ``hits``, ``prof``: per-function hits), and its ring
        free for the next CPU."""
        if cpu not in self.slot:
            return [], {}
        entries = self.drain_cpu(cpu)
        counts = {"overruns": self.field(cpu, _OVERRUNS),
                  "dropped": self.field(cpu, _DROPPED),
                  "hits": self.field(cpu, _HITS)}
        table = getattr(self, "prof_ips", [])
        if table:
            raw = self._mem.read(self._prof(cpu), 8 * len(table))
            counts["prof"] = dict(zip(table, struct.unpack(f"<{len(table)}Q", raw)))
        self.cpus.remove(cpu)
        del self.slot[cpu]
        return entries, counts

    # ------------------------------------------------------------ layout
    def _rec(self, cpu: int) -> int:
        return self.percpu + self.slot[cpu] * _CPU_REC

    def _ring(self, cpu: int) -> int:
        return self.ring0 + self.slot[cpu] * self.ring_stride

    def _prof(self, cpu: int) -> int:
        return self.prof0 + self.slot[cpu] * self.prof_stride

    def _w(self, addr: int, v: int) -> None:
        self._mem.write(addr, struct.pack("<Q", v & ((1 << 64) - 1)))

    def _r(self, addr: int) -> int:
        return int.from_bytes(self._mem.read(addr, 8), "little")

    def field(self, cpu: int, f: int) -> int:
        return self._r(self._rec(cpu) + 8 * f)

    # ------------------------------------------------------------ profiler table
    def set_profile_ips(self, ips: Iterable[int]) -> list[int]:
        """Give the guest's profiler its sorted table of addresses (at most
        *nprof*) and zero every CPU's counters; return the sorted table."""
        table = sorted(set(ips))
        if len(table) > self.nprof:
            raise ValueError(f"{len(table)} functions to profile, room for {self.nprof}")
        self._mem.write(self.ips_addr, b"".join(struct.pack("<Q", a) for a in table))
        self._w(self.image.sym("ftrace_prof_n"), len(table))
        self._w(self.image.sym("ftrace_prof_ips"), self.ips_addr)
        self.prof_ips = table
        self.reset_profile()
        return table

    def reset_profile(self) -> None:
        for cpu in self.cpus:
            self._mem.write(self._prof(cpu), bytes(8 * self.nprof))

    def profile(self) -> dict[int, int]:
        """Hits per function address, summed over CPUs (the guest's counts)."""
        table = getattr(self, "prof_ips", [])
        out = dict.fromkeys(table, 0)
        for cpu in self.cpus:
            raw = self._mem.read(self._prof(cpu), 8 * len(table))
            for a, n in zip(table, struct.unpack(f"<{len(table)}Q", raw)):
                out[a] += n
        return out

    # ------------------------------------------------------------ ring
    @property
    def overwrite(self) -> bool:
        """The kernel's ``options/overwrite``: a full ring overwrites its
        oldest unread event (True, the default) or drops the new one."""
        return self._overwrite

    @overwrite.setter
    def overwrite(self, on: bool) -> None:
        # every CPU's record; the next event each CPU writes follows it
        # (ring_buffer_change_overwrite: the buffer is kept)
        for c in self.cpus:
            self._w(self._rec(c) + 8 * _OVERWRITE, int(bool(on)))
        self._overwrite = bool(on)

    @property
    def overruns(self) -> int:
        """Events overwritten before they were read (overwrite mode), all
        CPUs: the kernel's ``overrun``."""
        return sum(self.overruns_per_cpu().values())

    def overruns_per_cpu(self) -> dict[int, int]:
        return {c: self.field(c, _OVERRUNS) for c in self.cpus}

    @property
    def dropped_events(self) -> int:
        """New events refused by a full ring (overwrite off), all CPUs: the
        kernel's ``dropped events``."""
        return sum(self.dropped_per_cpu().values())

    def dropped_per_cpu(self) -> dict[int, int]:
        return {c: self.field(c, _DROPPED) for c in self.cpus}

    @property
    def lost(self) -> int:
        """Events not readable any more, whatever the mode: overruns plus
        dropped events."""
        return self.overruns + self.dropped_events

    def hits(self) -> int:
        """Callbacks run, all CPUs (recorded, counted or dropped)."""
        return sum(self.hits_per_cpu().values())

    def hits_per_cpu(self) -> dict[int, int]:
        return {c: self.field(c, _HITS) for c in self.cpus}

    def pending(self, cpu: int) -> int:
        """Entries a read of *cpu*'s ring would give (at most *size*)."""
        return min(self.field(cpu, _HEAD) - self.field(cpu, _TAIL), self.size)

    def drain_cpu(self, cpu: int) -> list[TraceEntry]:
        head, tail = self.field(cpu, _HEAD), self.field(cpu, _TAIL)
        if head - tail <= 0:
            return []
        # overwrite mode: the slots before head - size hold newer events now
        tail = max(tail, head - self.size)
        ring = self._ring(cpu)
        out = []
        mask = self.size - 1
        # one read per contiguous stretch of the ring -- in short chunks when
        # the producer runs while we read (a process's threads do; a vCPU
        # between two host steps does not): after each, the entries the
        # producer has lapped meanwhile (index < its head - size) may be
        # torn and are dropped -- it counted them as overruns when it
        # overwrote them -- and reading goes on past them
        chunk = _CHUNK if self.concurrent else self.size
        while tail < head:
            i = tail & mask
            run = min(head - tail, self.size - i, chunk)
            raw = self._mem.read(ring + i * TRACE_ENTRY_SIZE, run * TRACE_ENTRY_SIZE)
            first = tail
            if self.concurrent:
                gone = self.field(cpu, _HEAD) - self.size
                if gone > tail:
                    k = min(gone - tail, run)
                    raw = raw[k * TRACE_ENTRY_SIZE:]
                    first = tail + k
                    if gone >= tail + run:
                        tail = min(max(gone, tail + run), head)
                        continue
            for ts, ip, parent, pid in _ENTRY.iter_unpack(raw):
                out.append(TraceEntry(ts, cpu, ip, parent, pid))
            tail = first + len(raw) // TRACE_ENTRY_SIZE
        self._w(self._rec(cpu) + 8 * _TAIL, head)
        self.drained += len(out)
        return out

    def drain(self) -> list[TraceEntry]:
        """Every entry not yet read, all CPUs merged in timestamp order (as
        trace_pipe merges them); consumed."""
        per = [self.drain_cpu(c) for c in self.cpus]
        return list(heapq.merge(*per, key=lambda e: e.ts))

    def reset(self) -> None:
        """Discard what is buffered and zero the overrun, dropped and hit
        counts (``echo > trace``)."""
        for c in self.cpus:
            self._w(self._rec(c) + 8 * _TAIL, self.field(c, _HEAD))
            for f in (_OVERRUNS, _DROPPED, _HITS):
                self._w(self._rec(c) + 8 * f, 0)


def format_trace_line(e: TraceEntry, name: Callable[[int], str],
                      comms: dict[int, str] | None = None) -> str:
    """trace_pipe's function-tracer line: ``<task>-<pid> [cpu] flags ts:
    func <-caller`` (comm right-aligned in 16 columns, pid left-aligned in
    7, as the kernel prints them), with the irq-info column the kernel's
    ``options/irq-info`` shows by default: irqs-off, need-resched,
    hard/soft irq, preempt depth, migrate-disable depth.  The guest's
    entries record no flags; the workload calls every traced function
    from its task loop with nothing of these set, so the column is
    ``.....`` on every line (what the kernel prints for such a context)."""
    comm = (comms or {}).get(e.pid, "<...>")
    return (f"{comm:>16}-{e.pid:<7} [{e.cpu:03d}] ..... {e.ts:>12}: {name(e.ip)} "
            f"<-{name(e.parent_ip)}")
