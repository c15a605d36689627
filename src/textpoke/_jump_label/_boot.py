# SPDX-License-Identifier: GPL-2.0-only
"""``jump_label_init`` on x86 (Linux 6.12).

The kernel is built with ``HAVE_JUMP_LABEL_HACK``: objtool already wrote
each site as the NOP or the JMP its key's initial state asks for, and x86
has no ``arch_jump_label_transform_static``, so ``jump_label_init`` writes
nothing: it sorts the table, marks init entries and links keys to their
entries.  This module checks that every site holds one of its two forms
(2-byte ``66 90``/``eb rel8`` or 5-byte NOP5/``e9 rel32``) and reports
the ones that do not match the key's initial state.

:func:`jump_label_sync` does what ``static_branch_enable/disable`` did to
the sites between boot and a snapshot of the kernel's data (``kt.data``):
each site in kernel text (core and init; ``.exit.text`` is never updated)
takes the form of its key's current ``enabled`` count.  Rules learnt from
``kernel/jump_label.c`` and ``arch/x86/kernel/jump_label.c``; the code is
our own.
"""

from __future__ import annotations

from operator import attrgetter

from .._alternative._kpasses import JMP8, JMP32, TableStats
from .._alternative._ktext import KernelBootError, KernelText
from .._core._insn import x86_nops
from ..images._tables import JumpEntry

__all__ = ["jump_label_init", "jump_label_sync", "jump_label_code", "entry_size"]


def entry_size(kt: KernelText, e: JumpEntry) -> int:
    """``arch_jump_entry_size``: the length of the instruction at the site."""
    b = kt.read(e.code, 5)
    if b[0] == JMP8 or b[:2] == x86_nops[2]:
        return 2
    if b[0] == JMP32 or b == x86_nops[5]:
        return 5
    raise KernelBootError(f"jump label at {kt.describe(e.code)}: {b.hex(' ')} is neither a "
                          "2- nor a 5-byte NOP/JMP")


def jump_label_code(kt: KernelText, e: JumpEntry, jmp: bool) -> bytes:
    n = entry_size(kt, e)
    if not jmp:
        return x86_nops[n]
    if n == 2:
        rel = e.target - (e.code + 2)
        if not -128 <= rel < 128:
            raise KernelBootError(f"jump label at {kt.describe(e.code)}: JMP8 cannot reach")
        return bytes([JMP8, rel & 0xFF])
    return bytes([JMP32]) + ((e.target - (e.code + 5)) & 0xFFFFFFFF).to_bytes(4, "little")


def _enabled(kt: KernelText, key: int) -> bool:
    return kt.data_s32(key) > 0


def jump_label_init(kt: KernelText, entries: list[JumpEntry]) -> TableStats:
    """Writes nothing (x86, 6.12); counts sites whose bytes disagree with
    their key's initial state in the image."""
    st = TableStats(entries=len(entries))
    saved, kt.data = kt.data, None
    try:
        for e in entries:
            want = jump_label_code(kt, e, _enabled(kt, e.key) != e.branch)
            if kt.read(e.code, len(want)) != want:
                st.note("site differs from its key's initial state")
    finally:
        kt.data = saved
    return st


def jump_label_sync(kt: KernelText, entries: list[JumpEntry],
                    text_ranges: list[tuple[int, int]]) -> TableStats:
    st = TableStats(entries=len(entries))
    for e in kt.synced(entries, attrgetter("code"), text_ranges):
        want = jump_label_code(kt, e, _enabled(kt, e.key) != e.branch)
        st.applied += 1
        st.changed += kt.write("__jump_table", e.code, want)
    return st
