# SPDX-License-Identifier: GPL-2.0-only
"""The live machine's INT3 half: a SIGTRAP at one of our INT3s runs the
machine's trap chain (walked by :meth:`Machine.walk_trap_chain`, as on
every machine) with a :class:`PtRegs` built from the thread's registers,
then parks the thread or writes the emulated registers back, by
``trap_policy`` (see :mod:`._machine`).  A mixin of LiveMachine."""

from __future__ import annotations

import ctypes
import signal

from .._core._emulate import PtRegs
from .._core._machine import TrapPriority, drive
from . import _ptrace as P
from ._process import ProcMem
from ._tracer import _HELD, _PARK, _PTRACE_SETSIGINFO, _RUN, _Thread

_INT3 = 0xCC


class _LeftStop(Exception):
    """A ptrace request on the thread whose stop is being handled failed
    with ESRCH: the thread left that stop under us.  Only a SIGKILL does
    that -- its process killed (say by the SIGTRAP another thread was just
    given), or an exec in another thread."""


def _op(fn, tid: int, *args):
    """``fn(tid, *args)``, a ptrace request on the thread being handled;
    its ESRCH becomes :class:`_LeftStop` (any other error, and any error of
    a handler, is raised as it is)."""
    try:
        return fn(tid, *args)
    except ProcessLookupError:
        raise _LeftStop(tid) from None


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



class _Traps:
    """LiveMachine's trap handling (a mixin)."""

    @staticmethod
    def _trap_queued(tid: int) -> bool:
        try:
            pend = P.peek_pending(tid, 4)
        except OSError:
            return False
        return any(s.si_signo == signal.SIGTRAP and s.si_code == P.SI_KERNEL for s in pend)

    def _rewind(self, t: _Thread, regs, site: int) -> None:
        """Put *t* back at *site* (the trap is not delivered) and let it run
        on -- or keep it stopped, its SIGTRAP consumed, if it is being held."""
        regs.rip = site
        _op(P.setregs, t.tid, regs)
        self.stats.traps_rewound += 1
        if t.want_hold:
            t.hold_sig = 0
            return
        self._resume(t)

    def _on_sigtrap(self, t: _Thread) -> None:
        try:
            self._sigtrap_stop(t)
        except _LeftStop:
            self._lost(t)

    def _lost(self, t: _Thread) -> None:
        """*t* left its ptrace-stop without us (ESRCH): only a SIGKILL does
        that, and the thread runs no user code again -- but it is not gone
        yet: it still stops at its exit event and, traced, stays a zombie
        until its tracer waits for it.  So it stays in the table, as
        running, and the waits see it through its exit stop and its death.
        (Dropped from the table here, it would sit in its exit stop or stay
        a zombie with nobody waiting for it, and its process could not be
        reaped: its parent's wait hung.)"""
        if self._threads.get(t.tid) is t:
            t.state = _RUN
            t.park_regs = None

    def _sigtrap_stop(self, t: _Thread) -> None:
        tid = t.tid
        # rewound to the site before its stop was reaped (_Rewind._reap):
        # the registers and siginfo as they were at the trap
        pre = self.__dict__.get("_prerewound")
        pre = pre.pop(tid, None) if pre else None
        regs = pre[0] if pre is not None else _op(P.getregs, tid, self._regs)
        site = regs.rip - 1
        if site in self._int3_sites:
            si = pre[1] if pre is not None else _op(P.getsiginfo, tid)
            if si.si_code == P.SI_KERNEL:
                self.stats.traps += 1
                if self.text_read(site, 1)[0] != _INT3:
                    self._rewind(t, regs, site)     # our INT3 is gone: run what is there now
                    return
                if pre is None:
                    # at the site at once, before the handler chain runs: the
                    # stop is reaped (its SIGTRAP consumed), so a patcher killed
                    # from here on has the kernel resume the thread where its
                    # rip points -- at site+1 that is the middle of an
                    # instruction; at the site, the guard takes the INT3 again.
                    # (With the guard in the target this was done before the
                    # reap, which closes the window between the two.)
                    at_site = P.UserRegs.from_buffer_copy(regs)
                    at_site.rip = site
                    _op(P.setregs, tid, at_site)
                if self._run_chain(t, regs, site):
                    return
                _op(P.setregs, tid, regs)          # unclaimed: as it trapped
                if site in self._adopted:
                    # a dead patcher's INT3, not repaired yet: back to the
                    # site, to trap again until it is (never to the target)
                    self._rewind(t, regs, site)
                    return
        elif any(h.priority > TrapPriority.TEXT_POKE for h in self._trap_order) \
                and self._client_int3(tid, site):
            # an INT3 a client wrote among larger text (a kprobe slot's
            # second INT3) or one the text holds by design (a rethook
            # trampoline's call into the host): offered to the chain, as
            # every machine does; unclaimed, it is the process's own
            # (a kprobe's INT3 the guard knows was rewound before the reap as
            # ours are: the chain gets the registers of the trap)
            if self._run_chain(t, regs, site):
                return
        if pre is not None:
            # rewound before the reap, and not ours after all: as it
            # trapped, with the siginfo the kernel made (not the guard's mark)
            _op(P.setregs, tid, pre[0])
            _op(lambda x: P.ptrace(_PTRACE_SETSIGINFO, x, 0, ctypes.addressof(pre[1])), tid)
        if t.want_hold:
            t.hold_sig = signal.SIGTRAP
            return
        self._resume(t, signal.SIGTRAP)    # not ours: the process gets it unchanged

    def _client_int3(self, tid: int, site: int) -> bool:
        """Whether the SIGTRAP of *tid* is an INT3 at *site* (0xcc there,
        the kernel's SI_KERNEL) in the machine's text (core or execmem)."""
        try:
            if P.getsiginfo(tid).si_code != P.SI_KERNEL:
                return False
            self.text_range_of(site, 1)
            return self.text_read(site, 1)[0] == _INT3
        except Exception:
            return False

    def _run_chain(self, t: _Thread, regs: P.UserRegs, site: int) -> bool:
        park = self.trap_policy == "park"
        gprs = regs.as_dict()
        seen: list = []

        def regs_for(h) -> PtRegs:
            # under "park", the text-poke handler's writes are kept aside:
            # its emulation only answers "is this trap the core's?"
            shadow = park and h.priority <= TrapPriority.TEXT_POKE
            pt = PtRegs(ip=regs.rip, sp=regs.rsp, flags=regs.eflags,
                        mem=_ShadowMem(self._mem) if shadow else self._mem,
                        cpu=t.tid, user_mode=False, gprs=dict(gprs))
            seen[:] = [pt, shadow]
            return pt

        task = self.walk_trap_chain(None, regs_for)
        try:
            h = drive(task)
        finally:
            task.close()
        if h is None:
            return False
        pt, shadow = seen
        if shadow:
            # rewind now, not at release: if the patcher dies, the
            # kernel resumes this thread at the site (where the guard
            # handler takes any INT3 still there), never at site+1
            t.park_regs = P.UserRegs.from_buffer_copy(regs)
            regs.rip = site
            _op(P.setregs, t.tid, regs)
            t.state = _PARK
            t.park_site = site
            self.stats.traps_parked += 1
            return True
        regs.rip, regs.rsp, regs.eflags = pt.ip, pt.sp, pt.flags
        for k, v in pt.gprs.items():
            if gprs.get(k) != v and hasattr(regs, k):
                setattr(regs, k, v)
        _op(P.setregs, t.tid, regs)
        self.stats.traps_emulated += 1
        if t.want_hold:
            t.hold_sig = 0
            return True
        self._resume(t)
        return True

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
            except ProcessLookupError:
                self._lost(t)               # killed while parked: its exit is still to come
                continue
            t.park_regs = None
            if t.want_hold:
                t.state = _HELD
                t.hold_sig = 0
            else:
                self._resume(t)
            done.add(tid)
        return done
