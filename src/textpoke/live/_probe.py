# SPDX-License-Identifier: GPL-2.0-only
"""``live probe``: kprobes on a running process, as uprobes are -- through
the very client the sim uses (:class:`textpoke._kprobes.Kprobes`, made by
:class:`textpoke.kernel.Kernel` over a :class:`LiveMachine`).

Nothing of kprobes is copied here.  This module only

* describes the process to the client as a kernel image would: the probed
  function's symbol and size (:class:`ProcessImage`) and empty patching
  tables (a process has no ``__jump_table`` or static calls; its fentry
  NOP, if any, is an ordinary instruction to kprobes, copied out of line
  like any other);
* gives the client executable memory within rel32 reach of the probed
  module (``execmem_range(near=...)``: a slot's RIP-relative operand and
  its boosted JMP back must reach), asked of the machine's ``EXECMEM``
  capability;
* parses fetch-args in the kernel's ``kprobe_events`` syntax (a subset,
  :func:`parse_fetchargs`) and evaluates them in the pre-handler, on the
  registers and memory the trap shows;
* pumps the machine while the window is open (a thread that hits the
  INT3 stops in the tracer until it is serviced) and formats one
  trace_pipe-like line per hit.

The client does the rest as on the sim: the INT3 at the probe point, its
handler on the machine's trap chain (``Machine.walk_trap_chain``), the
probed instruction emulated (CALL/JMP/Jcc/RET...) or run out of line from
a slot -- boosted (a JMP back, one trap per hit) where the kernel's
non-preemptible build would boost, else followed by a second INT3 -- and,
at close, the original byte back, every thread seen outside the slot
(``QUIESCE``) before the slot is freed.  The live machine's own rules hold:
SIGINT/SIGTERM surface between protocol steps, a thread parked or stopped
is resumed at an instruction boundary, and no INT3 is left behind.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

from .._core._machine import Capability, WaitUntil
from .._errors import TextPokeError
from ..images._tables import KernelTables
from ._fetchargs import FetchArg, FetchArgError, format_value, parse_fetchargs
from ._process import alive

__all__ = ["FetchArg", "FetchArgError", "parse_fetchargs", "ProcessImage", "LiveProbe", "Hit"]

_M64 = (1 << 64) - 1


# ------------------------------------------------------------------ the image
class ProcessImage:
    """What the kprobes client reads of an image, for a process: the symbols
    (with sizes) of the functions probed, and empty tables."""

    def __init__(self, path: str, functions: dict[str, tuple[int, int]]) -> None:
        self.path = path
        self.symbols = {n: a for n, (a, _s) in functions.items()}
        self.sizes = {n: s for n, (_a, s) in functions.items()}

    def sym(self, name: str) -> int:
        return self.symbols[name]

    def tables(self, text: tuple[int, int]) -> KernelTables:
        return KernelTables(path=self.path, text=text, replacement=(0, 0))


# ------------------------------------------------------------------ probing
@dataclass
class Hit:
    tid: int
    cpu: int
    ts: float
    values: list[str]
    comm: str


class LiveProbe:
    """One kprobe on process *pid* at *spec* (``[lib:]symbol[+off]``) with
    *fetchargs*; ``arm()``, ``pump(until)`` to service hits, ``close()``.

    Hits are formatted in the pre-handler (while the thread is stopped:
    its memory is what the function sees) and queued on :attr:`hits`."""

    def __init__(self, pid: int, spec: str, fetchargs: list[str]) -> None:
        from ._symbols import Symbols, check_boundary, parse_address
        self.pid = pid
        self.spec = spec
        self.syms = Symbols(pid)
        self.machine = None
        self.kernel = None
        self.core = None
        self.probe = None
        self.hits: list[Hit] = []
        self.nhit = 0
        #: of nhit, the hits read from the optimised probe's ring (the
        #: others went through the INT3 before the JMP was in)
        self.nrecorded = 0
        self._comm: dict[int, str] = {}
        self._stat_fds: dict[int, int] = {}
        #: the optimised path (see :mod:`._probe_opt`): its ring, clock and
        #: recorder once the client has put the JMP in; else why not
        self.ring = None
        self.time = None
        self.recorder: int | None = None
        self.opt_reason: str | None = None
        self._exec: tuple[int, int] | None = None
        self._orig: bytes | None = None
        try:
            lib, name, off = parse_address(spec)
            if name is None:
                raise FetchArgError(f"probe point {spec!r}: give a symbol (SYMBOL[+OFF] or "
                                    "lib:SYMBOL[+OFF]), not a number")
            s = self.syms.lookup(name, lib)
            if not s.func or s.size <= 0:
                raise FetchArgError(f"probe point {spec!r}: {s.name} is not a function with a size")
            if off:
                check_boundary(s, off)
            self.symbol, self.offset, self.addr, self.size = s.name, off, s.addr + off, s.size
            self.module = s.module
            self.event = f"p_{s.name}_{off}"
            self.args = parse_fetchargs(fetchargs, self.syms.resolve)
            if off and any(a.needs_entry for a in self.args):
                raise FetchArgError(f"$argN is only for a probe on a function's entry "
                                    f"({s.name}, not {s.name}+{off:#x})")
        except BaseException:
            self.syms.close()
            raise

    # ------------------------------------------------------------ lifetime
    def arm(self, *, strategy: str = "int3", optimize: bool = False,
            ring_size: int = 4096) -> None:
        """Attach, map execmem near the module, register the kprobe through
        the kernel's client; with *optimize*, then ask the client to
        optimise it (:mod:`._probe_opt`: a JMP to a buffer whose callback
        records the hit in a ring of *ring_size* entries in the target),
        keeping the INT3 probe, with :attr:`opt_reason`, where that is
        refused.  On any error everything is undone."""
        from .._core import TextPoke
        from ..kernel import Kernel
        from ._machine import LiveMachine
        self.machine = m = LiveMachine(self.pid, strategy=strategy)
        try:
            m.require(Capability.EXECMEM, "kprobes")
            m.require(Capability.QUIESCE, "kprobes")
            if optimize:
                # asked before anything is mapped: the TSC check injects a
                # system call in every thread
                self.opt_reason = self._opt_refusal() or self._tsc_refusal(m)
            ranges = self.module.executable_ranges()
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            from .._kprobes._core import KPROBES_EXECMEM
            rng = m.execmem_range(KPROBES_EXECMEM // 4, "kprobes",
                                  near=(min(lo, self.addr), max(hi, self.addr + 1)))
            self.core = TextPoke(m)
            image = ProcessImage(self.module.path, {self.symbol: (self.addr - self.offset,
                                                                  self.size)})
            start = rng.start
            if optimize and self.opt_reason is None:
                start = self._put_recorder(m, rng.start, ring_size)
                image.symbols["optimized_callback"] = self.recorder
            self._exec = (rng.start, rng.end)
            # freeable by 'live recover' while nothing jumps into it
            self._journal_exec([])
            self.kernel = Kernel(self.core, image, tables=image.tables((lo, hi)),
                                 config={"PREEMPTION": False, "KPROBES_ON_FTRACE": False},
                                 execmem={"kprobes": (start, rng.end)})
            kp = self.kernel.kprobes
            # the INT3 stands in the text while the threads run: guarded and
            # journaled first, so a SIGKILL of this patcher leaves a thread on
            # it waiting at the site for 'live recover' instead of dying
            m.guard_int3_sites([self.addr])
            orig = self._orig = m.text_read(self.addr, 5)
            # the symbol as given: a process has no __mcount_loc, so offset 0
            # is the function's first byte (the fentry NOP, if any)
            self.probe = kp.register_kprobe(self.symbol if not self.offset
                                            else f"{self.symbol}+{self.offset:#x}",
                                            pre_handler=self._pre)
            if self.recorder is not None:
                self._optimize(kp, orig)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ optimised
    def _opt_refusal(self) -> str | None:
        from ._probe_opt import cpu_refusal, fetch_refusal
        if self.offset:
            return (f"{self.symbol}+{self.offset:#x} is past the function's entry: code there "
                    "may keep data in the 128-byte red zone below %rsp, which the detour's "
                    "pushes would overwrite (only an entry is optimised)")
        return fetch_refusal(self.args) or cpu_refusal() or _shadow_stack(self.pid)

    def _tsc_refusal(self, m) -> str | None:
        """Why the recorder's ``rdtscp`` would not run in some thread: one
        that made ``prctl(PR_SET_TSC, PR_TSC_SIGSEGV)`` (per thread, and
        inherited by the threads it makes) gets SIGSEGV for it, at its
        first hit.  Every thread is asked -- ``live trace``'s own check,
        :func:`._trace_clock.tsc_disabled` -- before anything is mapped.
        A thread made later inherits its (asked) creator's mode; one that
        turns RDTSC off after the question is not seen."""
        from ._trace_clock import tsc_disabled
        with m.stopped() as tids:
            why = tsc_disabled(m, tids)
        return None if why is None else f"the recorder reads the TSC (rdtscp): {why}"

    def _put_recorder(self, m, at: int, ring_size: int) -> int:
        """The recorder at *at* (the start of the probes' execmem) and its
        ring in data memory; returns where the client's execmem starts."""
        from ._probe_opt import RECORDER_SIZE, ProbeRing, recorder_code, stack_words
        data = m.map_data(ProbeRing.data_bytes(ring_size), "probe-ring")
        self.ring = ProbeRing(m.mem, data, ring_size)
        m.mem.write(data, self.ring.header())
        self.core.text_poke_copy(at, recorder_code(data, stack_words(self.args)))
        self.recorder = at
        return at + RECORDER_SIZE

    def _optimize(self, kp, orig: bytes) -> None:
        from .._kprobes._types import KprobeError
        from ._trace_clock import TscTime
        self.time = TscTime(self.pid)           # the first pair before any hit
        # the client tells what it will write before the JMP goes in: the
        # JMP and the bytes it replaces are journaled as the probes'
        # execmem's site first, so a SIGKILL of this patcher at any moment
        # of the write leaves 'live recover' able to put the original
        # bytes back (an INT3 left, or a JMP) and unmap the execmem once no
        # thread is in it
        kp.before_optimize = self._journal_jmps
        try:
            kp.optimize_kprobe(self.probe)
        except KprobeError as e:
            self.opt_reason = str(e)
            self.ring = self.time = None
        finally:
            kp.before_optimize = None
        # what the text reads now: the JMP, or (refused, failed) nothing
        jmp = self.machine.text_read(self.addr, 5)
        self._journal_exec([(self.addr, orig, jmp)] if jmp[:1] == b"\xe9" else [])

    def _journal_jmps(self, sites: list[tuple[int, bytes, bytes]]) -> None:
        """The client's ``before_optimize``: the JMPs about to be written,
        journaled as the probes' execmem's sites."""
        self._journal_exec(sites)

    def _journal_exec(self, sites: list, kind: str = "probe") -> None:
        """The probes' execmem in the journal as a stub region (kind
        ``probe``) with the *sites* that jump (or are about to jump) into
        it: ``live recover`` switches those that read the JMP back, puts
        back the INT3 probe's byte (a site in flight), and unmaps the
        region once no thread is in it or has a return address into it
        (the machine's plain ``execmem`` kind stays mapped for good while
        code is in it; the client's freed slots keep their bytes)."""
        j = self.machine.journal
        if j is None or self._exec is None:
            return
        lo, hi = self._exec
        for r in j.data["regions"]:
            if r["base"] == lo:
                # the machine's own entry, re-kinded: its sizes cover the
                # injected-syscall rescue's pages at the region's end too
                r["kind"] = kind
                r["sites"] = [[a, o.hex(), n.hex()] for a, o, n in sites]
                j.flush()
                return
        j.add_region(kind, lo, hi - lo, 0, sites)

    @property
    def optimized(self) -> bool:
        kp = self.kernel.kprobes if self.kernel is not None else None
        site = kp._sites.get(self.addr) if kp is not None else None
        return bool(site is not None and site.optimized and self.ring is not None)

    def _drain(self, *, final: bool = False) -> None:
        """The hits the recorder committed since the last drain, as the
        INT3 path's pre-handler would have made them."""
        from ._probe_opt import Recorded
        ring = self.ring
        if ring is None:
            return
        raws = ring.drain(final=final)
        t = self.time
        for raw in raws:
            rec = Recorded(raw, self.addr)
            self.nhit += 1
            self.nrecorded += 1
            comm = self._thread_comm(rec.tid)
            vals = []
            for a in self.args:
                try:
                    vals.append(format_value(a, rec, a.fetch(rec), comm, self._symbolize))
                except (OSError, TextPokeError, struct.error):
                    vals.append("(fault)")
            self.hits.append(Hit(rec.tid, rec.cpu, t.ns(rec.tsc) / 1e9, vals, comm))
        if raws:
            t.sample()              # after the read: every hit read lies before it

    def _finish_ring(self) -> None:
        """After the client's close (the probe unregistered: the probe
        point's bytes as they were): once no thread is in the probes'
        execmem (the client's slots and buffer, the recorder: no RIP there,
        no stack word pointing there), the last recorded hits are read and
        the whole range is cleared -- the client, as the kernel, leaves a
        freed slot's bytes in place (only marked free) -- so that the
        machine unmaps it at close.  A thread that stays keeps the range
        (and the ring) mapped; regions_kept says why."""
        m, rng = self.machine, self._exec
        if rng is None or m is None:
            return
        try:
            if self._orig is not None and m.text_read(self.addr, len(self._orig)) != self._orig:
                raise TextPokeError("the probe point does not read its original bytes")
            m.run_task(m.quiesce([rng], "the probe's slots, buffer and recorder"))
        except TextPokeError:
            self._drain()
            return
        self._drain(final=True)
        self.core.text_poke_copy(rng[0], b"\xcc" * (rng[1] - rng[0]))
        self.recorder = self._exec = None

    @property
    def boosted(self) -> bool | None:
        kp = self.kernel.kprobes if self.kernel is not None else None
        if kp is None or self.probe is None:
            return None
        site = kp._sites.get(self.addr)
        return None if site is None else (site.emulate is None and site.boosted)

    def how(self) -> str:
        kp = self.kernel.kprobes
        site = kp._sites.get(self.addr)
        if site is None:
            return "gone"
        if self.optimized:
            return (f"optimised: a JMP to an out-of-line buffer, hits recorded in the process "
                    f"({site.insn.text})")
        if site.emulate is not None:
            how = f"emulated ({site.insn.text})"
        else:
            how = ("boosted" if site.boosted else "single-stepped out of line") + \
                f" ({site.insn.text})"
        return how + (f"; not optimised: {self.opt_reason}" if self.opt_reason else "")

    def close(self) -> dict:
        """Unregister (the original byte back, the slot freed once no thread
        is in it), detach.  Returns what is left: ``int3_left`` read back
        from the process (0 or 1), ``regions_kept``."""
        left = {"int3_left": 0, "regions_kept": []}
        try:
            if self.kernel is not None:
                self.kernel.close()
            self._finish_ring()
            if self.core is not None:
                self.core.close()
        finally:
            self.kernel = self.core = None
            if self.machine is not None:
                m, self.machine = self.machine, None
                try:
                    m.close()
                finally:
                    left["regions_kept"] = list(m.regions_kept)
            self.syms.close()
            self._close_stat_fds()
        left["int3_left"] = self.int3_left()
        return left

    def int3_left(self) -> int | None:
        """0 or 1: whether the probe point reads INT3 now (None: the process
        is gone, nothing to read)."""
        try:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
                f.seek(self.addr)
                return int(f.read(1) == b"\xcc")
        except OSError:
            return None

    # ------------------------------------------------------------ hits
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

    def _cpu(self, tid: int) -> int:
        """The CPU the thread last ran on (``/proc/.../stat`` field 39),
        through an fd kept open per thread (pread at 0 regenerates it: an
        open and a close per hit cost more than the read)."""
        try:
            fd = self._stat_fds.get(tid)
            if fd is None:
                fd = self._stat_fds[tid] = os.open(f"/proc/{self.pid}/task/{tid}/stat",
                                                   os.O_RDONLY | os.O_CLOEXEC)
            st = os.pread(fd, 1024, 0)
            return int(st[st.rindex(b")") + 2:].split()[36])
        except (OSError, ValueError, IndexError):
            return -1

    def _close_stat_fds(self) -> None:
        for fd in self._stat_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._stat_fds.clear()

    def _pre(self, p, regs) -> bool:
        ts = time.clock_gettime(time.CLOCK_MONOTONIC)
        self.nhit += 1
        tid = regs.cpu
        comm = self._thread_comm(tid)
        # the registers as the probed instruction sees them: ip is the probe
        # point (the trap leaves it after the INT3)
        vals = []
        for a in self.args:
            try:
                v = a.fetch(_AtProbe(regs, self.addr))
                vals.append(format_value(a, regs, v, comm, self._symbolize))
            except (OSError, TextPokeError, struct.error):
                vals.append("(fault)")
        self.hits.append(Hit(tid, self._cpu(tid), ts, vals, comm))
        return False

    def _symbolize(self, v: int) -> str:
        try:
            return self.syms.symbolize(v & _M64)
        except Exception:
            return f"{v & _M64:#x}"

    def line(self, h: Hit) -> str:
        args = "".join(f" {a.name}={v}" for a, v in zip(self.args, h.values))
        return (f"{h.comm:>16}-{h.tid:<7} [{h.cpu:03d}] {h.ts:.6f}: {self.event}: "
                f"({self.symbol}+{self.offset:#x}){args}")

    def pump(self, until: Callable[[], bool]) -> None:
        """Service the process's stops (hits among them) until *until()*."""
        m = self.machine
        if self.ring is None:
            def task():
                yield WaitUntil(lambda: until() or not m.threads, "probe hits")
            m.run_task(task())
            return
        # optimised: the threads do not stop at a hit; the ring is read
        # every few milliseconds while the machine services other stops
        while True:
            self._drain()
            if until() or not m.threads:
                return
            end = time.monotonic() + 0.005

            def task():
                yield WaitUntil(lambda: time.monotonic() >= end or not m.threads, "probe hits")
            m.run_task(task())

    def take(self) -> list[Hit]:
        out, self.hits = self.hits, []
        return out


def _shadow_stack(pid: int) -> str | None:
    """Why not, when the process runs with a CET shadow stack (the
    recorder's return is not a RET: see :mod:`._probe_opt`)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("x86_Thread_features:") and "shstk" in ln.split():
                    return "the process runs with a CET shadow stack"
    except OSError:
        pass
    return None


class _AtProbe:
    """The registers of a hit with ``ip`` at the probe point."""

    __slots__ = ("ip", "sp", "flags", "gprs", "mem")

    def __init__(self, regs, addr: int) -> None:
        self.ip, self.sp, self.flags, self.gprs, self.mem = addr, regs.sp, regs.flags, regs.gprs, regs.mem




__all__ += ["alive", "format_value"]
