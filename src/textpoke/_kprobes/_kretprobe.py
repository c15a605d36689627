# SPDX-License-Identifier: GPL-2.0-only
"""kretprobes: an entry probe swaps the return address for a trampoline in
execmem (an INT3) and remembers the real one per CPU; the trampoline's trap
runs the return handler with the return value and resumes at the real
return address.  A part of :class:`~._core.Kprobes`."""

from __future__ import annotations

from typing import Any, Callable

from .._core._emulate import PtRegs
from ._types import _TRAMP_SIZE, KprobeError, Kretprobe, KretprobeInstance

__all__: list[str] = []


class _Kretprobes:
    """The kretprobe half of :class:`Kprobes` (its state lives there)."""

    # ------------------------------------------------------------ kretprobes
    def _ensure_trampoline(self) -> int:
        if self._tramp is None:
            t = self.execmem.alloc(_TRAMP_SIZE)
            self.core.text_poke_copy(t, b"\xcc" * _TRAMP_SIZE)
            self._tramp = t
        return self._tramp

    @property
    def trampoline(self) -> int | None:
        return self._tramp

    def register_kretprobe(self, spec: "str | int",
                           handler: Callable[[KretprobeInstance, PtRegs], Any] | None = None,
                           entry_handler: Callable[[KretprobeInstance, PtRegs], Any] | None = None,
                           maxactive: int | None = None) -> Kretprobe:
        """Return probe on a function (at its entry: offset 0, or the first
        instruction after the fentry NOP)."""
        self._check_open()
        name, off, addr, _size = self.resolve(spec)
        start = self.functions[name][0]
        if not (off == 0 or (off == 5 and start in self.fentry)):
            raise KprobeError(f"{name}+{off:#x} is not the entry of {name}: a kretprobe "
                              "needs the return address on top of the stack", reason="entry",
                              addr=addr)
        self._ensure_trampoline()
        rp = Kretprobe(None, handler, entry_handler,
                       maxactive if maxactive is not None and maxactive > 0
                       else max(10, 2 * len(self.machine.cpus)))
        rp.kp = self.register_kprobe(addr, lambda p, regs: self._ret_entry(rp, regs))
        rp.registered = True
        self.kretprobes.append(rp)
        return rp

    def unregister_kretprobe(self, rp: Kretprobe) -> None:
        """Instances in flight still return through the trampoline (to the
        right place) but no longer run the handler."""
        if rp.registered:
            rp.registered = False
            self.unregister_kprobe(rp.kp)
            self.kretprobes.remove(rp)

    def pending_instances(self) -> int:
        return sum(len(v) for v in self._instances.values())

    def _ret_entry(self, rp: Kretprobe, regs: PtRegs) -> bool:
        insts = self._instances.setdefault(regs.cpu, [])
        if sum(1 for i in insts if i.rp is rp) >= rp.maxactive:
            rp.nmissed += 1
            return False
        ret = int.from_bytes(regs.mem.read(regs.sp, 8), "little")
        ri = KretprobeInstance(rp, ret, regs.sp, regs.cpu)
        if rp.entry_handler is not None and rp.entry_handler(ri, regs):
            return False
        regs.mem.write(regs.sp, self._tramp.to_bytes(8, "little"))
        insts.append(ri)
        return False

    def _ret_hit(self, regs: PtRegs) -> bool:
        insts = self._instances.get(regs.cpu, [])
        slot = regs.sp - 8
        for i in range(len(insts) - 1, -1, -1):
            if insts[i].slot == slot:
                break
        else:
            return False        # not ours: an oops, as a stray trampoline return should be
        ri = insts[i]
        del insts[i:]           # deeper instances never returned (their stack is gone)
        self.stats.ret_hits += 1
        regs.ip = ri.ret_addr
        rp = ri.rp
        if rp.registered:
            rp.nhit += 1
            if rp.handler is not None:
                rp.handler(ri, regs)
        regs.ip = ri.ret_addr
        return True
