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
* parses each probe point and its fetch-args in the kernel's
  ``kprobe_events`` syntax (:mod:`._probe_point`, :mod:`._fetchargs`) and
  evaluates them in the pre-handler, on the registers and memory the trap
  shows -- several points per command, one machine and one client for
  all (their execmem must reach every point with a rel32: one module, or
  modules mapped within 2 GiB of each other, as shared libraries are);
* optimised, gives the recorder a ring per thread (:mod:`._probe_rings`)
  and reads them;
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
from typing import Callable

from .._core._machine import Capability, WaitUntil
from .._errors import NotSupportedError, TextPokeError
from ..images._tables import KernelTables
from ._fetchargs import FetchArg, FetchArgError, format_value, parse_fetchargs
from ._probe_point import Hit, ProbePoint, split_probe_def
from ._process import alive
from ._trace_view import thread_comm

__all__ = ["FetchArg", "FetchArgError", "parse_fetchargs", "ProcessImage", "LiveProbe", "Hit",
           "ProbePoint", "split_probe_def", "RING_SIZE"]

_M64 = (1 << 64) - 1
#: entries of each thread's ring (320 bytes each)
RING_SIZE = 1024
#: how far apart a command's probe points may lie: their one execmem must
#: reach each of them (and their module's code) with a rel32
_REACH = (1 << 31) - (64 << 20)


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
class LiveProbe:
    """Kprobes on process *pid*: *spec* (``[lib:]symbol[+off]``) with
    *fetchargs*, and each ``(spec, fetchargs)`` of *more*; ``arm()``,
    ``pump(until)`` to service hits, ``close()``.

    Hits are formatted in the pre-handler (while the thread is stopped:
    its memory is what the function sees) or from the rings, and queued
    on :attr:`hits`, each naming its point."""

    def __init__(self, pid: int, spec: str, fetchargs: list[str] = (), *,
                 more: list[tuple[str, list[str]]] = ()) -> None:
        from ._symbols import Symbols
        self.pid = pid
        self.syms = Symbols(pid)
        self.machine = None
        self.kernel = None
        self.core = None
        self.hits: list[Hit] = []
        self.nhit = 0
        self._comm: dict[int, str] = {}
        self._stat_fds: dict[int, int] = {}
        #: the optimised path (see :mod:`._probe_opt`): the threads' rings,
        #: the clock and the recorder once the client has put a JMP in
        self.ring = None
        self.time = None
        self.recorder: int | None = None
        self._exec: tuple[int, int] | None = None
        self._by_op: dict[int, ProbePoint] = {}
        try:
            self.points = [ProbePoint(self.syms, spec, list(fetchargs))]
            for sp, fa in more:
                self.points.append(ProbePoint(self.syms, sp, list(fa)))
            seen: dict[int, ProbePoint] = {}
            for p in self.points:
                o = seen.setdefault(p.addr, p)
                if o is not p:
                    raise FetchArgError(f"probe point {p.spec!r} is {o.spec!r} again "
                                        f"({p.addr:#x}): one probe per address")
            lo = min(min(r[0] for r in p.module.executable_ranges()) for p in self.points)
            hi = max(max(r[1] for r in p.module.executable_ranges()) for p in self.points)
            if hi - lo > _REACH:
                raise FetchArgError(
                    "probe points " + ", ".join(p.spec for p in self.points) + " lie in modules "
                    f"{(hi - lo) / (1 << 30):.1f} GiB apart: one command's probes share one "
                    "execmem, which must reach each with a rel32 (give one command per module)")
            self._span = (lo, hi)
        except BaseException:
            self.syms.close()
            raise

    # ------------------------------------------------------------ the first point
    # (what a one-probe caller reads: the CLI's start line, tests, benches)
    def __getattr__(self, name: str):
        pts = self.__dict__.get("points")
        if pts and name in ("args", "event", "symbol", "offset", "addr", "size", "module",
                            "probe", "spec"):
            return getattr(pts[0], name)
        raise AttributeError(name)

    @property
    def opt_reason(self) -> str | None:
        return self.points[0].opt_reason

    @property
    def nrecorded(self) -> int:
        return sum(p.nrecorded for p in self.points)

    # ------------------------------------------------------------ lifetime
    def arm(self, *, strategy: str = "int3", optimize: bool = False,
            ring_size: int = RING_SIZE, ring_slots: int | None = None,
            allow_single_step: bool = False) -> None:
        """Attach, map execmem near the modules, register a kprobe per point
        through the kernel's client; with *optimize*, then ask the client
        to optimise each (:mod:`._probe_opt`: a JMP to a buffer whose
        callback records the hit in the thread's ring of *ring_size*
        entries in the target), keeping the INT3 probe, with its
        ``opt_reason``, where that is refused.  *ring_slots*: rings for
        threads (default: the threads there and :data:`RING_SLOTS_SPARE`
        more; 0: every thread on the shared spare ring, which asks
        ``gettid`` per hit -- a bench's baseline).  A point whose
        instruction the client would single-step out of line is refused
        unless *allow_single_step* (see :meth:`_refuse_single_steps`).  On
        any error everything is undone."""
        from .._core import TextPoke
        from .._kprobes._core import KPROBES_EXECMEM
        from ..kernel import Kernel
        from ._machine import LiveMachine
        self.machine = m = LiveMachine(self.pid, strategy=strategy)
        try:
            m.require(Capability.EXECMEM, "kprobes")
            m.require(Capability.QUIESCE, "kprobes")
            if optimize:
                # asked before anything is mapped: the TSC check injects a
                # system call in every thread
                why = self._opt_refusal() or self._tsc_refusal(m)
                for p in self.points:
                    p.opt_reason = why or p.entry_refusal()
            lo, hi = self._span
            rng = m.execmem_range(KPROBES_EXECMEM // 4, "kprobes",
                                  near=(min(lo, *(p.addr for p in self.points)),
                                        max(hi, *(p.addr + 1 for p in self.points))))
            self.core = TextPoke(m)
            image = ProcessImage(self.points[0].module.path,
                                 {p.symbol: (p.addr - p.offset, p.size) for p in self.points})
            start = rng.start
            self._exec = (rng.start, rng.end)
            # freeable by 'live recover' while nothing jumps into it
            self._journal_exec([])
            if optimize and any(p.opt_reason is None for p in self.points):
                start = self._put_recorder(m, rng.start, ring_size, ring_slots)
                if self.recorder is not None:
                    image.symbols["optimized_callback"] = self.recorder
            self.kernel = Kernel(self.core, image, tables=image.tables((lo, hi)),
                                 config={"PREEMPTION": False, "KPROBES_ON_FTRACE": False},
                                 execmem={"kprobes": (start, rng.end)})
            kp = self.kernel.kprobes
            if not allow_single_step:
                self._refuse_single_steps(kp)
            # the INT3s stand in the text while the threads run: guarded and
            # journaled first, so a SIGKILL of this patcher leaves a thread on
            # one waiting at the site for 'live recover' instead of dying
            m.guard_int3_sites([p.addr for p in self.points])
            for p in self.points:
                p.orig = m.text_read(p.addr, 5)
            for p in self.points:
                p.probe = kp.register_kprobe(p.name, pre_handler=self._pre_for(p))
            if self.recorder is not None:
                self._optimize(kp)
        except BaseException:
            self.close()
            raise

    def _refuse_single_steps(self, kp) -> None:
        """Refuse (KprobeError, nothing written) a point whose instruction
        the client neither emulates nor boosts: a hit runs its copy in the
        slot and then traps on the slot's second INT3, which only this
        patcher handles -- a SIGKILL of it while a thread is between the two
        would leave that thread to die of the INT3 (the target's SIGTRAP
        guard knows the probe points, not the slots).  The user may accept
        that risk (``--allow-single-step``)."""
        from .._kprobes._types import KprobeError
        for p in self.points:
            what = kp.steps_out_of_line(p.symbol, p.addr)
            if what is not None:
                raise KprobeError(
                    f"{p.spec}: {what!r} would be single-stepped out of line (not emulated, "
                    "not boostable): a SIGKILL of the prober while a thread steps it would "
                    "kill the target; --allow-single-step probes it anyway",
                    reason="unsupported", addr=p.addr)

    # ------------------------------------------------------------ optimised
    def _opt_refusal(self) -> str | None:
        from ._probe_opt import cpu_refusal
        return cpu_refusal() or _shadow_stack(self.pid)

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

    def _put_recorder(self, m, at: int, ring_size: int, slots: int | None) -> int:
        """The threads' rings (every thread's GS base on its own) and the
        recorder at *at* (the start of the probes' execmem); returns where
        the client's execmem starts.  A thread that uses its GS base itself
        shares the spare ring (the recorder checks every base it reads)."""
        from ._probe_opt import RECORDER_SIZE, fsgsbase, recorder_code, stack_words
        from ._probe_rings import RING_SLOTS_SPARE, ThreadRings
        if slots is None:
            slots = len(m.cpus) + RING_SLOTS_SPARE
        # without RDGSBASE the recorder could not check a GS base before
        # following it: no thread's base is used, all share the spare ring
        self.ring = ThreadRings(m, ring_size, slots, use_gs=fsgsbase(self.pid))
        try:
            self.ring.start()
        except NotSupportedError as e:
            self.ring.stop()
            self.ring = None
            for p in self.points:
                if p.opt_reason is None:
                    p.opt_reason = f"the recorder finds its thread's ring through %gs: {e}"
            return at
        words = max(stack_words(p.args) for p in self.points if p.opt_reason is None)
        r = self.ring
        self.core.text_poke_copy(at, recorder_code(
            words, spare=r.spare.addr, rings=r.headers() if r.use_gs else None))
        self.recorder = at
        return at + RECORDER_SIZE

    def _optimize(self, kp) -> None:
        from .._kprobes._types import KprobeError
        from ._trace_clock import TscTime
        self.time = TscTime(self.pid)           # the first pair before any hit
        # the client tells what it will write before a JMP goes in: the JMP
        # and the bytes it replaces are journaled as the probes' execmem's
        # site first, so a SIGKILL of this patcher at any moment of the
        # write leaves 'live recover' able to put the original bytes back
        # (an INT3 left, or a JMP) and unmap the execmem once no thread is
        # in it
        kp.before_optimize = self._journal_jmps
        try:
            for p in self.points:
                if p.opt_reason is not None:
                    continue
                try:
                    kp.optimize_kprobe(p.probe)
                except KprobeError as e:
                    p.opt_reason = str(e)
                finally:
                    # what the text reads now: the JMPs in, none for a refusal
                    self._journal_exec(self._jmp_sites())
                site = kp._sites.get(p.addr)
                if site is not None and site.optimized:
                    p.op = site.detour.op
                    self._by_op[p.op] = p
        finally:
            kp.before_optimize = None
        if not self._by_op:
            self.time = None

    def _jmp_sites(self) -> list[tuple[int, bytes, bytes]]:
        m = self.machine
        out = []
        for p in self.points:
            if p.orig is not None:
                now = m.text_read(p.addr, 5)
                if now[:1] == b"\xe9":
                    out.append((p.addr, p.orig, now))
        return out

    def _journal_jmps(self, sites: list[tuple[int, bytes, bytes]]) -> None:
        """The client's ``before_optimize``: the JMPs about to be written,
        journaled with those already in as the probes' execmem's sites."""
        have = self._jmp_sites()
        self._journal_exec(have + [x for x in sites if x[0] not in {a for a, _o, _n in have}])

    def _journal_exec(self, sites: list, kind: str = "probe") -> None:
        """The probes' execmem in the journal as a stub region (kind
        ``probe``) with the *sites* that jump (or are about to jump) into
        it: ``live recover`` switches those that read the JMP back, puts
        back the INT3 probes' bytes (sites in flight), and unmaps the
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

    def point_optimized(self, p: ProbePoint) -> bool:
        kp = self.kernel.kprobes if self.kernel is not None else None
        site = kp._sites.get(p.addr) if kp is not None else None
        return bool(site is not None and site.optimized and self.ring is not None)

    @property
    def optimized(self) -> bool:
        """The (first) point is optimised."""
        return self.point_optimized(self.points[0])

    def _drain(self, *, final: bool = False) -> None:
        """The hits the recorder committed since the last drain, as the
        INT3 path's pre-handler would have made them."""
        from ._probe_opt import Recorded
        ring = self.ring
        if ring is None or self.time is None:
            return
        raws = ring.drain(final=final)
        t = self.time
        for raw in raws:
            p = self._by_op.get(raw[4])
            if p is None:
                continue
            rec = Recorded(raw, p.addr)
            self.nhit += 1
            p.nhit += 1
            p.nrecorded += 1
            comm = self._thread_comm(rec.tid)
            vals = []
            for a in p.args:
                try:
                    vals.append(format_value(a, rec, a.fetch(rec), comm, self._symbolize))
                except (OSError, TextPokeError, struct.error):
                    vals.append("(fault)")
            self.hits.append(Hit(rec.tid, rec.cpu, t.ns(rec.tsc) / 1e9, vals, comm, p))
        if raws:
            t.sample()              # after the read: every hit read lies before it

    def _finish_ring(self) -> None:
        """After the client's close (the probes unregistered: the points'
        bytes as they were): once no thread is in the probes' execmem (the
        client's slots and buffers, the recorder: no RIP there, no stack
        word pointing there), the last recorded hits are read and the whole
        range is cleared -- the client, as the kernel, leaves a freed
        slot's bytes in place (only marked free) -- so that the machine
        unmaps it at close.  A thread that stays keeps the range (and the
        rings) mapped; regions_kept says why."""
        m, rng = self.machine, self._exec
        if rng is None or m is None:
            return
        try:
            for p in self.points:
                if p.orig is not None and m.text_read(p.addr, len(p.orig)) != p.orig:
                    raise TextPokeError(f"{p.spec} does not read its original bytes")
            m.run_task(m.quiesce([rng], "the probe's slots, buffer and recorder"))
        except TextPokeError:
            self._drain()
            return
        self._drain(final=True)
        self.core.text_poke_copy(rng[0], b"\xcc" * (rng[1] - rng[0]))
        self.recorder = self._exec = None

    def how(self, p: ProbePoint | None = None) -> str:
        p = p or self.points[0]
        kp = self.kernel.kprobes
        site = kp._sites.get(p.addr)
        if site is None:
            return "gone"
        if self.point_optimized(p):
            return (f"optimised: a JMP to an out-of-line buffer, hits recorded in the process "
                    f"({site.insn.text})" + ("" if self.ring.use_gs else
                                             "; one ring for every thread, gettid per hit: "
                                             "no FSGSBASE in user mode to find a ring per thread"))
        if site.emulate is not None:
            how = f"emulated ({site.insn.text})"
        else:
            how = ("boosted" if site.boosted else "single-stepped out of line") + \
                f" ({site.insn.text})"
        return how + (f"; not optimised: {p.opt_reason}" if p.opt_reason else "")

    @property
    def boosted(self) -> bool | None:
        kp = self.kernel.kprobes if self.kernel is not None else None
        if kp is None or self.points[0].probe is None:
            return None
        site = kp._sites.get(self.points[0].addr)
        return None if site is None else (site.emulate is None and site.boosted)

    def close(self) -> dict:
        """Unregister (the original bytes back, the slots freed once no
        thread is in them), detach.  Returns what is left: ``int3_left``
        read back from the process (how many points read INT3),
        ``regions_kept``."""
        left = {"int3_left": 0, "regions_kept": []}
        try:
            if self.kernel is not None:
                self.kernel.close()
            self._finish_ring()
            if self.core is not None:
                self.core.close()
        finally:
            self.kernel = self.core = None
            if self.ring is not None:
                self.ring.stop()
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
        """How many probe points read INT3 now (None: the process is gone,
        nothing to read)."""
        try:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
                n = 0
                for p in self.points:
                    f.seek(p.addr)
                    n += f.read(1) == b"\xcc"
                return n
        except OSError:
            return None

    # ------------------------------------------------------------ hits
    def _thread_comm(self, tid: int) -> str:
        return thread_comm(self.pid, tid, self._comm)

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

    def _pre_for(self, p: ProbePoint) -> Callable:
        return lambda kp, regs: self._pre(p, regs)

    def _pre(self, p: ProbePoint, regs) -> bool:
        ts = time.clock_gettime(time.CLOCK_MONOTONIC)
        self.nhit += 1
        p.nhit += 1
        tid = regs.cpu
        comm = self._thread_comm(tid)
        # the registers as the probed instruction sees them: ip is the probe
        # point (the trap leaves it after the INT3)
        vals = []
        for a in p.args:
            try:
                v = a.fetch(_AtProbe(regs, p.addr))
                vals.append(format_value(a, regs, v, comm, self._symbolize))
            except (OSError, TextPokeError, struct.error):
                vals.append("(fault)")
        self.hits.append(Hit(tid, self._cpu(tid), ts, vals, comm, p))
        return False

    def _symbolize(self, v: int) -> str:
        try:
            return self.syms.symbolize(v & _M64)
        except Exception:
            return f"{v & _M64:#x}"

    def line(self, h: Hit) -> str:
        return (h.point or self.points[0]).line(h)

    def pump(self, until: Callable[[], bool]) -> None:
        """Service the process's stops (hits among them) until *until()*."""
        m = self.machine
        if self.time is None:
            def task():
                yield WaitUntil(lambda: until() or not m.threads, "probe hits")
            m.run_task(task())
            return
        # optimised: the threads do not stop at a hit; the rings are read
        # every few milliseconds while the machine services other stops
        # (INT3 hits of points not optimised among them)
        while True:
            self._drain()
            if until() or not m.threads:
                return
            end = time.monotonic() + 0.005

            def task():
                yield WaitUntil(lambda: time.monotonic() >= end or not m.threads, "probe hits")
            m.run_task(task())

    def take(self) -> list[Hit]:
        """The hits queued since the last take, in time order (those read
        from the rings and those the INT3 path saw come in apart)."""
        out, self.hits = self.hits, []
        if len(self.points) > 1:
            out.sort(key=lambda h: h.ts)
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
