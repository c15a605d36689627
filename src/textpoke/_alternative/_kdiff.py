# SPDX-License-Identifier: GPL-2.0-only
"""Compare a patched kernel text with a reference (the kernel's own memory
after ``alternative_instructions()``): bytes differing per executable
section and, for each differing range, the symbol+offset and the table
sites that cover it -- what a kernel engineer needs to see why."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..images._tables import (alt_instr_table, jump_table, mcount_table, paravirt_table,
                                   s32_table, static_call_table)
from ._kboot import table_bounds
from ._ktext import KernelText

__all__ = ["DiffRange", "SiteIndex", "diff_sections", "diff_ranges"]


@dataclass
class DiffRange:
    start: int
    end: int
    where: str
    section: str
    ours: bytes
    ref: bytes
    sites: list[str]

    def as_dict(self) -> dict:
        return {"start": hex(self.start), "len": self.end - self.start, "where": self.where,
                "section": self.section, "ours": self.ours.hex(" "), "ref": self.ref.hex(" "),
                "sites": self.sites}


class SiteIndex:
    """Every table site as an interval [addr, addr+len) -> table name."""

    def __init__(self, kt: KernelText) -> None:
        buf, base = kt.buf, kt.base
        iv: list[tuple[int, int, str]] = []

        def rows(t: str, reader, *args) -> list:
            bounds = table_bounds(kt, t)
            return reader(buf, base, *bounds, *args) if bounds else []
        for a in rows(".retpoline_sites", s32_table):
            iv.append((a, a + 6, ".retpoline_sites"))
        for a in rows(".return_sites", s32_table):
            iv.append((a, a + 5, ".return_sites"))
        for a in rows(".call_sites", s32_table):
            iv.append((a, a + 5, ".call_sites"))
        for a in rows(".ibt_endbr_seal", s32_table):
            iv.append((a, a + 4, ".ibt_endbr_seal"))
        for a in rows(".smp_locks", s32_table):
            iv.append((a, a + 1, ".smp_locks"))
        for p in rows(".parainstructions", paravirt_table):
            iv.append((p.instr, p.instr + max(p.len, 1), f".parainstructions type={p.type}"))
        for e in rows(".altinstructions", alt_instr_table, kt.line.alt_layout):
            iv.append((e.instr, e.instr + max(e.instrlen, 1), f".altinstructions[{e.index}]"
                       f" cpuid={e.cpuid >> 5}*32+{e.cpuid & 31} flags={e.flags:#x}"))
        for j in rows("__jump_table", jump_table):
            iv.append((j.code, j.code + 5, f"__jump_table key={kt.describe(j.key)}"))
        for s in rows(".static_call_sites", static_call_table):
            iv.append((s.addr, s.addr + 6, f".static_call_sites key={kt.describe(s.key)}"
                       + (" tail" if s.tail else "")))
        for m in rows("__mcount_loc", mcount_table):
            if m:
                iv.append((m, m + 5, "__mcount_loc"))
        iv.sort()
        self.iv = iv
        self.starts = [x[0] for x in iv]
        self.maxlen = 255

    def covering(self, lo: int, hi: int) -> list[str]:
        i = bisect.bisect_left(self.starts, lo - self.maxlen)
        out = []
        while i < len(self.iv) and self.iv[i][0] < hi:
            a, e, name = self.iv[i]
            if e > lo:
                out.append(f"{name} @{a:#x}")
            i += 1
        return out


def diff_sections(kt: KernelText, ref: bytes) -> dict[str, int]:
    """Bytes differing per executable section."""
    out = {}
    for name, lo, hi in kt.exec_ranges:
        a = kt.buf[lo - kt.base:hi - kt.base]
        b = ref[lo - kt.base:hi - kt.base]
        out[name] = 0 if a == b else sum(1 for x, y in zip(a, b) if x != y)
    return out


def diff_ranges(kt: KernelText, ref: bytes, index: SiteIndex | None = None, gap: int = 4,
                limit: int = 1000) -> list[DiffRange]:
    """Differing byte ranges (merged across gaps of < *gap* equal bytes),
    named by symbol and covering sites."""
    out: list[DiffRange] = []
    for name, lo, hi in kt.exec_ranges:
        a = kt.buf[lo - kt.base:hi - kt.base]
        b = ref[lo - kt.base:hi - kt.base]
        if a == b:
            continue
        i, n = 0, len(a)
        # skip equal 4 KiB blocks quickly
        while i < n and len(out) < limit:
            j = min(n, i + 4096)
            if a[i:j] == b[i:j]:
                i = j
                continue
            while i < j and a[i] == b[i]:
                i += 1
            if i == j:
                continue
            s = i
            e = i + 1
            while e < n and (a[e] != b[e] or any(a[k] != b[k] for k in range(e, min(n, e + gap)))):
                e += 1
            start, end = lo + s, lo + e
            out.append(DiffRange(start, end, kt.describe(start), name, bytes(a[s:e]),
                                 bytes(b[s:e]),
                                 index.covering(start, end) if index else []))
            i = e
    return out
