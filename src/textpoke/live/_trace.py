# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``: the ftrace function tracer on a running process, through
the very client the sim uses (:class:`textpoke._ftrace.Ftrace`, made by
:class:`textpoke.kernel.Kernel` over a :class:`LiveMachine`).

Nothing of ftrace is copied here.  The design is the kernel's, with the
process's threads for CPUs:

* **The runtime is injected** (:mod:`._trace_runtime`): the bundled
  kernel's ``ftrace_caller``, ``function_trace_call``,
  ``function_profile_call``, ``ftrace_ops_list_func`` and ``ftrace_stub``,
  relocated from ``kernel.elf`` into one region mapped in the target within
  rel32 reach of the traced module (``EXECMEM`` kind of memory: r-x code,
  then rw- data).  The same region holds the per-CPU records, the rings and
  the profiler's tables (``DATA``), and the ops' dynamic trampolines the
  client makes (``FTRACE_FL_TRAMP``, from an execmem share of the region).
* **Per-thread rings** (``PERCPU``): each thread's GS base points at its
  own ``struct ftrace_cpu`` (``%gs:0``, as ``this_cpu_ptr``), so events are
  written by the injected code inside the target, in the thread that makes
  the call -- no ptrace stop per call.  A thread that starts later gets a
  ring of its own before it runs (CPU-set listener); one that exits has its
  ring read and freed for the next.  The host only reads the rings (and
  moves ``tail``): :class:`~textpoke._ftrace.RingBuffer`, with the kernel's
  default ``overwrite`` (a full ring overwrites its oldest event and counts
  it in ``overruns``).  The runtime's per-CPU loads (``mov %gs:0``) are
  checked (:func:`._trace_runtime.gs_stub`, with ``live probe``'s emitter
  :mod:`._gscheck`): the base is read without being followed (RDGSBASE,
  or ``arch_prctl(ARCH_GET_GS)`` where the process has no FSGSBASE in
  user mode -- a system call per call) and followed only when it is one
  of the records.  A thread whose GS base is the program's own (set with
  ``arch_prctl(ARCH_SET_GS)`` after the tracer gave it a ring, or
  inherited by a thread made then) gets a sink record instead: its calls
  are not recorded but counted, exactly, as *missed* (``counts()``, the
  CLI's summary and JSON).  Not a spare ring with ``gettid`` as the
  probe's recorder has: the records are the kernel's single-writer rings
  (``head`` read, the entry written, ``head`` stored), which two threads
  sharing one would tear; the kernel's answer to an event it cannot
  record, too, is a count.
* **The records** are what the client knows, fentry sites: a function's
  NOP5 (``-pg -mfentry -mnop-mcount``) is its record, switched NOP5 <-> CALL
  by the client's own update.  A function without one -- any function of
  ``/usr/bin/python3`` or libc -- gets a *pad* in the region: a NOP5 (its
  record, which the client switches like any fentry site), then the
  instructions its entry's 5-byte JMP replaces, moved out of line
  (:mod:`textpoke._relocate`, as ``live count`` does), then a JMP back; the
  entry becomes ``jmp pad`` for the session (written with the quiescence
  the moved instructions need).  ``ftrace_caller`` sees the pad's NOP5 as the
  fentry site (ip) and the function's return address (parent ip): the stack
  at the pad is the function's at its entry.  The two other fentry forms
  (five NOP1s, ``call *__fentry__@GOTPCREL``) are pads too, reached by a
  ``jmp`` written with every thread stopped.

``--profile`` is the client's ``profile`` tracer: the image it is given
names, as its profile callback, ``function_profile_call`` followed by a
small return hook of ours (:data:`PROFILE_CODE`): the kernel's profiler gets
its times from fgraph's return hook, this one keeps a per-thread return
stack and the TSC at entry and return.

The trace clock: the runtime's rings are stamped with the TSC (the bundled
runtime's ``counter`` clock replaced by ``rdtsc`` in the copy, see
:mod:`._trace_runtime`), which orders events across threads where the TSC
is invariant (``constant_tsc`` and ``nonstop_tsc`` in ``/proc/cpuinfo``;
elsewhere the counter clock is kept, and said).  :class:`TscTime` turns a
reading into the target's ``CLOCK_MONOTONIC``: the host samples
(TSC, ``CLOCK_MONOTONIC``) pairs -- one before the tracer starts, one after
each read of the rings -- and an event is placed by linear interpolation
between the two pairs around it, so each timestamp is as exact as a pair
(a fraction of a microsecond) however long the session, and the mapping is
monotonic.  The kernel's ``tsc_khz`` is not readable from user space (and
``cpu MHz`` in ``/proc/cpuinfo`` is the core's current frequency, not the
TSC's), hence the measurement; ``/proc/PID/timens_offsets`` is added so the
times are the process's own ``CLOCK_MONOTONIC`` in a time namespace too.

So the kernel's two-level design holds: sites are switched once by the
client's batch (the INT3 protocol, or stop-machine), and the tracer runs in
the traced program at the cost of a CALL and a ring write.  The README
weighs this against the sketch it had (an injected ring per CPU).

Survival: the region is journaled (kind ``trace``) before it is mapped and
again, with every site that will jump or call into it (each candidate
call target), before any does; a SIGKILL of the tracer leaves the target
running the tracer (the rings fill and overwrite) until ``live recover``
switches the sites back and frees the region.  At a clean end: the client
stops (every record NOP5 again), the entries get their bytes back, every
thread is seen outside the region (``QUIESCE``), the rings are read a last
time, the region is unmapped and the GS bases put back.

The pieces: :mod:`._trace_sites` (which functions, their pads, the switch
to them), :mod:`._trace_runtime` (the runtime's copy), :mod:`._trace_clock`
(the TSC and the process's clock), :mod:`._trace_profile` (the profiler's
return hook), :mod:`._trace_free` (the region freed once no thread is in
it), :mod:`._trace_view` (counts, the profile, trace_pipe's lines); this
module puts them together (:class:`LiveTrace`).
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from .._core._insn import CALL_INSN_OPCODE, text_gen_insn
from .._core._machine import WaitUntil
from .._errors import NotSupportedError, TextPokeError
from ._symbols import Symbols
from ._trace_clock import TscTime, host_tsc, tsc_disabled, tsc_variant_reason
from ._trace_free import alive, free_region, threads_in_region
from ._probe_opt import fsgsbase
from ._trace_profile import _P_FPC, _P_GS, _P_HANDLER, NOP4, PROFILE_CODE, SHADOW_N
from ._trace_view import TraceView, thread_comm
from ._trace_sites import (BRIDGE_SLOT, NOP5, PAD_SIZE, TraceError, TraceSite, fill_pads,
                           group_sites, plan_sites, reach_of, switch_pads)

__all__ = ["LiveTrace", "TraceSite", "TraceError", "PAD_SIZE", "DEFAULT_RING", "NOP5",
           "alive", "TraceStats", "free_region", "threads_in_region", "TscTime",
           "tsc_variant_reason"]

#: entries per thread's ring (the kernel's buffer_size_kb is per CPU too)
DEFAULT_RING = 4096
#: the execmem share for the client's dynamic trampolines
_TRAMP_SHARE = 1024
#: rings at most (threads alive at once)
MAX_RINGS = 1024


@dataclass
class TraceStats:
    events: int = 0           # entries read from the rings
    overruns: int = 0         # overwritten before read (kernel: overrun)
    dropped: int = 0          # refused by a full ring (overwrite off)
    hits: int = 0             # callbacks run
    missed: int = 0           # calls made with a GS base not ours (not recorded)
    threads_seen: int = 0
    threads_without_ring: int = 0
    prof: dict = field(default_factory=dict)


class LiveTrace(TraceView):
    """The function tracer (or profiler) on process *pid*, for the functions
    matching *pattern* (a glob, ``lib:glob``).  ``arm()``, then ``pump`` /
    ``take`` while the window is open, then ``close()``."""

    def __init__(self, pid: int, pattern: str, *, ring: int = DEFAULT_RING,
                 profile: bool = False, strategy: str = "int3",
                 clock: str | None = None) -> None:
        if ring < 2 or ring & (ring - 1):
            raise TraceError(f"--buffer-size must be a power of two >= 2, not {ring}")
        self.pid, self.pattern, self.ring_size = pid, pattern, ring
        self.profile, self.strategy = profile, strategy
        #: the rings' clock: "tsc" where it is invariant, else "counter"
        #: (clock_note says why)
        self.clock_note = tsc_variant_reason() if clock in (None, "tsc") else None
        self.clock = clock or ("counter" if self.clock_note else "tsc")
        self._clock_asked = clock
        if self.clock not in ("tsc", "counter"):
            raise TraceError(f"trace clock {clock!r}: tsc or counter")
        if self.clock == "counter" and clock == "tsc":
            raise TraceError(f"the TSC cannot be the trace clock here: {self.clock_note}")
        self.time: TscTime | None = None
        self.syms = Symbols(pid)
        self.machine = self.core = self.kernel = self.ft = self.ring = None
        self.region = None
        self.stats = TraceStats()
        #: how the runtime reads a thread's GS base before following it
        #: (_trace_runtime.GS_READS); None: RDGSBASE where the process has
        #: FSGSBASE in user mode, else arch_prctl
        self.gs_read: str | None = None
        self._sink: int | None = None
        #: threads whose GS base was the program's own at the start (no ring)
        self._own_gs: set[int] = set()
        self.own_gs_note: str | None = None
        self.skipped: list[dict] = []
        self.kept: list[str] = []
        self._pending: list = []
        self._names: dict[int, str] = {}
        self._parents: dict[int, str] = {}
        self._comm: dict[int, str] = {}
        self._removed: list = []
        self.armed = False
        self._unhook: dict | None = None
        self._pareas = (0, 0, 0)
        self._bridges: list = []
        self._times: dict[int, int] = {}      # prof index -> cycles, threads gone
        self._tsc = None
        self.final_events: list = []
        self.final_counts: dict | None = None
        self.final_profile: list = []
        try:
            self.sites = self._plan()
        except BaseException:
            self.syms.close()
            raise

    # ------------------------------------------------------------ planning
    def _plan(self) -> list[TraceSite]:
        sites = plan_sites(self.syms, self.pattern, self.pid, self.skipped)
        #: the span each bridge must reach (sites out of the runtime's reach)
        self._spans = group_sites(self.syms, sites)
        return sites

    def _reach_of(self, sites) -> tuple[int, int]:
        return reach_of(self.syms, sites)


    # ------------------------------------------------------------ arming
    def arm(self) -> None:
        """Attach, inject the runtime and pads, give every thread its ring,
        switch the entries to their pads and start the tracer through the
        client.  On any error everything is undone."""
        from .._core import TextPoke
        from .._ftrace._ring import RingBuffer
        from ..kernel import Kernel
        from ._machine import LiveMachine
        from ._trace_runtime import (GS_STUB, REC_SIZE, ProcessFtraceImage, build_runtime,
                                     gs_stub, runtime_layout)
        self.machine = m = LiveMachine(self.pid, strategy=self.strategy)
        try:
            # every thread's GS base claimed first (a base a killed tracer
            # left pointing at memory recover freed is taken back to 0); a
            # thread whose base is the program's own keeps it and gets no
            # ring: the runtime's checked loads count its calls missed
            # (the unchecked runtime, a baseline only, would follow it:
            # refused, before anything is mapped)
            self._own_gs = set()
            with m.stopped() as tids:
                for tid in tids:
                    try:
                        m.set_percpu_base(tid, 0)
                    except NotSupportedError as e:
                        if self.gs_read == "unchecked":
                            raise
                        self._own_gs.add(tid)
                        self.own_gs_note = str(e)
                # an RDTSC (the TSC clock's, the profiler's return hook)
                # in a thread that turned it off is a SIGSEGV: asked first
                notsc = tsc_disabled(m, tids) if self.profile or self.clock == "tsc" else None
            if notsc:
                if self.profile or self._clock_asked == "tsc":
                    what = "--profile times calls with RDTSC" if self.profile else \
                        "the TSC clock reads RDTSC"
                    raise TraceError(f"{what}, which would kill process {self.pid}: {notsc}")
                self.clock, self.clock_note = "counter", notsc
            nrec = min(MAX_RINGS, max(16, 2 * len(m.threads) + 8))
            if self.clock == "tsc":
                # the first pair, before any event can be stamped
                self.time = TscTime(self.pid)
            nprof = len(self.sites) if self.profile else 0
            if self.gs_read is None:
                self.gs_read = "rdgsbase" if fsgsbase(self.pid) else "syscall"
            rt_code, rt_data = runtime_layout(nrec, self.clock, nprof=nprof, gs=self.gs_read)
            pads = [s for s in self.sites if s.padded]
            # the profiler's return hook, then its own checked load
            prof_code = -(-(len(PROFILE_CODE) + GS_STUB) // 64) * 64 if self.profile else 0
            code_size = rt_code + prof_code + PAD_SIZE * len(pads) + _TRAMP_SHARE
            ring_bytes = RingBuffer.region_bytes(self.ring_size, nprof, nrec)
            # the profiler's return stacks and cycle tables, one per ring
            pstride = (SHADOW_N * 32 + -(-8 * nprof // 64) * 64) if self.profile else 0
            self.region = r = self._map(m, code_size, rt_data + ring_bytes + pstride * nrec)
            # a bridge near each group of modules out of the runtime's reach
            bridges = []
            for i, span in enumerate(self._spans):
                n = max(s.slot for s in self.sites if s.bridge == i) + 1
                b = self._map(m, BRIDGE_SLOT * n, 0, near=span, group=r.base)
                self._bridges.append(b)
                bridges.append((b.base, bytearray(b"\xcc" * (BRIDGE_SLOT * n))))
            rt = build_runtime(r.base, r.data, nrec, clock=self.clock, nprof=nprof,
                               gs=self.gs_read)
            self._sink = rt.symbols.get("trace_gs_sink")
            code = bytearray(rt.code.ljust(rt_code, b"\xcc"))
            if self.profile:
                # the image's profile callback: function_profile_call (the
                # hit), then the return hook (the time)
                blob = bytearray(PROFILE_CODE)
                struct.pack_into("<QQQ", blob, _P_FPC, rt.symbols["function_profile_call"],
                                 rt.symbols["ftrace_prof_ips"], rt.symbols["ftrace_prof_n"])
                at = r.base + len(code)
                if self.gs_read != "unchecked":
                    # its entry's per-CPU load checked as the runtime's are
                    # (a missed call gets the sink, whose empty return stack
                    # hooks nothing), by a stub that does not count the call
                    # missed again (function_profile_call's load did)
                    percpu = rt.symbols["ftrace_percpu"]
                    stub = at + len(blob)
                    blob += gs_stub(8, self.gs_read, percpu, percpu + nrec * REC_SIZE,
                                    rt.symbols["trace_gs_sink"], count=False)
                    blob[_P_GS:_P_GS + 9] = (b"\xe8" + struct.pack("<i", stub - (at + _P_GS + 5))
                                             + NOP4)
                rt.symbols["function_profile_call"] = at
                code += bytes(blob).ljust(prof_code, b"\xcc")
                self._unhook = {"handler": at + _P_HANDLER, "percpu": rt.symbols["ftrace_percpu"],
                                "nrec": nrec}
                self._pareas = (r.data + rt_data + ring_bytes, pstride, nprof)
            self._fill_pads(r.base + len(code), pads, code, bridges)
            tramp_lo = r.base + len(code)
            code += b"\xcc" * _TRAMP_SHARE
            image = ProcessFtraceImage(f"process {self.pid}", rt, {s.record: s.function for s in self.sites})
            self._names = dict(image.names)
            self._journal(m, r, rt, tramp_lo)
            for b, (_base, bcode) in zip(self._bridges, bridges):
                b.write(b.base, bytes(bcode))
            r.write(r.base, bytes(code))
            r.write(r.data, rt.data)
            m.refresh_maps()
            if self.profile:
                for i in range(nrec):
                    self._reset_shadow(i, times=False)
            self.core = core = TextPoke(m)
            lo = min(x.start for x in m.text_ranges)
            self.kernel = Kernel(core, image, tables=image.tables((lo, lo + 1)),
                                 config={"PREEMPTION": True},
                                 execmem={"ftrace": (tramp_lo, tramp_lo + _TRAMP_SHARE)})
            self.ft = ft = self.kernel.ftrace
            tasks = {tid: (self._thread_comm(tid), tid) for tid in m.threads
                     if tid not in self._own_gs}
            self.ring = RingBuffer(m, image, size=self.ring_size, nprof=nprof, tasks=tasks,
                                   slots=nrec, mapped_at=r.data + rt_data, cpus=list(tasks))
            self.ring.concurrent = True
            self.stats.threads_seen = len(tasks) + len(self._own_gs)
            self.stats.threads_without_ring = len(self._own_gs)
            m.subscribe_cpus(self._on_cpu)
            if self.profile:
                self.ring.set_profile_ips(s.record for s in self.sites)
            self._switch_pads(on=True)
            self.armed = True
            ft.start("profile" if self.profile else "function")
            if self.profile:
                self._tsc = host_tsc()
                self._tsc0 = (self._tsc(), time.perf_counter_ns())
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _map(self, m, code_size: int, data_size: int, *, near: tuple[int, int] | None = None,
             group: int | None = None):
        """The runtime's region (near the sites of the main group), or a
        bridge (near *near*, linked to the runtime's region *group* in the
        journal)."""
        from ._inject import InjectError
        from ._region import Region
        from ._symbols import read_maps
        lo, hi = near or self._reach_of([s for s in self.sites if s.bridge < 0])
        j = m.journal
        tried = []

        def before(base: int, code: int, data: int) -> None:
            j.add_region("trace", base, code, data, [])
            tried.append(base)
            if group is not None:
                j.data["regions"][-1]["group"] = group
                j.flush()

        errors = []
        with m.stopped() as tids:
            for tid in sorted(tids, key=lambda t: t != m.pid):
                try:
                    return Region.map(m.pid, tid, code_size, data_size, near=(lo, hi),
                                      maps=read_maps(m.pid), before=before)
                except (InjectError, OSError) as e:
                    errors.append(f"thread {tid}: {e}")
                    for base in tried:
                        j.drop_region(base, flush=False)
                    tried.clear()
                    j.flush()
                    if isinstance(e, InjectError) and "failed:" in str(e):
                        break
        raise TraceError("could not map the tracer's region: " + "; ".join(errors))

    def _fill_pads(self, at: int, pads: list[TraceSite], code: bytearray, bridges=()) -> None:
        fill_pads(at, pads, code, self.sites, self.skipped, self.pattern, bridges)


    def _journal(self, m, r, rt, tramp_lo: int) -> None:
        """The region with every site that will jump or call into it, before
        any does: ``live recover`` switches those back and frees it."""
        j = m.journal
        targets = [rt.symbols["ftrace_caller"]]
        # the client's ops trampolines come first in their share (one per
        # tracer; where each lands is the allocator's, so every slot a
        # trampoline of the ftrace_caller template can start at)
        size = rt.symbols["ftrace_caller_end"] - rt.symbols["ftrace_caller"] + 5 + 8
        step = -(-size // 16) * 16
        targets += [tramp_lo + i * step for i in range(_TRAMP_SHARE // step)]
        sites = []
        for s in self.sites:
            if not s.padded:
                sites += [(s.addr, s.found, text_gen_insn(CALL_INSN_OPCODE, s.addr, t))
                          for t in targets]
            else:
                sites.append((s.addr, s.found, s.jmp))
        # in place: the runtime's region stays before its bridges (live
        # recover takes them in order, and frees a group with its first);
        # every site is listed with the runtime's region, a bridge's too
        regs = j.data["regions"]
        for e in regs:
            if e["base"] == r.base:
                e["sites"] = [[a, o.hex(), n.hex()] for a, o, n in sites]
                if self._unhook:
                    # what 'live recover' needs to put hooked return addresses back
                    e["unhook"] = dict(self._unhook)
        j.flush()

    def _switch_pads(self, on: bool) -> None:
        """Entries (and the other fentry forms) to ``jmp pad`` or back."""
        switch_pads(self.machine, self.core, self.sites, on)


    # ------------------------------------------------------------ threads
    def _on_cpu(self, event: str, tid: int) -> None:
        ring = self.ring
        if ring is None:
            return
        if event == "add":
            self.stats.threads_seen += 1
            comm = self._thread_comm(tid)
            try:
                ok = ring.add_cpu(tid, comm, tid)
                if ok and self._unhook:
                    self._reset_shadow(ring.slot[tid], times=True)
            except (TextPokeError, OSError):
                ok = False
            if not ok:
                # it keeps its parent's GS base: the program's own (its
                # calls are counted as missed), or its parent's ring (events
                # still land, two writers)
                self.stats.threads_without_ring += 1
        elif event == "remove":
            if self._unhook and tid in ring.slot:
                for i, c in enumerate(self._read_times(ring.slot[tid])):
                    self._times[i] = self._times.get(i, 0) + c
            entries, counts = ring.remove_cpu(tid)
            self._removed.append((entries, counts))

    def _thread_comm(self, tid: int) -> str:
        return thread_comm(self.pid, tid, self._comm)

    # ------------------------------------------------------------ the window
    def pump(self, until: Callable[[], bool]) -> None:
        """Let the process run (servicing its stops: signals, new threads)
        until *until()*."""
        m = self.machine

        def task():
            yield WaitUntil(lambda: until() or not m.threads, "the trace window")
        m.run_task(task())

    def take(self) -> list:
        """The events read from every ring since the last call, in
        timestamp order (trace_pipe: consumed)."""
        import heapq
        out = self.ring.drain() if self.ring is not None else []
        if self.time is not None:
            # after the read: every event read lies before this pair
            self.time.sample()
        if self._removed:
            per = [e for e, _c in self._removed] + [out]
            for _e, c in self._removed:
                self._fold(c)
            self._removed = []
            out = list(heapq.merge(*per, key=lambda e: e.ts))
        self.stats.events += len(out)
        return out

    # ------------------------------------------------------------ the end
    def close(self) -> dict:
        """Stop the tracer (every record NOP5), give the entries their bytes
        back, read the rings a last time once no thread is in the region,
        unmap it, put the GS bases back, detach.  Returns what is left:
        ``int3_left`` (sites whose first byte reads INT3), ``restored``,
        ``regions_kept``; the last events are kept for :meth:`take`."""
        left = {"int3_left": 0, "restored": False, "regions_kept": []}
        m = self.machine
        tail: list = []
        try:
            if m is not None and not getattr(m, '_closed', False):
                try:
                    if self.ft is not None and self.ft.func != "none":
                        self.ft.stop()
                finally:
                    if self.core is not None:
                        self._switch_pads(on=False)
                self._free(m, tail)
        finally:
            try:
                if self.kernel is not None:
                    self.kernel.close()
                if self.core is not None:
                    self.core.close()
            finally:
                self.kernel = self.core = None
                if m is not None:
                    if self.ring is not None:
                        m.unsubscribe_cpus(self._on_cpu)
                    try:
                        m.close()
                    finally:
                        left["regions_kept"] = list(m.regions_kept) + self.kept
                self.syms.close()
        self.final_events = tail
        left["int3_left"] = self.int3_left()
        left["restored"] = self.restored()
        return left

    def _free(self, m, tail: list) -> None:
        """Once no thread is in the region: read the rings, put the GS bases
        back, unmap.  A region a thread may still be in stays mapped (with
        its data and the bases), said why."""
        r = self.region
        if r is None:
            return
        # the last events and counts (nothing writes them any more once no
        # thread can be in the region; what a thread still finishing
        # function_trace_call writes is read after the look below)
        why = free_region(m, r, unmap=False, unhook=self._unhook)
        if self.ring is not None:
            tail += self.take()
            self.final_counts = self.counts()
            self.final_profile = self.profile_counts() if self.profile else []
        if why:
            self.kept += [f"trace region {r.base:#x}: " + "; ".join(why)]
            return
        if self.ring is not None:
            for tid in list(self.ring.slot):
                with contextlib.suppress(TextPokeError, OSError):
                    if tid in m.threads:
                        m.set_percpu_base(tid, 0)
        why = free_region(m, r, unhook=self._unhook)
        if why:
            self.kept += [f"trace region {r.base:#x}: " + "; ".join(why)]
        else:
            j = m.journal
            # the runtime's own CALLs the client switched (ftrace_call, the
            # trampolines') are finished writes: gone with the region
            j.data["sites"] = {a: v for a, v in j.data["sites"].items()
                               if not r.base <= int(a) < r.end}
            j.drop_region(r.base)
            self.region = None
            for b in self._bridges:
                b.close()
            self._bridges = []

    def int3_left(self) -> int:
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            return sum(1 for s in self.sites if os.pread(fd, 1, s.addr) == b"\xcc")
        except OSError:
            return 0
        finally:
            os.close(fd)

    def restored(self) -> bool:
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return all(os.pread(fd, len(s.found), s.addr) == s.found for s in self.sites)
        except OSError:
            return False
        finally:
            os.close(fd)
