# SPDX-License-Identifier: GPL-2.0-only
"""``runtime_const_init``: the immediates of ``runtime_const_ptr()`` (a
``mov $imm64``) and ``runtime_const_shift_right_32()`` (a shift's imm8)
listed in ``runtime_ptr_<sym>`` / ``runtime_shift_<sym>`` take the value
of ``<sym>`` once the kernel has computed it (``dentry_hashtable`` and
``d_hash_shift`` in ``dcache_init_early``, before ``alternative_instructions``).

The value is run-time state: it is read from a data snapshot (``kt.data``)
and a variable still 0 there has not been initialised yet (its
``runtime_const_init`` comes later, e.g. ``USER_PTR_MAX`` right after
``alternative_instructions``), so its sites are left alone.
"""

from __future__ import annotations

from ..images._symbols import with_prefix
from ..images._tables import s32_table
from ._kpasses import TableStats
from ._ktext import KernelText

__all__ = ["runtime_const_sync"]


def runtime_const_sync(kt: KernelText) -> TableStats:
    st = TableStats()
    if kt.data is None:
        return st
    for kind, width in (("ptr", 8), ("shift", 1)):
        pre = f"__start_runtime_{kind}_"
        for name, start in with_prefix(kt.symbols, pre):
            var = name[len(pre):]
            stop = kt.opt(f"__stop_runtime_{kind}_{var}")
            addr = kt.opt(var)
            if stop is None or addr is None:
                continue
            sites = s32_table(kt.buf, kt.base, start, stop, name)
            st.entries += len(sites)
            val = kt.data_u64(addr) if width == 8 else kt.data_u64(addr) & 0xFFFFFFFF
            if not val:
                st.skipped += len(sites)
                continue
            for a in sites:
                st.applied += 1
                st.changed += kt.write(f"runtime_{kind}_{var}", a,
                                       (val & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))
    return st
