# SPDX-License-Identifier: GPL-2.0-only
"""A batch cut short -- a machine failure, an interrupt thrown into its
task, the task closed, the core closed -- is finished (when every tail is
in place: only first bytes are left) or rolled back (earlier), with the
same INT3 discipline, before the exception propagates; what was done is
said on the exception.  A part of :class:`~textpoke._core._textpoke.TextPoke`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import TextPokeError
from ._insn import INT3_INSN_OPCODE
from ._machine import Task

if TYPE_CHECKING:
    from ._batch import _Inflight

__all__: list[str] = []


class _Recovery:
    """Recovery of :class:`TextPoke`'s batch (a mixin)."""

    def _recover(self, st: _Inflight, err: BaseException | None) -> Task:
        """Finish (when every tail is in place: only first bytes are left)
        or roll back (earlier) the batch *st*; then drop its references.
        A failure here is added to *err* as a note and never hides it."""
        try:
            if st.phase in ("first", "drop"):
                try:
                    yield from self._batch_finish_forward(st)
                    _say_finished(err, [self.text_poke_addr(t) for t in st.vec])
                except GeneratorExit:
                    raise
                except Exception as again:
                    _note(err, f"finishing the interrupted batch failed ({again!r}); rolling back")
                    yield from self._batch_rollback(st)
            elif st.phase in ("int3", "tail"):
                yield from self._batch_rollback(st)
            yield from self._batch_drop_refs(st, wait=True)
        except GeneratorExit:
            raise
        except BaseException as again:
            if err is None:
                raise
            _note(err, f"recovering the batch failed too: {again!r}; text at the batch's sites "
                       "may still hold INT3 (check with a read-back)")
        finally:
            st.done = True

    def _recover_now(self, st: _Inflight, err: BaseException | None) -> None:
        """Recover *st* outside the task that ran it (the machine let go of
        that task, or it is being closed).  Shielded: an interrupt arriving
        while the machine services its CPUs is noted on *err* and recovery
        goes on from where it was."""
        self.stats.recoveries += 1
        rec = _Resumable(self._recover(st, err))
        for _attempt in range(64):
            try:
                self.machine.run_task(rec.task())
                return
            except BaseException as again:
                if rec.finished:
                    if err is None:
                        raise        # nothing else to report it on
                    return           # its failure is already a note on err
                if isinstance(again, Exception):
                    # the machine itself failed while recovering
                    if err is None:
                        raise
                    _note(err, f"recovering the batch stopped: {again!r}; text at the batch's "
                               "sites may still hold INT3 (check with a read-back)")
                    return
                _note(err, f"interrupted again while recovering ({again!r}); recovery went on")
        _note(err, "gave up recovering the batch after 64 interruptions")

    def _batch_finish_forward(self, st: _Inflight) -> Task:
        """Every tail is written and synced: write the first bytes still
        missing, then sync -- always: the interrupted write may have stored
        its byte without the sync that should follow it."""
        m = self.machine
        for tpl in st.vec:
            addr = self.text_poke_addr(tpl)
            byte = tpl.new_bytes()[:1]
            if byte[0] != INT3_INSN_OPCODE and m.text_read(addr, 1) != byte:
                yield from self._poke(addr, byte, "first")
            self._expect[addr] = byte[0]
        yield from self._sync()
        self.stats.finished_forward += 1

    def _batch_rollback(self, st: _Inflight) -> Task:
        """Put every site touched so far back as it was, with the same
        discipline.  The entries stay in the array meanwhile, so a CPU
        reaching an INT3 still emulates (the new instruction: old or new is
        fine while a site is in flux).

        The interrupted write may have landed without the sync that should
        have followed it, so the syncs here depend on what the text may
        hold, not only on what this rollback writes."""
        m = self.machine
        self.stats.rollbacks += 1
        touched = list(zip(st.vec, st.olds))
        if not touched:
            return
        wrote = False
        tails_differ = False
        for tpl, old in touched:          # 1. every site starts with INT3
            addr = self.text_poke_addr(tpl)
            cur = m.text_read(addr, tpl.len)
            if cur[1:] != old[1:]:
                tails_differ = True
            if cur != old and cur[0] != INT3_INSN_OPCODE:
                yield from self._poke(addr, b"\xcc", "int3")
                wrote = True
        if wrote or tails_differ:
            yield from self._sync()
        for tpl, old in touched:          # 2. old tails back
            addr = self.text_poke_addr(tpl)
            if tpl.len > 1 and m.text_read(addr + 1, tpl.len - 1) != old[1:]:
                yield from self._poke(addr + 1, old[1:], "tail")
        if tails_differ or st.phase == "tail":
            yield from self._sync()
        for tpl, old in touched:          # 3. old first bytes back
            addr = self.text_poke_addr(tpl)
            if m.text_read(addr, 1) != old[:1]:
                yield from self._poke(addr, old[:1], "first")
            self._expect[addr] = old[0]
        yield from self._sync()           # no CPU may keep a stale INT3
        now = m.now()
        for tpl, old in touched[:st.announced]:   # the log says the site is old again
            self.events.record(self.text_poke_addr(tpl), tpl.new_bytes(), old, "rollback", now)


def _say_finished(err: BaseException | None, addrs: list[int]) -> None:
    """*err* stopped a batch after its tails were in place, and the batch
    was finished, not rolled back: the text changed.  Say which sites are
    new -- in the message of an error of ours, as a note on anything else
    -- and keep them as ``err.new_sites``."""
    if err is None:
        return
    shown = ", ".join(f"{a:#x}" for a in addrs[:8]) + (f", ... ({len(addrs)} sites)"
                                                       if len(addrs) > 8 else "")
    text = f"the batch was finished, not rolled back: the new bytes are in place at {shown}"
    try:
        err.new_sites = list(addrs)       # type: ignore[attr-defined]
    except AttributeError:
        pass
    if isinstance(err, TextPokeError) and len(err.args) == 1 and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]}; {text}",)
    else:
        err.add_note(text)


def _note(err: BaseException | None, text: str) -> None:
    if err is not None:
        err.add_note(text)


class _Resumable:
    """A task that can be driven again after its driver was interrupted:
    the step it was waiting on (a WaitUntil) is yielded again first, so
    that no wait is skipped."""

    _START = object()

    def __init__(self, gen: Task) -> None:
        self.gen = gen
        self.pending: Any = self._START
        self.finished = False

    def task(self) -> Task:
        gen = self.gen
        try:
            item = next(gen) if self.pending is self._START else self.pending
            while True:
                self.pending = item
                yield item
                item = gen.send(None)
        except StopIteration as stop:
            self.finished = True
            return stop.value
        except BaseException:
            if gen.gi_frame is None:     # the recovery itself raised
                self.finished = True
            raise
