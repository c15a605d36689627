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

from typing import Callable

from ..images._tables_real import RealAltInstr
from ._kpasses import CALL, F_CALL_DEPTH, TableStats, apply_relocation_k, fast_decode, _rel32
from ._ktext import CpuCaps, KernelText

__all__ = ["callthunks_patch_builtin_calls", "SKIP_DESTS"]

#: Destinations that must not be redirected (they account for themselves
#: or run before the per-CPU state exists).
SKIP_DESTS = ("error_entry", "paranoid_entry", "xen_error_entry", "__switch_to_asm",
              "ret_from_fork", "soft_restart_cpu", "__fentry__")
_KEXEC_CONTROL_CODE_MAX_SIZE = 2048


class _Thunks:
    def __init__(self, kt: KernelText) -> None:
        self.kt = kt
        t0 = kt.sym("skl_call_thunk_template")
        self.tmpl_addr = t0
        self.size = kt.sym("skl_call_thunk_tail") - t0
        self.tmpl = kt.read(t0, self.size)
        self.lo, self.hi = kt.sym("_text"), kt.sym("_etext")
        self.skip = {kt.symbols[n] for n in SKIP_DESTS if n in kt.symbols}
        rk = kt.opt("relocate_kernel")
        self.kexec = (rk, rk + _KEXEC_CONTROL_CODE_MAX_SIZE) if rk is not None else (0, 0)
        self.pads: dict[int, int | None] = {}
        self.made = 0

    def skip_addr(self, dest: int) -> bool:
        return dest in self.skip or self.kexec[0] <= dest < self.kexec[1]

    def patch_dest(self, dest: int) -> int | None:
        """The thunk before *dest*, written there if the padding is NOPs."""
        if dest in self.pads:
            return self.pads[dest]
        pad = dest - self.size
        b = bytearray(self.tmpl) + bytes(16)
        apply_relocation_k(b, pad, self.size, self.tmpl_addr, self.size)
        want = bytes(b[:self.size])
        cur = self.kt.read(pad, self.size)
        res: int | None = pad
        if cur != want:
            if cur != b"\x90" * self.size:
                res = None
            else:
                self.kt.write(".call_sites(thunk)", pad, want)
                self.made += 1
        self.pads[dest] = res
        return res


def _patch_call(kt: KernelText, th: _Thunks, addr: int, st: TableStats) -> None:
    if not th.lo <= addr < th.hi:
        st.skipped += 1
        return
    o = addr - kt.base
    if kt.buf[o] == CALL:
        dest = addr + 5 + int.from_bytes(kt.buf[o + 1:o + 5], "little", signed=True)
    else:
        ins = fast_decode(kt, addr)
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
    st.changed += kt.write(".call_sites", addr, _rel32(CALL, addr, pad))


def callthunks_patch_builtin_calls(kt: KernelText, call_sites: list[int],
                                   alts: list[RealAltInstr], caps: CpuCaps,
                                   dbg: Callable[[str], None] | None = None
                                   ) -> tuple[TableStats, int] | None:
    """Redirect calls to accounting thunks; None when the CPU does not use
    call-depth tracking.  Returns (stats over both tables, thunks written)."""
    if not caps.has_bit(F_CALL_DEPTH):
        return None
    th = _Thunks(kt)
    st = TableStats(entries=len(call_sites) + len(alts))
    for addr in call_sites:
        _patch_call(kt, th, addr, st)
    for a in alts:
        _patch_call(kt, th, a.instr, st)
    return st, th.made
