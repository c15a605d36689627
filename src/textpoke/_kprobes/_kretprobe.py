# SPDX-License-Identifier: GPL-2.0-only
"""kretprobes, the way 6.12 builds them on rethook.  A part of
:class:`~._core.Kprobes`.

The entry probe's handler (``pre_handler_kretprobe``) takes an instance
from the kretprobe's pool of *maxactive* (``rethook_try_get``; none left:
``nmissed``), runs the entry handler (a true return gives the instance
back), and hooks it (``rethook_hook`` -> ``arch_rethook_prepare``): the
instance remembers the return address on top of the stack and that
stack slot (its *frame*), the slot gets ``arch_rethook_trampoline``, and
the instance goes on the head of the current task's list.

The function's RET goes to ``arch_rethook_trampoline`` -- guest code in
the image (``images/kernel/rethook.S``): it pushes a fake return address
and a ``struct pt_regs`` and calls ``arch_rethook_trampoline_callback``,
whose INT3 brings the host here (``_rethook_hit``).  As the kernel's
callback and ``rethook_trampoline_handler``: the registers are fixed
(``ip`` = the trampoline, ``orig_ax`` = -1, ``sp`` past the two pushed
words), the real return address is the first instance on the task's list
not holding the trampoline itself (a second kretprobe on the same
function hooked the trampoline), every return handler of the instances
for this frame runs with ``ip`` = that address, the fake slot gets the
real address (``arch_rethook_fixup_return``), the used instances leave the
list and go back to their pools, and flags are copied into the ``ss`` slot
so the trampoline's ``popfq; ret`` resumes the caller.  A kretprobe
unregistered while instances are in flight keeps returning through the
trampoline, without its handler.

The "current task" is what :attr:`Kprobes.current_task` says for a CPU
(default: the CPU itself -- each vCPU runs one task, none migrates).

An image without ``arch_rethook_trampoline`` gets the older model: a
trampoline in execmem that is an INT3, instances per CPU.

Rules learnt from ``kernel/trace/rethook.c``, ``arch/x86/kernel/rethook.c``
and ``kernel/kprobes.c`` (Linux 6.12); the code is our own.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from .._core._emulate import PtRegs
from ._types import _TRAMP_SIZE, KprobeError, Kretprobe, KretprobeInstance

__all__: list[str] = []

#: struct pt_regs, word by word, as arch_rethook_trampoline pushes it
_PT_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
            "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")
_PT = struct.Struct(f"<{len(_PT_REGS)}Q")
_M64 = (1 << 64) - 1
_KERNEL_CS = 0x10


class _Kretprobes:
    """The kretprobe half of :class:`Kprobes` (its state lives there)."""

    # ------------------------------------------------------------ kretprobes
    def _ensure_trampoline(self) -> int:
        if self._tramp is None:
            sym = self.image.symbols if self.image is not None else {}
            t = sym.get("arch_rethook_trampoline")
            cb = sym.get("arch_rethook_trampoline_callback")
            if t is not None and cb is not None:
                self._tramp, self._rethook_cb = t, cb
            else:
                t = self.execmem.alloc(_TRAMP_SIZE)
                self.core.text_poke_copy(t, b"\xcc" * _TRAMP_SIZE)
                self._tramp = t
        return self._tramp

    @property
    def rethook(self) -> bool:
        """Return probes go through the image's rethook trampoline."""
        return self._rethook_cb is not None

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
        if self.rethook:
            # rethook_try_get: one pool of maxactive per kretprobe
            inflight = sum(1 for lst in self._instances.values() for i in lst if i.rp is rp)
            task = self.current_task(regs.cpu)
        else:
            inflight = sum(1 for i in self._instances.get(regs.cpu, []) if i.rp is rp)
            task = regs.cpu
        if inflight >= rp.maxactive:
            rp.nmissed += 1
            return False
        ret = int.from_bytes(regs.mem.read(regs.sp, 8), "little")
        ri = KretprobeInstance(rp, ret, regs.sp, regs.cpu)
        if rp.entry_handler is not None and rp.entry_handler(ri, regs):
            return False
        # arch_rethook_prepare: the return address becomes the trampoline
        regs.mem.write(regs.sp, self._tramp.to_bytes(8, "little"))
        self._instances.setdefault(task, []).append(ri)     # the list's head is its end
        return False

    def _ret_hit(self, regs: PtRegs) -> bool:
        """The older model's INT3 trampoline."""
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

    def _rethook_hit(self, regs: PtRegs) -> bool:
        """arch_rethook_trampoline_callback(regs) and
        rethook_trampoline_handler, on the pt_regs the trampoline pushed."""
        ptr = regs.gprs.get("rdi", 0) & _M64
        vals = _PT.unpack(regs.mem.read(ptr, _PT.size))
        f = dict(zip(_PT_REGS, vals))
        f["cs"], f["rip"], f["orig_rax"] = _KERNEL_CS, self._tramp, _M64
        f["rsp"] = (f["rsp"] + 16) & _M64
        frame = ptr + _PT.size                  # the fake return address's slot
        lst = self._instances.get(self.current_task(regs.cpu), [])
        # __rethook_find_ret_addr: the first instance not holding the trampoline
        found = next((k for k in range(len(lst) - 1, -1, -1)
                      if lst[k].ret_addr != self._tramp), None)
        if found is None:
            return False        # the kernel BUG()s: "Return address not found!"
        correct = lst[found].ret_addr
        gprs = {n: f[n] for n in _PT_REGS[:15]}
        h = PtRegs(ip=correct, sp=f["rsp"], flags=f["eflags"], mem=regs.mem, cpu=regs.cpu,
                   gprs=dict(gprs))
        self.stats.ret_hits += 1
        for k in range(len(lst) - 1, found - 1, -1):
            ri = lst[k]
            if ri.slot != frame:
                break           # WARN_ON_ONCE in the kernel: another frame's instance
            rp = ri.rp
            if rp.registered:
                rp.nhit += 1
                if rp.handler is not None:
                    rp.handler(ri, h)
        # arch_rethook_fixup_return, then the used instances leave the list
        regs.mem.write(frame, correct.to_bytes(8, "little"))
        del lst[found:]
        out = [h.gprs.get(n, gprs[n]) & _M64 for n in _PT_REGS[:15]]
        out += [f["orig_rax"], h.ip & _M64, f["cs"], h.flags & _M64, f["rsp"],
                h.flags & _M64]         # flags into ss: the trampoline's popfq takes them
        regs.mem.write(ptr, _PT.pack(*out))
        return True
