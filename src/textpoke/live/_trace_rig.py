# SPDX-License-Identifier: GPL-2.0-only
"""The function tracer's startup self-test on a live process: the
:class:`~textpoke.selftests.FtraceRig` protocol over the bundled image
mapped into a real process (the live client rig's loader,
:mod:`._rig`), whose threads run the image's ``ftrace_work_loop`` -- the
very workload the sim's vCPUs run -- while
:func:`textpoke.selftests.ftrace_selftest` switches the sites through the
kernel's ftrace client and reads the guest's rings.

The rings' CPUs are the loop threads: each has a ring of its own (its GS
base pointed at an ``ftrace_percpu`` record: ``RingBuffer`` gives thread ids
free records), stamped with its thread id and name.  A "step" of the sim
is a look here: between two looks every thread is synced (the machine
interrupts it, it passes through the kernel), and the rings are read.
Needs gcc and ptrace (the live tests' rule)."""

from __future__ import annotations

import os
import struct
import time
from collections import Counter

from .._ftrace._ops import MCOUNT_INSN_SIZE, Ftrace
from .._ftrace._ring import FTRACE_CPUS, RingBuffer, TraceEntry
from ..selftests._ftrace import FtraceRigViews
from ._rig import LiveKernelRig, LiveRigError
from ._trace_view import thread_comm

__all__ = ["LiveFtraceRig"]

_WREC = 128
# struct ft_work field offsets (8 bytes each; images/kernel/ftrace.c)
_PASSES, _NFUNCS, _FNS, _COUNTS, _BAD, _BADFN, _PAUSE, _PAUSED, _ONESHOT, _ONESHOT_CALLS = range(10)


def _page_up(n: int) -> int:
    return (n + 0xFFF) & ~0xFFF


class LiveFtraceRig(LiveKernelRig, FtraceRigViews):
    """The bundled kernel booted in a live process with *cpus* threads
    running ``ftrace_work_loop``; :attr:`ftrace` (the kernel's client),
    :attr:`ring` (one ring of *ring_size* entries per thread).  A context
    manager."""

    def __init__(self, *, cpus: int = 3, ring_size: int = 4096, strategy: str = "int3") -> None:
        # the main thread has a record too (it never runs traced code)
        if not 1 <= cpus < FTRACE_CPUS:
            raise ValueError(f"cpus must be 1..{FTRACE_CPUS - 1}")
        self.trace: list[TraceEntry] = []
        self.work: list[int] = []
        self._start(cpus=cpus, loop="ftrace_work_loop", recs="ft_work_recs", rec_size=_WREC,
                    strategy=strategy, prefix="textpoke-live-ftrace-")
        with self._closing_on_error():
            m = self.machine
            self.core = self.kernel.core
            self.ftrace: Ftrace = self.kernel.ftrace
            tasks = {t: (thread_comm(self.pid, t), t) for t in m.cpus}
            self.ring = RingBuffer(m, self.image, size=ring_size,
                                   nprof=len(self.ftrace.records), tasks=tasks,
                                   slots=len(m.cpus), base=None)
            self.ring.set_profile_ips(r.ip for r in self.ftrace.records)
            n = len(self.ftrace.records)
            self._cstride = _page_up(8 * n)
            base = m.map_data(self._cstride * (cpus + 2), "ftrace_work")
            self._fns, self._counts0 = base, base + self._cstride
            self.sites_at_boot = {r.ip: m.text_read(r.ip, MCOUNT_INSN_SIZE)
                                  for r in self.ftrace.records}

    def _loader_started(self) -> None:
        # the loop threads, in the order the loader made them (worker i
        # runs on record i): thread ids rise as threads are created
        tids = sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        self.cpus = [t for t in tids if t != self.pid]
        if len(self.cpus) != self.ncpus:
            raise LiveRigError(f"the loader has {len(self.cpus)} threads, not {self.ncpus}")

    def _end_loader(self) -> None:
        """Killed (it only loops) and reaped."""
        if not self.exited():
            self.proc.kill()
        self.proc.wait(timeout=30)

    # ------------------------------------------------------------ guest records
    def _rec(self, i: int) -> int:
        return self.recs + i * _WREC

    def _idx(self, cpu: int) -> int:
        return self.cpus.index(cpu)

    def _f(self, cpu: int, f: int) -> int:
        return struct.unpack("<Q", self.machine.mem.read(self._rec(self._idx(cpu)) + 8 * f, 8))[0]

    def _setf(self, cpu: int, f: int, v: int) -> None:
        self.machine.mem.write(self._rec(self._idx(cpu)) + 8 * f,
                               struct.pack("<Q", v & ((1 << 64) - 1)))

    # ------------------------------------------------------------ FtraceRig
    def set_work(self, functions) -> list[int]:
        addrs = [self.sym(f) if isinstance(f, str) else int(f) for f in functions]
        if len(addrs) > self._cstride // 8:
            raise ValueError(f"at most {self._cstride // 8} workload functions")
        mem = self.machine.mem
        mem.write(self._fns, b"".join(struct.pack("<Q", a) for a in addrs))
        self.work = addrs
        for i, cpu in enumerate(self.cpus):
            mem.write(self._counts0 + i * self._cstride, bytes(8 * len(addrs)))
            self._setf(cpu, _FNS, self._fns)
            self._setf(cpu, _COUNTS, self._counts0 + i * self._cstride)
            self._setf(cpu, _NFUNCS, len(addrs))
        return addrs

    def live_cpus(self) -> list[int]:
        return list(self.cpus) if not self.exited() else []

    def passes(self, cpu: int) -> int:
        return self._f(cpu, _PASSES)

    def counts(self) -> Counter:
        out: Counter = Counter()
        n = len(self.work)
        for i in range(len(self.cpus)):
            raw = self.machine.mem.read(self._counts0 + i * self._cstride, 8 * n)
            for a, c in zip(self.work, struct.unpack(f"<{n}Q", raw)):
                out[a] += c
        return out

    def oneshot_calls(self, cpu: int) -> int:
        return self._f(cpu, _ONESHOT_CALLS)

    def bad(self) -> list[dict]:
        return [{"cpu": c, "count": self._f(c, _BAD),
                 "function": self.ftrace.name(self._f(c, _BADFN))}
                for c in self.cpus if self._f(c, _BAD)]

    def read_trace(self) -> list[TraceEntry]:
        new = self.ring.drain()
        self.trace += new
        return new

    def run_until(self, pred, max_steps: int = 5_000_000, chunk: int | None = None, *,
                  read: bool = True) -> bool:
        """Look until *pred* holds (at most 200,000 looks, and never after
        the process died); between two looks every thread is synced (a stop
        reported meanwhile is handled) and, unless *read* is false, the
        rings are read."""
        m = self.machine
        nap = 0.0
        for _ in range(min(max_steps, 200_000)):
            if self.exited():
                return False
            if pred():
                return True
            m.run_task(m.sync_each_cpu())
            if read:
                self.read_trace()
            # let the threads run between two looks: each look stops them
            # all, and on a loaded box back-to-back looks left them almost
            # no time to make the progress looked for (minutes, not seconds)
            if nap:
                time.sleep(nap)
            nap = min(nap * 2 or 50e-6, 5e-3)
        return pred()

    def wait_passes(self, n: int = 1, max_steps: int = 5_000_000) -> bool:
        goal = {c: self.passes(c) + n for c in self.live_cpus()}
        return self.run_until(lambda: all(self.passes(c) >= g for c, g in goal.items()),
                              max_steps)

    def pause(self, max_steps: int = 5_000_000, *, read: bool = True) -> bool:
        for c in self.cpus:
            self._setf(c, _PAUSE, 1)
        return self.run_until(lambda: all(self._f(c, _PAUSED) for c in self.live_cpus()),
                              max_steps, read=read)

    def resume(self) -> None:
        # only the flag the threads read: each clears its own `paused` when
        # it leaves the spin.  Clearing it here too lost a thread whenever a
        # pause() followed before that thread had run (a loaded box): it
        # never saw pause go to 0, stayed in its spin with paused 0, and the
        # pause waited for it for ever
        for c in self.cpus:
            self._setf(c, _PAUSE, 0)

    def call_once(self, cpu: int, func, max_steps: int = 1_000_000) -> bool:
        before = self.oneshot_calls(cpu)
        self._setf(cpu, _ONESHOT, self.sym(func) if isinstance(func, str) else func)
        return self.run_until(lambda: self.oneshot_calls(cpu) > before and
                              not self._f(cpu, _ONESHOT), max_steps)

    def window(self, passes: int = 2) -> tuple[Counter, list[TraceEntry]]:
        """An exact measurement: every thread paused, the rings emptied and
        their counts zeroed (``echo > trace``: a real CPU free-running
        between two looks of the host makes far more events than a ring
        holds, which the sim's reader never meets), the workload's counts
        zeroed; then every thread runs exactly *passes* passes (let out of
        its pause spin by single steps, the pause flag set again behind it)
        and pauses.  Returns (the workload's counts, the trace)."""
        self.pause()
        self.read_trace()
        self.ring.reset()
        self.set_work(self.work)
        mark = len(self.trace)
        for _ in range(passes):
            self._one_pass()
        self.read_trace()
        return self.counts(), self.trace[mark:]

    def _one_pass(self) -> None:
        from .._errors import MachineError
        from . import _ptrace as P
        m = self.machine
        with m.stopped():
            for c in self.live_cpus():
                self._setf(c, _PAUSE, 0)
                for _ in range(100_000):
                    if not self._f(c, _PAUSED):
                        break               # out of the spin: the pass starts
                    P.singlestep(c)
                    si = P.SigInfo()
                    for _poll in range(200_000):
                        si.si_pid = 0
                        if P.waitid(c, si, False) == 0 and si.si_pid:
                            break
                        time.sleep(20e-6)
                    else:
                        raise MachineError(f"thread {c} does not stop after a single step")
                else:
                    raise MachineError(f"thread {c} stays in its pause spin")
                self._setf(c, _PAUSE, 1)    # it pauses again after this pass
        self.run_until(lambda: all(self._f(c, _PAUSED) for c in self.live_cpus()))
