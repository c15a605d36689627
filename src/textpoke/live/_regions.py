# SPDX-License-Identifier: GPL-2.0-only
"""The live machine's capabilities: what a running process can lend a
client beyond the protocol (a mixin of LiveMachine).

``EXECMEM``  :meth:`execmem_range` maps an r-x region by an injected
             ``mmap`` within rel32 reach of the main executable's text; it
             appears in ``text_ranges`` as a non-core range, and
             :class:`textpoke._execmem.ExecMem` hands out chunks of it as it
             does on every machine.
``DATA``     :meth:`map_data` maps zeroed rw- memory in the target, reached
             from the host through ``machine.mem``.
``PERCPU``   :meth:`set_percpu_base` sets a thread's GS base (x86-64 user
             code leaves %gs to whoever wants it; glibc's TLS is %fs), so
             that ``%gs:``-relative code reads a per-thread record -- the
             kernel's ``this_cpu_ptr`` with threads for CPUs.  A thread
             whose GS base is already set by the program is refused.  A
             new thread inherits its parent's base until a CPU-set listener
             sets its own (listeners hear ``"add"`` while it is still
             stopped).
``QUIESCE``  :meth:`quiesce` holds every thread stopped and looks: no rip
             inside a range and no word on the top of a stack pointing into
             one (a return address: a CALL among the bytes whose callee is
             still running, or a signal frame) -- otherwise it lets them run
             and looks again, and gives up with the reasons after
             :data:`QUIESCE_ATTEMPTS` looks (never unmaps or moves anything
             a thread may be in).

Every region is written down in the journal (kind ``execmem`` or ``data``)
before its ``mmap`` runs.  At ``close()`` a region is unmapped only when
no thread can be in it and, for code, when every byte reads INT3 or zero
(every chunk freed by ``ExecMem.free``, which fills it with INT3: nothing
left that a site could still call); data regions go only when every code
region went, and GS bases are put back then too.  What stays is listed in
:attr:`regions_kept` and dropped from the journal (it is in use, not a
leftover)."""

from __future__ import annotations

import errno
import time
from typing import Sequence

from .._core._machine import PAGE_SIZE, Task, TextRange, WaitUntil
from .._errors import MachineError, NotSupportedError
from . import _ptrace as P
from ._inject import (_MASK, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PROT_READ,
                      PROT_WRITE, SYS_mmap, SYS_munmap, InjectError, find_syscall_insn,
                      inject_syscall)
from ._region import Region, threads_inside
from ._process import read_maps
from ._thread import _HELD, _PARK, _VFORK

__all__ = ["QUIESCE_ATTEMPTS", "QuiesceTimeout"]

#: looks :meth:`quiesce` takes (the threads run between two, a little
#: longer each time: 0.5 ms growing to 10 ms) before it gives up
QUIESCE_ATTEMPTS = 400


class QuiesceTimeout(MachineError):
    """Threads stayed inside the ranges a quiesce waited for them to leave."""


class _Regions:
    """LiveMachine's capabilities (a mixin)."""

    def _regions_init(self) -> None:
        self._regions: dict[str, tuple[str, Region]] = {}    # name -> (kind, region)
        self._gs_orig: dict[int, int] = {}
        self._gs_given: set[int] = set()
        self.regions_kept: list[str] = []

    # ------------------------------------------------------------- EXECMEM, DATA
    def execmem_range(self, size: int = 64 << 10, name: str = "execmem", *,
                      near: "tuple[int, int] | None" = None) -> TextRange:
        """``Capability.EXECMEM``: a non-core text range of at least *size*
        bytes (mapped now, r-x, within rel32 reach of the main executable,
        or of every address in *near* = (lowest, highest): a shared
        library's code); the same *name* again returns the same range."""
        self._check_open()
        have = self._regions.get(name)
        if have is not None:
            kind, r = have
            if kind != "execmem" or r.code_size < size:
                raise MachineError(f"region {name!r} is already mapped ({kind}, {r.code_size} bytes)")
        else:
            r = self._map_region("execmem", name, size, 0, None, near=near)
        # the region itself (the mapping may have been merged with a neighbour)
        return TextRange(r.base, r.base + r.code_size, f"[execmem:{name}]", core=False)

    def map_data(self, size: int, name: str, addr: int | None = None) -> int:
        """``Capability.DATA``: *size* bytes of zeroed data memory in the
        target, at *addr* if given; the same *name* at the same place again
        returns the region that is there."""
        self._check_open()
        if size < 1:
            raise ValueError(f"data region {name}: size {size} < 1")
        have = self._regions.get(name)
        if have is not None:
            kind, r = have
            if kind == "data" and (addr is None or addr == r.base) and size <= r.data_size:
                return r.base
            raise MachineError(f"region {name!r} is already mapped ({kind} at {r.base:#x})")
        return self._map_region("data", name, 0, size, addr).base

    def _map_region(self, kind: str, name: str, code: int, data: int, addr: int | None, *,
                    near: "tuple[int, int] | None" = None) -> Region:
        self._check_write()
        self._check_tracer()
        if near is None:
            near = (self._ranges[0].start, self._ranges[0].end)
        maps = read_maps(self.pid)
        if addr is not None:
            if addr % PAGE_SIZE:
                raise ValueError(f"data region {name}: {addr:#x} is not page-aligned")
            near = None
        j = self.journal

        def before(base: int, code_size: int, data_size: int) -> None:
            if j is not None:       # named before the mmap runs: recover finds it
                j.add_region(kind, base, code_size, data_size, [])

        with self._signals_deferred():
            self._hold_all()
            try:
                held = sorted((t for t, th in self._threads.items()
                               if th.state == _HELD and not th.child_of),
                              key=lambda t: t != self.pid)
                if not held:
                    raise MachineError(f"no thread of process {self.pid} could be stopped")
                try:
                    if near is None:
                        r = _map_at(self.pid, held[0], addr, data, maps, before)
                    else:
                        r = Region.map(self.pid, held[0], code, data, near=near, maps=maps,
                                       before=before)
                except (InjectError, OSError) as e:
                    if j is not None and j.data["regions"] and j.data["regions"][-1]["kind"] == kind:
                        j.data["regions"].pop()
                        j.flush()
                    raise MachineError(f"cannot map {name!r} in process {self.pid}: {e}") from None
            finally:
                self._release_held()
        self._regions[name] = (kind, r)
        self.refresh_maps()
        return r

    # ------------------------------------------------------------- PERCPU
    def set_percpu_base(self, cpu: int, addr: int) -> None:
        """``Capability.PERCPU``: thread *cpu*'s GS base (``%gs:0`` reads *addr*)."""
        self._check_open()
        self._check_tracer()
        t = self._threads.get(cpu)
        if t is None:
            raise MachineError(f"thread {cpu} is not attached to the {self.name} machine")
        if t.state in (_HELD, _PARK):
            try:
                self._set_gs(t, addr)
            except OSError as e:
                # a new thread its parent's clone event announced, not in its
                # first stop yet (a CPU-set listener's "add"): hold it there
                if e.errno != errno.ESRCH or t.stops:
                    raise
                t.want_hold = True
                while self._threads.get(cpu) is t and not t.stops:
                    self._wait(cpu, True)
                if self._threads.get(cpu) is t:
                    try:
                        self._set_gs(t, addr)
                    finally:
                        # let go also when refused (the program's own base)
                        t.want_hold = self._holding
                        if not self._holding and t.state == _HELD:
                            sig, t.hold_sig = t.hold_sig, 0
                            self._resume(t, max(sig, 0))
            return
        with self.stopped():
            t = self._threads.get(cpu)
            if t is None:
                raise MachineError(f"thread {cpu} exited")
            self._set_gs(t, addr)

    def reset_percpu_bases(self, lo: int, hi: int) -> int:
        """Every thread whose GS base lies in ``[lo, hi)`` (a region of ours
        being freed: a killed patcher's, for 'live recover') back to 0, the
        only base the machine ever replaces (see :meth:`_set_gs`); returns
        how many.  A base elsewhere is left: the program's own."""
        n = 0
        with self.stopped():
            for tid, t in list(self._threads.items()):
                if t.state in (_HELD, _PARK) and \
                        lo <= P.getregs(tid, P.UserRegs()).gs_base < hi:
                    self._gs_orig.setdefault(tid, 0)
                    self._set_gs(t, 0)
                    n += 1
        return n

    def _set_gs(self, t, addr: int) -> None:
        regs = P.getregs(t.tid, P.UserRegs())
        if t.tid not in self._gs_orig:
            # a base we gave (a new thread inherits its parent's), or one
            # that points at nothing mapped (a killed patcher's, after
            # 'live recover' freed its records), is not the program's own
            ours = not regs.gs_base or regs.gs_base in self._gs_given or not any(
                m.start <= regs.gs_base < m.end for m in read_maps(self.pid))
            if not ours:
                raise NotSupportedError(f"thread {t.tid} of process {self.pid} uses its GS base "
                                        f"({regs.gs_base:#x}) itself")
            self._gs_orig[t.tid] = 0
        regs.gs_base = addr
        if addr:
            self._gs_given.add(addr)
        P.setregs(t.tid, regs)
        if t.park_regs is not None:       # restored when it is let go: keep the new base
            t.park_regs.gs_base = addr

    # ------------------------------------------------------------- QUIESCE
    def quiesce(self, ranges: Sequence[tuple[int, int]], why: str = "") -> Task:
        """``Capability.QUIESCE``: returns once every thread was seen, all
        of them stopped at once, with no rip in a ``[lo, hi)`` of *ranges*
        and no stack word pointing into one (see the module doc);
        :class:`QuiesceTimeout` after :data:`QUIESCE_ATTEMPTS` looks."""
        self._check_open()
        ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        reasons: list[str] = []
        for attempt in range(QUIESCE_ATTEMPTS):
            reasons = self.threads_in(ranges)
            if not reasons:
                return
            self.stats.quiesce_waits += 1
            until = time.monotonic() + min(0.0005 * (attempt + 1), 0.01)
            yield WaitUntil(lambda: time.monotonic() >= until,
                            f"threads to leave the text ({why})" if why else
                            "threads to leave the text")
        raise QuiesceTimeout(f"process {self.pid}: threads stay inside "
                             f"{', '.join(f'{lo:#x}-{hi:#x}' for lo, hi in ranges)}"
                             + (f" ({why})" if why else "") + ": " + "; ".join(reasons[:3]))

    def threads_in(self, ranges: Sequence[tuple[int, int]]) -> list[str]:
        """With every thread stopped: why some thread may be inside one of
        *ranges* (rip, or a stack word pointing in).  Empty: none is."""
        self._check_tracer()
        with self._signals_deferred():
            self._hold_all()
            try:
                # (a thread kept in its vfork stop too: its stack counts)
                regs = [(tid, P.getregs(tid, P.UserRegs()))
                        for tid, t in list(self._threads.items())
                        if t.state in (_HELD, _PARK) or (t.state == _VFORK and not t.asleep)]
                return threads_inside(self.pid, regs, ranges, ranges, read_maps(self.pid),
                                      self._mem.read)
            finally:
                self._release_held()

    # ------------------------------------------------------------- at close
    def _free_regions(self) -> None:
        """Unmap what no thread can be in and nothing can reach (see the
        module doc); list what stays in :attr:`regions_kept`."""
        if not self._regions:
            return
        j = self.journal
        kept: list[str] = []
        code = [(n, r) for n, (k, r) in self._regions.items() if k == "execmem"]
        data = [(n, r) for n, (k, r) in self._regions.items() if k == "data"]
        for name, r in code:
            raw = self._mem.read(r.base, r.code_size)
            if raw.strip(b"\xcc\x00"):
                kept.append(f"execmem {name!r} at {r.base:#x}: code still in it (a chunk not freed)")
                continue
            why = self._unmap(r)
            if why:
                kept.append(f"execmem {name!r} at {r.base:#x}: " + "; ".join(why))
        for name, r in data:
            if kept:
                kept.append(f"data {name!r} at {r.base:#x}: code that may use it stays")
                continue
            why = self._unmap(r)
            if why:
                kept.append(f"data {name!r} at {r.base:#x}: " + "; ".join(why))
        if not kept and self._gs_orig:
            with self._signals_deferred():
                self._hold_all()
                try:
                    for tid, t in list(self._threads.items()):
                        # only a base we gave (or a thread inherited from one
                        # we gave it): one the program set since is its own
                        if t.state in (_HELD, _PARK) and \
                                P.getregs(tid, P.UserRegs()).gs_base in self._gs_given:
                            self._set_gs(t, self._gs_orig.get(tid, 0))
                finally:
                    self._release_held()
        # what stays is in use, not a leftover for 'live recover'
        for _name, (_k, r) in self._regions.items():
            r.close()
            if j is not None:
                j.drop_region(r.base, flush=False)
        if j is not None and j.on_disk:
            j.flush()
        self._regions.clear()
        self.regions_kept = kept

    def _unmap(self, r: Region, ready=None, attempts: int = 20) -> list[str]:
        """Unmap *r* once, with every thread held, no thread can be in it
        (:meth:`Region.in_use`: no rip inside, no stack word pointing in);
        the threads run a little longer between two looks.  *ready(tids,
        tid)*, called with the threads held before each look (*tids*: the
        held ones, *tid*: the one the ``munmap`` would run in), may say why
        not yet: ``(reasons, final)`` -- final, the region stays for good.
        Returns why it stays (empty: unmapped).  The one unmap loop of the
        live machine: regions at close and in ``live recover``, the SIGTRAP
        guard (:meth:`_Survival._guard_remove`)."""
        why: list[str] = []
        for attempt in range(attempts):
            with self._signals_deferred():
                self._hold_all()
                try:
                    held = [(tid, P.getregs(tid, P.UserRegs()))
                            for tid, t in list(self._threads.items())
                            if t.state in (_HELD, _PARK) or (t.state == _VFORK and not t.asleep)]
                    if not held:
                        return ["no thread could be stopped"]
                    tids = [t for t, _ in held if self._threads[t].state == _HELD]
                    if not tids:
                        why = ["every thread is parked"]
                    else:
                        tid = self.pid if self.pid in tids else tids[0]
                        why, final = ready(tids, tid) if ready is not None else ([], False)
                        if final:
                            return why
                        if not why:
                            why = r.in_use(held)
                        if not why:
                            if not r.syscall_at:
                                r.syscall_at = find_syscall_insn(self.pid)
                            r.unmap(tid)
                            self.refresh_maps()
                            return []
                finally:
                    self._release_held()
            time.sleep(0.0005 * (attempt + 1))
        return why


def _map_at(pid: int, tid: int, addr: int, size: int, maps, before) -> Region:
    """A data region at a fixed address (MAP_FIXED_NOREPLACE: it fails
    rather than replace anything)."""
    size = -(-size // PAGE_SIZE) * PAGE_SIZE
    syscall_at = find_syscall_insn(pid, maps)
    before(addr, 0, size)
    got = inject_syscall(pid, tid, SYS_mmap, addr, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1 & _MASK, 0,
                         syscall_at=syscall_at)
    if got < 0:
        raise InjectError(f"mmap({addr:#x}, {size:#x}) failed: error {-got}")
    if got != addr:
        inject_syscall(pid, tid, SYS_munmap, got, size, syscall_at=syscall_at)
        raise InjectError(f"mmap placed the region at {got:#x}, not at {addr:#x}")
    return Region(pid, got, 0, size, syscall_at=syscall_at)
