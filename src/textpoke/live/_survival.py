# SPDX-License-Identifier: GPL-2.0-only
"""What keeps the target alive if the patcher dies (SIGKILL cannot be
caught): before the first INT3 of a batch is written, the SIGTRAP guard
(:mod:`._guard`) is injected and every site in flight is journaled
(:mod:`._journal`); a clean end removes the guard once no INT3 of ours is
left and no thread is inside it.  A mixin of LiveMachine."""

from __future__ import annotations

import os
import time
from typing import Sequence

from .._errors import MachineError
from . import _guard as G
from ._inject import InjectError, find_syscall_insn, inject_syscall
from ._region import Region
from ._process import read_maps, start_time, state_of
from ._thread import _HELD

_INT3 = 0xCC
#: seconds between two reads of the SIGTRAP action before a batch (see
#: _guard_verify; the cheap look at SigCgt is made before every phase)
EXACT_EVERY = 0.25


class _Survival:
    """LiveMachine's journal and guard (a mixin)."""

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
            self._note_wanted_int3s()
            if self._guard is not None:
                # a later batch: the action may have changed since the last
                # one (read, not only looked at, every EXACT_EVERY seconds:
                # the read stops every thread, 2-10 ms, and a session may run
                # a thousand small batches)
                now = time.monotonic()
                exact = now - self._guard_read_at >= EXACT_EVERY
                if exact:
                    self._guard_read_at = now
                self._guard_verify(exact=exact)
            self._journal_int3s(int3s)
            return
        sites = j.data["sites"]
        if sites:
            if self._guard is not None:
                # tails or first bytes: INT3s of ours stand in the text until
                # these land; the target may have replaced the action meanwhile
                self._guard_verify()
            tails = [(a - 1, self.text_read(a, len(d)), bytes(d)) for a, d in writes
                     if len(d) > 0 and str(a - 1) in sites and str(a) not in sites
                     and self.text_read(a - 1, 1)[0] == _INT3]
            if tails:
                j.sites_tails(tails)

    def guard_int3_sites(self, addrs: Sequence[int]) -> None:
        """Before a client writes INT3s that stand in the text while the
        threads run (kprobes): the guard in the target and the old bytes in
        the journal, as for a batch's INT3s -- so a SIGKILL of the patcher
        leaves a thread on one waiting at the site (``live recover`` puts
        the byte back) instead of dying of SIGTRAP."""
        self._check_open()
        if self.journal is not None and addrs:
            with self._signals_deferred():
                self._journal_int3s(list(addrs))

    def _journal_int3s(self, int3s: list[int]) -> None:
        j = self.journal
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

    def _note_wanted_int3s(self) -> None:
        """The sites of the batch in flight whose NEW first byte is an INT3
        (``poke --force ... cc``): once the batch is done the INT3 there is
        the user's, not one in flight -- it must not keep the guard (the
        target dies of it as it would without us)."""
        st = getattr(self.owner, "_inflight", None)
        if st is None:
            return
        stext = self.owner._stext
        wanted = {stext + t.rel_addr for t in st.vec if t.len != 6 and t.text[:1] == b"\xcc"}
        if wanted:
            self._int3_wanted = self._int3_wanted | wanted

    _int3_wanted: frozenset | set = frozenset()
    _guard_read_at = float("-inf")
    #: times the guard's SIGTRAP action was found replaced while INT3s of
    #: ours stood in the text, and put back
    guard_reinstalled = 0

    def _guard_verify(self, exact: bool = False) -> bool:
        """While INT3s of ours may stand in the text: is the process's
        SIGTRAP action still the guard?  The target may have replaced it
        (``signal(SIGTRAP, ...)``, ``sigaction``), and so may the kernel (an
        INT3 hit by a thread with SIGTRAP blocked resets the action to
        SIG_DFL).  A SIGKILL of the patcher from then on would leave the
        INT3s without a handler.  If it is not ours, the guard is installed
        again; what the target asked for (not a reset of ours by the kernel)
        becomes the action the guard chains to and the one given back at
        removal.  Without *exact*, only a cheap look that needs no stop
        (/proc/PID/status: is SIGTRAP caught at all?) decides whether to
        read the action; with it, the action is read (every thread held
        for one injected ``rt_sigaction``).  Returns True if it was put back."""
        g = self._guard
        if g is None or not g.get("installed") or g.get("restored"):
            return False
        if not exact and _sigtrap_caught(self.pid) is not False:
            return False
        base = g["base"]
        data = base + G.CODE_SIZE
        self._hold_all()
        try:
            # a thread in an event stop first: one held in a signal-delivery-
            # stop (a signal on its way, e.g. a -pg program's SIGPROF) runs an
            # injected call by single-stepping libc (see _inject), which a
            # SIGKILL of the patcher turns into the target's death
            held = sorted((t for t, th in self._threads.items()
                           if th.state == _HELD and not th.child_of),
                          key=lambda t: (self._threads[t].hold_sig != 0, t != self.pid))
            if not held:
                return False
            tid = held[0]
            self._mem.write(data + G.CUR_OFF, bytes(32))
            r = inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP, 0, data + G.CUR_OFF,
                               8, syscall_at=g["syscall_at"])
            if r < 0:
                return False
            cur = self._mem.read(data + G.CUR_OFF, 32)
            handler = int.from_bytes(cur[:8], "little")
            if handler == base:
                return False
            restorer = int.from_bytes(cur[16:24], "little")
            if not (handler == 0 and base <= restorer < base + G.CODE_SIZE):
                # the target's own choice: chained to while we patch, and
                # given back when the guard goes
                self._mem.write(data + G.ACT_OFF, cur)
                g["old"] = cur.hex()
            r = inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP,
                               base + G.NEW_ACT_OFF, 0, 8, syscall_at=g["syscall_at"])
            if r < 0:
                raise InjectError(f"putting the SIGTRAP guard back in process {self.pid} "
                                  f"failed: {os.strerror(-r)}")
            self.guard_reinstalled += 1
            if self.journal is not None:
                self.journal.set_guard(g)
            return True
        finally:
            self._release_held()

    def _guard_install(self) -> None:
        lo = self._ranges[0].start
        self._hold_all()
        try:
            errors = []
            # a thread in an event stop first (see _guard_verify)
            for tid in sorted((t for t, th in self._threads.items()
                               if th.state == _HELD and not th.child_of),
                              key=lambda t: (self._threads[t].hold_sig != 0, t != self.pid)):
                def before(base: int, code: int, data: int) -> None:
                    # named before the mmap runs: a kill inside it leaves
                    # nothing 'live recover' does not know of
                    self._guard = {"base": base, "size": code + data, "installed": False,
                                   "syscall_at": find_syscall_insn(self.pid)}
                    self.journal.set_guard(self._guard)
                try:
                    r = Region.map(self.pid, tid, G.CODE_SIZE, G.DATA_SIZE, near=(lo, lo),
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
        g = self._guard
        if g is None:
            return []
        j = self.journal
        if j is not None and self._int3_wanted:
            for a in [a for a in j.data["sites"] if int(a) in self._int3_wanted]:
                del j.data["sites"][a]     # an INT3 written on purpose: the user's now
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
        region = Region(self.pid, base, G.CODE_SIZE, size - G.CODE_SIZE, syscall_at=g["syscall_at"])
        cur_map = next((m for m in read_maps(self.pid) if m.start <= data + G.CUR_OFF < m.end),
                       None)
        if cur_map is not None and "w" not in cur_map.perms:
            # a patcher killed between the region's mmap (r-x as a whole) and
            # the mprotect that makes its data writable: the action, installed
            # only after that, was never ours (and the read below would fail
            # with EFAULT writing into the page)
            g["restored"] = True

        def ready(tids: list[int], tid: int) -> tuple[list[str], bool]:
            if any(self._trap_queued(t) for t in tids):
                # an INT3 of ours taken before the site was repaired, not
                # reported yet: let it come to us (rewound) first, never to
                # the target's own action
                return ["a thread has a SIGTRAP of ours queued"], False
            if g.get("restored"):
                return [], False
            # read the action first: ours is put back to what it replaced;
            # any other (we were killed before installing, or the target
            # set its own since) is left alone
            self._mem.write(data + G.CUR_OFF, bytes(32))
            r = inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP,
                               0, data + G.CUR_OFF, 8, syscall_at=g["syscall_at"])
            if r < 0:
                # the call failed: nothing was read (an empty buffer must not
                # read as "not ours"); try again
                return [f"reading the SIGTRAP action in thread {tid} failed: "
                        f"{os.strerror(-r)}"], False
            cur = self._mem.read(data + G.CUR_OFF, 32)
            handler = int.from_bytes(cur[:8], "little")
            restorer = int.from_bytes(cur[16:24], "little")
            # ours, or ours reset to SIG_DFL by the kernel: an INT3 hit by a
            # thread with SIGTRAP blocked (glibc blocks every signal in a
            # thread being created or exiting) forces the signal and resets
            # the handler, keeping our flags and restorer
            ours = handler == base or (handler == 0 and base <= restorer < base + G.CODE_SIZE)
            if ours:
                inject_syscall(self.pid, tid, G.SYS_rt_sigaction, G.SIGTRAP,
                               data + G.ACT_OFF, 0, 8, syscall_at=g["syscall_at"])
            g["restored"] = True
            if not ours and g.get("installed", True) and handler > 1:
                # the target installed a handler of its own since: it stays,
                # and so does ours (it may chain to it); SIG_DFL or SIG_IGN
                # set since chain to nothing
                g["kept"] = "the target replaced its SIGTRAP handler"
                return [g["kept"]], True
            return [], False

        try:
            why = self._unmap(region, ready, attempts)
        finally:
            region.close()
        if not why:
            self._guard = None
            if j is not None:
                j.data["sites"] = {}
                j.set_guard(None)
        return why


    def _target_gone(self, settle: float = 0.5) -> bool:
        """No thread of the target will run its text again: the process is
        gone (or its pid names another), or every one of its threads has
        passed its exit event, is a zombie, or has SIGKILL pending (a group
        exit: a fatal signal, e.g. the user's own INT3 with the default
        action given back).  Then its journal has nothing left to recover --
        kept, it would only read as a dead patcher's.  While a group exit is
        seen under way (a thread with SIGKILL pending, or one that has left
        its signal wait for do_exit), its threads' exit events are collected
        for at most *settle* seconds; with no sign of one, the answer is
        given at once (a living target costs one read of /proc)."""
        j = self.journal
        started = j.data["start"] if j is not None else -1
        deadline = time.monotonic() + settle
        while True:
            state = _group_state(self.pid, started, self._exiting)
            if state != "dying" or time.monotonic() >= deadline:
                return state == "gone"
            for tid in list(self._threads):
                try:
                    self._wait(tid, False)
                except (OSError, MachineError):
                    pass
            time.sleep(0.001)


def _group_state(pid: int, started: int, exiting) -> str:
    """'gone': no thread of process *pid* (started at *started*) can run
    again; 'dying': a group exit is under way and some thread has not
    reached its exit yet; 'alive' otherwise."""
    if started < 0 or start_time(pid) != started:
        return "gone"
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return "gone"
    killed = unsettled = False
    for tid in tids:
        st = state_of(pid, tid)
        if st in ("", "Z", "X") or tid in exiting:
            continue
        if _sigkill_pending(pid, tid):
            killed = True
        else:
            unsettled = True
    if not unsettled:
        return "gone"
    return "dying" if killed else "alive"


def _sigkill_pending(pid: int, tid: int) -> bool:
    """Thread *tid* has SIGKILL pending: it will exit (the mark a group
    exit leaves in every other thread of the process)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigPnd:"):
                    return bool(int(line.split()[1], 16) & (1 << 8))
    except (OSError, ValueError):
        pass
    return False


def _sigtrap_caught(pid: int) -> bool | None:
    """Whether process *pid* catches SIGTRAP (a handler, ours or another),
    from /proc/PID/status without stopping it; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (G.SIGTRAP - 1)))
    except (OSError, ValueError):
        pass
    return None
