# SPDX-License-Identifier: GPL-2.0-only
"""Optimised kprobes: replacing >= 5 bytes of whole instructions with a
JMP32 to a detour (and back) through the INT3 protocol while CPUs run
the function, with the kernel's refusals.  The detour's code and checks are in
:mod:`._opt`.  A part of :class:`~._core.Kprobes`."""

from __future__ import annotations

import bisect
import struct
from typing import Iterable

from .._core._insn import INT3_INSN_OPCODE, JMP32_INSN_OPCODE, Insn, text_gen_insn
from ._opt import (MAX_INSN_SIZE, RELATIVEJUMP_SIZE, InsnSlots, OptError,
                   OptinsnSlots, check_displaced, check_function, check_reach, detour_code)
from ._types import Kprobe, KprobeError, _Site

__all__: list[str] = []


class _Optprobes:
    """The optimisation half of :class:`Kprobes` (its state lives there)."""

    # ------------------------------------------------------------ optimisation
    def optimize_kprobe(self, p: Kprobe) -> None:
        self.optimize_kprobes([p])

    def optimize_kprobes(self, probes: Iterable[Kprobe]) -> None:
        """Turn the INT3 of each probe into a JMP32 to a detour buffer, one
        probe at a time through the INT3 protocol (6.12's
        ``arch_optimize_kprobes``: a ``text_poke_bp`` each, so three syncs a
        probe).  KprobeError (reason ``optimize``) when one cannot be, with
        nothing changed."""
        self._check_open()
        with self.core.text_mutex:
            sites: list[_Site] = []
            for p in probes:
                site = self._sites.get(p.addr)
                if site is None or p not in site.probes:
                    raise KprobeError(f"{p.name} is not registered", reason="optimize", addr=p.addr)
                if not site.optimized and site not in sites:
                    sites.append(site)
            new_detours: list[_Site] = []
            try:
                for s in sites:
                    if s.detour is None:
                        self._prepare_detour(s)
                        new_detours.append(s)
            except BaseException:
                for s in new_detours:
                    self._detours.pop(s.detour.call_ret, None)
                    self._free_detour(s.detour.addr)
                    s.detour, s.displaced = None, b""
                raise
            if not sites:
                return
            for s in sites:
                s.redirect = True
            ranges = []
            for s in sites:
                ranges.append((s.addr + 1, s.addr + len(s.displaced)))
                if s.slot is not None:
                    ranges.append((s.slot, s.slot + MAX_INSN_SIZE))
            try:
                self._wait_quiescent(ranges, "optimising kprobes")
                if self.before_optimize is not None:
                    self.before_optimize(
                        [(s.addr, s.displaced[:RELATIVEJUMP_SIZE],
                          text_gen_insn(JMP32_INSN_OPCODE, s.addr, s.detour.addr)) for s in sites])
                # arch_optimize_kprobes: each probe its own text_poke_bp
                # (three syncs a probe), not one batch for the pass
                for s in sites:
                    self.core.smp_text_poke_single(
                        s.addr, text_gen_insn(JMP32_INSN_OPCODE, s.addr, s.detour.addr))
                    s.optimized, s.redirect = True, False
                    self.stats.optimized += 1
            except BaseException:
                for s in sites:
                    s.redirect = False
                    s.optimized = self.machine.text_read(s.addr, 1)[0] == JMP32_INSN_OPCODE
                raise

    def kprobe_optimizer(self) -> list[Kprobe]:
        """What the kernel's delayed optimizer work does after probes are
        registered (``kprobe_optimizer``): every probe site not optimised
        yet that can be is optimised, one after the other; a site that cannot
        be (a post-handler, a jump into the range, too short...) stays an
        INT3 probe, without an error.  Returns one probe per site
        optimised.  :class:`Kprobes` with ``auto_optimize=True`` runs it
        after every registration (the kernel's default,
        ``debug.kprobes-optimization`` = 1); without, probes stay INT3
        probes until this or :meth:`optimize_kprobe` is called."""
        self._check_open()
        ready: list[Kprobe] = []
        with self.core.text_mutex:
            for s in list(self._sites.values()):
                if s.optimized or not s.probes or \
                        any(p.post_handler is not None for p in s.probes):
                    continue
                if s.detour is None:
                    try:
                        self._prepare_detour(s)
                    except KprobeError:
                        continue
                elif any(o is not s and s.addr < o.addr < s.addr + len(s.displaced)
                         for o in self._sites.values()):
                    continue        # a probe arrived inside its range meanwhile
                ready.append(s.probes[0])
            if ready:
                self.optimize_kprobes(ready)
        return ready

    def _prepare_detour(self, s: _Site) -> None:
        name, fstart, fsize = s.func
        addr = s.addr
        why = None
        if s.ftrace:
            why = "a probe on the fentry NOP is an ftrace_ops (KPROBES_ON_FTRACE), not optimised"
        elif any(p.post_handler is not None for p in s.probes):
            why = "a probe with a post-handler is not optimised (the detour has no single-step)"
        elif fstart + fsize - addr < RELATIVEJUMP_SIZE:
            why = (f"only {fstart + fsize - addr} bytes to the end of {name}: a JMP32 needs "
                   f"{RELATIVEJUMP_SIZE}")
        if why:
            raise KprobeError(f"cannot optimise {name}+{addr - fstart:#x}: {why}",
                              reason="optimize", addr=addr)
        insns = self._decode_function(fstart, fsize)
        try:
            check_function(insns, addr, jump_tables=self.jump_tables or bool(self.thunk_range),
                           thunks=self.thunk_range)
            ext = self._extable_in(fstart, fstart + fsize) & {i.addr for i in insns}
            if ext:
                raise OptError(f"{name} has an exception-table entry at "
                               f"{min(ext):#x} (its fixup code may jump into the function)")
            disp: list[Insn] = []
            n = 0
            for ins in insns:
                if ins.addr < addr:
                    continue
                if n >= RELATIVEJUMP_SIZE:
                    break
                disp.append(ins)
                n += ins.length
            if n < RELATIVEJUMP_SIZE or addr + n > fstart + fsize:
                raise OptError(f"the instructions from {addr:#x} to the end of {name} are "
                               f"shorter than {RELATIVEJUMP_SIZE} bytes")
            check_displaced(disp)
            for other in self._sites.values():
                if other is not s and addr < other.addr < addr + n:
                    raise OptError(f"another probe at {other.addr:#x} is inside the range")
            who = self.text_reserved(addr, addr + n - 1)
            if who is not None:
                raise OptError(f"[{addr:#x}, {addr + n:#x}) is text reserved by {who}")
            buf = self._alloc_detour()
            try:
                check_reach(addr, buf)
                det = detour_code(buf, addr, disp, op=self._optprobe_op(addr, buf),
                                  callback=self._optimized_callback(), smap=self.smap)
                # only the buffer's own bytes, as arch_prepare_optimized_kprobe
                # writes them: the rest of the slot keeps what the page held
                self.core.text_poke_copy(buf, det.code)
            except BaseException:
                self._free_detour(buf)
                raise
        except OptError as e:
            raise KprobeError(f"cannot optimise {name}+{addr - fstart:#x}: {e}",
                              reason="optimize", addr=addr) from None
        s.detour = det
        s.displaced = self._recovered(addr, n)
        self._detours[det.call_ret] = s

    def _extable_in(self, lo: int, hi: int) -> set[int]:
        """Instruction addresses in [lo, hi) with an entry in the image's
        ``__ex_table`` (``search_exception_tables``; entries are three s32
        fields, each relative to itself, the first the instruction)."""
        tab = self.__dict__.get("_extable")
        if tab is None:
            tab = []
            syms = self.image.symbols if self.image is not None else {}
            a, b = syms.get("__start___ex_table"), syms.get("__stop___ex_table")
            if a is not None and b is not None and 0 < b - a <= 1 << 24:
                try:
                    raw = self.machine.mem.read(a, b - a)
                except Exception:
                    raw = b""
                tab = sorted(a + o + struct.unpack_from("<i", raw, o)[0]
                             for o in range(0, len(raw) - 11, 12))
            self.__dict__["_extable"] = tab
        return set(tab[bisect.bisect_left(tab, lo):bisect.bisect_left(tab, hi)])

    @property
    def detour_mem(self):
        """Where the optinsn slots' pages come from: ``opt_execmem`` when
        given (on a real kernel, the page its ``kprobe_optinsn_slots`` got),
        else the probes' execmem."""
        return getattr(self, "opt_execmem", None) or self.execmem

    @property
    def optinsn_slots(self) -> OptinsnSlots:
        mem = self.detour_mem
        slots = self.__dict__.get("_optinsn_slots")
        if slots is None or slots.mem is not mem:
            slots = self.__dict__["_optinsn_slots"] = OptinsnSlots(mem)
        return slots

    @property
    def insn_slots(self) -> InsnSlots:
        """``kprobe_insn_slots``: pages of the probes' instruction copies,
        from :attr:`execmem` (on a real kernel, the page its
        ``kprobe_insn_slots`` got)."""
        slots = self.__dict__.get("_insn_slots")
        if slots is None or slots.mem is not self.execmem:
            slots = self.__dict__["_insn_slots"] = InsnSlots(self.execmem)
        return slots

    def _alloc_detour(self) -> int:
        return self.optinsn_slots.alloc()

    def _free_detour(self, addr: int, dirty: bool = False) -> None:
        self.optinsn_slots.free(addr, dirty)

    def _optprobe_op(self, addr: int, buf: int) -> int:
        """The first argument the buffer passes to ``optimized_callback``:
        the kernel's ``struct optimized_kprobe`` -- a kmalloc address only a
        run of the kernel tells, so given per probe address in
        ``optprobe_ops`` (read from a run-time reference); otherwise the
        slot's own address stands for it (our callback finds the probe by
        its return address and never reads it)."""
        return self.optprobe_ops.get(addr, buf)

    def _optimized_callback(self) -> int:
        """The image's ``optimized_callback`` when it has one (a real
        kernel), else our stub ``int3; ret`` in execmem, whose INT3 is the
        call into the host (see :mod:`._opt`)."""
        if self._opt_callback is None:
            a = self.image.symbols.get("optimized_callback") if self.image is not None else None
            if a is None:
                a = self.execmem.alloc(16)
                self.core.text_poke_copy(a, b"\xcc\xc3")
                self._opt_stub = a
            self._opt_callback = a
        return self._opt_callback

    def unoptimize_kprobe(self, p: Kprobe) -> None:
        self.unoptimize_kprobes([p])

    def unoptimize_kprobes(self, probes: Iterable[Kprobe]) -> None:
        """Back to INT3 probes, the 6.12 way (``arch_unoptimize_kprobe``):
        the JMP32's first byte becomes the probe's INT3 and every CPU is
        synced, then the displaced bytes after it are put back and every
        CPU synced again.  A CPU that reaches the INT3 meanwhile is sent
        to the detour (which stays until unregistration), so the handler
        runs once either way; no CPU can be inside the 4 tail bytes, which
        were one instruction (the JMP32) since the probe was optimised."""
        self._check_open()
        with self.core.text_mutex:
            sites = []
            for p in probes:
                s = self._sites.get(p.addr)
                if s is not None and s.optimized and s not in sites:
                    sites.append(s)
            self._unoptimize(sites)

    def _unoptimize(self, sites: list[_Site]) -> None:
        # Until the last sync the sites stay "optimized" for the handler:
        # an INT3 hit goes to the detour.  Interrupted in between, a site
        # holds INT3 + the JMP's old displacement and is still handled as
        # optimised; unregistering or unoptimising again completes it.
        # arch_unoptimize_kprobes: one probe after the other, two syncs each
        for s in sites:
            self.core.text_poke(s.addr, bytes([INT3_INSN_OPCODE]))
            self.core.smp_text_poke_sync_each_cpu()
            self.core.text_poke(s.addr + 1, s.displaced[1:RELATIVEJUMP_SIZE])
            self.core.smp_text_poke_sync_each_cpu()
            s.optimized = False
            self.stats.unoptimized += 1

    def is_optimized(self, p: Kprobe) -> bool:
        s = self._sites.get(p.addr)
        return bool(s and s.optimized)

    def site_info(self, p: Kprobe) -> dict:
        s = self._sites.get(p.addr)
        if s is None:
            return {}
        how = "optimized" if s.optimized else ("emulated" if s.emulate is not None else
                                               ("boosted" if s.boosted else "single-step"))
        if s.ftrace:
            how = f"ftrace ({s.ftrace})"        # KPROBES_ON_FTRACE: no INT3 at all
        return {"addr": s.addr, "insn": s.insn.text, "how": how, "slot": s.slot,
                "detour": s.detour.addr if s.detour else None,
                "displaced": len(s.displaced) if s.detour else 0}
