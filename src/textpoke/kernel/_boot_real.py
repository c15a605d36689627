# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time text patching of a real kernel image, in ``start_kernel``'s
order.  The passes and their order are the image's kernel line's
(:class:`~textpoke.images._lines.KernelLine`; 6.1 runs ``apply_paravirt``
before the retpolines and has no call-depth thunks).  Linux 6.12:

``setup_arch``: ``jump_label_init``, ``static_call_init`` -> (``start_kernel``)
``ftrace_init`` -> ``arch_cpu_finalize_init``: ``cpu_select_mitigations``
... ``alternative_instructions()``: ``apply_retpolines``, ``apply_returns``,
``apply_alternatives``, ``callthunks_patch_builtin_calls``,
``apply_seal_endbr``, and, for a uniprocessor boot, the SMP-lock unlock
over ``_text.._etext``.

(The INT3 and relocation self-tests execute code and write nothing; FineIBT
is not configured in the images this targets -- no ``CFI_CLANG``.)

With a data snapshot (``data=``, the kernel's memory at the moment
``alternative_instructions()`` starts) the passes read ``pv_ops``, static
call keys and static keys as the kernel had them then, and the jump-label
and static-call sites that run-time updates changed before that point are
brought to the same state first.

This lives in the kernel layer, above both the alternatives passes and the
clients, because the order calls into both.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .._alternative._kboot import KernelBoot, table_bounds as _bounds
from .._alternative._kearly import EarlyBoot, early_snapshot
from .._alternative._kpasses import F_CALL_DEPTH, BootOptions, TableStats
from .._alternative._ktext import CpuCaps, KernelText
from .._alternative._passes import TEXT_PASSES, TextPasses
from .._alternative._records import DA_ALL, DebugLog, PassLog
from .._alternative._smp_locks import DS_PREFIX, LOCK_PREFIX, lock_prefixes
from .._alternative._runtime_const import runtime_const_sync
from .._ftrace import ftrace_init
from .._jump_label import jump_label_init, jump_label_sync
from .._static_call import static_call_init, static_call_sync
from ..images._tables import (alt_instr_table, jump_table, mcount_table, paravirt_table,
                                   s32_count, s32_table, static_call_table)

__all__ = ["boot_kernel"]


def boot_kernel(kt: KernelText, caps: CpuCaps, opts: BootOptions | None = None, *,
                debug_alternative: bool = False, early: EarlyBoot | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> KernelBoot:
    """Run the boot-time passes of *kt*'s kernel line on *kt* in place, in
    that line's order (``KernelLine.passes``); returns counts per table.

    *caps* are read under the line's feature numbering.  Without a data
    snapshot in *kt*, *early* (the early-boot inputs) makes one from the
    image: :func:`._kearly.early_snapshot`."""
    opts = opts or BootOptions()
    line = kt.line
    caps = caps.for_line(line)
    res = KernelBoot(kt, caps, opts)
    if kt.data is None and early is not None:
        kt.data, res.early = early_snapshot(kt, caps, early)
    dlog = DebugLog(DA_ALL if debug_alternative else 0)
    steps = ["tables", *line.passes]
    t_all = time.perf_counter()

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if progress:
            progress(name, steps.index(name), len(steps))
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            res.timings[name] = time.perf_counter() - t0

    buf, base = kt.buf, kt.base

    def table(name: str, reader: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        bounds = _bounds(kt, name)
        return reader(buf, base, *bounds, *args, **kw) if bounds else []

    def tables() -> dict[str, Any]:
        t: dict[str, Any] = {}
        t["sc"] = table(".static_call_sites", static_call_table)
        t["jl"] = table("__jump_table", jump_table)
        t["mc"] = table("__mcount_loc", mcount_table)
        t["pv"] = table(".parainstructions", paravirt_table)
        t["rp"] = table(".retpoline_sites", s32_table, ".retpoline_sites")
        t["rt"] = table(".return_sites", s32_table, ".return_sites")
        t["alt"] = table(".altinstructions", alt_instr_table, line.alt_layout)
        # .call_sites (~230,000 entries) is read as a list only for a CPU
        # with call-depth tracking; otherwise its count is all that is shown
        if caps.has(F_CALL_DEPTH):
            t["cs"] = table(".call_sites", s32_table, ".call_sites")
        else:
            t["cs"] = None
            t["cs_count"] = table(".call_sites", s32_count, ".call_sites") or 0
        t["ibt"] = table(".ibt_endbr_seal", s32_table, ".ibt_endbr_seal")
        t["lk"] = table(".smp_locks", s32_table, ".smp_locks", keep_zero=True)
        return t

    t = step("tables", tables)
    kernel_text = [(kt.sym("_stext"), kt.sym("_etext")),
                   (kt.sym("_sinittext"), kt.sym("_einittext"))]
    s = res.stats
    # the text passes of alternative_instructions(), the bundled image's too
    text = TextPasses(kt, {".parainstructions": t["pv"], ".retpoline_sites": t["rp"],
                           ".return_sites": t["rt"], ".altinstructions": t["alt"],
                           ".call_sites": t["cs"], ".ibt_endbr_seal": t["ibt"]},
                      caps, opts, dlog)

    def put(name: str, fn: Callable[[], TableStats]) -> Callable[[], None]:
        return lambda: s.__setitem__(name, fn().as_dict())

    def sync() -> None:
        s["__jump_table(sync)"] = jump_label_sync(kt, t["jl"], kernel_text).as_dict()
        s[".static_call_sites(sync)"] = static_call_sync(kt, t["sc"], kernel_text).as_dict()
        s["runtime_const(sync)"] = runtime_const_sync(kt).as_dict()

    def text_pass(name: str) -> Callable[[], None]:
        return lambda: s.__setitem__(TEXT_PASSES[name], text.run(name).stats.as_dict())

    def retpolines() -> None:
        text_pass("apply_retpolines")()
        res.its_thunks = text.its.allocated

    def callthunks() -> None:
        if t["cs"] is None:                 # no call-depth tracking: counted only
            s[".call_sites"] = TableStats(entries=t["cs_count"]).as_dict()
            return
        d = text.run("callthunks").stats.as_dict()
        if caps.has(F_CALL_DEPTH):
            d["thunks"] = text.thunks_made
        s[".call_sites"] = d

    def smp_locks() -> None:
        up = not opts.noreplace_smp and (opts.ncpus == 1 or (opts.setup_max_cpus is not None
                                                             and opts.setup_max_cpus <= 1))
        res.uniproc = up
        lg = PassLog(len(t["lk"]), kt.describe, dlog)
        if up:
            lock_prefixes(kt, t["lk"], (kt.sym("_text"), kt.sym("_etext")), DS_PREFIX,
                          LOCK_PREFIX, lg)
        s[".smp_locks"] = lg.stats.as_dict()

    passes: dict[str, Callable[[], None]] = {
        "jump_label_init": put("__jump_table", lambda: jump_label_init(kt, t["jl"])),
        "static_call_init": put(".static_call_sites", lambda: static_call_init(kt, t["sc"])),
        "ftrace_init": put("__mcount_loc", lambda: ftrace_init(kt, t["mc"])),
        "runtime_sync": sync,
        **{name: text_pass(name) for name in TEXT_PASSES},
        "apply_retpolines": retpolines,
        "callthunks": callthunks,
        "smp_locks": smp_locks,
    }
    try:
        for name in line.passes:
            if name == "runtime_sync" and kt.data is None:
                continue
            step(name, passes[name])
    finally:
        res.debug[:] = dlog.lines()
    res.timings["total"] = time.perf_counter() - t_all
    if progress:
        progress("done", len(steps), len(steps))
    return res
