# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time text patching of a real kernel image, in ``start_kernel``'s
order (Linux 6.12):

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

from .._alternative._callthunks import callthunks_patch_builtin_calls
from .._alternative._kalt import apply_alternatives_k, apply_seal_endbr_k, smp_unlock_k
from .._alternative._kboot import KernelBoot, table_bounds as _bounds
from .._alternative._kearly import EarlyBoot, early_snapshot
from .._alternative._kpasses import BootOptions, TableStats, apply_returns_k
from .._alternative._kretpoline import ItsThunks, apply_retpolines_k
from .._alternative._ktext import CpuCaps, KernelText
from .._alternative._runtime_const import runtime_const_sync
from .._ftrace import ftrace_init
from .._jump_label import jump_label_init, jump_label_sync
from .._static_call import static_call_init, static_call_sync
from ..images._tables_real import (alt_instr_table, jump_table, mcount_table, s32_table,
                                   static_call_table)

__all__ = ["boot_kernel"]


def boot_kernel(kt: KernelText, caps: CpuCaps, opts: BootOptions | None = None, *,
                debug_alternative: bool = False, early: EarlyBoot | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> KernelBoot:
    """Run the boot-time passes on *kt* in place; returns counts per table.

    Without a data snapshot in *kt*, *early* (the early-boot inputs) makes
    one from the image: :func:`._kearly.early_snapshot`."""
    opts = opts or BootOptions()
    res = KernelBoot(kt, caps, opts)
    if kt.data is None and early is not None:
        kt.data, res.early = early_snapshot(kt, caps, early)
    dbg = res.debug.append if debug_alternative else None
    steps = ["tables", "jump_label_init", "static_call_init", "ftrace_init", "runtime_sync",
             "apply_retpolines", "apply_returns", "apply_alternatives", "callthunks",
             "apply_seal_endbr", "smp_locks"]
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

    def tables() -> dict[str, Any]:
        t: dict[str, Any] = {}
        t["sc"] = static_call_table(buf, base, *_bounds(kt, ".static_call_sites"))
        t["jl"] = jump_table(buf, base, *_bounds(kt, "__jump_table"))
        t["mc"] = mcount_table(buf, base, *_bounds(kt, "__mcount_loc"))
        t["rp"] = s32_table(buf, base, *_bounds(kt, ".retpoline_sites"), ".retpoline_sites")
        t["rt"] = s32_table(buf, base, *_bounds(kt, ".return_sites"), ".return_sites")
        t["alt"] = alt_instr_table(buf, base, *_bounds(kt, ".altinstructions"))
        t["cs"] = s32_table(buf, base, *_bounds(kt, ".call_sites"), ".call_sites")
        t["ibt"] = s32_table(buf, base, *_bounds(kt, ".ibt_endbr_seal"), ".ibt_endbr_seal")
        t["lk"] = s32_table(buf, base, *_bounds(kt, ".smp_locks"), ".smp_locks", keep_zero=True)
        return t

    t = step("tables", tables)
    kernel_text = [(kt.sym("_stext"), kt.sym("_etext")),
                   (kt.sym("_sinittext"), kt.sym("_einittext"))]
    s = res.stats
    s["__jump_table"] = step("jump_label_init", lambda: jump_label_init(kt, t["jl"])).as_dict()
    s[".static_call_sites"] = step("static_call_init",
                                   lambda: static_call_init(kt, t["sc"])).as_dict()
    s["__mcount_loc"] = step("ftrace_init", lambda: ftrace_init(kt, t["mc"])).as_dict()
    if kt.data is not None:
        def sync() -> None:
            s["__jump_table(sync)"] = jump_label_sync(kt, t["jl"], kernel_text).as_dict()
            s[".static_call_sites(sync)"] = static_call_sync(kt, t["sc"], kernel_text).as_dict()
            s["runtime_const(sync)"] = runtime_const_sync(kt).as_dict()
        step("runtime_sync", sync)
    its = ItsThunks(kt, opts.its_pages)
    s[".retpoline_sites"] = step("apply_retpolines", lambda: apply_retpolines_k(
        kt, t["rp"], caps, opts, its, dbg)).as_dict()
    res.its_thunks = its.allocated
    s[".return_sites"] = step("apply_returns",
                              lambda: apply_returns_k(kt, t["rt"], caps, opts, dbg)).as_dict()
    s[".altinstructions"] = step("apply_alternatives",
                                 lambda: apply_alternatives_k(kt, t["alt"], caps, dbg)).as_dict()
    ct = step("callthunks", lambda: callthunks_patch_builtin_calls(kt, t["cs"], t["alt"], caps,
                                                                    dbg))
    if ct is None:
        s[".call_sites"] = TableStats(entries=len(t["cs"])).as_dict()
    else:
        d = ct[0].as_dict()
        d["thunks"] = ct[1]
        s[".call_sites"] = d
    s[".ibt_endbr_seal"] = step("apply_seal_endbr",
                                lambda: apply_seal_endbr_k(kt, t["ibt"], dbg)).as_dict()
    up = not opts.noreplace_smp and (opts.ncpus == 1 or (opts.setup_max_cpus is not None
                                                         and opts.setup_max_cpus <= 1))
    res.uniproc = up
    if up:
        s[".smp_locks"] = step("smp_locks", lambda: smp_unlock_k(
            kt, t["lk"], (kt.sym("_text"), kt.sym("_etext")), dbg)).as_dict()
    else:
        s[".smp_locks"] = TableStats(entries=len(t["lk"])).as_dict()
    res.timings["total"] = time.perf_counter() - t_all
    if progress:
        progress("done", len(steps), len(steps))
    return res
