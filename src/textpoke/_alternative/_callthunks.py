# SPDX-License-Identifier: GPL-2.0-only
"""Call-depth tracking: ``callthunks_patch_builtin_calls()``.

With ``X86_FEATURE_CALL_DEPTH`` (``retbleed=stuff``) every direct call in
core kernel text (``.call_sites``, then the call sites of
``.altinstructions``) whose destination is core text is redirected to an
accounting thunk placed in the padding just before the destination: the
``skl_call_thunk_template`` bytes, relocated to the pad, where the pad
still holds NOPs.  Rules learnt from ``arch/x86/kernel/callthunks.c``; the
code is our own.
"""

from __future__ import annotations

from typing import Sequence

from .._core._insn import insn_decode_kernel
from .._errors import BadInstructionError
from ..images._tables import AltInstr
from ._code import CALL, rel32
from ._kpasses import F_CALL_DEPTH
from ._ktext import CpuCaps, TextBuffer
from ._records import PassLog, TableStats
from ._reloc import apply_relocation

__all__ = ["callthunks", "CallThunks", "SKIP_DESTS"]

#: Destinations that must not be redirected (they account for themselves
#: or run before the per-CPU state exists).
SKIP_DESTS = ("error_entry", "paranoid_entry", "xen_error_entry", "__switch_to_asm",
              "ret_from_fork", "soft_restart_cpu", "__fentry__")
_KEXEC_CONTROL_CODE_MAX_SIZE = 2048
#: legacy and REX prefixes: only a site starting with one can still be a CALL
#: when its first byte is not E8
_PREFIXES = frozenset([0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3,
                       *range(0x40, 0x50)])


class CallThunks:
    """The call-depth accounting thunks of a text: where one goes, its
    code, and (:meth:`patch_dest`) writing it into a function's padding."""

    def __init__(self, tb: TextBuffer) -> None:
        self.tb = tb
        t0 = tb.sym("skl_call_thunk_template")
        self.tmpl_addr = t0
        self.size = tb.sym("skl_call_thunk_tail") - t0
        self.tmpl = tb.read(t0, self.size)
        self.lo, self.hi = tb.sym("_text"), tb.sym("_etext")
        self.skip = {a for a in map(tb.opt, SKIP_DESTS) if a is not None}
        rk = tb.opt("relocate_kernel")
        self.kexec = (rk, rk + _KEXEC_CONTROL_CODE_MAX_SIZE) if rk is not None else (0, 0)
        self.pads: dict[int, int | None] = {}
        self.made = 0
        # The template is normally one RIP-relative instruction (sarq $5,
        # %gs:__x86_call_depth(%rip)): then relocating it is moving one
        # displacement, computed here instead of decoding it per pad.
        self.rip_field: tuple[int, int, int] | None = None
        try:
            ins = insn_decode_kernel(self.tmpl, t0)
        except BadInstructionError:
            ins = None
        if (ins is not None and ins.length == self.size and ins.rip_relative
                and ins.branch_target is None and ins.displacement_size == 4
                and ins.mnemonic != "nop"):
            self.rip_field = (ins.displacement_offset, ins.displacement_value,
                              ins.end + ins.displacement_value)

    def skip_addr(self, dest: int) -> bool:
        return dest in self.skip or self.kexec[0] <= dest < self.kexec[1]

    def code_at(self, pad: int) -> bytes:
        """The template relocated to run at *pad*."""
        if self.rip_field is not None:
            off, disp, target = self.rip_field
            b = bytearray(self.tmpl)
            if target < self.tmpl_addr or target > self.tmpl_addr + self.size:
                b[off:off + 4] = ((disp + self.tmpl_addr - pad) & 0xFFFFFFFF).to_bytes(4, "little")
            return bytes(b)
        b = bytearray(self.tmpl) + bytes(16)
        apply_relocation(b, pad, self.size, self.tmpl_addr, self.size, self.tb.line)
        return bytes(b[:self.size])

    def in_core(self, dest: int) -> bool:
        return self.lo <= dest < self.hi

    def patch_dest(self, dest: int) -> int | None:
        """The thunk before *dest*, written there if the padding is NOPs."""
        if dest in self.pads:
            return self.pads[dest]
        pad = dest - self.size
        want = self.code_at(pad)
        cur = self.tb.read(pad, self.size)
        res: int | None = pad
        if cur != want:
            if cur != b"\x90" * self.size:
                res = None
            else:
                self.tb.write(".call_sites(thunk)", pad, want)
                self.made += 1
        self.pads[dest] = res
        return res


def _patch_call(tb: TextBuffer, th: CallThunks, addr: int, st: TableStats) -> None:
    if not th.lo <= addr < th.hi:
        st.skipped += 1
        return
    cur = tb.peek(addr, 5)
    b0 = cur[0]
    if b0 == CALL:
        dest = addr + 5 + int.from_bytes(cur[1:5], "little", signed=True)
    elif b0 not in _PREFIXES:
        st.skipped += 1             # not a CALL (patched out, or an indirect call)
        return
    else:
        ins = tb.decode(addr)
        if ins is None or ins.op1 != CALL:
            st.skipped += 1
            return
        dest = addr + ins.length + ins.imm
    if th.skip_addr(dest) or not th.lo <= dest < th.hi:
        st.skipped += 1
        return
    pad = th.patch_dest(dest)
    if pad is None:
        st.skipped += 1
        st.note("no NOP padding before the destination")
        return
    st.applied += 1
    new = rel32(CALL, addr, pad)
    if cur != new:
        st.changed += tb.write(".call_sites", addr, new)


def callthunks(tb: TextBuffer, call_sites: Sequence[int], alts: Sequence[AltInstr],
               caps: CpuCaps, log: PassLog) -> int:
    """Redirect calls to accounting thunks when the CPU uses call-depth
    tracking (counts over both tables in *log*); the thunks written."""
    if not caps.has(F_CALL_DEPTH):
        return 0
    th = CallThunks(tb)
    st = log.stats
    for addr in call_sites:
        _patch_call(tb, th, addr, st)
    for a in alts:
        _patch_call(tb, th, a.instr, st)
    return th.made
