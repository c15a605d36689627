# SPDX-License-Identifier: GPL-2.0-only
"""The live machine: a running Linux x86-64 process, patched from outside
through ptrace.  The "CPUs" are the process's threads.

Attach and follow
    Every thread is attached with ``PTRACE_SEIZE`` (no stop on attach) and
    ``PTRACE_O_TRACECLONE | TRACEEXIT | TRACEEXEC``: a new thread is traced
    from its first instruction (it starts in a ptrace-stop, and CPU-set
    listeners hear ``"add"`` before it is resumed); an exiting thread is
    seen at its exit stop (``"remove"``: it runs no user code after that).
    The process is identified by (pid, start time); the identity is
    re-checked before every write (:class:`ProcessChanged`,
    :class:`NoSuchProcess`), and an ``exec`` seen meanwhile refuses every
    write after it.

Text
    ``text_ranges`` are the executable mappings of /proc/PID/maps, the main
    executable's first.  File-backed ranges (the executable, shared
    libraries) are ``core=True`` -- compiled code, which ``text_poke_copy``
    refuses as it refuses core kernel text; anonymous executable mappings
    (JIT code, pages injected for trampolines) are ``core=False``, the
    execmem of a process.  [vdso], [vsyscall] and [uprobes] are left out.
    Writes go through ``/proc/PID/mem`` (the kernel's own alias path into
    read-only text), one ``pwrite`` per run of nearby writes (writes less
    than a page apart are merged with the bytes between them, so no page
    without a write is touched), each run read back with one ``pread``.
    Writable executable mappings are never merged (the process may write
    there itself).  Reads are served from a per-task cache of text pages
    that our own writes keep current.

The INT3 handler runs in the tracer
    A thread that executes an INT3 stops with SIGTRAP.  When the byte before
    its RIP is a site where this machine wrote an INT3, the machine's trap
    chain runs with a :class:`PtRegs` built from the thread's registers
    (``user_mode=False``: the core treats it as a kernel-mode INT3; ``mem``
    is the process's memory).  Then, by ``trap_policy``:

    ``"park"`` (default): when the core's handler claims the trap, the
        thread is left stopped (its emulated registers are discarded) and is
        resumed *at the site* once the site's first byte is no longer INT3
        (checked at every sync, and when the task ends): it then executes
        the whole new (or, after a rollback, old) instruction.  A hot site
        costs one trap per thread per batch instead of one per hit.
    ``"emulate"``: the emulated rip/rsp/flags (and the CALL's pushed return
        address) are written back and the thread resumes at once.

    Handlers of other priorities (kprobes-like, notifiers) always run with
    the real registers and are written back.  A SIGTRAP that no handler
    claims, and every other signal, is delivered to the process unchanged.
    A SIGTRAP from one of our INT3s that is reported only after the INT3 is
    gone again (the kernel may report the interrupt stop of a sync before
    the pending SIGTRAP) is resolved by resuming the thread at the site.

Serialisation (``sync_each_cpu``)
    ``strategy="int3"`` (default): every running thread is sent
    ``PTRACE_INTERRUPT`` and waited for until it reports a stop; each is
    resumed at once.  A thread that reports any ptrace-stop is inside the
    kernel, and it can only get back to user code through the kernel's
    return path (IRET or SYSRET after the signal/ptrace work), which is
    serialising on x86 -- the cross-modifying-code rule of the SDM (Vol. 3,
    §8.1.3: the modifying processor writes, then every executing
    processor executes a serialising instruction before it runs the
    modified bytes) holds exactly as with the kernel's IPI + sync_core.
    Threads already stopped (parked, group-stopped) are synced: they too
    return only through the kernel.  A thread that exits meanwhile counts
    as synced; a new thread starts from the kernel, serialised.
    ``strategy="stop-machine"``: each write stops every thread first,
    checks that no thread's RIP lies strictly inside a range being written
    (such a thread is single-stepped out), writes, and resumes them all;
    ``sync_each_cpu`` then has nothing left to do.

Never kill the patient
    While it drives a task or detaches, the machine keeps SIGINT, SIGTERM,
    SIGHUP, SIGQUIT, SIGALRM and SIGUSR1/2 blocked except while it waits
    for a thread, so a signal's exception (the library installs no
    handler; the CLI's raise KeyboardInterrupt / Terminated) surfaces at a
    wait, between two protocol steps, and never inside the bookkeeping of
    a thread's stop.  ``run_task`` lets go of the task; the core then
    finishes or rolls back the batch through a fresh ``run_task``;
    ``close()`` resumes parked threads at their sites and detaches every
    thread (a thread that has our SIGTRAP still queued is first let take
    it, so it is never delivered after we leave).  If the target or one of
    its threads vanishes mid-batch, the batch goes on with the others.

    SIGKILL of the patcher cannot be caught.  The kernel then detaches
    every thread (ptrace does not kill tracees when the tracer dies: this
    machine never sets PTRACE_O_EXITKILL) and resumes it.  So, before the
    first INT3 of a session is written, a SIGTRAP handler is injected into
    the target (:mod:`._guard`: a thread that reaches an INT3 of ours after
    we are gone goes back to the site and waits there), a parked thread's
    RIP is set back to its site when it is parked, and every site in
    flight is written down in the journal (:mod:`._journal`) before its
    INT3 and its tail are written.  ``textpoke live recover`` puts those
    sites back whole and removes the handler; a clean close removes the
    handler and the journal itself.

Limits: one tracer thread -- use a LiveMachine from the thread that made
it (ptrace's rule); a ``fork`` while a batch is in flight copies any INT3
of ours into the child, which is not traced; the core's batch addresses
sites relative to the first text range within ±2 GiB, so shared libraries
of a PIE are out of its reach in one batch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .._core._emulate import PtRegs
from .._core._machine import PAGE_SIZE, Machine, Task, TextRange, TrapPriority, WaitUntil, drive
from .._errors import BadAddressError, MachineError
from . import _ptrace as P
from ._errors import ACCESS_HINT, AccessDenied, NoSuchProcess, ProcessChanged
from . import _guard as G
from ._journal import Journal
from ._process import Mapping, ProcessIdentity, ProcMem, list_tids, read_maps

__all__ = ["LiveMachine", "LiveStats", "TRAP_POLICIES", "STRATEGIES"]

TRAP_POLICIES = ("park", "emulate")
STRATEGIES = ("int3", "stop-machine")

_OPTIONS = P.PTRACE_O_TRACECLONE | P.PTRACE_O_TRACEEXIT | P.PTRACE_O_TRACEEXEC
_GROUP_STOP_SIGS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                       signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2})
_SKIP_MAPS = frozenset({"[vdso]", "[vsyscall]", "[uprobes]", "[vvar]"})
_INT3 = 0xCC

# thread states
_RUN, _HELD, _PARK, _LISTEN = "run", "held", "park", "listen"


@dataclass(slots=True)
class LiveStats:
    """What the machine did (the core keeps its own ``TextPoke.stats``)."""

    attached: int = 0
    threads_added: int = 0
    threads_removed: int = 0
    syncs: int = 0
    interrupts: int = 0
    writes: int = 0            # pwrite calls on /proc/PID/mem (text)
    pokes: int = 0             # (addr, bytes) pokes asked for
    traps: int = 0             # SIGTRAP stops at one of our INT3 sites
    traps_emulated: int = 0
    traps_parked: int = 0
    traps_rewound: int = 0     # our INT3 was already gone: resumed at the site
    signals_passed: int = 0    # signals (SIGTRAPs included) delivered unchanged
    group_stops: int = 0
    single_steps: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class _Thread:
    __slots__ = ("tid", "state", "stops", "park_site", "park_regs", "hold_sig", "want_hold",
                 "pending_int")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.state = _RUN
        self.stops = 0              # ptrace-stops reported so far
        self.park_site = 0
        self.park_regs: P.UserRegs | None = None
        self.hold_sig = 0           # signal to deliver when a held thread is let go
        self.want_hold = False      # keep it stopped at its next interrupt stop
        # An interrupt stop (PTRACE_EVENT_STOP) is due.  Any ptrace-stop
        # clears the kernel's pending interrupt, and one sent while the
        # thread sits in a stop we have not seen yet stays pending past it;
        # so before resuming a thread from any other stop while one is due,
        # the interrupt is sent again: exactly one interrupt stop follows.
        self.pending_int = 0


class _ShadowMem:
    """Data memory whose writes are kept aside: a parked thread's emulation
    is only a question (is this trap the core's?), never applied."""

    def __init__(self, mem: ProcMem) -> None:
        self._mem = mem
        self._w: dict[int, bytes] = {}

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray(self._mem.read(addr, size))
        for a, d in self._w.items():
            for i, b in enumerate(d):
                if addr <= a + i < addr + size:
                    out[a + i - addr] = b
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        self._w[addr] = bytes(data)


class LiveMachine(Machine):
    """A running process as a machine (see the module docstring).

    ``LiveMachine(pid, trap_policy="park"|"emulate", strategy="int3"|"stop-machine")``
    attaches at once; ``close()`` (or leaving ``with``) detaches."""

    name = "live"
    guard_kept: list[str] = []
    capabilities = frozenset()
    wide_text = True          # shared libraries lie far from the executable
    text_poke_array_max = 1 << 15   # a sync stops every thread: one batch for 32,768 sites

    def __init__(self, pid: int, *, trap_policy: str = "park", strategy: str = "int3",
                 recover: bool = False) -> None:
        if trap_policy not in TRAP_POLICIES:
            raise ValueError(f"trap_policy must be one of {TRAP_POLICIES}, not {trap_policy!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        super().__init__()
        self.trap_policy = trap_policy
        self.strategy = strategy
        self.stats = LiveStats()
        self._tracer = threading.get_ident()
        self._ident = ProcessIdentity(pid)
        self.pid = pid
        self._threads: dict[int, _Thread] = {}
        self._exiting: set[int] = set()
        self._si = P.SigInfo()
        self._regs = P.UserRegs()
        self._int3_sites: set[int] = set()
        self._pages: dict[int, bytes] = {}
        self._maps: list[Mapping] = []
        self._ranges: list[TextRange] = []
        self._exec_seen = False
        self._holding = False
        self._sync_wait: dict[int, int] = {}
        self._sorted_handles: tuple = ()
        self._sigmask_depth = 0
        self._old_mask: set | None = None
        self._mem: ProcMem | None = None
        self._guard: dict | None = None      # the injected SIGTRAP handler (see _guard)
        self._adopted: set[int] = set()
        self.journal: Journal | None = None
        try:
            self._mem = ProcMem(pid, self._ident.name)
            self.refresh_maps()
            # refuse (another textpoke at work, or a dead one's leftovers)
            # before seizing anything
            self.journal = Journal.open(pid, adopt=recover, name=self._ident.name)
            self._guard = self.journal.data.get("guard")
            if self._guard and not any(m.start == self._guard["base"] for m in self._maps):
                self._guard = None               # its mmap never ran (killed inside it)
                self.journal.data["guard"] = None
            # a dead patcher's sites: a trap there is ours too (see _on_sigtrap)
            self._adopted = {int(a) for a in self.journal.data["sites"]}
            self._int3_sites |= self._adopted
            self._attach()
        except BaseException:
            self._detach_all()
            self._ident.close()
            if self._mem is not None:
                self._mem.close()
            self._closed = True
            raise

    # ------------------------------------------------------------- attach
    def _attach(self) -> None:
        me = os.getpid()
        while True:
            new = [t for t in list_tids(self.pid) if t not in self._threads]
            if not new:
                break
            for tid in new:
                try:
                    P.seize(tid, _OPTIONS)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        if tid == self.pid:
                            raise NoSuchProcess(self.pid, "process vanished while attaching",
                                                self._ident.name) from None
                        continue                 # a thread that just exited
                    if e.errno == errno.EPERM and self._threads and _tracer_of(tid) == me:
                        pass                     # auto-attached already (a clone of a seized thread)
                    elif e.errno == errno.EPERM:
                        other = _tracer_of(tid)
                        why = (f"already traced by pid {other}" if other and other != me
                               else ACCESS_HINT)
                        raise AccessDenied(self.pid, f"PTRACE_SEIZE refused: {why}",
                                           self._ident.name) from None
                    else:
                        raise MachineError(f"PTRACE_SEIZE of thread {tid} failed: {e}") from None
                self._threads[tid] = _Thread(tid)
                self.stats.attached += 1
        self._ident.check()

    # ------------------------------------------------------------- the protocol
    @property
    def cpus(self) -> list[int]:
        return list(self._threads)

    @property
    def threads(self) -> list[int]:
        """The thread ids attached now (the machine's CPUs)."""
        return list(self._threads)

    @property
    def text_ranges(self) -> list[TextRange]:
        return self._ranges

    @property
    def mem(self) -> ProcMem:
        self._check_open()
        return self._mem

    def refresh_maps(self) -> list[TextRange]:
        """Re-read /proc/PID/maps (after the process mapped or unmapped code)."""
        maps = read_maps(self.pid)
        exe = self._ident.exe
        ranges, first = [], None
        for m in maps:
            if not m.executable or m.path in _SKIP_MAPS:
                continue
            anon = not m.path.startswith("/")
            name = os.path.basename(m.path) if not anon else (m.path or f"[anon:{m.start:#x}]")
            r = TextRange(m.start, m.end, name, core=not anon)
            if first is None and m.path == exe:
                first = r
            else:
                ranges.append(r)
        if first is None:
            if not ranges:
                raise MachineError(f"pid {self.pid} has no executable mapping")
            first = ranges.pop(0)
        self._maps = maps
        self._ranges = [first] + ranges
        self._pages.clear()
        return self._ranges

    def text_range_of(self, addr: int, size: int = 1) -> TextRange:
        try:
            return super().text_range_of(addr, size)
        except BadAddressError:
            if self._closed:
                raise
            self.refresh_maps()           # mapped since we last looked?
            return super().text_range_of(addr, size)

    def _mapping_of(self, addr: int) -> Mapping | None:
        for m in self._maps:
            if m.start <= addr < m.end:
                return m
        return None

    def text_read(self, addr: int, size: int) -> bytes:
        # Fast path: within one cached page (the cache is emptied by close()
        # and at every task).  Every read of a batch takes it.
        page = addr & ~(PAGE_SIZE - 1)
        chunk = self._pages.get(page)
        if chunk is not None and addr + size <= page + PAGE_SIZE:
            off = addr - page
            return chunk[off:off + size]
        self._check_open()
        pages = self._pages
        out = []
        a, end = addr, addr + size
        while a < end:
            page = a & ~(PAGE_SIZE - 1)
            chunk = pages.get(page)
            if chunk is None:
                m = self._mapping_of(a)
                if m is None or not m.executable:
                    self.text_range_of(a, min(end, page + PAGE_SIZE) - a)   # refresh or raise
                    m = self._mapping_of(a)
                if m is not None and m.writable:       # the process may write here: no cache
                    n = min(end, page + PAGE_SIZE) - a
                    out.append(self._mem.read(a, n))
                    a += n
                    continue
                chunk = self._mem.read(page, PAGE_SIZE)
                pages[page] = chunk
            off = a - page
            n = min(end - a, PAGE_SIZE - off)
            out.append(chunk[off:off + n])
            a += n
        return out[0] if len(out) == 1 else b"".join(out)

    def text_poke_write(self, addr: int, data: bytes) -> Task:
        yield from self.text_poke_write_many(((addr, data),))

    def text_poke_write_many(self, writes: Sequence[tuple[int, bytes]]) -> Task:
        self._check_write()
        self._journal_writes(writes)
        runs = self._runs(writes)
        if self.strategy == "stop-machine":
            self._hold_all()
            try:
                self._step_out_of(runs)
                self._write_runs(runs)
            finally:
                self._release_held()
        else:
            self._write_runs(runs)
        yield

    def _journal_writes(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Before INT3s (and tails under them) are written: the guard is in
        the target, and the journal says what each site held."""
        j = self.journal
        if j is None:
            return
        # only the batch's INT3s: an INT3 written on purpose with text_poke
        # (a breakpoint) must kill the target as it would without us
        in_batch = getattr(self.owner, "_inflight", None) is not None
        int3s = [a for a, d in writes if len(d) == 1 and d[0] == _INT3] if in_batch else []
        if int3s:
            if self._guard is None:
                self._guard_install()
            sites = j.data["sites"]
            for a in [a for a in sites if self.text_read(int(a), 1)[0] != _INT3]:
                del sites[a]                   # whole again: an earlier batch's
            olds = {}
            for a in int3s:
                b = self.text_read(a, 1)
                if b[0] != _INT3:
                    olds[a] = b
            if olds:
                self._mem.write(self._guard["base"] + G.CODE_SIZE + G.COUNT_OFF,
                                G.table_bytes(set(int3s) | {int(a) for a in sites}))
                j.sites_int3(olds)
            return
        sites = j.data["sites"]
        if sites:
            tails = [(a - 1, self.text_read(a, len(d)), bytes(d)) for a, d in writes
                     if len(d) > 0 and str(a - 1) in sites and str(a) not in sites
                     and self.text_read(a - 1, 1)[0] == _INT3]
            if tails:
                j.sites_tails(tails)

    def _guard_install(self) -> None:
        from ._inject import ExecMem, InjectError, find_syscall_insn, inject_syscall
        lo = self._ranges[0].start
        self._hold_all()
        try:
            errors = []
            for tid in sorted((t for t, th in self._threads.items() if th.state == _HELD),
                              key=lambda t: t != self.pid):
                def before(base: int, code: int, data: int) -> None:
                    # named before the mmap runs: a kill inside it leaves
                    # nothing 'live recover' does not know of
                    self._guard = {"base": base, "size": code + data, "installed": False,
                                   "syscall_at": find_syscall_insn(self.pid)}
                    self.journal.set_guard(self._guard)
                try:
                    r = ExecMem.map(self.pid, tid, G.CODE_SIZE, G.DATA_SIZE, near=(lo, lo),
                                    before=before)
                except (InjectError, OSError) as e:
                    errors.append(f"thread {tid}: {e}")
                    self._guard = None
                    self.journal.set_guard(None)
                    continue
                base = r.base
                # written down before the action is installed: a kill from here
                # on leaves a mapping that 'live recover' finds
                self._guard = {"base": base, "size": r.end - base, "syscall_at": r.syscall_at,
                               "installed": False}
                self.journal.set_guard(self._guard)
                self._mem.write(base, G.CODE)
                self._mem.write(base + G.NEW_ACT_OFF, G.our_action(base))
                data = base + G.CODE_SIZE
                res = inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP,
                                     base + G.NEW_ACT_OFF, data + G.ACT_OFF, 8,
                                     syscall_at=r.syscall_at)
                if res < 0:
                    inject_syscall(self.pid, tid, 11, base, r.end - base, syscall_at=r.syscall_at)
                    raise InjectError(f"rt_sigaction(SIGTRAP) in process {self.pid} failed: "
                                      f"{os.strerror(-res)}")
                self._guard = {"base": base, "size": r.end - base, "syscall_at": r.syscall_at,
                               "installed": True,
                               "old": self._mem.read(data + G.ACT_OFF, 32).hex()}
                r.close()
                self.journal.set_guard(self._guard)
                self._pages.clear()
                self.refresh_maps()
                return
            raise InjectError("could not inject the SIGTRAP guard: " + "; ".join(errors))
        finally:
            self._release_held()

    def remove_guard(self) -> list[str]:
        """Remove the injected SIGTRAP handler now (no INT3 of ours may be
        left in the text); returns why it stays (empty: removed)."""
        self._check_open()
        with self._signals_deferred():
            self.guard_kept = self._guard_remove()
        return self.guard_kept

    def _guard_remove(self, attempts: int = 20) -> list[str]:
        """Give the target its SIGTRAP action back and unmap the handler
        once no thread is in it.  Returns why it stays (empty: removed)."""
        from ._inject import ExecMem, inject_syscall
        g = self._guard
        if g is None:
            return []
        j = self.journal
        left = [int(a) for a in (j.data["sites"] if j else ())
                if self._mem.read(int(a), 1)[0] == _INT3]
        if left:
            return [f"{len(left)} site(s) still hold an INT3"]
        base, size = g["base"], g["size"]
        data = base + G.CODE_SIZE
        if not any(m.start == base for m in read_maps(self.pid)):
            # never mapped (killed inside the injected mmap): nothing to undo
            self._guard = None
            if j is not None:
                j.set_guard(None)
            return []
        region = ExecMem(self.pid, base, G.CODE_SIZE, size - G.CODE_SIZE, syscall_at=g["syscall_at"])
        why: list[str] = []
        try:
            for attempt in range(attempts):
                self._hold_all()
                try:
                    held = [t for t, th in self._threads.items() if th.state == _HELD]
                    if not held:
                        return ["no thread could be stopped"]
                    if any(self._trap_queued(t) for t in held):
                        # an INT3 of ours taken before the site was repaired,
                        # not reported yet: let it come to us (rewound) first,
                        # never to the target's own action
                        why = ["a thread has a SIGTRAP of ours queued"]
                        continue
                    tid = self.pid if self.pid in held else held[0]
                    if not g.get("restored"):
                        # read the action first: ours is put back to what it
                        # replaced; any other (we were killed before installing,
                        # or the target installed its own since) is left alone
                        self._mem.write(data + G.CUR_OFF, bytes(32))
                        inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP,
                                       0, data + G.CUR_OFF, 8, syscall_at=g["syscall_at"])
                        cur = self._mem.read(data + G.CUR_OFF, 32)
                        ours = int.from_bytes(cur[:8], "little") == base
                        if ours:
                            inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP,
                                           data + G.ACT_OFF, 0, 8, syscall_at=g["syscall_at"])
                        g["restored"] = True
                        if not ours and g.get("installed", True):
                            # the target installed a handler of its own since:
                            # it stays, and so does ours (it may chain to it)
                            g["kept"] = "the target replaced its SIGTRAP handler"
                            return [g["kept"]]
                    why = region.in_use([(t, self.get_regs(t)) for t in held])
                    if not why:
                        region.unmap(tid)
                        self._guard = None
                        if j is not None:
                            j.data["sites"] = {}
                            j.set_guard(None)
                        self.refresh_maps()
                        return []
                finally:
                    self._release_held()
                time.sleep(0.0005 * (attempt + 1))
            return why
        finally:
            region.close()

    def write_stopped(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write with every thread stopped and none strictly inside a
        range written (stepped out first): for putting back whole what a
        dead patcher left (``live recover``)."""
        self._check_write()
        self._check_tracer()
        # one run per write (never merged: a thread may run the code between
        # two sites, it must only not stand strictly inside one)
        runs = [r for w in writes for r in self._runs((w,))]
        with self._signals_deferred():
            self._hold_all()
            try:
                self._step_out_of(runs)
                self._write_runs(runs)
            finally:
                self._release_held()

    def text_write_early(self, addr: int, data: bytes) -> None:
        """A direct write (``text_poke_early``): only for text no thread can
        be executing."""
        self._check_write()
        self.text_range_of(addr, len(data))
        self._write_runs(self._runs(((addr, data),)))

    def sync_each_cpu(self) -> Task:
        self._check_open()
        self.stats.syncs += 1
        if self.strategy == "stop-machine":
            self._unpark_ready()
            return                 # every write stopped and resumed every thread
        synced = self._unpark_ready()
        if self._exiting:
            self._reap_exiting()
        wait = self._sync_wait
        wait.clear()
        for tid, t in list(self._threads.items()):
            if t.state != _RUN or tid in synced:
                continue           # stopped in the kernel: returns only through it
            if self._interrupt(t):
                wait[tid] = t.stops
        if wait:
            yield WaitUntil(self._synced, "every thread to pass through the kernel")

    def _reap_exiting(self) -> None:
        """Reap threads that passed their exit stop (a traced thread stays a
        zombie until its tracer waits for it)."""
        for tid in list(self._exiting):
            if tid != self.pid:
                self._wait(tid, False)

    def _synced(self) -> bool:
        # A thread is synced once it stopped (it returns only through the
        # kernel); waiting for its interrupt stop itself also leaves no
        # stop unreported behind us.
        threads = self._threads
        for tid in self._sync_wait:
            t = threads.get(tid)
            if t is not None and t.state == _RUN and t.pending_int:
                return False
        return True

    def _settle(self) -> None:
        """Reap the interrupt stops still due (a thread that stopped for a
        trap first takes its interrupt stop when resumed), so that no thread
        sits in a stop nobody reports between two calls."""
        for tid, t in list(self._threads.items()):
            while t.state == _RUN and t.pending_int and self._threads.get(tid) is t:
                self._wait(tid, True)

    def run_task(self, task: Task) -> Any:
        self._check_open()
        self._check_tracer()
        with self._signals_deferred():
            self._pages.clear()
            self._drain()
            try:
                item = next(task)
                while True:
                    if isinstance(item, WaitUntil):
                        while not item.predicate():
                            self._service()
                    item = task.send(None)
            except StopIteration as stop:
                return stop.value
            finally:
                # Let go of the task (the caller may recover); parked
                # threads go back to their sites (they re-trap if an INT3
                # of an unfinished batch is still there).
                self._sync_wait.clear()
                with contextlib.suppress(MachineError, OSError):
                    self._unpark_ready(all_=True)
                    self._settle()

    # ------------------------------------------------------------- writing
    def _check_write(self) -> None:
        self._check_open()
        if self._exec_seen:
            raise ProcessChanged(self.pid, "the process called exec: its text is another "
                                 "program's", self._ident.name)
        self._ident.check()

    def _runs(self, writes: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytearray]]:
        """Group writes into runs: nearby writes (less than a page apart, in
        one read-only mapping) share one pwrite, the bytes between them
        taken from the text as it is."""
        runs: list[tuple[int, bytearray]] = []
        cur_start, cur, cur_map = -1, None, None
        int3_sites = self._int3_sites
        count = 0
        for addr, data in writes:
            count += 1
            n = len(data)
            if n == 0:
                continue
            if n == 1 and data[0] == _INT3:
                int3_sites.add(addr)
            m = cur_map
            if m is None or not (m.start <= addr and addr + n <= m.end):
                m = self._mapping_of(addr)
            if m is None or not m.executable or addr + n > m.end:
                self.text_range_of(addr, n)       # refresh maps, or BadAddressError
                m = self._mapping_of(addr)
                if m is None or not m.executable or addr + n > m.end:
                    raise BadAddressError(f"[{addr:#x}, +{n}) is not in an executable mapping "
                                          f"of pid {self.pid}")
            if cur is not None and m is cur_map and not m.writable:
                end = cur_start + len(cur)
                if cur_start <= addr and addr - end < PAGE_SIZE:
                    if addr > end:
                        cur += self.text_read(end, addr - end)
                    off = addr - cur_start
                    if off + n > len(cur):
                        cur.extend(bytes(off + n - len(cur)))
                    cur[off:off + n] = data
                    continue
            if cur is not None:
                runs.append((cur_start, cur))
            cur_start, cur, cur_map = addr, bytearray(data), m
        if cur is not None:
            runs.append((cur_start, cur))
        self.stats.pokes += count
        return runs

    def _write_runs(self, runs: list[tuple[int, bytearray]]) -> None:
        mem, pages = self._mem, self._pages
        for start, buf in runs:
            data = bytes(buf)
            mem.write(start, data)
            self.stats.writes += 1
            back = mem.read(start, len(data))
            # keep the page cache current with what memory now holds
            a, end = start, start + len(data)
            while a < end:
                page = a & ~(PAGE_SIZE - 1)
                n = min(end, page + PAGE_SIZE) - a
                old = pages.get(page)
                if old is not None:
                    off = a - page
                    pages[page] = old[:off] + back[a - start:a - start + n] + old[off + n:]
                a += n
            if back != data:
                from .._errors import VerifyMismatchError
                raise VerifyMismatchError(f"pid {self.pid}: text at {start:#x} reads "
                                          f"{back[:16].hex()} after writing {data[:16].hex()}")

    # ------------------------------------------------------------- threads
    def _interrupt(self, t: _Thread) -> bool:
        try:
            P.interrupt(t.tid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                self._vanished(t.tid)
                return False
            raise MachineError(f"PTRACE_INTERRUPT of thread {t.tid} failed: {e}") from None
        self.stats.interrupts += 1
        t.pending_int = 1
        return True

    def _resume(self, t: _Thread, sig: int = 0) -> None:
        if sig:
            self.stats.signals_passed += 1
        try:
            if t.pending_int:
                P.interrupt(t.tid)
            P.cont(t.tid, sig)
            t.state = _RUN
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise MachineError(f"PTRACE_CONT of thread {t.tid} failed: {e}") from None
            self._vanished(t.tid)

    def _add_thread(self, tid: int) -> _Thread:
        t = self._threads.get(tid)
        if t is None:
            t = _Thread(tid)
            t.state = _HELD        # it is in its initial stop until we see and resume it
            t.want_hold = self._holding
            self._threads[tid] = t
            self.stats.threads_added += 1
            self._cpus_changed("add", tid)
        return t

    def _vanished(self, tid: int) -> None:
        t = self._threads.pop(tid, None)
        self._sync_wait.pop(tid, None)
        if t is not None:
            self.stats.threads_removed += 1
            self._cpus_changed("remove", tid)

    def _drain(self) -> None:
        """Handle a status a previous wait reaped but could not handle."""
        si = self._si
        if si.si_pid:
            pid, code, status = si.si_pid, si.si_code, si.si_status
            si.si_pid = 0
            self._handle(pid, code, status)

    def _wait(self, tid: int, block: bool, interruptible: bool = False) -> bool:
        """Wait for (or poll) one thread; handle what it reports.  Only an
        *interruptible* wait lets the deferred signals in (a task's waits,
        between protocol steps); the others are short and must not be cut.

        A blocking wait polls (WNOHANG, sleeping 20 us growing to 1 ms) and
        looks at the thread in /proc now and then, so that a thread that
        died, or sits in a stop nobody will report again, can never hang
        the patcher."""
        self._drain()
        si = self._si
        if not block:
            return self._poll(tid)
        old = self._old_mask if interruptible else None
        nap, waited, next_look = 20e-6, 0.0, 0.05
        try:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            while True:
                si.si_pid = 0
                r = P.waitid(tid, si, False)
                if r < 0 or si.si_pid:
                    break
                time.sleep(nap)
                waited += nap
                nap = min(nap * 1.5, 1e-3)
                if waited >= next_look:
                    next_look += 0.05
                    st = _thread_state(self.pid, tid)
                    if st in ("", "Z", "X"):
                        r = -errno.ECHILD
                        break
                    if st == "t" and waited >= 0.2:
                        # stopped for us, yet nothing to report: a stop we
                        # lost track of -- let it go on
                        t = self._threads.get(tid)
                        with contextlib.suppress(OSError):
                            P.cont(tid, 0)
                            if t is not None:
                                t.pending_int = 0
                                t.state = _RUN
                            return True
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
        return self._after_wait(tid, r)

    def _poll(self, tid: int) -> bool:
        si = self._si
        si.si_pid = 0
        return self._after_wait(tid, P.waitid(tid, si, False))

    def _after_wait(self, tid: int, r: int) -> bool:
        si = self._si
        if r == -errno.ECHILD:
            si.si_pid = 0
            self._exiting.discard(tid)
            self._vanished(tid)
            return True
        if r < 0 or not si.si_pid:
            return False          # EINTR: the signal's exception is raised by the caller's next step
        self._drain()
        return True

    def _service(self) -> None:
        """One round of waiting, for a task's WaitUntil."""
        for tid in list(self._sync_wait):
            t = self._threads.get(tid)
            if t is not None and t.state == _RUN and t.pending_int:
                self._wait(tid, True, interruptible=True)
                return
        got = False
        for tid in list(self._threads) + list(self._exiting):
            got |= self._wait(tid, False)
        if not got:
            time.sleep(0.0002)

    def _handle(self, tid: int, code: int, status: int) -> None:
        if code in (P.CLD_EXITED, P.CLD_KILLED, P.CLD_DUMPED):
            self._exiting.discard(tid)
            self._vanished(tid)
            return
        if code != P.CLD_TRAPPED:
            return
        t = self._threads.get(tid)
        if t is None:
            if tid in self._exiting:
                return
            t = self._add_thread(tid)       # a new thread's first stop, before its parent's event
        t.stops += 1
        t.state = _HELD
        sig, event = status & 0xFF, status >> 8
        if event == P.PTRACE_EVENT_STOP:
            t.pending_int = 0
            if sig not in _GROUP_STOP_SIGS and self._int3_sites and self._trap_queued(tid):
                # The interrupt stop came first and our SIGTRAP is still
                # queued: let the thread take it now (no user code runs in
                # between), so it never waits, unreported, for a later call.
                self._resume(t)
                if self._threads.get(tid) is t:
                    self._wait(tid, True)
                return
            if sig in _GROUP_STOP_SIGS:
                self.stats.group_stops += 1
                if t.want_hold:
                    t.hold_sig = -1        # let go with PTRACE_LISTEN: still group-stopped
                    return
                try:
                    P.listen(tid)
                    t.state = _LISTEN
                except OSError:
                    self._vanished(tid)
                return
            if t.want_hold:
                t.hold_sig = 0
                return
            self._resume(t)
        elif event == P.PTRACE_EVENT_CLONE:
            try:
                new = P.geteventmsg(tid)
            except OSError:
                new = 0
            if new:
                nt = self._add_thread(new)
                if nt.stops == 0:
                    self._wait(new, True)         # its first stop comes at once
            self._resume(t)
        elif event == P.PTRACE_EVENT_EXIT:
            self._threads.pop(tid, None)
            self._exiting.add(tid)
            self._sync_wait.pop(tid, None)
            self.stats.threads_removed += 1
            self._cpus_changed("remove", tid)
            with contextlib.suppress(OSError):
                P.cont(tid, 0)
        elif event == P.PTRACE_EVENT_EXEC:
            self._exec_seen = True
            self._resume(t)
        elif event:
            self._resume(t)
        elif sig == signal.SIGTRAP:
            self._on_sigtrap(t)
        else:
            if t.want_hold:
                t.hold_sig = sig       # delivered when let go
                return
            self._resume(t, sig)


    # ------------------------------------------------------------- traps
    def _rebuild_chain(self) -> None:
        super()._rebuild_chain()
        self._sorted_handles = tuple(sorted(self._trap_handles, key=lambda h: (h.priority, h.seq)))

    @staticmethod
    def _trap_queued(tid: int) -> bool:
        try:
            pend = P.peek_pending(tid, 4)
        except OSError:
            return False
        return any(s.si_signo == signal.SIGTRAP and s.si_code == P.SI_KERNEL for s in pend)

    def _on_sigtrap(self, t: _Thread) -> None:
        tid = t.tid
        regs = P.getregs(tid, self._regs)
        site = regs.rip - 1
        if site in self._int3_sites:
            si = P.getsiginfo(tid)
            if si.si_code == P.SI_KERNEL:
                self.stats.traps += 1
                if self.text_read(site, 1)[0] != _INT3:
                    regs.rip = site            # our INT3 is gone: run what is there now
                    P.setregs(tid, regs)
                    self.stats.traps_rewound += 1
                    if t.want_hold:
                        t.hold_sig = 0
                        return
                    self._resume(t)
                    return
                if self._run_chain(t, regs, site):
                    return
                if site in self._adopted:
                    # a dead patcher's INT3, not repaired yet: back to the
                    # site, to trap again until it is (never to the target)
                    regs.rip = site
                    P.setregs(tid, regs)
                    self.stats.traps_rewound += 1
                    if t.want_hold:
                        t.hold_sig = 0
                        return
                    self._resume(t)
                    return
        if t.want_hold:
            t.hold_sig = signal.SIGTRAP
            return
        self._resume(t, signal.SIGTRAP)    # not ours: the process gets it unchanged

    def _run_chain(self, t: _Thread, regs: P.UserRegs, site: int) -> bool:
        park = self.trap_policy == "park"
        gprs = regs.as_dict()
        for h in self._sorted_handles:
            shadow = park and h.priority <= TrapPriority.TEXT_POKE
            pt = PtRegs(ip=regs.rip, sp=regs.rsp, flags=regs.eflags,
                        mem=_ShadowMem(self._mem) if shadow else self._mem,
                        cpu=t.tid, user_mode=False, gprs=dict(gprs))
            task = h.handler(pt)
            try:
                handled = drive(task)
            finally:
                task.close()
            if not handled:
                continue
            if shadow:
                # rewind now, not at release: if the patcher dies, the
                # kernel resumes this thread at the site (where the guard
                # handler takes any INT3 still there), never at site+1
                t.park_regs = P.UserRegs.from_buffer_copy(regs)
                regs.rip = site
                P.setregs(t.tid, regs)
                t.state = _PARK
                t.park_site = site
                self.stats.traps_parked += 1
                return True
            regs.rip, regs.rsp, regs.eflags = pt.ip, pt.sp, pt.flags
            for k, v in pt.gprs.items():
                if gprs.get(k) != v and hasattr(regs, k):
                    setattr(regs, k, v)
            P.setregs(t.tid, regs)
            self.stats.traps_emulated += 1
            if t.want_hold:
                t.hold_sig = 0
                return True
            self._resume(t)
            return True
        return False

    def _unpark_ready(self, all_: bool = False) -> set[int]:
        """Resume, at their sites, parked threads whose site no longer starts
        with INT3 (every one with *all_*).  Returns their ids."""
        done = set()
        for tid, t in list(self._threads.items()):
            if t.state != _PARK:
                continue
            if not all_ and self.text_read(t.park_site, 1)[0] == _INT3:
                continue
            regs = t.park_regs
            regs.rip = t.park_site
            try:
                P.setregs(tid, regs)
            except OSError:
                self._vanished(tid)
                continue
            t.park_regs = None
            if t.want_hold:
                t.state = _HELD
                t.hold_sig = 0
            else:
                self._resume(t)
            done.add(tid)
        return done

    # ------------------------------------------------------------- stop-machine
    def _hold_all(self) -> None:
        """Stop every thread and keep it stopped (``stopped()``)."""
        self._unpark_ready()
        self._holding = True
        pending = {}
        for tid, t in list(self._threads.items()):
            t.want_hold = True
            if t.state == _RUN and self._interrupt(t):
                pending[tid] = t
            elif t.state == _LISTEN and self._interrupt(t):
                pending[tid] = t
        try:
            for tid, t in pending.items():
                while self._threads.get(tid) is t and t.state in (_RUN, _LISTEN):
                    self._wait(tid, True)
        except BaseException:
            self._release_held()
            raise

    def _release_held(self) -> None:
        self._holding = False
        for tid, t in list(self._threads.items()):
            t.want_hold = False
            if t.state == _HELD:
                sig, t.hold_sig = t.hold_sig, 0
                if sig < 0:
                    try:
                        P.listen(tid)
                        t.state = _LISTEN
                    except OSError:
                        self._vanished(tid)
                else:
                    self._resume(t, sig)

    def _step_out_of(self, runs: list[tuple[int, bytearray]]) -> None:
        for tid, t in list(self._threads.items()):
            if t.state != _HELD:
                continue
            for _ in range(64):
                rip = P.getregs(tid, self._regs).rip
                if not any(s < rip < s + len(b) for s, b in runs):
                    break
                P.singlestep(tid)
                self.stats.single_steps += 1
                si = P.SigInfo()
                for _spin in range(100000):
                    si.si_pid = 0
                    if P.waitid(tid, si, False) == 0 and si.si_pid:
                        break
                    time.sleep(20e-6)
            else:
                raise MachineError(f"thread {tid} stays inside a range being written")

    def step_out_of_range(self, lo: int, hi: int) -> None:
        """Single-step every held thread whose RIP is in [lo, hi) until it
        is not (inside :meth:`stopped`)."""
        self._step_out_of([(lo - 1, bytearray(hi - lo + 1))])

    @contextlib.contextmanager
    def stopped(self) -> Iterator[list[int]]:
        """Hold every thread stopped for the duration (for code that must
        see or change a quiet process: injected syscalls, register reads).
        Yields the thread ids held."""
        self._check_open()
        self._check_tracer()
        with self._signals_deferred():
            self._hold_all()
            try:
                yield [tid for tid, t in self._threads.items() if t.state == _HELD]
            finally:
                self._release_held()

    def get_regs(self, tid: int) -> P.UserRegs:
        """A copy of a stopped thread's registers (see :meth:`stopped`)."""
        return P.UserRegs.from_buffer_copy(P.getregs(tid, P.UserRegs()))

    def set_regs(self, tid: int, regs: P.UserRegs) -> None:
        P.setregs(tid, regs)

    # ------------------------------------------------------------- signals
    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        if self._sigmask_depth:
            self._sigmask_depth += 1
            try:
                yield
            finally:
                self._sigmask_depth -= 1
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
        self._old_mask = old
        self._sigmask_depth = 1
        try:
            yield
        finally:
            self._sigmask_depth = 0
            self._old_mask = None
            signal.pthread_sigmask(signal.SIG_SETMASK, old)   # a pending signal raises here

    def _check_tracer(self) -> None:
        if threading.get_ident() != self._tracer:
            raise MachineError("a LiveMachine must be used from the thread that attached it "
                               "(ptrace requests come from the tracing thread only)")

    # ------------------------------------------------------------- lifetime
    def _release(self) -> None:
        try:
            with self._signals_deferred():
                try:
                    if self._guard is not None and self._threads and not self._exec_seen:
                        with contextlib.suppress(OSError, MachineError):
                            self.guard_kept = self._guard_remove()
                    if self.journal is not None:
                        if self._exec_seen:
                            self.journal.remove()     # that text is gone with the old program
                        else:
                            self.journal.close()
                finally:
                    self._detach_all()
        finally:
            self._ident.close()
            if self._mem is not None:
                self._mem.close()
            self._pages.clear()

    def _detach_all(self) -> None:
        """Stop every thread, settle what it reports, and detach it; a thread
        with our SIGTRAP still queued takes it first (handled here)."""
        if not self._threads and not self._exiting:
            return
        with contextlib.suppress(OSError, MachineError):
            self._drain()
        with contextlib.suppress(OSError, MachineError):
            self._unpark_ready(all_=True)
        for _round in range(8):
            self._hold_all_quietly()
            with contextlib.suppress(OSError, MachineError):
                self._unpark_ready(all_=True)       # held now, back at their sites
            again = False
            for tid, t in list(self._threads.items()):
                if t.state != _HELD:
                    continue
                try:
                    pend = P.peek_pending(tid)
                except OSError:
                    pend = []
                if any(s.si_signo == signal.SIGTRAP and s.si_code == P.SI_KERNEL for s in pend):
                    # let it take the queued SIGTRAP while we still trace it
                    sig, t.hold_sig = t.hold_sig, 0
                    self._resume_keep_hold(t, sig)
                    again = True
            if not again:
                break
        for tid, t in list(self._threads.items()):
            try:
                P.detach(tid, max(t.hold_sig, 0) if t.state == _HELD else 0)
            except OSError:
                pass
        self._threads.clear()
        self._detach_stragglers()
        leader_parent = _ppid_of(self.pid)
        for tid in list(self._exiting):
            if tid == self.pid and leader_parent == os.getpid():
                continue               # our own child: its parent (us) reaps it, not the tracer
            si = P.SigInfo()
            P.waitid(tid, si, False)
        self._exiting.clear()

    def _detach_stragglers(self) -> None:
        """Let go of threads still traced by us that the table no longer
        holds: one born (and attached by the kernel, TRACECLONE) while the
        others were being detached, or one whose PTRACE_DETACH failed
        because it was not in a ptrace-stop yet.  Left traced, such a thread
        stays stopped for a tracer that no longer waits for it, and its
        process cannot be reaped until the tracer exits (seen on a loaded
        box: a churning target hung its parent's wait())."""
        me = threading.get_native_id()
        deadline = time.monotonic() + 2.0       # never block a close on a dying process
        while time.monotonic() < deadline:
            # a zombie thread is the exit path's business (below), not ours
            try:
                tids = list_tids(self.pid)
            except NoSuchProcess:
                return
            left = [tid for tid in tids
                    if _tracer_of(tid) == me and _thread_state(self.pid, tid) not in ("Z", "X")]
            if not left:
                return
            for tid in left:
                try:
                    P.detach(tid, 0)          # already in a ptrace-stop
                    continue
                except OSError:
                    pass
                # running or not stopped yet: stop it (a newborn reports its
                # first stop anyway), collect that stop without blocking
                with contextlib.suppress(OSError):
                    P.interrupt(tid)
                si = P.SigInfo()
                P.waitid(tid, si, False)
                with contextlib.suppress(OSError):
                    P.detach(tid, 0)
            time.sleep(0.001)

    def _resume_keep_hold(self, t: _Thread, sig: int) -> None:
        t.want_hold = True
        try:
            if t.pending_int:
                P.interrupt(t.tid)
            P.cont(t.tid, sig)
            t.state = _RUN
        except OSError:
            self._vanished(t.tid)
            return
        while self._threads.get(t.tid) is t and t.state == _RUN:
            # its next stop is the queued SIGTRAP, handled (rewound) and held
            if not self._wait(t.tid, True):
                with contextlib.suppress(OSError):
                    P.interrupt(t.tid)

    def _hold_all_quietly(self) -> None:
        with contextlib.suppress(MachineError):
            self._hold_all()


def _thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            raw = f.read()
        return raw[raw.rindex(b")") + 2:].split()[0].decode()
    except (OSError, ValueError, IndexError):
        return ""


def _tracer_of(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ppid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        return int(raw[raw.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
