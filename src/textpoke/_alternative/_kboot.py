# SPDX-License-Identifier: GPL-2.0-only
"""What a real kernel's boot-time patching works on and returns: the text
buffer of a loaded image (:func:`kernel_text_of`), where each table lies
(:data:`TABLE_BOUNDS`) and the result of a boot (:class:`KernelBoot`).

The passes themselves run in ``start_kernel``'s order in
:func:`textpoke.kernel.boot_kernel`, one layer up: that order includes the
clients' init passes (jump labels, static calls, ftrace), and this package
is below the clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..images._lines import LINE_612
from ._kpasses import BootOptions
from ._ktext import CpuCaps, KernelBootError, KernelText

__all__ = ["KernelBoot", "kernel_text_of", "table_bounds", "TABLE_BOUNDS"]

#: table -> (start symbol, end symbol)
TABLE_BOUNDS = {
    ".static_call_sites": ("__start_static_call_sites", "__stop_static_call_sites"),
    "__jump_table": ("__start___jump_table", "__stop___jump_table"),
    "__mcount_loc": ("__start_mcount_loc", "__stop_mcount_loc"),
    ".retpoline_sites": ("__retpoline_sites", "__retpoline_sites_end"),
    ".return_sites": ("__return_sites", "__return_sites_end"),
    ".altinstructions": ("__alt_instructions", "__alt_instructions_end"),
    ".call_sites": ("__call_sites", "__call_sites_end"),
    ".ibt_endbr_seal": ("__ibt_endbr_seal", "__ibt_endbr_seal_end"),
    ".smp_locks": ("__smp_locks", "__smp_locks_end"),
    ".parainstructions": ("__parainstructions", "__parainstructions_end"),
}


@dataclass
class KernelBoot:
    kt: KernelText
    caps: CpuCaps
    opts: BootOptions
    stats: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    debug: list[str] = field(default_factory=list)
    its_thunks: list[tuple[int, int]] = field(default_factory=list)
    uniproc: bool = False
    early: Any = None               # the EarlyState the model derived, if used

    def as_dict(self) -> dict[str, Any]:
        return {"tables": self.stats, "timings": {k: round(v, 4) for k, v in self.timings.items()},
                "uniproc_patched": self.uniproc,
                **({"early_state": self.early.as_dict()} if self.early is not None else {}),
                "return_thunk": self.opts.return_thunk if isinstance(self.opts.return_thunk, str)
                else hex(self.opts.return_thunk)}


def kernel_text_of(image: Any, *, data: bytes | None = None, record: bool = False) -> KernelText:
    """A :class:`KernelText` over a loaded real image (anything with
    ``memory``, ``text_start``, ``symbols`` and ``executable_sections()``)."""
    mem = bytearray(image.memory)
    ranges = [(s.name, s.addr, s.end) for s in image.executable_sections()]
    if data is not None and len(data) < len(mem):
        raise KernelBootError(f"data snapshot of {len(data)} bytes is shorter than _text.._end "
                              f"({len(mem)})")
    line = getattr(image, "line", None) or LINE_612
    return KernelText(mem, image.text_start, image.symbols, ranges, data=data, record=record,
                      line=line)


def table_bounds(kt: KernelText, table: str) -> tuple[int, int] | None:
    """The table's [start, stop) from its symbols, or None when the image's
    kernel line (or its build) has no such table."""
    spec = kt.line.tables.get(table)
    if spec is None:
        return None
    a, b = kt.opt(spec[1]), kt.opt(spec[2])
    if a is None or b is None:
        return None
    return a, b
