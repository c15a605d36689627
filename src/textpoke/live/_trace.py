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
  it in ``overruns``).
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
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from .._core._insn import CALL_INSN_OPCODE, JMP32_INSN_OPCODE, text_gen_insn, x86_nops
from .._core._machine import WaitUntil
from .._errors import TextPokeError
from ._symbols import SymbolError, Symbols

__all__ = ["LiveTrace", "TraceSite", "TraceError", "PAD_SIZE", "DEFAULT_RING"]

NOP5 = x86_nops[5]
PAD_SIZE = 64
#: entries per thread's ring (the kernel's buffer_size_kb is per CPU too)
DEFAULT_RING = 4096
#: the execmem share for the client's dynamic trampolines
_TRAMP_SHARE = 1024
#: rings at most (threads alive at once)
MAX_RINGS = 1024
#: a trace cannot call across more than this (rel32 from any site to the runtime)
_REACH = (1 << 31) - (64 << 20)


class TraceError(TextPokeError, ValueError):
    """Nothing to trace, or the functions cannot be traced (one line)."""


@dataclass(slots=True)
class TraceSite:
    """One traced function: where the tracer enters it."""

    function: str
    module: str
    kind: str                 # "nop5", "entry", "5xnop1", "call-got"
    addr: int                 # the site in the function
    found: bytes              # its bytes now (what goes back at the end)
    plan: object = None       # EntryPlan (entries)
    record: int = 0           # the NOP5 the client switches (addr, or the pad's)
    pad: int = 0              # the pad (not nop5)
    jmp: bytes = b""          # what the site holds while traced (not nop5)

    def as_dict(self) -> dict:
        return {"function": self.function, "module": self.module, "kind": self.kind,
                "addr": f"{self.addr:#x}", "record": f"{self.record:#x}"}


@dataclass
class TraceStats:
    events: int = 0           # entries read from the rings
    overruns: int = 0         # overwritten before read (kernel: overrun)
    dropped: int = 0          # refused by a full ring (overwrite off)
    hits: int = 0             # callbacks run
    threads_seen: int = 0
    threads_without_ring: int = 0
    prof: dict = field(default_factory=dict)


class LiveTrace:
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
        if self.clock not in ("tsc", "counter"):
            raise TraceError(f"trace clock {clock!r}: tsc or counter")
        if self.clock == "counter" and clock == "tsc":
            raise TraceError(f"the TSC cannot be the trace clock here: {self.clock_note}")
        self.time: TscTime | None = None
        self.syms = Symbols(pid)
        self.machine = self.core = self.kernel = self.ft = self.ring = None
        self.region = None
        self.stats = TraceStats()
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
        from ._entry import entry_sites
        from ._fentry import fentry_sites
        pattern = self.pattern
        try:
            funcs = self.syms.functions(pattern)
        except SymbolError as e:
            raise TraceError(str(e)) from None
        found = fentry_sites(self.syms, pattern)
        sites: list[TraceSite] = []
        for s in found:
            if s.kind in ("nop5", "5xnop1", "call-got"):
                sites.append(TraceSite(s.function, s.module, s.kind, s.addr, bytes(s.found)))
            else:
                self.skipped.append(dict(s.as_dict(), why=f"fentry site holds {s.kind}"))
        covered = {s.func_addr for s in found}
        ents, refused = entry_sites(self.syms, pattern,
                                    functions=[f for f in funcs if f.addr not in covered])
        for e in ents:
            # the JMP covers 5 bytes: what goes back (the rest of the moved
            # instructions stays as it is)
            sites.append(TraceSite(e.function, e.module, "entry", e.addr, bytes(e.found),
                                   plan=e.plan))
        self.skipped += [dict(r.as_dict(), kind=r.reason) for r in refused]
        if not sites:
            if not funcs and not found:
                raise TraceError(f"no function matching {pattern!r} in process {self.pid}")
            why = "; ".join(f"{d.get('function')}: {d.get('why')}" for d in self.skipped[:3])
            raise TraceError(f"nothing matching {pattern!r} can be traced ({len(self.skipped)} "
                             f"refused; {why})")
        sites.sort(key=lambda s: s.addr)
        lo, hi = self._reach_of(sites)
        if hi - lo > _REACH:
            mods = sorted({s.module for s in sites})
            raise TraceError(f"the functions matching {pattern!r} lie in modules more than 2 GiB "
                             f"apart ({', '.join(mods[:4])}): the sites call one runtime in rel32 "
                             "reach -- trace one module at a time (lib:GLOB)")
        return sites

    def _reach_of(self, sites) -> tuple[int, int]:
        lo, hi = sites[0].addr, sites[-1].addr + 8
        for mod in {s.module for s in sites if s.kind != "nop5"}:
            with contextlib.suppress(SymbolError):
                m = self.syms.module(mod)
                lo = min(lo, min(x.start for x in m.mappings))
                hi = max(hi, max(x.end for x in m.mappings))
        return lo, hi

    # ------------------------------------------------------------ arming
    def arm(self) -> None:
        """Attach, inject the runtime and pads, give every thread its ring,
        switch the entries to their pads and start the tracer through the
        client.  On any error everything is undone."""
        from .._core import TextPoke
        from .._ftrace._ring import RingBuffer
        from ..kernel import Kernel
        from ._machine import LiveMachine
        from ._trace_runtime import ProcessFtraceImage, build_runtime, runtime_layout
        self.machine = m = LiveMachine(self.pid, strategy=self.strategy)
        try:
            # every thread's GS base claimed first (refused, before anything
            # is mapped, for a program that uses it; a base a killed tracer
            # left pointing at memory recover freed is taken back to 0)
            with m.stopped() as tids:
                for tid in tids:
                    m.set_percpu_base(tid, 0)
            nrec = min(MAX_RINGS, max(16, 2 * len(m.threads) + 8))
            if self.clock == "tsc":
                # the first pair, before any event can be stamped
                self.time = TscTime(self.pid)
            rt_code, rt_data = runtime_layout(nrec, self.clock)
            pads = [s for s in self.sites if s.kind != "nop5"]
            prof_code = -(-len(PROFILE_CODE) // 64) * 64 if self.profile else 0
            code_size = rt_code + prof_code + PAD_SIZE * len(pads) + _TRAMP_SHARE
            nprof = len(self.sites) if self.profile else 0
            ring_bytes = RingBuffer.region_bytes(self.ring_size, nprof, nrec)
            # the profiler's return stacks and cycle tables, one per ring
            pstride = (SHADOW_N * 32 + -(-8 * nprof // 64) * 64) if self.profile else 0
            self.region = r = self._map(m, code_size, rt_data + ring_bytes + pstride * nrec)
            rt = build_runtime(r.base, r.data, nrec, clock=self.clock)
            code = bytearray(rt.code.ljust(rt_code, b"\xcc"))
            if self.profile:
                # the image's profile callback: function_profile_call (the
                # hit), then the return hook (the time)
                blob = bytearray(PROFILE_CODE)
                struct.pack_into("<QQQ", blob, _P_FPC, rt.symbols["function_profile_call"],
                                 rt.symbols["ftrace_prof_ips"], rt.symbols["ftrace_prof_n"])
                at = r.base + len(code)
                rt.symbols["function_profile_call"] = at
                code += bytes(blob).ljust(prof_code, b"\xcc")
                self._unhook = {"handler": at + _P_HANDLER, "percpu": rt.symbols["ftrace_percpu"],
                                "nrec": nrec}
                self._pareas = (r.data + rt_data + ring_bytes, pstride, nprof)
            self._fill_pads(r.base + len(code), pads, code)
            tramp_lo = r.base + len(code)
            code += b"\xcc" * _TRAMP_SHARE
            image = ProcessFtraceImage(f"process {self.pid}", rt, {s.record: s.function for s in self.sites})
            self._names = dict(image.names)
            self._journal(m, r, rt, tramp_lo)
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
            tasks = {tid: (self._thread_comm(tid), tid) for tid in m.threads}
            self.ring = RingBuffer(m, image, size=self.ring_size, nprof=nprof, tasks=tasks,
                                   slots=nrec, mapped_at=r.data + rt_data)
            self.ring.concurrent = True
            self.stats.threads_seen = len(tasks)
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

    def _map(self, m, code_size: int, data_size: int):
        from ._inject import InjectError, Region
        from ._symbols import read_maps
        lo, hi = self._reach_of(self.sites)
        j = m.journal

        def before(base: int, code: int, data: int) -> None:
            j.add_region("trace", base, code, data, [])

        errors = []
        with m.stopped() as tids:
            for tid in sorted(tids, key=lambda t: t != m.pid):
                try:
                    return Region.map(m.pid, tid, code_size, data_size, near=(lo, hi),
                                      maps=read_maps(m.pid), before=before)
                except (InjectError, OSError) as e:
                    errors.append(f"thread {tid}: {e}")
                    j.data["regions"] = [x for x in j.data["regions"] if x["sites"]
                                         or x["kind"] != "trace"]
                    j.flush()
                    if isinstance(e, InjectError) and "failed:" in str(e):
                        break
        raise TraceError("could not map the tracer's region: " + "; ".join(errors))

    def _fill_pads(self, at: int, pads: list[TraceSite], code: bytearray) -> None:
        from .._relocate import RelocError, trampoline
        keep = []
        for s in pads:
            pad = at + PAD_SIZE * len(keep)
            try:
                if s.kind == "entry":
                    body = trampoline(s.plan, pad, head=NOP5)
                else:       # an fentry form: nothing to move, the pad goes back after it
                    body = NOP5 + text_gen_insn(JMP32_INSN_OPCODE, pad + 5, s.addr + len(s.found))
            except RelocError as e:
                self.skipped.append({"function": s.function, "addr": f"{s.addr:#x}",
                                     "module": s.module, "kind": e.reason, "why": str(e)})
                self.sites.remove(s)
                continue
            assert len(body) <= PAD_SIZE, len(body)
            code += body.ljust(PAD_SIZE, b"\xcc")
            s.pad = s.record = pad
            s.jmp = text_gen_insn(JMP32_INSN_OPCODE, s.addr, pad) + b"\x90" * (len(s.found) - 5
                                                                               if s.kind != "entry" else 0)
            keep.append(s)
        for s in self.sites:
            if s.kind == "nop5":
                s.record = s.addr
        if not self.sites:
            raise TraceError(f"nothing matching {self.pattern!r} can be traced: every entry's "
                             "instructions are out of reach of the tracer's region")

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
            if s.kind == "nop5":
                sites += [(s.addr, s.found, text_gen_insn(CALL_INSN_OPCODE, s.addr, t))
                          for t in targets]
            else:
                sites.append((s.addr, s.found, s.jmp))
        j.drop_region(r.base, flush=False)
        j.add_region("trace", r.base, r.code_size, r.data_size, sites)
        if self._unhook:
            # what 'live recover' needs to put hooked return addresses back
            j.data["regions"][-1]["unhook"] = dict(self._unhook)
            j.flush()

    def _switch_pads(self, on: bool) -> None:
        """Entries (and the other fentry forms) to ``jmp pad`` or back."""
        from ._entry import quiescent_tails
        from ._fentry import QUIESCENT
        m, core = self.machine, self.core
        pads = [s for s in self.sites if s.kind != "nop5"]
        todo = []
        for s in pads:
            want = s.jmp if on else s.found
            if m.text_read(s.addr, len(want)) != want:
                todo.append((s, want))
        quiet = [(s.addr, w) for s, w in todo if s.kind in QUIESCENT]
        batch = [(s, w) for s, w in todo if s.kind not in QUIESCENT]
        if batch:
            entries = [s for s, _ in batch if on]
            tails = quiescent_tails(m, [_EntryView(s) for s in entries]) if entries \
                else contextlib.nullcontext()
            with tails:
                with core.batch():
                    for s, w in batch:
                        # going back: while the INT3 stands the old JMP is emulated
                        # (the pad runs the same instructions)
                        core.smp_text_poke_batch_add(s.addr, w, emulate=None if on else s.jmp)
        if quiet:
            m.write_stopped(quiet)

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
                # it keeps its parent's ring: events still land, two writers
                self.stats.threads_without_ring += 1
        elif event == "remove":
            if self._unhook and tid in ring.slot:
                for i, c in enumerate(self._read_times(ring.slot[tid])):
                    self._times[i] = self._times.get(i, 0) + c
            entries, counts = ring.remove_cpu(tid)
            self._removed.append((entries, counts))

    def _reset_shadow(self, slot: int, *, times: bool) -> None:
        """Ring *slot*'s return stack emptied (and its cycle table zeroed)."""
        base0, stride, nprof = self._pareas
        area = base0 + slot * stride
        rec = self._unhook["percpu"] + slot * 128
        mem = self.machine.mem
        mem.write(rec + _F_SP, struct.pack("<QQQQ", area, area + SHADOW_N * 32, area,
                                           area + SHADOW_N * 32))
        if times and nprof:
            mem.write(area + SHADOW_N * 32, bytes(8 * nprof))

    def _read_times(self, slot: int) -> list[int]:
        base0, stride, nprof = self._pareas
        if not nprof:
            return []
        raw = self.machine.mem.read(base0 + slot * stride + SHADOW_N * 32, 8 * nprof)
        return list(struct.unpack(f"<{nprof}Q", raw))

    def _thread_comm(self, tid: int) -> str:
        c = self._comm.get(tid)
        if c is None:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    c = f.read().strip()
            except OSError:
                c = "<...>"
            self._comm[tid] = c
        return c

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

    def _fold(self, c: dict) -> None:
        st = self.stats
        st.overruns += c.get("overruns", 0)
        st.dropped += c.get("dropped", 0)
        st.hits += c.get("hits", 0)
        for a, n in c.get("prof", {}).items():
            st.prof[a] = st.prof.get(a, 0) + n

    def counts(self) -> dict:
        """Overruns, dropped events and hits so far (threads alive and gone)."""
        r = self.ring
        live = {"overruns": r.overruns, "dropped": r.dropped_events, "hits": r.hits()} \
            if r is not None else {}
        st = self.stats
        return {"overruns": st.overruns + live.get("overruns", 0),
                "dropped": st.dropped + live.get("dropped", 0),
                "hits": st.hits + live.get("hits", 0)}

    def profile_counts(self) -> list[tuple[str, int, int]]:
        """(function, hits, time in ns), most hits first: the profiler's
        per-thread counters summed, threads gone included; the time is the
        return hook's cycles (call to return, children included: the
        kernel's graph-time), at the TSC rate measured over the session."""
        per = dict(self.stats.prof)
        table = getattr(self.ring, "prof_ips", None) if self.ring is not None else None
        if table:
            for a, n in self.ring.profile().items():
                per[a] = per.get(a, 0) + n
        cyc = dict(self._times)
        if table and self._unhook:
            for s in self.ring.slot.values():
                for i, c in enumerate(self._read_times(s)):
                    cyc[i] = cyc.get(i, 0) + c
        ns_per = self._ns_per_cycle()
        out: dict[str, list[int]] = {}
        for i, a in enumerate(table or sorted(per)):
            name = self._names.get(a, f"{a:#x}")
            o = out.setdefault(name, [0, 0])
            o[0] += per.get(a, 0)
            o[1] += round(cyc.get(i, 0) * ns_per)
        return sorted(((k, h, t) for k, (h, t) in out.items()), key=lambda x: (-x[1], x[0]))

    def _ns_per_cycle(self) -> float:
        if self._tsc is None:
            return 0.0
        c0, n0 = self._tsc0
        c1, n1 = self._tsc(), time.perf_counter_ns()
        return (n1 - n0) / (c1 - c0) if c1 > c0 else 0.0

    def func_name(self, ip: int) -> str:
        return self._names.get(ip) or self.parent_name(ip)

    def parent_name(self, ip: int) -> str:
        """``%ps``: the function's name, without offset."""
        n = self._parents.get(ip)
        if n is None:
            try:
                n = self.syms.symbolize(ip).split("+", 1)[0]
            except Exception:
                n = f"{ip:#x}"
            if len(self._parents) < 1 << 16:
                self._parents[ip] = n
        return n

    def ns(self, e) -> int | None:
        """Event *e*'s time: the target's ``CLOCK_MONOTONIC`` in ns (None
        on the counter clock)."""
        return self.time.ns(e.ts) if self.time is not None else None

    def seconds(self, e) -> float | None:
        ns = self.ns(e)
        return None if ns is None else ns / 1e9

    def stamp(self, e) -> str:
        """The timestamp as trace_pipe prints it: ``%5lu.%06lu`` seconds
        (truncated to the microsecond), or the counter's integer."""
        ns = self.ns(e)
        if ns is None:
            return f"{e.ts:>12}"
        return f"{ns // 1_000_000_000:5d}.{ns // 1000 % 1_000_000:06d}"

    def line(self, e) -> str:
        """trace_pipe's function-tracer line.  ``[NNN]`` is the thread's
        ring (the per-thread ring stands for the per-CPU one); the
        timestamp is seconds of the target's ``CLOCK_MONOTONIC`` (the
        counter's integer where the TSC is not the clock)."""
        comm = self._comm.get(e.pid) or self._thread_comm(e.pid)
        slot = self.ring.slot.get(e.cpu, 0) if self.ring is not None else 0
        return (f"{comm:>16}-{e.pid:<7} [{slot:03d}] ..... {self.stamp(e)}: "
                f"{self.func_name(e.ip)} <-{self.parent_name(e.parent_ip)}")

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


#: what a signal frame's return address (``pretcode``) points at: glibc's
#: ``__restore_rt``, ``mov $15, %rax; syscall`` (rt_sigreturn)
_RESTORER = bytes.fromhex("48c7c00f0000000f05")
#: where ``uc_mcontext.rip`` lies in an x86-64 ``rt_sigframe`` (pretcode 8,
#: ucontext's flags, link and stack 40, then r8..rcx and rsp: 16 words)
_SIGFRAME_RIP = 8 + 40 + 16 * 8


def threads_in_region(m, r, tids) -> list[str]:
    """With *tids* stopped: why a thread may still be in the tracer's code
    -- its rip there, or a signal frame (delivered while it ran there) that
    will return there.  Other words on a stack that point into the code are
    dead: the runtime's only CALLs are ftrace_caller's into its callbacks,
    which call nothing, so a live return address into it exists only while
    the thread's rip is there or a signal interrupted it there; what else
    is found (the return address of an earlier call, left in the red zone
    or in a frame's slot not written since) is never run."""
    from ._inject import STACK_SCAN
    from ._symbols import read_maps
    lo, hi = r.base, r.base + r.code_size
    maps = read_maps(m.pid)
    why = []
    for tid in tids:
        regs = m.get_regs(tid)
        if r.base <= regs.rip < r.end:
            why.append(f"thread {tid} runs at {regs.rip:#x}")
            continue
        stack = next((x for x in maps if x.start <= regs.rsp < x.end), None)
        top = min(regs.rsp + STACK_SCAN, stack.end if stack else regs.rsp + 4096)
        try:
            buf = m.mem.read(regs.rsp, top - regs.rsp)
        except OSError:
            why.append(f"thread {tid}: its stack at {regs.rsp:#x} cannot be read")
            continue
        for i, (w,) in enumerate(struct.iter_unpack("<Q", buf[:len(buf) // 8 * 8])):
            if not lo <= w < hi:
                continue
            at = regs.rsp + 8 * i
            frame = at - _SIGFRAME_RIP
            try:
                pret = struct.unpack("<Q", m.mem.read(frame, 8))[0]
                if m.mem.read(pret, len(_RESTORER)) == _RESTORER:
                    why.append(f"thread {tid}: a signal frame at {frame:#x} returns to "
                               f"{w:#x}")
                    break
            except (OSError, TextPokeError, struct.error):
                continue
    return why


def free_region(m, r, *, unmap: bool = True, attempts: int = 50,
                unhook: dict | None = None) -> list[str]:
    """Wait (every thread stopped and looked at, a thread inside stepped
    out, then let run) until no thread is in the tracer's code
    (:func:`threads_in_region`); then unmap *r* in a stopped thread unless
    *unmap* is false.  *unhook* (the profiler's return hooks, see
    :func:`unhook_returns`) is undone first, with the threads stopped.
    Returns why it is still in use (empty: done)."""
    from .._errors import MachineError
    from ._inject import InjectError, find_syscall_insn
    why: list[str] = []
    for attempt in range(attempts):
        with m.stopped() as tids:
            try:
                m.step_out_of_range(r.base, r.base + r.code_size)
            except MachineError as e:       # a long way out: let it run on
                why = [str(e)]
            else:
                if unhook:
                    unhook_returns(m.mem, unhook)
                why = threads_in_region(m, r, tids)
            if not why:
                if not unmap:
                    return []
                errs = []
                if not r.syscall_at:
                    r.syscall_at = find_syscall_insn(m.pid)
                for tid in sorted(tids, key=lambda t: t != m.pid):
                    try:
                        r.unmap(tid)
                        return []
                    except (InjectError, OSError) as e:
                        errs.append(f"munmap in thread {tid} failed: {e}")
                return errs
        time.sleep(0.0005 * (attempt + 1))
    return why


# --- the profiler's time: a return hook (the kernel's profiler uses fgraph) ----
#: ``live_profile_call`` and ``live_return_handler``, position-independent,
#: hand-written (GNU as, then the bytes; no code of the kernel's):
#:
#:   live_profile_call:                  # (ip, parent_ip, op), from ftrace_caller
#:     push %rdi; push %rsi; sub $8,%rsp
#:     call *T_FPC(%rip)                 # function_profile_call: the hit
#:     add $8,%rsp; pop %rsi; pop %rdi
#:     lea 96(%rsp),%r9                  # the traced function's return address
#:     cmp %rsi,(%r9); jne 9f            #   (only in ftrace_caller's frame)
#:     mov %gs:0,%r8                     # this thread's ftrace_cpu
#:     mov 96(%r8),%rcx; cmp 104(%r8),%rcx; jae 9f   # its return stack full
#:     (binary search of ip in *T_IPS[0..*T_N) -> %rax; jne 9f if absent)
#:     mov %rsi,0(%rcx); mov %r9,8(%rcx); mov %rax,16(%rcx)
#:     rdtsc; shl $32,%rdx; or %rdx,%rax; mov %rax,24(%rcx)
#:     add $32,%rcx; mov %rcx,96(%r8)    # pushed
#:     lea live_return_handler(%rip),%rax; mov %rax,(%r9)   # hooked
#:   9: ret
#:   live_return_handler:                # the hooked function returned here
#:     push %rax (room for the return); push %rax,%rdx,%rcx,%r8,%r9
#:     mov %gs:0,%r8; mov 96(%r8),%rcx; lea 40(%rsp),%r9    # the slot it came from
#:   4: sub $32,%rcx; cmp 112(%r8),%rcx; jb 8f  # the entry of that slot (deeper
#:     cmp %r9,8(%rcx); jne 4b           #   ones were left by a longjmp)
#:     mov %rcx,96(%r8)                  # popped
#:     rdtsc; ...; sub 24(%rcx),%rax     # cycles in the function
#:     mov 16(%rcx),%rdx; mov 120(%r8),%r9; add %rax,(%r9,%rdx,8)
#:     mov 0(%rcx),%rax; mov %rax,40(%rsp)                  # the real return
#:     pop %r9,%r8,%rcx,%rdx,%rax; ret
#:   8: ud2
#:   T_FPC, T_IPS, T_N: .quad (the host fills them)
#:
#: Per thread, in the pad words of its ftrace_cpu: 96 the return stack's
#: top, 104 its limit, 112 its base, 120 the per-function cycle table.
PROFILE_CODE = bytes.fromhex(
    "57564883ec08ff15040100004883c4085e5f4c8d4c24604939310f8582000000654c8b04250000"
    "0000498b4860493b4868736f4c8b15de0000004d8b124c8b1ddc0000004d8b1b31c04c39d87318"
    "4a8d141848d1ea49393cd27306488d4201ebe84989d3ebe34c8b1db3000000493b03733049393c"
    "c2752a4889314c894908488941100f3148c1e2204809d0488941184883c12049894860488d0511"
    "000000498901c3cc66662e0f1f840000000000905050525141504151654c8b042500000000498b"
    "48604c8d4c24284883e920493b487072334c39490875f0498948600f3148c1e2204809d0482b41"
    "18488b51104d8b4878490104d1488b01488944242841594158595a58c30f0b0f1f800000000000"
    "0000000000000000000000000000000000000000000000")
_P_HANDLER, _P_FPC, _P_IPS, _P_N = 0xB0, 0x110, 0x118, 0x120
#: return-stack entries per thread (32 bytes each): deeper calls are counted, not timed
SHADOW_N = 512
_F_SP, _F_LIMIT, _F_BASE, _F_TIMES = 96, 104, 112, 120


def unhook_returns(mem, info: dict) -> int:
    """With every thread stopped and none inside the tracer's code: put
    back every return address the profiler hooked and still stands on a
    stack, and empty the return stacks.  *info*: ``handler``, ``percpu``,
    ``nrec``.  Returns how many were put back."""
    handler, percpu, nrec = info["handler"], info["percpu"], info["nrec"]
    n = 0

    def rd(a: int) -> int:
        return struct.unpack("<Q", mem.read(a, 8))[0]

    for i in range(nrec):
        rec = percpu + i * 128
        top, base = rd(rec + _F_SP), rd(rec + _F_BASE)
        if not base or top <= base:
            continue
        raw = mem.read(base, top - base)
        for ret, slot, _idx, _t in struct.iter_unpack("<QQQQ", raw):
            try:
                if rd(slot) == handler:
                    mem.write(slot, struct.pack("<Q", ret))
                    n += 1
            except (OSError, TextPokeError):
                continue            # a stack that went away with its thread
        mem.write(rec + _F_SP, struct.pack("<Q", base))
    return n


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


class _EntryView:
    """What :func:`quiescent_tails` reads of an entry site."""

    __slots__ = ("addr", "plan")

    def __init__(self, s: TraceSite) -> None:
        self.addr, self.plan = s.addr, s.plan


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2:][:1] not in (b"Z", b"X")
    except OSError:
        return False


__all__ += ["alive", "TraceStats", "free_region", "threads_in_region", "TscTime",
            "tsc_variant_reason"]
