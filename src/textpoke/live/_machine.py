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
    write after it.  A child that runs on the process's memory -- vfork,
    posix_spawn, ``clone(CLONE_VM)`` without ``CLONE_THREAD`` -- is followed
    (``PTRACE_O_TRACEVFORK``; one running at attach is seized) and is a CPU
    like a thread until its exec or exit stop, where it is detached; a
    thread that vforked is kept in its vfork event stop (or counts as in the
    kernel, asleep in the vfork wait) until then.  A forked copy gets the
    sites in flight put back and is let go (:mod:`._fork`).

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
it (ptrace's rule); a vfork child that meets an INT3 left by a patcher
killed mid-batch, before ``live recover``, dies if it has reset its
SIGTRAP handler (posix_spawn's does); the core's batch addresses
sites relative to the first text range within ±2 GiB, so shared libraries
of a PIE are out of its reach in one batch.

Where each concern lives (LiveMachine is assembled from one mixin each):
:mod:`._tracer` (attach, the thread table, waits and ptrace-stops; with
:mod:`._thread`: a traced thread's record and states, :mod:`._children`:
vfork/posix_spawn/CLONE_VM children followed while they share the text,
:mod:`._rewind`: a trap rewound before its stop is reaped),
:mod:`._traps` (our INT3s: the trap chain, park or emulate),
:mod:`._stopmachine` (holding every thread, stepping out of a range),
:mod:`._sigdefer` (signal deferral, the tracer thread),
:mod:`._text` (maps, the page cache, runs of writes),
:mod:`._survival` (journal and guard), :mod:`._regions` (the
capabilities: execmem, data, per-thread GS base, quiescence) and
:mod:`._detach`; this module
holds the machine: construction, the protocol, and the capabilities.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Sequence

from .._core._machine import Capability, Machine, Task, TextRange, WaitUntil
from .._errors import MachineError
from . import _ptrace as P
from ._detach import _Detach
from ._journal import Journal
from ._process import Mapping, ProcessIdentity, ProcMem
from ._regions import _Regions
from ._sigdefer import _SignalDeferral
from ._stopmachine import _StopMachine
from ._survival import _Survival
from ._text import _Text
from ._thread import _RUN, _VFORK, _Thread
from ._tracer import LiveStats, _Tracer
from ._traps import _Traps

__all__ = ["LiveMachine", "LiveStats", "TRAP_POLICIES", "STRATEGIES"]

TRAP_POLICIES = ("park", "emulate")
STRATEGIES = ("int3", "stop-machine")


class LiveMachine(_Tracer, _Traps, _StopMachine, _SignalDeferral, _Text, _Survival, _Regions,
                  _Detach, Machine):
    """A running process as a machine (see the module docstring).

    ``LiveMachine(pid, trap_policy="park"|"emulate", strategy="int3"|"stop-machine")``
    attaches at once; ``close()`` (or leaving ``with``) detaches."""

    name = "live"
    guard_kept: list[str] = []
    #: what a process can lend (see :mod:`._regions`): executable and data
    #: memory mapped in it, per-thread storage through the GS base, and
    #: quiescence seen with every thread stopped
    capabilities = frozenset({Capability.EXECMEM, Capability.DATA, Capability.PERCPU,
                              Capability.QUIESCE})
    wide_text = True          # shared libraries lie far from the executable
    text_poke_array_max = 1 << 15   # a sync stops every thread: one batch for 32,768 sites

    def __init__(self, pid: int, *, trap_policy: str = "park", strategy: str = "int3",
                 recover: bool = False) -> None:
        if trap_policy not in TRAP_POLICIES:
            raise ValueError(f"trap_policy must be one of {TRAP_POLICIES}, not {trap_policy!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        super().__init__()
        self._regions_init()
        self.trap_policy = trap_policy
        self.strategy = strategy
        self.stats = LiveStats()
        self._tracer = threading.get_ident()
        self._ident = ProcessIdentity(pid)
        self.pid = pid
        self._threads: dict[int, _Thread] = {}
        self._exiting: set[int] = set()
        self._children: set[int] = set()     # vfork children traced (see _children)
        self._children_gone: set[int] = set()    # ... and those let go since
        self._si = P.SigInfo()
        self._regs = P.UserRegs()
        self._int3_sites: set[int] = set()
        self._pages: dict[int, bytes] = {}
        self._maps: list[Mapping] = []
        self._ranges: list[TextRange] = []
        self._exec_seen = False
        self._holding = False
        self._sync_wait: dict[int, int] = {}
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


    # ------------------------------------------------------------- the protocol
    @property
    def cpus(self) -> list[int]:
        return list(self._threads)

    @property
    def threads(self) -> list[int]:
        """The thread ids attached now (the machine's CPUs), vfork children
        included while they share the process's memory (see _children)."""
        return list(self._threads)

    def set_percpu_base(self, cpu: int, addr: int) -> None:
        """``Capability.PERCPU`` (see :mod:`._regions`); a vfork child that
        has exec'd or exited since the caller listed the CPUs is skipped:
        it runs none of this process's code any more.  A thread asleep in
        the kernel's vfork wait (not in a ptrace-stop: its registers cannot
        be reached) is waited for until its child is done, 5 s at most."""
        if cpu not in self._threads and cpu in self._children_gone:
            return
        t = self._threads.get(cpu)
        if t is not None and t.state == _VFORK and t.asleep:
            self._check_tracer()
            end = time.monotonic() + 5.0
            with self._signals_deferred():
                while self._threads.get(cpu) is t and t.state == _VFORK and t.asleep:
                    if time.monotonic() > end:
                        raise MachineError(f"thread {cpu} of process {self.pid} sleeps in vfork "
                                           "for more than 5 s (its child runs on)")
                    self._service()
        super().set_percpu_base(cpu, addr)

    @property
    def text_ranges(self) -> list[TextRange]:
        return self._ranges

    @property
    def mem(self) -> ProcMem:
        self._check_open()
        return self._mem


    def text_poke_write(self, addr: int, data: bytes) -> Task:
        yield from self.text_poke_write_many(((addr, data),))

    def text_poke_write_many(self, writes: Sequence[tuple[int, bytes]]) -> Task:
        self._check_write()
        self._journal_writes(writes)
        runs = self._runs(writes)
        if self.strategy == "stop-machine":
            self._hold_all()
            try:
                # a thread may stand in the code between two sites of a run
                # (the run is one pwrite of them and the bytes between, as
                # they are); it must only not stand strictly inside a write
                self._step_out_of(writes)
                self._write_runs(runs)
            finally:
                self._release_held()
        else:
            self._write_runs(runs)
        yield


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
