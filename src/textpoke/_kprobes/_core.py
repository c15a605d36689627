# SPDX-License-Identifier: GPL-2.0-only
"""kprobes, kretprobes and optimised kprobes on a :class:`TextPoke`.

:class:`Kprobes` owns every probe of one machine: ``register_kprobe`` puts
an INT3 on an instruction boundary (checked by decoding from the start of
the function), ``kprobe_int3_handler`` -- on the machine's INT3 chain at
``TrapPriority.KPROBES``, after the text-poke handler, as ``do_int3``
orders them -- runs the pre-handlers and then performs the probed
instruction:

* CALL, JMP, Jcc, RET, LOOP/JRCXZ, indirect CALL/JMP through a register,
  CLI/STI are **emulated** on the trap's registers (``prepare_emulation``);
* anything else is **executed out of line** from an instruction slot in
  execmem holding a copy of the instruction (a RIP-relative displacement
  re-targeted so that it reaches the same data) followed by an INT3.  The
  trap returns into the slot; the second INT3 stands for the single-step
  trap (the kernel replaced TF single-stepping by exactly this INT3 in
  5.14): its handler moves ``ip`` back to the instruction after the
  original and runs the post-handlers.  A probe without post-handler on a
  "boostable" instruction gets a JMP back instead of the INT3, as the
  kernel's non-preemptible build does: one trap per hit instead of two.
  With ``preemption=True`` (a CONFIG_PREEMPTION kernel, Debian's) nothing
  is ever boosted: a task preempted in the slot could not be found there.

Several probes at one address form an aggregate: their pre-handlers run
in registration order until one returns a true value (it changed ``ip``
itself), and the rest are not run for that hit, as ``aggr_pre_handler``.

Refused before anything is written (``check_kprobe_address_safe``,
``can_probe``): the blacklist (``.kprobes.text``, ``noinstr`` text, entry
text, ``NOKPROBE_SYMBOL`` functions -- each taken from the image's
symbols where it has them, plus *blacklist*; a ``foo.cold`` part counts as
``foo``), a ``__cfi_``/``__pfx_`` preamble symbol, text reserved by
jump_label or static_call, and an instruction that traps by design
(UD0/UD1/UD2, INT3/INT n/INTO/INT1).  A LOCK prefix the SMP switch may
rewrite is *not* a reason: the kernel's one-byte
``alternatives_text_reserved(addr, addr)`` query never matches (its end is
exclusive), so a probe there is accepted, as in the kernel.

Calls are always emulated, so the return address a callee sees is the
original one (the "fixed" return address of the old single-step model).

kretprobes put an entry probe on the function (its first instruction;
with a bare symbol name, the one after the fentry NOP -- or the NOP
itself with KPROBES_ON_FTRACE) that swaps the return address on the stack
for rethook's ``arch_rethook_trampoline`` and puts an instance on the
current task's list; the return handler runs with ``regs.gprs["rax"]``
(the return value) and ``ip`` = the real return address: see
:mod:`._kretprobe`.

Optimised probes: see :mod:`._optprobe` (and :mod:`._opt` for the detour;
kretprobes are :mod:`._kretprobe`, the records :mod:`._types`).  As in
6.12, optimising writes each probe's JMP32 with its own ``text_poke_bp``
(three syncs a probe; while the site is in flux the text-poke handler
emulates the JMP32 to the detour); unoptimising writes the probe's INT3,
syncs, puts the displaced tail back and syncs again, one probe after the
other, and an INT3 hit meanwhile is sent to the detour; unregistering an
optimised probe unoptimises it, then disarms it (the original byte, a
sync).  Every call runs the handler exactly once whichever way it goes.

Before the JMP32 is written, INT3 hits are sent to the detour and the
machine runs until every CPU has been seen outside the bytes about to be
overwritten and out of the instruction slot (the kernel's
``synchronize_rcu_tasks``); slots and detours are freed after the same
wait.

Probes stay INT3 probes until optimised by :meth:`optimize_kprobe` or
:meth:`kprobe_optimizer` (``auto_optimize=True`` runs the latter after
every registration, as the kernel's delayed optimizer does by default).

**fentry**: without ``KPROBES_ON_FTRACE`` (no *ftrace* given) a probe on
the fentry NOP is refused, and a bare symbol name means the first
instruction after the NOP.  With it (``Kprobes(ftrace=...)``, Debian's
``CONFIG_KPROBES_ON_FTRACE``) a probe on the NOP is an address in an
ftrace_ops, never an INT3: see :mod:`._onftrace`.

Learnt from ``arch/x86/kernel/kprobes/{core,opt}.c`` and
``kernel/kprobes.c`` (Linux 6.12); the code is our own.
"""

from __future__ import annotations

import struct
from typing import Callable, Hashable, Iterable

from .._core._emulate import PtRegs
from .._core._insn import INT3_INSN_OPCODE, JMP32_INSN_OPCODE, JMP32_INSN_SIZE, text_gen_insn
from .._core._machine import Capability, TrapPriority
from .._errors import BadInstructionError, TextPokeError
from .._execmem import ExecMem
from ..images._symbols import Symbols
from ..images._tables import read_tables
from ._insn import can_boost, is_exception_insn, prepare_emulation, relocate
from ._kretprobe import _Kretprobes
from ._lookup import _Lookup
from ._onftrace import _FtraceProbes
from ._opt import KERNEL_CS, MAX_INSN_SIZE, MAX_OPTINSN_SIZE, PT_REGS
from ._optprobe import _Optprobes
from ._types import (Kprobe, KprobeError, KprobeStats, Kretprobe, KretprobeInstance,
                     PostHandler, PreHandler, _Site)

__all__ = ["Kprobes", "Kprobe", "Kretprobe", "KretprobeInstance", "KprobeError", "KprobeStats"]

#: the top of execmem that is ours unless an allocator is given
KPROBES_EXECMEM = 256 * 1024


def _s64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


class Kprobes(_Lookup, _Kretprobes, _Optprobes, _FtraceProbes):
    """The probes of one machine.  ``Kprobes(core, image)``; optional
    reservation sources: *smp* (``BootResult.smp``: alternatives), *keys*
    (:class:`StaticKeys`), *calls* (:class:`StaticCalls`), *tables* (for
    ``__mcount_loc``).  *execmem*: where slots, detours and the kretprobe
    trampoline go (default: the top 256 KiB of the first execmem range).
    A context manager; :meth:`close` unregisters everything."""

    def __init__(self, core, image=None, *, tables=None, smp=None, keys=None, calls=None,
                 execmem: ExecMem | None = None, preemption: bool = False,
                 blacklist: "Iterable[tuple[int, int] | str]" = (),
                 auto_optimize: bool = False, ftrace=None, smap: bool = False,
                 jump_tables: bool = True) -> None:
        self.core = core
        #: KPROBES_ON_FTRACE: the Ftrace whose ops probes on fentry NOPs use
        self.ftrace = ftrace
        self._ftrace_handler: int | None = None
        if ftrace is not None:
            self._ftrace_handler = (image.symbols.get("kprobe_ftrace_handler")
                                    if image is not None else None)
            if self._ftrace_handler is None:
                raise KprobeError("KPROBES_ON_FTRACE needs the image's kprobe_ftrace_handler",
                                  reason="fentry")
        self.machine = core.machine
        self.image = image
        self.preemption = preemption
        #: the CPU has SMAP: optimised probes' buffers start with CLAC
        self.smap = smap
        #: the kernel may have jump tables (neither retpolines nor IBT): a
        #: function with an indirect jump is not optimised
        self.jump_tables = jump_tables
        #: called with ``[(addr, old bytes, JMP32)]`` for the sites about to
        #: be optimised, after their quiescence and before the first JMP is
        #: written: a machine that must be undoable after its patcher dies
        #: (live: a journal) records what will be written.  It may raise:
        #: nothing is written then.
        self.before_optimize: Callable[[list[tuple[int, bytes, bytes]]], None] | None = None
        #: 6.1's can_optimize (CONFIG_RETPOLINE): a jump into
        #: [__indirect_thunk_start, __indirect_thunk_end) -- the retpoline
        #: thunks and, in 6.1's layout, the return thunks too -- counts as an
        #: indirect jump, and an indirect jump refuses whatever the build
        #: (6.12 dropped both: it trusts IBT/retpoline builds to have no jump
        #: tables).  Only a 6.1 image is known to follow it.
        self.thunk_range: tuple[int, int] | None = None
        if image is not None and str(getattr(image, "version", "")).startswith("6.1."):
            lo = image.symbols.get("__indirect_thunk_start")
            hi = image.symbols.get("__indirect_thunk_end")
            if lo is not None and hi is not None and lo < hi:
                self.thunk_range = (lo, hi)
        #: probe address -> the kernel's struct optimized_kprobe for it (the
        #: optprobe buffer's first argument; from a run-time reference)
        self.optprobe_ops: dict[int, int] = {}
        self._opt_callback: int | None = None
        self._opt_stub: int | None = None
        #: run kprobe_optimizer after every registration (the kernel's default)
        self.auto_optimize = auto_optimize
        self.smp, self.keys, self.calls = smp, keys, calls
        self.functions: dict[str, tuple[int, int]] = {}
        self._fsyms: Symbols | None = None
        self._fsyms_n = 0
        if image is not None:
            for n, a in image.symbols.items():
                sz = image.sizes.get(n, 0)
                if sz > 0 and self.machine.is_text(a):
                    self.functions[n] = (a, sz)
            if tables is None:
                tables = read_tables(image)
        self.fentry: frozenset[int] = frozenset(m.addr for m in tables.mcount_loc) \
            if tables is not None else frozenset()
        #: [start, end) ranges no probe may be put in
        self.blacklist: list[tuple[int, int]] = self._image_blacklist(image)
        for b in blacklist:
            self.blacklist.append(self._blacklist_range(b))
        if execmem is None:
            rng = next(r for r in self.machine.text_ranges if not r.core)
            execmem = ExecMem(core, start=rng.end - KPROBES_EXECMEM, end=rng.end)
        self.execmem = execmem
        self.stats = KprobeStats()
        self._sites: dict[int, _Site] = {}
        self._slots: dict[int, _Site] = {}       # second-INT3 address -> site
        self._detours: dict[int, _Site] = {}     # buffer's callback return address -> site
        self._instances: dict[int, list[KretprobeInstance]] = {}
        self._tramp: int | None = None
        self._rethook_cb: int | None = None
        #: the task a CPU runs (rethook's per-task list): by default the CPU
        self.current_task: Callable[[int], Hashable] = lambda cpu: cpu
        self._current: dict[int, list[Kprobe]] = {}
        self.kretprobes: list[Kretprobe] = []
        self._closed = False
        self._handle = self.machine.register_trap_handler(
            self.kprobe_int3_handler, priority=TrapPriority.KPROBES, name="kprobe_int3_handler")

    # ------------------------------------------------------------ lifetime
    def __enter__(self) -> "Kprobes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unregister every probe (text restored), free slots and detours;
        the trampoline stays while kretprobe instances are pending (their
        returns still need it).  Idempotent."""
        if self._closed or self.machine.closed:
            self._closed = True
            return
        self._closed = True
        for rp in list(self.kretprobes):
            if rp.registered:
                self.unregister_kretprobe(rp)
        probes = [p for s in self._sites.values() for p in s.probes]
        if probes:
            self.unregister_kprobes(probes)
        if not any(self._instances.values()):
            if self._tramp is not None and self._rethook_cb is None:
                self.execmem.free(self._tramp)
            self._tramp = None
            if self._opt_stub is not None:
                self.execmem.free(self._opt_stub)
            self._opt_stub = self._opt_callback = None
            self._handle.unregister()

    @property
    def probes(self) -> list[Kprobe]:
        return [p for s in self._sites.values() for p in s.probes]

    # ------------------------------------------------------------ register
    def register_kprobe(self, spec: "str | int", pre_handler: PreHandler | None = None,
                        post_handler: PostHandler | None = None) -> Kprobe:
        """Arm a probe at ``symbol[+off]`` (or an address).  KprobeError,
        text unchanged, when the place cannot be probed."""
        self._check_open()
        name, off, addr, _size = self.resolve(spec)
        p = Kprobe(name, off, addr, pre_handler, post_handler)
        with self.core.text_mutex:
            site = self._sites.get(addr)
            if site is not None:           # an aggregate probe
                if post_handler is not None and site.optimized:
                    self._unoptimize([site])
                site.probes.append(p)
                p.registered = True
            else:
                self._prepare(p)
        if self.auto_optimize:
            self.kprobe_optimizer()
        return p

    def register_kprobes(self, specs: Iterable[tuple]) -> list[Kprobe]:
        """Several at once; on a refusal the ones already armed are
        unregistered again and the error propagates."""
        done: list[Kprobe] = []
        try:
            for spec in specs:
                done.append(self.register_kprobe(*spec))
        except BaseException:
            if done:
                self.unregister_kprobes(done)
            raise
        return done

    def _boosts(self, insn, post_handler) -> bool:
        """Whether a copied instruction gets a JMP back after its copy in the
        slot (boosted) rather than a second INT3 (single-stepped out of
        line): never with preemption or a post-handler, and only where the
        instruction allows it and the slot has room for the JMP."""
        return not self.preemption and post_handler is None and can_boost(insn) and \
            MAX_INSN_SIZE - insn.length >= JMP32_INSN_SIZE

    def steps_out_of_line(self, symbol: str, addr: int, post_handler=None) -> str | None:
        """The instruction at *addr* of *symbol* (as text) when a probe
        there would run it out of line and then take the slot's second INT3
        -- neither emulated nor boosted; else None.  Nothing is written; a
        point register would refuse is left for it to refuse."""
        fstart, fsize = self.functions[symbol]
        if self.ftrace is not None and addr in self.fentry:
            return None
        insn = next((i for i in self._decode_function(fstart, fsize) if i.addr == addr), None)
        if insn is None or is_exception_insn(insn) or prepare_emulation(insn) is not None:
            return None
        return None if self._boosts(insn, post_handler) else insn.text

    def _prepare(self, p: Kprobe) -> None:
        addr = p.addr
        fstart, fsize = self.functions[p.symbol]
        # a probe inside an optimised probe's displaced range: the kernel
        # (__arm_kprobe) unoptimises that probe -- its INT3 comes back and
        # the bytes it displaced are in place again -- and accepts this one
        inside = [s for s in self._sites.values()
                  if s.optimized and s.addr < addr < s.addr + len(s.displaced)]
        self._unoptimize(inside)
        if p.symbol.startswith(("__cfi_", "__pfx_")):
            raise KprobeError(f"{p.name} is in a CFI preamble ({p.symbol})", reason="reserved",
                              addr=addr)
        if self.within_kprobe_blacklist(addr):
            raise KprobeError(f"{p.name} ({addr:#x}) is blacklisted (kprobes/noinstr/entry "
                              "text or NOKPROBE_SYMBOL)", reason="blacklist", addr=addr)
        if self.ftrace is not None and addr in self.fentry:
            self._prepare_ftrace(p, fstart, fsize)
            return
        insns = self._decode_function(fstart, fsize)
        insn = next((i for i in insns if i.addr == addr), None)
        if insn is None:
            raise KprobeError(f"{p.name} ({addr:#x}) is not an instruction boundary of "
                              f"{p.symbol}", reason="boundary", addr=addr)
        if insn.opcode[:1] == bytes([INT3_INSN_OPCODE]) or \
                self.machine.text_read(addr, 1)[0] == INT3_INSN_OPCODE:
            raise KprobeError(f"{p.name} ({addr:#x}) holds an INT3 (padding, a breakpoint, or "
                              "a patch in flight)", reason="int3", addr=addr)
        who = self.text_reserved(addr, addr)
        if who is not None:
            raise KprobeError(f"{p.name} ({addr:#x}) is text reserved by {who}",
                              reason="fentry" if who.startswith("ftrace") else "reserved",
                              addr=addr)
        if is_exception_insn(insn):
            raise KprobeError(f"{p.name}: {insn.text} traps by design and cannot be probed",
                              reason="unsupported", addr=addr)
        em = prepare_emulation(insn)
        if isinstance(em, str):
            raise KprobeError(f"{p.name}: {em} ({insn.text})", reason="unsupported", addr=addr)
        site = _Site(addr, insn, self.machine.text_read(addr, 1), (p.symbol, fstart, fsize), em)
        # arch_copy_kprobe: every probe gets a slot with the copy and its
        # tail, emulated or not (an emulated one's copy is never run)
        slot = self.insn_slots.alloc()
        try:
            code = relocate(insn, slot)
            boost = self._boosts(insn, p.post_handler)
            tail = text_gen_insn(JMP32_INSN_OPCODE, slot + insn.length, addr + insn.length) \
                if boost else b"\xcc"
            # only the copy and its tail, as arch_copy_kprobe writes them:
            # the rest of the slot keeps what the page holds
            self.core.text_poke_copy(slot, code + tail)
        except (ValueError, BadInstructionError) as e:
            self.insn_slots.free(slot)
            raise KprobeError(f"{p.name}: cannot copy the instruction out of line: {e}",
                              reason="unsupported", addr=addr) from None
        site.slot, site.boosted = slot, boost
        self._slots[slot + insn.length] = site
        site.probes.append(p)
        self._sites[addr] = site
        try:
            # arm_kprobe: the INT3, then every CPU serialised
            self.core.text_poke(addr, bytes([INT3_INSN_OPCODE]))
            self.core.smp_text_poke_sync_each_cpu()
        except BaseException:
            del self._sites[addr]
            raise
        p.registered = True

    # ------------------------------------------------------------ unregister
    def unregister_kprobe(self, p: Kprobe) -> None:
        self.unregister_kprobes([p])

    def unregister_kprobes(self, probes: Iterable[Kprobe]) -> None:
        """Disarm (restore the bytes, sync), then wait until no CPU can be
        in a slot or detour before freeing them."""
        gone: list[_Site] = []
        with self.core.text_mutex:
            restore_opt: list[_Site] = []
            restore_int3: list[_Site] = []
            restore_ftrace: list[_Site] = []
            for p in probes:
                site = self._sites.get(p.addr)
                if site is None or p not in site.probes:
                    continue
                site.probes.remove(p)
                p.registered = False
                if site.probes:
                    continue
                if site.ftrace:
                    restore_ftrace.append(site)
                    continue
                (restore_opt if site.optimized or site.redirect else restore_int3).append(site)
            if restore_ftrace:
                # disarm_kprobe_ftrace: the addresses leave their ops (the
                # last one out unregisters it)
                gone_ips = {s.addr for s in restore_ftrace}
                for ops in sorted({s.ftrace for s in restore_ftrace}):
                    self._set_ftrace_ips(ops, self._ftrace_ips(ops) - gone_ips)
                for s in restore_ftrace:
                    del self._sites[s.addr]
            # the kernel, probe by probe: an optimised one is unoptimised
            # (INT3, sync, the displaced tail, sync: a CPU at the INT3 is
            # still sent to the detour) and then disarmed like any other
            # (arch_disarm_kprobe: the original byte, sync)
            for s in restore_opt:
                self._unoptimize([s] if s.optimized else [])
                s.optimized = s.redirect = False
            for s in restore_opt + restore_int3:
                self.core.text_poke(s.addr, s.orig)
                self.core.smp_text_poke_sync_each_cpu()
            for s in restore_opt + restore_int3:
                del self._sites[s.addr]
                gone.append(s)
        if not gone:
            return
        ranges = []
        for s in gone:
            if s.slot is not None:
                ranges.append((s.slot, s.slot + MAX_INSN_SIZE))
            if s.detour is not None:
                ranges.append((s.detour.addr, s.detour.addr + MAX_OPTINSN_SIZE))
        if ranges:
            self._wait_quiescent(ranges, "freeing kprobe slots")
        for s in gone:
            if s.slot is not None:
                # arch_remove_kprobe: a boosted copy may still be run by a
                # task preempted in it: dirty, reused after a collection
                self._slots.pop(s.slot + s.insn.length, None)
                self.insn_slots.free(s.slot, dirty=s.boosted)
            if s.detour is not None:
                self._detours.pop(s.detour.call_ret, None)
                self._free_detour(s.detour.addr, dirty=True)

    # ------------------------------------------------------------ quiescence
    def _wait_quiescent(self, ranges: list[tuple[int, int]], why: str) -> None:
        """Run the machine until every CPU has been seen outside *ranges*
        and not in a trap (``synchronize_rcu_tasks``): the machine's
        ``QUIESCE`` capability.  On a machine that cannot show where its
        CPUs are, a sync is all we can do."""
        m = self.machine
        self.stats.quiesce_waits += 1
        if not m.has(Capability.QUIESCE):
            self.core.smp_text_poke_sync_each_cpu()
            return
        m.run_task(m.quiesce(ranges, why))

    # ------------------------------------------------------------ the handler
    def kprobe_int3_handler(self, regs: PtRegs):
        """On the INT3 chain after the text-poke handler: a probe hit, the
        second INT3 of a slot, the kretprobe trampoline, or a detour's
        handler call.  True when handled."""
        if False:  # a generator, as the chain wants; nothing here sleeps
            yield
        ip = regs.ip - 1
        if ip == self._ftrace_handler:
            return self._ftrace_hit(regs)
        site = self._sites.get(ip)
        if site is not None and not site.ftrace:
            return self._hit(site, regs)
        site = self._slots.get(ip)
        if site is not None:
            return self._post(site, regs)
        if self._rethook_cb is not None and ip == self._rethook_cb:
            return self._rethook_hit(regs)
        if ip == self._tramp and self._rethook_cb is None:
            return self._ret_hit(regs)
        if ip == self._opt_stub:
            site = self._detours.get(int.from_bytes(regs.mem.read(regs.sp, 8), "little"))
            if site is not None:
                return self._opt_hit(site, regs)
        return False

    def _hit(self, site: _Site, regs: PtRegs) -> bool:
        self.stats.hits += 1
        if site.redirect or site.optimized:
            # optimising: the detour runs the handlers (or a CPU with a
            # stale view still saw the INT3 of an optimised site)
            regs.ip = site.detour.addr
            return True
        for p in list(site.probes):
            p.nhit += 1
            if p.pre_handler is not None and p.pre_handler(p, regs):
                return True                 # it moved ip itself; the rest are not run
        if site.emulate is not None:
            site.emulate(regs)
            self.stats.emulated += 1
            self._post_handlers(site, regs)
            return True
        regs.ip = site.slot
        if site.boosted:
            self.stats.boosted += 1
        else:
            # kprobe_ctlblk: the probes this CPU is single-stepping for
            self._current[regs.cpu] = list(site.probes)
        return True

    def _post(self, site: _Site, regs: PtRegs) -> bool:
        # the copy ran; resume after the original instruction
        regs.ip = site.addr + site.insn.length
        self.stats.single_stepped += 1
        self._post_handlers(site, regs, self._current.pop(regs.cpu, None))
        return True

    @staticmethod
    def _post_handlers(site: _Site, regs: PtRegs, probes: "list[Kprobe] | None" = None) -> None:
        for p in list(site.probes if probes is None else probes):
            if p.post_handler is not None:
                p.post_handler(p, regs, 0)

    def _opt_hit(self, site: _Site, regs: PtRegs) -> bool:
        # optimized_callback(op, regs): the buffer built a struct pt_regs
        # right above the return address of its call
        n = len(PT_REGS)
        frame = regs.sp + 8
        raw = regs.mem.read(frame, 8 * n)
        vals = list(struct.unpack(f"<{n}Q", raw))
        at = {r: i for i, r in enumerate(PT_REGS)}
        gprs = {r: vals[at[r]] for r in PT_REGS[:15]}
        # what the kernel's callback fixes in the frame before the handlers
        vals[at["sp"]] = (vals[at["sp"]] + 8) & ((1 << 64) - 1)
        vals[at["cs"]] = KERNEL_CS
        vals[at["ip"]] = site.addr + 1
        vals[at["orig_ax"]] = (1 << 64) - 1
        hregs = PtRegs(ip=site.addr + 1, sp=vals[at["sp"]], flags=vals[at["flags"]],
                       mem=regs.mem, cpu=regs.cpu, gprs=dict(gprs))
        self.stats.detour_hits += 1
        for p in list(site.probes):
            p.nhit += 1
            if p.pre_handler is not None:
                p.pre_handler(p, hregs)
        # the template restores the registers and the flags from the frame
        # (ip and sp are not restored: the copies run next, then the JMP back),
        # so only those are written back: a probe address + 1 left in the ip
        # slot would read, to a machine that looks for return addresses on
        # stacks (live's QUIESCE), as a thread inside the bytes an optimise
        # waits for every thread to leave
        out = list(struct.unpack(f"<{n}Q", raw))
        for r in PT_REGS[:15]:
            out[at[r]] = hregs.gprs.get(r, gprs[r]) & ((1 << 64) - 1)
        out[at["flags"]] = hregs.flags & ((1 << 64) - 1)
        regs.mem.write(frame, struct.pack(f"<{n}Q", *out))
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise TextPokeError("this Kprobes is closed")
        self.machine._check_open()
