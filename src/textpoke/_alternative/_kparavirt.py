# SPDX-License-Identifier: GPL-2.0-only
"""``apply_paravirt`` over a real kernel's flat memory, for the kernel
lines that still have ``.parainstructions`` (6.1; 6.12 turned these sites
into alternatives with ``ALT_FLAG_DIRECT_CALL``).

Each site names a ``pv_ops`` slot (its ``type`` is the slot's index in the
structure seen as an array of pointers) and its length.  The site becomes a
direct ``CALL`` to the function the slot holds when patching runs (read
from the data snapshot, or the image's static initialiser), nothing at all
when it holds ``_paravirt_nop``, a ``CALL paravirt_BUG`` when it is NULL;
the rest of the site is NOPs (the line's ``add_nops``).  Rules learnt from
6.1's arch/x86/kernel/alternative.c and paravirt.c; the code is our own.
"""

from __future__ import annotations

from typing import Callable

from ..images._tables_real import ParaSite
from ._code import CALL, rel32
from ._kpasses import TableStats
from ._reloc import add_nops
from ._ktext import KernelBootError, KernelText

__all__ = ["apply_paravirt_k"]

MAX_PATCH_LEN = 255 - 1


def apply_paravirt_k(kt: KernelText, sites: list[ParaSite],
                     dbg: Callable[[str], None] | None = None) -> TableStats:
    st = TableStats(entries=len(sites))
    pv_ops = kt.sym("pv_ops")
    nop = kt.opt("_paravirt_nop")
    bug = kt.opt("paravirt_BUG")
    lo, hi = kt.base, kt.base + len(kt.buf)
    for p in sites:
        if p.len > MAX_PATCH_LEN:
            raise KernelBootError(f".parainstructions {p.index}: len {p.len} > {MAX_PATCH_LEN}")
        if not lo <= p.instr < hi - p.len:
            raise KernelBootError(f".parainstructions {p.index}: site {p.instr:#x} outside "
                                  f"_text.._end")
        fn = kt.data_u64(pv_ops + 8 * p.type)
        if fn == 0:
            if bug is None:
                raise KernelBootError("a NULL pv_ops slot and no paravirt_BUG in the image")
            fn = bug
        if fn == nop:
            code = b""
        else:
            code = rel32(CALL, p.instr, fn)
        if len(code) > p.len:
            raise KernelBootError(f".parainstructions {p.index} at {kt.describe(p.instr)}: "
                                  f"a {len(code)}-byte call does not fit {p.len} bytes")
        b = bytearray(code) + bytearray(p.len - len(code))
        add_nops(b, len(code), p.len - len(code), kt.line)
        if dbg:
            dbg(f"paravirt at: {kt.describe(p.instr)} ({p.instr:#x}) type {p.type} len "
                f"{p.len} -> {kt.describe(fn) if code else 'nop'}: {bytes(b).hex(' ')}")
        st.applied += 1
        st.changed += kt.write(".parainstructions", p.instr, bytes(b))
    return st
