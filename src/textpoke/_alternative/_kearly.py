# SPDX-License-Identifier: GPL-2.0-only
"""The run-time state early boot leaves behind when
``alternative_instructions()`` starts (Linux 6.12 and 6.1, x86-64: what
differs is the image's kernel line's data -- 6.1 has no APIC or LSM static
calls and no runtime constants, so those parts find nothing to set), derived from
what a user knows: the image and its config, the kernel command line, the
CPU's capability words, the number of CPUs and the memory size.

Without a data snapshot (``--data``), :func:`early_snapshot` builds one: a
copy of the image's memory with the static call keys, static keys and
runtime constants that code running before ``alternative_instructions()``
sets written the way it sets them.  The sync passes then bring the sites
to that state exactly as they do with a real snapshot.

What is modelled (rules learnt from the 6.12 sources; the code is ours):

* preemption model (``preempt_dynamic_init`` / ``preempt=``): the five
  preempt-dynamic static calls, from ``preempt=`` or the config's default
  (``CONFIG_PREEMPT_NONE``/``_VOLUNTARY``/``_PREEMPT``, and the -rt build's
  ``CONFIG_PREEMPT_LAZY``: full's calls plus the ``sk_dynamic_preempt_lazy``
  and ``_promote`` static keys);
* the APIC driver's callbacks (``apic_call_*``), read from the driver's
  ``struct apic`` in the image's data: ``apic_physflat`` unless the CPU has
  x2APIC (then the x2APIC driver, which also depends on interrupt
  remapping, the hypervisor and the ACPI tables: ``--apic`` chooses);
* ``x86_idle`` (``select_idle_routine``: ``idle=``, MWAIT -- HLT under a
  hypervisor, whose CPUID leaf 5 has no C1 sub-state --, TDX);
* the early lockdown LSM's ``locked_down`` hook (slot 0 and its key);
* static keys: ``__use_tsc``, ``cr_pinning``, ``sched_clock_running``,
  ``virt_spin_lock_key`` (hypervisor bit), ``crng_is_ready`` (RDRAND/RDSEED
  and ``random.trust_cpu``), ``init_on_alloc``/``init_on_free``/
  ``check_pages_enabled``, ``mmio_stale_data_clear``/``cpu_buf_idle_clear``;
* runtime constants: ``d_hash_shift`` from the memory size (and
  ``dhash_entries=``); ``dentry_hashtable`` only when given (it is the
  address memblock hands out, which depends on every earlier allocation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._ktext import CpuCaps, KernelBootError, KernelText

__all__ = ["EarlyBoot", "EarlyState", "early_snapshot", "read_config", "parse_size",
           "kernel_params", "dhash_shift", "APIC_DRIVERS", "PREEMPT_MODES"]

PREEMPT_MODES = ("none", "voluntary", "full", "lazy")
#: --apic name -> the image's struct apic symbol
APIC_DRIVERS = {"physflat": "apic_physflat", "x2apic_phys": "apic_x2apic_phys",
                "x2apic_cluster": "apic_x2apic_cluster", "noop": "apic_noop"}

# struct apic's callback offsets are the kernel line's (KernelLine.apic_slots):
# 6.12 calls them through static calls, 6.1 through plain pointers

# preempt-dynamic static call -> (function when enabled, when disabled; None = NULL)
_PREEMPT_CALLS = {
    "cond_resched": ("__cond_resched", "__static_call_return0"),
    "might_resched": ("__cond_resched", "__static_call_return0"),
    "preempt_schedule": ("preempt_schedule_thunk", None),
    "preempt_schedule_notrace": ("preempt_schedule_notrace_thunk", None),
    "irqentry_exit_cond_resched": ("raw_irqentry_exit_cond_resched", None),
}
_PREEMPT_ON = {"none": {"cond_resched"},
               "voluntary": {"cond_resched", "might_resched"},
               "full": {"preempt_schedule", "preempt_schedule_notrace",
                        "irqentry_exit_cond_resched"}}
# lazy preemption (the -rt build's CONFIG_PREEMPT_LAZY): full's static calls,
# plus the two static keys that defer a fair-class reschedule to the tick
_PREEMPT_ON["lazy"] = _PREEMPT_ON["full"]
_PREEMPT_KEYS = {"lazy": ("sk_dynamic_preempt_lazy", "sk_dynamic_preempt_promote")}

_PAGE = 4096


def parse_size(s: str) -> int:
    """``1G``, ``512M``, ``2048`` (MiB, as QEMU's -m), ``0x40000000``."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)i?[bB]?\s*", s or "")
    if not m:
        raise KernelBootError(f"not a memory size: {s!r} (e.g. 1G, 512M)")
    n = int(m.group(1), 0)
    unit = m.group(2).upper()
    if not unit and not m.group(1).startswith("0x"):
        unit = "M"
    return n << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def read_config(path: str | Path) -> dict[str, str]:
    cfg: dict[str, str] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        k, eq, v = line.partition("=")
        if eq and k.startswith("CONFIG_"):
            cfg[k] = v.strip().strip('"')
    return cfg


def kernel_params(cmdline: str) -> dict[str, str | None]:
    """The command line as the kernel's parameter parser sees it: names
    with ``-`` and ``_`` alike, the last occurrence winning."""
    out: dict[str, str | None] = {}
    for tok in cmdline.split():
        k, eq, v = tok.partition("=")
        out[k.replace("-", "_")] = v if eq else None
    return out


def _kstrtobool(v: str | None, default: bool) -> bool:
    if v is None:
        return default
    s = v.lower()
    if s[:1] in ("1", "y") or s in ("on",):
        return True
    if s[:1] in ("0", "n") or s in ("off",):
        return False
    return default


def dhash_shift(nr_kernel_pages: int, nr_all_pages: int, dhash_entries: int = 0) -> int:
    """``d_hash_shift`` as ``dcache_init_early`` leaves it: 32 minus the
    log2 of the dentry hash size ``alloc_large_system_hash`` picks
    (8-byte buckets, one per 2^13 bytes of low memory, adapting above 64G)."""
    bucket, scale = 8, 13
    n = dhash_entries
    if not n:
        n = -(-nr_kernel_pages // 256) * 256         # round up to 1 MiB of pages
        adapt = (64 << 30) // _PAGE
        while adapt < n:
            scale += 1
            adapt <<= 2
        n = n >> (scale - 12)
        if n * bucket < _PAGE:
            n = _PAGE // bucket
    n = 1 << (n - 1).bit_length() if n > 1 else 1
    mx = min(((nr_all_pages * _PAGE) >> 4) // bucket, 0x80000000)
    n = min(n, mx)
    return 32 - (n.bit_length() - 1)


@dataclass
class EarlyBoot:
    """The inputs of the early-boot model."""
    cmdline: str = ""
    ncpus: int = 1
    mem: int | None = None                 # RAM in bytes (QEMU's -m)
    config: dict[str, str] | None = None
    preempt: str | None = None             # overrides config and preempt=
    apic: str | None = None                # a key of APIC_DRIVERS
    dentry_hashtable: int | None = None
    smt: bool = False                      # SMT siblings active
    x86_idle: str | None = None            # overrides select_idle_routine ("none": NULL)


@dataclass
class EarlyState:
    """What the model decided: symbol -> value, and notes."""
    static_calls: dict[str, str | int | None] = field(default_factory=dict)
    static_keys: dict[str, int] = field(default_factory=dict)
    runtime: dict[str, int] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"choices": self.choices,
                "static_calls": {k: v if not isinstance(v, int) else hex(v)
                                 for k, v in self.static_calls.items()},
                "static_keys": self.static_keys,
                "runtime_const": {k: hex(v) for k, v in self.runtime.items()},
                "notes": self.notes}


def _preempt_mode(eb: EarlyBoot, params: dict, st: EarlyState) -> str:
    if eb.preempt:
        return eb.preempt
    v = params.get("preempt")
    if v in PREEMPT_MODES:
        return v
    cfg = eb.config
    if cfg is None:
        st.notes.append("no kernel config: preemption model taken as the image's static "
                        "default (full); give --config or --preempt")
        return "full"
    if cfg.get("CONFIG_PREEMPT_NONE") == "y":
        return "none"
    if cfg.get("CONFIG_PREEMPT_VOLUNTARY") == "y":
        return "voluntary"
    if cfg.get("CONFIG_PREEMPT_LAZY") == "y":
        return "lazy"
    return "full"


def _apic_driver(eb: EarlyBoot, caps: CpuCaps, params: dict, st: EarlyState) -> str:
    if eb.apic:
        return eb.apic
    if "disableapic" in params or "nolapic" in params or not caps.has("apic"):
        return "noop"
    if caps.has("x2apic") and "nox2apic" not in params:
        st.notes.append("x2APIC CPU: the x2APIC driver depends on interrupt remapping, the "
                        "hypervisor and the ACPI FADT; assumed x2apic_cluster (x2apic_phys "
                        "with x2apic_phys on the command line); --apic overrides")
        return "x2apic_phys" if "x2apic_phys" in params else "x2apic_cluster"
    return "physflat"


def early_state(kt: KernelText, caps: CpuCaps, eb: EarlyBoot) -> EarlyState:
    st = EarlyState()
    p = kernel_params(eb.cmdline)
    sc, sk = st.static_calls, st.static_keys
    has = kt.opt

    # -- preemption model
    if has("__SCK__preempt_schedule") is not None:
        mode = _preempt_mode(eb, p, st)
        st.choices["preempt"] = mode
        for name, (on, off) in _PREEMPT_CALLS.items():
            if has("__SCK__" + name) is not None:
                sc[name] = on if name in _PREEMPT_ON[mode] else off
        for m, keys in _PREEMPT_KEYS.items():
            for k in keys:
                if has(k) is not None:
                    sk[k] = int(m == mode)

    # -- APIC driver
    drv = _apic_driver(eb, caps, p, st)
    st.choices["apic"] = drv
    sym = APIC_DRIVERS.get(drv)
    if sym is None or has(sym) is None:
        raise KernelBootError(f"no APIC driver {drv!r} in the image")
    a = kt.sym(sym)
    slots, name_off = kt.line.apic_slots, kt.line.apic_name_offset
    if slots is not None and name_off is not None:
        name_ptr = kt.data_u64(a + name_off)
        eoi = kt.data_u64(a)
        for cb, off in slots.items():
            if has("__SCK__apic_call_" + cb) is None:
                continue
            f = kt.data_u64(a + off)
            if cb == "native_eoi" and not f:
                f = eoi
            sc["apic_call_" + cb] = f or None
        if not name_ptr:
            raise KernelBootError(f"{sym}: no name: struct apic is not {kt.line.name}'s layout")

    # -- idle routine
    if has("__SCK__x86_idle") is not None:
        idle = p.get("idle")
        if eb.x86_idle:
            fn = None if eb.x86_idle == "none" else eb.x86_idle
        elif idle == "poll":
            fn = None
        elif idle is None and caps.has("mwait") and not caps.has("bug_monitor") \
                and not caps.has("bug_amd_apic_c1e") and not caps.has("hypervisor"):
            fn = "mwait_idle"
            st.notes.append("MWAIT CPU: mwait_idle assumed (CPUID leaf 5 reports a C1 "
                            "sub-state on real CPUs; --x86-idle overrides)")
        elif _feature(caps, "tdx_guest"):
            fn = "tdx_halt"
        else:
            # under a hypervisor (QEMU, TCG or KVM without cpu-pm) leaf 5 has
            # the MWAIT extensions but no C1 sub-state: HLT
            fn = "default_idle"
        sc["x86_idle"] = fn
        st.choices["x86_idle"] = fn

    # -- early LSMs: lockdown is the only early one 6.12 has
    e0, e1 = has("__start_early_lsm_info"), has("__end_early_lsm_info")
    if e0 is not None and e1 is not None and e1 > e0 and has("lockdown_is_locked_down") \
            and has("__SCK__lsm_static_call_locked_down_0") is not None:
        sc["lsm_static_call_locked_down_0"] = "lockdown_is_locked_down"
        sk["security_hook_active_locked_down_0"] = 1

    # -- static keys
    if caps.has("tsc") and "notsc" not in p:
        sk["__use_tsc"] = 1
    sk["cr_pinning"] = 1
    sk["sched_clock_running"] = 1
    if caps.has("hypervisor"):
        sk["virt_spin_lock_key"] = 1
    if (caps.has("rdrand") or caps.has("rdseed")) and \
            _kstrtobool(p.get("random.trust_cpu"), True):
        sk["crng_is_ready"] = 1
    cfg = eb.config or {}
    if eb.config is not None:
        ioa = _kstrtobool(p.get("init_on_alloc"), cfg.get("CONFIG_INIT_ON_ALLOC_DEFAULT_ON") == "y")
        iof = _kstrtobool(p.get("init_on_free"), cfg.get("CONFIG_INIT_ON_FREE_DEFAULT_ON") == "y")
        sk["init_on_alloc"] = int(ioa)
        sk["init_on_free"] = int(iof)
        if (ioa or iof) and cfg.get("CONFIG_DEBUG_VM") != "y":
            sk["check_pages_enabled"] = 1
    mit_off = p.get("mitigations") == "off"
    mmio_on = (caps.has("bug_mmio_stale_data") and not caps.has("bug_mmio_unknown")
               and not mit_off and p.get("mmio_stale_data") != "off")
    if mmio_on:
        sk["mmio_stale_data_clear"] = 0 if caps.has("clear_cpu_buf") else 1
        sk["cpu_buf_idle_clear"] = 1
        st.notes.append("MMIO stale data: cpu_buf_idle_clear assumes ARCH_CAP_FBSDP_NO clear "
                        "(an MSR bit, not a capability word)")
    if caps.has("bug_msbds_only"):
        if eb.smt:
            sk["cpu_buf_idle_clear"] = 1
        elif not mmio_on:
            sk["cpu_buf_idle_clear"] = 0

    # -- runtime constants
    if has("d_hash_shift") is not None:
        dh = p.get("dhash_entries")
        try:
            dhe = int(dh, 0) if dh else 0
        except ValueError:
            dhe = 0
        if eb.mem is not None or dhe:
            pages = (eb.mem or 0) // _PAGE
            # QEMU/PC layout: page 0 and 640K..1M are not RAM, the BIOS keeps
            # the top 128K below 4G; the kernel image is reserved
            all_pages = max(pages - 130, 1)
            image = (kt.sym("_end") - kt.sym("_text")) // _PAGE if has("_end") else 0
            nr_kernel = max(all_pages - image, 1)
            st.runtime["d_hash_shift"] = dhash_shift(nr_kernel, all_pages, dhe)
        else:
            st.notes.append("no memory size (--mem): d_hash_shift left as in the image")
        if eb.dentry_hashtable is not None:
            st.runtime["dentry_hashtable"] = eb.dentry_hashtable
        else:
            st.notes.append("dentry_hashtable (a memblock address) not given "
                            "(--dentry-hashtable): its runtime_const_ptr sites keep the "
                            "image's placeholder")
    return st


def _feature(caps: CpuCaps, name: str) -> bool:
    try:
        return caps.has(name)
    except KernelBootError:
        return False


def early_snapshot(kt: KernelText, caps: CpuCaps, eb: EarlyBoot) -> tuple[bytearray, EarlyState]:
    """The image's memory with the early-boot state written into it: what
    ``kt.data`` would hold at ``alternative_instructions()``."""
    st = early_state(kt, caps, eb)
    snap = bytearray(kt.buf)

    def put(addr: int, val: int, n: int) -> None:
        o = addr - kt.base
        if o < 0 or o + n > len(snap):
            raise KernelBootError(f"early state write at {addr:#x} outside _text.._end")
        snap[o:o + n] = (val & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    for name, fn in st.static_calls.items():
        key = kt.opt("__SCK__" + name)
        if key is None:
            continue
        addr = 0 if fn is None else fn if isinstance(fn, int) else kt.sym(fn)
        put(key, addr, 8)
    for name, n in st.static_keys.items():
        key = kt.opt(name)
        if key is not None:
            put(key, n, 4)
    for name, v in st.runtime.items():
        addr = kt.opt(name)
        if addr is not None:
            put(addr, v, 8 if name == "dentry_hashtable" else 4)
    return snap, st
