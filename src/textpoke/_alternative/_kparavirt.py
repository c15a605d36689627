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

from typing import Sequence

from .._errors import BadAddressError
from ..images._tables import ParaSite
from ._code import CALL, rel32
from ._ktext import KernelBootError, TextBuffer
from ._records import PassLog
from ._reloc import add_nops

__all__ = ["paravirt"]

MAX_PATCH_LEN = 255 - 1


def paravirt(tb: TextBuffer, sites: Sequence[ParaSite], log: PassLog) -> None:
    """The ``.parainstructions`` pass over *tb*."""
    st, dbg = log.stats, log.dbg
    pv_ops = tb.sym("pv_ops")
    nop = tb.opt("_paravirt_nop")
    bug = tb.opt("paravirt_BUG")
    for p in sites:
        if p.len > MAX_PATCH_LEN:
            raise KernelBootError(f".parainstructions {p.index}: len {p.len} > {MAX_PATCH_LEN}")
        try:
            tb.read(p.instr, p.len + 1)
        except (KernelBootError, BadAddressError):
            raise KernelBootError(f".parainstructions {p.index}: site {p.instr:#x} outside "
                                  f"_text.._end") from None
        fn = tb.data_u64(pv_ops + 8 * p.type)
        if fn == 0:
            if bug is None:
                raise KernelBootError("a NULL pv_ops slot and no paravirt_BUG in the image")
            fn = bug
        if fn == nop:
            code = b""
        else:
            code = rel32(CALL, p.instr, fn)
        if len(code) > p.len:
            raise KernelBootError(f".parainstructions {p.index} at {tb.describe(p.instr)}: "
                                  f"a {len(code)}-byte call does not fit {p.len} bytes")
        b = bytearray(code) + bytearray(p.len - len(code))
        add_nops(b, len(code), p.len - len(code), tb.line)
        if dbg.mask:
            dbg(dbg.mask, f"paravirt at: {tb.describe(p.instr)} ({p.instr:#x}) type {p.type} "
                          f"len {p.len} -> {tb.describe(fn) if code else 'nop'}: "
                          f"{bytes(b).hex(' ')}", p.instr)
        st.applied += 1
        st.changed += tb.write(".parainstructions", p.instr, bytes(b))
