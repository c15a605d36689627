# SPDX-License-Identifier: GPL-2.0-only
"""Dynamic ftrace trampolines (``FTRACE_FL_TRAMP``): a part of
:class:`~._ops.Ftrace`.

When an ops is registered it gets a trampoline of its own in execmem
(``arch_ftrace_update_trampoline`` -> ``create_trampoline``): a copy of
``ftrace_caller`` .. ``ftrace_caller_end`` (``ftrace_regs_caller`` .. ``_end``
for an ops that wants every register, its ``jnz`` at
``ftrace_regs_caller_jmp`` turned into a two-byte NOP) relocated to its new
address, the ``movq disp32(%rip), %rdx`` at ``ftrace_caller_op_ptr``
re-aimed at the ops pointer stored after the copy, the CALL at
``ftrace_call`` aimed straight at that ops' function, then a return
(``jmp x86_return_thunk`` where the CPU wants the return thunk there, else
``ret; int3``) in a slot of ``RET_SIZE`` bytes, then the 8-byte ops pointer.
Registering the ops again only re-aims the CALL inside it when it differs
(``text_poke_bp``).  Without execmem, or with a template not as expected,
no trampoline is made and the sites call ``ftrace_caller``, as when the
kernel's allocation fails.  Which record calls which trampoline is
:class:`~._ops.Ftrace`'s (``ftrace_get_addr_new``).

Learnt from ``arch/x86/kernel/ftrace.c`` (Linux 6.12); the code is our own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._alternative._reloc import text_poke_apply_relocation
from .._alternative._thunks import return_thunk_at
from .._core._insn import (CALL_INSN_OPCODE, CALL_INSN_SIZE, JMP32_INSN_OPCODE, text_gen_insn,
                           x86_nops)
from .._errors import BadInstructionError

if TYPE_CHECKING:
    from ._ops import FtraceOps

__all__ = ["FtraceTrampoline", "RET_SIZE"]

#: the return slot after a trampoline's copy (RET_SIZE with
#: CONFIG_MITIGATION_RETPOLINE: room for a JMP32 to the return thunk)
RET_SIZE = 5
_OP_REF = bytes([0x48, 0x8B, 0x15])         # movq disp32(%rip), %rdx
_OP_REF_SIZE = 7


@dataclass(slots=True)
class FtraceTrampoline:
    """One ops' dynamic trampoline in execmem (``ops->trampoline``)."""

    ops: str                    # "function", "profile", or another ops' name
    addr: int
    size: int                   # the whole allocation: copy + RET_SIZE + ops pointer
    call_offset: int            # of the CALL to the ops' function
    save_regs: bool = False     # made from ftrace_regs_caller


class _Trampolines:
    """Each ops' own trampoline: made at its first registration, re-aimed
    at later ones.  A part of :class:`~._ops.Ftrace` (its ``machine``,
    ``core``, ``symbols``, ``execmem``, ``trampolines``, ``tramp_errors``)."""

    def _return_thunk_at(self, addr: int) -> int | None:
        """``cpu_wants_rethunk_at`` for a return written at *addr*."""
        return return_thunk_at(self.return_thunk, self.symbols.get("its_return_thunk"), addr)

    def create_trampoline(self, ops: str, extra: "dict[str, FtraceOps] | None" = None
                          ) -> FtraceTrampoline | None:
        """Make *ops*' trampoline (``create_trampoline``), or return None
        (and say why in :attr:`tramp_errors`) when there is no execmem or
        the template is not as expected -- the sites then keep calling
        ``ftrace_caller`` (or ``ftrace_regs_caller``)."""
        func, save_regs, obj = self._ops_info(ops, extra)
        if self.execmem is None:
            self.tramp_errors[ops] = "no execmem"
            return None
        pre = "ftrace_regs_caller" if save_regs else "ftrace_caller"
        start, end = self.symbols.get(pre), self.symbols.get(pre + "_end")
        op_ptr = self.symbols.get(pre + "_op_ptr")
        call_site = self.symbols.get("ftrace_regs_call" if save_regs else "ftrace_call")
        jmp = self.symbols.get("ftrace_regs_caller_jmp") if save_regs else None
        if None in (start, end, op_ptr, call_site) or not start < call_site < end or \
                (save_regs and jmp is None):
            self.tramp_errors[ops] = f"no {pre} template (_end, _op_ptr, its CALL) in the image"
            return None
        size = end - start
        total = size + RET_SIZE + 8
        try:
            addr = self.execmem.alloc(total)
        except MemoryError as e:
            self.tramp_errors[ops] = str(e)
            return None
        buf = bytearray(self.machine.text_read(start, size))
        ip = addr + size
        thunk = self._return_thunk_at(ip)
        ret = text_gen_insn(JMP32_INSN_OPCODE, ip, thunk) if thunk else bytes([0xC3, 0xCC])
        op_off = op_ptr - start
        ok = bytes(buf[op_off:op_off + 3]) == _OP_REF
        why = ""
        if ok and save_regs:
            # no direct calls through a trampoline: the two-byte jnz goes
            j = jmp - start
            if buf[j] != 0x75:
                ok, why = False, f"ftrace_regs_caller_jmp holds {buf[j]:#04x}, not a jnz rel8"
            else:
                buf[j:j + 2] = x86_nops[2]
        if ok:
            try:
                # relative operands that leave the copy keep their targets
                text_poke_apply_relocation(buf, addr, size, start, size)
            except BadInstructionError as e:
                ok, why = False, str(e)
        elif not why:
            why = (f"{pre}_op_ptr holds {bytes(buf[op_off:op_off + 3]).hex(' ')}, "
                   "not movq disp32(%rip), %rdx")
        if not ok:
            self.execmem.free(addr, invalidate=False)
            self.tramp_errors[ops] = why
            return None
        # the ops pointer after the return slot; the load reads it
        ptr = addr + size + RET_SIZE
        ops_obj = self.symbols.get(obj, 0)
        buf[op_off + 3:op_off + _OP_REF_SIZE] = struct.pack(
            "<i", ptr - (addr + op_off + _OP_REF_SIZE))
        call_off = call_site - start
        buf[call_off:call_off + CALL_INSN_SIZE] = text_gen_insn(
            CALL_INSN_OPCODE, addr + call_off, func)
        # fresh memory nobody runs yet: plain copies, as the kernel's memcpy
        self.core.text_poke_copy(addr, bytes(buf) + ret)
        self.core.text_poke_copy(ptr, struct.pack("<Q", ops_obj))
        t = FtraceTrampoline(ops, addr, total, call_off, save_regs)
        self.trampolines[ops] = t
        self.tramp_errors.pop(ops, None)
        return t

    def update_trampoline(self, ops: str, extra: "dict[str, FtraceOps] | None" = None
                          ) -> FtraceTrampoline | None:
        """``arch_ftrace_update_trampoline`` at *ops*' registration: make
        its trampoline the first time; later, re-aim the CALL inside it at
        the ops' function if it differs (one ``smp_text_poke_single``, the
        trampoline may be running)."""
        t = self.trampolines.get(ops)
        if t is None:
            return self.create_trampoline(ops, extra)
        site = t.addr + t.call_offset
        new = text_gen_insn(CALL_INSN_OPCODE, site, self._ops_info(ops, extra)[0])
        if self.machine.text_read(site, CALL_INSN_SIZE) != new:
            self.core.smp_text_poke_single(site, new)
        return t
