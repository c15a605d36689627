# SPDX-License-Identifier: GPL-2.0-only
"""``ftrace_init`` (Linux 6.12, x86): every ``__mcount_loc`` address in
core or init text holding ``call __fentry__`` becomes the ideal NOP5.

The table is sorted at build time (``BUILDTIME_MCOUNT_SORT``); entries of 0
(linker padding) and addresses outside ``_stext.._etext`` and
``_sinittext.._einittext`` (discarded weak functions) are skipped.  Each
site's bytes are verified first; the first mismatch is an ``ftrace_bug``
that stops the update, so no later site is touched -- as in the kernel.
Rules learnt from ``kernel/trace/ftrace.c`` and
``arch/x86/kernel/ftrace.c``; the code is our own.
"""

from __future__ import annotations

from .._alternative._kpasses import CALL, TableStats
from .._alternative._ktext import KernelText
from .._core._insn import x86_nops

__all__ = ["ftrace_init"]


def ftrace_init(kt: KernelText, locs: list[int]) -> TableStats:
    st = TableStats(entries=len(locs))
    ranges = ((kt.sym("_stext"), kt.sym("_etext")),
              (kt.sym("_sinittext"), kt.sym("_einittext")))
    fentry = kt.sym("__fentry__")
    nop5 = x86_nops[5]
    buf, base = kt.buf, kt.base
    (a0, a1), (b0, b1) = ranges
    for addr in locs:
        if not addr or not (a0 <= addr < a1 or b0 <= addr < b1):
            st.skipped += 1
            continue
        o = addr - base
        if buf[o] != CALL or addr + 5 + int.from_bytes(buf[o + 1:o + 5], "little",
                                                       signed=True) != fentry:
            st.note(f"ftrace_bug at {kt.describe(addr)}: {bytes(buf[o:o + 5]).hex(' ')}; "
                    "update stopped")
            break
        st.applied += 1
        st.changed += kt.write("__mcount_loc", addr, nop5)
    return st
