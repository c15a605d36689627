# SPDX-License-Identifier: GPL-2.0-only
"""Rewinding a trap before its stop is reaped (a mixin of the tracer,
:class:`~textpoke.live._tracer._Tracer`, whose waits reap through
:meth:`_Rewind._reap`).

A thread's SIGTRAP stop at one of our INT3s, once reaped, has lost its
signal: a patcher killed from then on has the kernel resume the thread
with none, wherever its rip points -- at site+1, the middle of an
instruction, until the trap handling has put it back.  Not yet reaped,
the stop still holds the SIGTRAP, and the kernel delivers it when the
tracer dies (with the siginfo as PTRACE_SETSIGINFO last left it): the
guard (._guard) takes it.  So while the guard is in the target the
stop is peeked first (WNOWAIT), the thread rewound while the stop
still holds its signal, and only then reaped:
  peeked        -> SIGTRAP delivered, rip = site+1: the guard sets it
                   to rip-1, the site
  siginfo marked -> si_addr = the site (an INT3's own is 0): the guard
                   sets rip to it, whether or not rip is rewound yet
  rip = site    -> the same, rip unchanged
  reaped        -> no signal; the thread runs the site again: the INT3
                   again (the guard, as for any trap) or the bytes put
                   back whole
The trap chain gets the registers as they were at the trap.
Not for a vfork child (posix_spawn resets every handler, the guard's
too: a SIGTRAP delivered to it kills it): its stop is reaped first."""

from __future__ import annotations

import ctypes
import signal

from . import _ptrace as P

_WNOWAIT = 0x01000000
_PTRACE_SETSIGINFO = 0x4203

#: test-only: called with ("peek" | "marked" | "rewound" | "reaped", tid) at
#: the steps of a trap's rewind before its stop is reaped (see _Rewind._reap);
#: the tests kill the patcher there
_test_hook = None


def _peek(tid: int, info: P.SigInfo) -> int:
    """``waitid(WNOHANG|WNOWAIT)``: what the thread reports, left unreaped."""
    info.si_pid = 0
    r = P._waitid(P.P_PID, tid, ctypes.addressof(info),
                  P.WEXITED | P.WSTOPPED | P.__WALL | P.WNOHANG | _WNOWAIT)
    return -ctypes.get_errno() if r < 0 else 0


class _Rewind:
    """The tracer's reap of a thread's stop, a trap rewound first (a mixin)."""

    def _rewinds_early(self) -> bool:
        """The guard is installed and is this version's (it reads the
        rewound site from si_addr; one adopted from an older patcher may not)."""
        g = self._guard
        if not g or not g.get("installed") or g.get("restored") or self.journal is None:
            return False
        base = g["base"]
        if self.__dict__.get("_guard_checked") != base:
            from . import _guard as G
            try:
                ok = self._mem.read(base, len(G.CODE)) == G.CODE
            except OSError:
                ok = False
            self._guard_checked, self._guard_marks = base, ok
        return self._guard_marks

    def _rewind_unreaped(self, tid: int) -> None:
        """*tid* sits, unreaped, in a SIGTRAP stop: if it trapped on an INT3
        of ours that the guard knows, mark its siginfo with the site and put
        its rip there (see above); the registers and siginfo at the trap are
        kept for the trap handling (:meth:`_Traps._sigtrap_stop`)."""
        pre = self.__dict__.setdefault("_prerewound", {})
        t = self._threads.get(tid)
        if tid in pre or t is None or t.child_of:
            return
        try:
            regs = P.getregs(tid, P.UserRegs())
            site = regs.rip - 1
            # an INT3 the guard knows: a batch's, or a client's it was told
            # of (kprobes: Machine.guard_int3_sites)
            if str(site) not in self.journal.data["sites"]:
                return
            if site not in self._int3_sites:
                try:
                    if self.text_read(site, 1)[0] != 0xCC:
                        return
                except Exception:
                    return
            si = P.getsiginfo(tid)
            if si.si_signo != signal.SIGTRAP or si.si_code != P.SI_KERNEL \
                    or si.si_pid or si.si_uid:
                return
            if _test_hook is not None:
                _test_hook("peek", tid)
            mark = P.SigInfo.from_buffer_copy(si)
            mark.si_pid, mark.si_uid = site & 0xFFFFFFFF, site >> 32
            P.ptrace(_PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(mark))
            pre[tid] = (P.UserRegs.from_buffer_copy(regs), si)
            if _test_hook is not None:
                _test_hook("marked", tid)
            at = P.UserRegs.from_buffer_copy(regs)
            at.rip = site
            P.setregs(tid, at)
        except OSError:
            return                  # gone from its stop: the reap says how
        if _test_hook is not None:
            _test_hook("rewound", tid)

    def _reap(self, tid: int, info: P.SigInfo) -> int:
        """``waitid(WNOHANG)`` on *tid*; a SIGTRAP stop is rewound before it
        is reaped while the guard is in the target (see above)."""
        if not self._rewinds_early():
            return P.waitid(tid, info, False)
        r = _peek(tid, info)
        if r < 0 or not info.si_pid:
            return r
        if info.si_code == P.CLD_TRAPPED and info.si_status == signal.SIGTRAP:
            self._rewind_unreaped(tid)
        r = P.waitid(tid, info, False)
        pre = self.__dict__.get("_prerewound")
        if pre and tid in pre:
            if r < 0 or not info.si_pid:
                return r            # (reaped by the next call: still the same stop)
            if info.si_code != P.CLD_TRAPPED or info.si_status != signal.SIGTRAP:
                del pre[tid]        # not that stop any more (killed meanwhile)
            elif _test_hook is not None:
                _test_hook("reaped", tid)
        return r
