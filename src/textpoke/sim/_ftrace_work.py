# SPDX-License-Identifier: GPL-2.0-only
"""The function tracer at work on running vCPUs.

:class:`FtraceMachine` boots a kernel image (the bundled one, or a
generated one with thousands of functions) as a
:class:`~textpoke.kernel.Kernel` (``.kernel``; its ``kernel.ftrace`` is the
tracer), adds the guest ring buffers,
and sets every vCPU running ``ftrace_work_loop`` over a table of functions
-- each call checked (the trampoline must preserve the argument registers)
and counted by the workload itself, so the trace can be checked against
counts that do not come from the tracer.

The host reads the rings as trace_pipe does (:meth:`FtraceMachine.run`
drains them between slices of the run).  :meth:`FtraceMachine.pause`
stops every CPU at the end of a pass, so a measurement window has exact
boundaries: nothing is half-way through a call.

It is the sim's rig for :func:`textpoke.selftests.ftrace_selftest`, the
kernel's startup test of the function tracer.
"""

from __future__ import annotations

import struct
from collections import Counter

from ._kernel_rig import SimKernelRig
from ._machine import COARSE, SchedPolicy
from .._ftrace._ops import MCOUNT_INSN_SIZE, Ftrace
from .._ftrace._ring import FTRACE_CPUS, RingBuffer, TraceEntry
from ..selftests._ftrace import (CALLEES, DEMO_FUNCTIONS, DYN_FTRACE_TEST_NAME,
                                 DYN_FTRACE_TEST_NAME2, FtraceRigViews, FtraceSelfTest, expected_hits,
                                 ftrace_selftest)

# the self-test itself needs only the rig and lives in textpoke.selftests; its
# names stay importable from here for the commands that run it on the sim
__all__ = ["FtraceMachine", "FtraceSelfTest", "ftrace_selftest", "expected_hits", "WORK_BASE",
           "DEMO_FUNCTIONS", "CALLEES", "DYN_FTRACE_TEST_NAME", "DYN_FTRACE_TEST_NAME2"]

WORK_BASE = 0x0C00_0000
_WREC = 128
# struct ft_work field offsets (8 bytes each)
_PASSES, _NFUNCS, _FNS, _COUNTS, _BAD, _BADFN, _PAUSE, _PAUSED, _ONESHOT, _ONESHOT_CALLS = range(10)


def _page_up(n: int) -> int:
    return (n + 0xFFF) & ~0xFFF


class FtraceMachine(SimKernelRig, FtraceRigViews):
    """*image* (default: the bundled kernel) booted on *cpus* vCPUs, with
    :attr:`ftrace` (the sites), :attr:`ring` (the guest's rings of
    *ring_size* entries per CPU) and the workload records.  A context
    manager; :meth:`close` frees the core and the machine."""

    def __init__(self, *, cpus: int = 4, seed: int = 0, image=None, ring_size: int = 4096,
                 line_size: int = 64, policy: SchedPolicy = COARSE,
                 features: tuple[str, ...] | None = None) -> None:
        if not 1 <= cpus <= FTRACE_CPUS:
            raise ValueError(f"cpus must be 1..{FTRACE_CPUS} (the image has {FTRACE_CPUS} "
                             "per-CPU ftrace records)")
        self._start(cpus=cpus, seed=seed, line_size=line_size, policy=policy, image=image,
                    features=features)
        with self._closing_on_error():
            self.core, self.boot = self.kernel.core, self.kernel.boot
            self.ftrace: Ftrace = self.kernel.ftrace
            self.ring = RingBuffer(self.sim, self.image, size=ring_size,
                                   nprof=len(self.ftrace.records))
            self.ring.set_profile_ips(r.ip for r in self.ftrace.records)
            n = len(self.ftrace.records)
            self._fns = WORK_BASE
            self._counts0 = WORK_BASE + _page_up(8 * n)
            self._cstride = _page_up(8 * n)
            self.sim.map_data(self._cstride * (max(self.sim.cpus) + 2), "ftrace_work",
                              WORK_BASE)
            # the text as boot left it: what disabling must give back
            self.sites_at_boot = {r.ip: self.sim.text_read(r.ip, MCOUNT_INSN_SIZE)
                                  for r in self.ftrace.records}
        self.recs = self.image.sym("ft_work_recs")
        self.work: list[int] = []
        self.started = False
        self.trace: list[TraceEntry] = []     # what the host has read so far

    # ------------------------------------------------------------ guest records
    def _rec(self, cpu: int) -> int:
        return self.recs + cpu * _WREC

    def _w(self, addr: int, v: int) -> None:
        self.sim.mem_write(addr, struct.pack("<Q", v & ((1 << 64) - 1)))

    def _f(self, cpu: int, f: int) -> int:
        return self.sim.read_u64(self._rec(cpu) + 8 * f)

    def _setf(self, cpu: int, f: int, v: int) -> None:
        self._w(self._rec(cpu) + 8 * f, v)

    def sym(self, name: str) -> int:
        return self.image.sym(name)

    def set_work(self, functions) -> list[int]:
        """The functions (names or addresses) every CPU calls in turn; the
        workload's call counts restart from zero.  Only while paused or
        before :meth:`start`."""
        addrs = [self.sym(f) if isinstance(f, str) else int(f) for f in functions]
        if len(addrs) > self._cstride // 8:
            raise ValueError(f"at most {self._cstride // 8} workload functions")
        self.sim.mem_write(self._fns, b"".join(struct.pack("<Q", a) for a in addrs))
        self.work = addrs
        for cpu in self.sim.cpus:
            self.sim.mem_write(self._counts0 + cpu * self._cstride, bytes(8 * len(addrs)))
            self._setf(cpu, _FNS, self._fns)
            self._setf(cpu, _COUNTS, self._counts0 + cpu * self._cstride)
            self._setf(cpu, _NFUNCS, len(addrs))
        return addrs

    def start(self) -> None:
        for cpu in self.sim.cpus:
            self.sim.start_cpu(cpu, self.sym("ftrace_work_loop"), {"rdi": self._rec(cpu)})
        self.started = True

    def live_cpus(self) -> list[int]:
        dead = {o.cpu for o in self.sim.oopses}
        return [c for c in self.sim.cpus if c not in dead]

    def passes(self, cpu: int) -> int:
        return self._f(cpu, _PASSES)

    def counts(self) -> Counter:
        """Calls the workload made, per function address, all CPUs."""
        out: Counter = Counter()
        n = len(self.work)
        for cpu in self.sim.cpus:
            raw = self.sim.mem_read(self._counts0 + cpu * self._cstride, 8 * n)
            for a, c in zip(self.work, struct.unpack(f"<{n}Q", raw)):
                out[a] += c
            out[-1] += 0
        del out[-1]
        return out

    def oneshot_calls(self, cpu: int) -> int:
        return self._f(cpu, _ONESHOT_CALLS)

    def bad(self) -> list[dict]:
        return [{"cpu": c, "count": self._f(c, _BAD), "function": self.ftrace.name(self._f(c, _BADFN))}
                for c in self.sim.cpus if self._f(c, _BAD)]

    @property
    def oopses(self) -> int:
        return len(self.sim.oopses)

    # ------------------------------------------------------------ running
    def read_trace(self) -> list[TraceEntry]:
        """Drain the rings into :attr:`trace`; return what was new."""
        new = self.ring.drain()
        self.trace += new
        return new

    def run(self, steps: int, *, chunk: int = 2000) -> None:
        """Run *steps* scheduling decisions, reading the rings every *chunk*."""
        done = 0
        while done < steps:
            k = min(chunk, steps - done)
            self.sim.run(k)
            done += k
            self.read_trace()

    def run_until(self, pred, max_steps: int = 5_000_000, chunk: int | None = None, *,
                  read: bool = True) -> bool:
        """Run until *pred*; read the rings every *chunk* steps unless
        *read* is false (a reader that has gone away).  By default the
        reader comes every 500 steps per running CPU: the steps are shared
        among the CPUs, so a fixed count would give one CPU alone four
        times the events of each of four -- more than its ring holds."""
        if chunk is None:
            chunk = 500 * max(1, len(self.live_cpus()))
        done = 0
        while done < max_steps:
            if pred():
                return True
            self.sim.run(chunk)
            done += chunk
            if read:
                self.read_trace()
        return pred()

    def wait_passes(self, n: int = 1, max_steps: int = 5_000_000) -> bool:
        goal = {c: self.passes(c) + n for c in self.live_cpus()}
        return self.run_until(lambda: all(self.passes(c) >= g for c, g in goal.items()
                                          if c in self.live_cpus()), max_steps)

    def pause(self, max_steps: int = 5_000_000, *, read: bool = True) -> bool:
        """Stop every CPU at the end of its current pass."""
        for c in self.sim.cpus:
            self._setf(c, _PAUSE, 1)
        return self.run_until(lambda: all(self._f(c, _PAUSED) for c in self.live_cpus()),
                              max_steps, chunk=200, read=read)

    def resume(self) -> None:
        for c in self.sim.cpus:
            self._setf(c, _PAUSE, 0)
            self._setf(c, _PAUSED, 0)   # the CPU clears it too once it leaves its spin

    def call_once(self, cpu: int, func, max_steps: int = 1_000_000) -> bool:
        """Have *cpu* call *func* exactly once from its loop; wait for it."""
        before = self.oneshot_calls(cpu)
        self._setf(cpu, _ONESHOT, self.sym(func) if isinstance(func, str) else func)
        return self.run_until(lambda: self.oneshot_calls(cpu) > before and
                              not self._f(cpu, _ONESHOT), max_steps, chunk=200)

    def window(self, passes: int = 2) -> tuple[Counter, list[TraceEntry]]:
        """An exact measurement: pause, zero the workload's counts and
        discard the rings, run every CPU *passes* passes, pause again;
        return (the workload's counts, the trace of the window).  The CPUs
        are left paused."""
        self.pause()
        self.read_trace()
        self.set_work(self.work)
        mark = len(self.trace)
        self.resume()
        self.wait_passes(passes)
        self.pause()
        self.read_trace()
        return self.counts(), self.trace[mark:]

