# SPDX-License-Identifier: GPL-2.0-only
"""``live trace``'s reading side, a mixin of :class:`._trace.LiveTrace`:
the counts summed over threads alive and gone, the profiler's hits and
times, and each event as trace_pipe prints it (names, timestamps)."""

from __future__ import annotations

import contextlib
import struct
import time

from ._trace_profile import _F_SP, SHADOW_N

__all__ = ["TraceView", "thread_comm"]


def thread_comm(pid: int, tid: int, cache: dict[int, str] | None = None) -> str:
    """Thread *tid*'s name (``/proc/PID/task/TID/comm``), ``<...>`` once it
    is gone (trace_pipe's name for a task it no longer knows); kept in
    *cache* when one is given (live trace and live probe print it per hit)."""
    if cache is not None and tid in cache:
        return cache[tid]
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            c = f.read().strip()
    except OSError:
        c = "<...>"
    if cache is not None:
        cache[tid] = c
    return c


class TraceView:
    """What :class:`LiveTrace` shows of what the rings and tables hold (it
    provides ``ring``, ``stats``, ``time``, ``machine``, ``syms`` and the
    name tables)."""

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
                "hits": st.hits + live.get("hits", 0),
                "missed": self._missed()}

    def _missed(self) -> int:
        """Calls made while the thread's GS base was not one of ours (the
        program's own, set after the tracer gave it one): the runtime's
        check sent them to the sink and counted them there."""
        sink = getattr(self, "_sink", None)
        if sink is not None and self.region is not None and self.machine is not None:
            with contextlib.suppress(Exception):
                from ._trace_runtime import SINK_MISSED
                raw = self.machine.mem.read(sink + SINK_MISSED, 8)
                self.stats.missed = struct.unpack("<Q", raw)[0]
        return self.stats.missed

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
