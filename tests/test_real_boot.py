# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time passes for a real kernel (Linux 6.12): unit checks on a
synthetic flat text, and -- where Debian's cloud image is cached -- the
whole image, and byte-for-byte against a QEMU reference when one is
named by TEXTPOKE_REF_DIR (before.bin, after.bin, gdb.log as the harness
writes them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from textpoke.kernel import BootOptions, CpuCaps, KernelBootError, KernelText
from textpoke._alternative._records import PassLog
from textpoke._alternative._reloc import nops_pass
from textpoke.images._lines import LINE_612
from textpoke._alternative._smp_locks import DS_PREFIX, LOCK_PREFIX, lock_prefixes
from textpoke._alternative._thunks import ItsThunks, retpolines, returns, seal_endbr
from textpoke._static_call import sc_transform
from textpoke.images._tables import TableError, s32_table

BASE = 0xFFFFFFFF81000000


# the shared passes, run on a real kernel's buffer and returning its counts
def apply_retpolines_k(kt, sites, caps, opts, its):
    lg = PassLog(len(sites), kt.describe)
    retpolines(kt, sites, caps, opts, its, lg)
    return lg.stats


def apply_returns_k(kt, sites, caps, opts):
    lg = PassLog(len(sites), kt.describe)
    returns(kt, sites, caps, opts, lg)
    return lg.stats


def apply_seal_endbr_k(kt, sites):
    lg = PassLog(len(sites), kt.describe)
    seal_endbr(kt, sites, lg)
    return lg.stats


def smp_unlock_k(kt, entries, text):
    lg = PassLog(len(entries), kt.describe)
    lock_prefixes(kt, entries, text, DS_PREFIX, LOCK_PREFIX, lg)
    return lg.stats


def _kt(size: int = 0x4000, **syms: int) -> KernelText:
    symbols = {"__x86_indirect_thunk_array": BASE + 0x3000, "__x86_return_thunk": BASE + 0x3800,
               "its_return_thunk": BASE + 0x3840, "__x86_indirect_its_thunk_array": BASE + 0x3400,
               "__static_call_return0": BASE + 0x3900, "_text": BASE, "_etext": BASE + size}
    symbols.update(syms)
    return KernelText(bytearray(b"\xcc" * size), BASE, symbols, [(".text", BASE, BASE + size)])


def _put(kt: KernelText, addr: int, data: bytes) -> None:
    kt.buf[addr - kt.base:addr - kt.base + len(data)] = data


def _call(op: int, addr: int, dest: int) -> bytes:
    return bytes([op]) + ((dest - addr - 5) & 0xFFFFFFFF).to_bytes(4, "little")


def test_caps_words_round_trip_and_names():
    c = CpuCaps([0, 0, 0, 1 << 21] + [0] * 7 + [(1 << 14) | (1 << 19)])
    assert c.has("always") and c.has("rethunk") and c.has("call_depth")
    assert not c.has("retpoline")
    assert c.words()[11] == (1 << 14) | (1 << 19)
    with pytest.raises(KernelBootError):
        CpuCaps([0] * 25)
    with pytest.raises(KernelBootError):
        c.set("no_such_feature")


def test_s32_table_is_self_relative_and_checks_bounds():
    buf = bytearray(16)
    buf[0:4] = (0x100).to_bytes(4, "little", signed=True)
    buf[4:8] = (-4).to_bytes(4, "little", signed=True)
    assert s32_table(buf, BASE, BASE, BASE + 8) == [BASE + 0x100, BASE]
    assert s32_table(buf, BASE, BASE, BASE + 16, keep_zero=True)[2:] == [None, None]
    with pytest.raises(TableError):
        s32_table(buf, BASE, BASE, BASE + 6)
    with pytest.raises(TableError):
        s32_table(buf, BASE, BASE, BASE + 32)


def test_optimize_nops_merges_runs_and_jumps_over_long_ones():
    b = bytearray(b"\xff\xd0\x90\x90\x90")
    nops_pass(b, 5, LINE_612)
    assert bytes(b) == b"\xff\xd0\x0f\x1f\x00"
    b = bytearray(b"\x90" * 20)
    nops_pass(b, 20, LINE_612)
    assert bytes(b) == b"\xeb\x12" + b"\xcc" * 18
    b = bytearray(b"\xf3\x90\x90")         # PAUSE is not a NOP
    nops_pass(b, 3, LINE_612)
    assert bytes(b)[:2] == b"\xf3\x90"


def test_retpoline_off_lfence_and_its_lower_half():
    kt = _kt()
    thunk = kt.sym("__x86_indirect_thunk_array")
    a1, a2 = BASE + 0x100, BASE + 0x120      # 0x100: lower half; 0x120: upper half
    _put(kt, a1, _call(0xE8, a1, thunk + 32 * 0))            # call *%rax
    _put(kt, a2, _call(0xE9, a2, thunk + 32 * 11))           # jmp *%r11
    st = apply_retpolines_k(kt, [a1, a2], CpuCaps(), BootOptions(), ItsThunks(kt, []))
    assert st.changed == 2
    assert kt.read(a1, 5) == b"\xff\xd0\x0f\x1f\x00"
    assert kt.read(a2, 5) == b"\x41\xff\xe3\xcc\x90"
    # ITS: the indirect branch would end in the lower half of a line at a1
    kt = _kt()
    _put(kt, a1, _call(0xE8, a1, thunk))
    caps = CpuCaps.from_names(["indirect_thunk_its"])
    apply_retpolines_k(kt, [a1], caps, BootOptions(), ItsThunks(kt, []))
    assert kt.read(a1, 5) == _call(0xE8, a1, kt.sym("__x86_indirect_its_thunk_array"))
    # ... and a dynamic page hands out thunks in the upper half of a line
    kt = _kt()
    _put(kt, a1, _call(0xE8, a1, thunk + 32 * 3))
    its = ItsThunks(kt, [0xFFFFFFFFA0000000])
    apply_retpolines_k(kt, [a1], caps, BootOptions(), its)
    (taddr, reg), = its.allocated
    assert reg == 3 and taddr & 0x3F >= 32
    assert kt.read(a1, 5) == _call(0xE8, a1, taddr)


def test_returns_its_address_rule_and_plain_ret():
    kt = _kt()
    rt = kt.sym("__x86_return_thunk")
    lo, hi = BASE + 0x200, BASE + 0x220
    for a in (lo, hi):
        _put(kt, a, _call(0xE9, a, rt))
    caps = CpuCaps.from_names(["rethunk"])
    apply_returns_k(kt, [lo, hi], caps, BootOptions(return_thunk="its_return_thunk"))
    assert kt.read(lo, 5) == _call(0xE9, lo, kt.sym("its_return_thunk"))
    assert kt.read(hi, 5) == b"\xc3\xcc\xcc\xcc\xcc"
    kt2 = _kt()
    _put(kt2, lo, _call(0xE9, lo, rt))
    st = apply_returns_k(kt2, [lo], CpuCaps(), BootOptions())
    assert kt2.read(lo, 5) == b"\xc3\xcc\xcc\xcc\xcc" and st.changed == 1


def test_static_call_transform_kinds():
    kt = _kt()
    a = BASE + 0x300
    f = BASE + 0x1000
    _put(kt, a, _call(0xE8, a, BASE))
    assert sc_transform(kt, a, f, False) == _call(0xE8, a, f)
    assert sc_transform(kt, a, 0, False) == b"\x0f\x1f\x44\x00\x00"
    assert sc_transform(kt, a, kt.sym("__static_call_return0"), False) == b"\x2e\x2e\x2e\x31\xc0"
    assert sc_transform(kt, a, f, True) == _call(0xE9, a, f)
    assert sc_transform(kt, a, 0, True) == b"\xc3\xcc\xcc\xcc\xcc"


def test_seal_endbr_and_smp_unlock():
    kt = _kt()
    a, b = BASE + 0x400, BASE + 0x410
    _put(kt, a, b"\xf3\x0f\x1e\xfa")
    _put(kt, b, b"\x90\x90\x90\x90")
    st = apply_seal_endbr_k(kt, [a, b])
    assert kt.read(a, 4) == b"\x66\x0f\x1f\x00" and st.skipped == 1
    _put(kt, BASE + 0x500, b"\xf0")
    st = smp_unlock_k(kt, [BASE + 0x500, None, BASE + 0x10000], (BASE, BASE + 0x4000))
    assert kt.read(BASE + 0x500, 1) == b"\x3e" and st.changed == 1 and st.skipped == 2


# ----------------------------------------------------------- the real image
def _image_path() -> Path | None:
    """The cached 6.12 cloud bzImage (it carries its symbols: no System.map)."""
    cached = sorted((Path.home() / ".cache/textpoke/kernel").glob("6.12.*-cloud-amd64"))
    for d in (os.environ.get("TEXTPOKE_KERNEL_DIR"), *cached[::-1], "/tmp/k612"):
        if not d:
            continue
        d = Path(d)
        img = next(iter(sorted(d.glob("vmlinuz*"))), None) or next(
            iter(sorted(d.glob("x/boot/vmlinuz*"))), None)
        if img:
            return img
    return None


@pytest.fixture(scope="module")
def real_image():
    p = _image_path()
    if p is None:
        pytest.skip("Debian's 6.12 cloud kernel is not cached (make test-kernel fetches it)")
    from textpoke.kernel import load_kernel
    return load_kernel(str(p))


def test_real_image_passes_touch_what_the_kernel_touches(real_image):
    from textpoke._alternative._kboot import kernel_text_of
    from textpoke.kernel import boot_kernel
    kt = kernel_text_of(real_image)
    res = boot_kernel(kt, CpuCaps.from_names(["always"]), BootOptions(ncpus=1))
    t = res.stats
    for name in (".altinstructions", ".retpoline_sites", ".return_sites"):
        assert t[name]["entries"] == real_image.table(name).count > 7000
    assert t[".ibt_endbr_seal"]["changed"] == real_image.table(".ibt_endbr_seal").count > 12000
    # every traced function now starts with the ideal NOP5, none calls __fentry__
    assert t["__mcount_loc"]["changed"] > 40000
    fentry = kt.sym("__fentry__")
    for a in [kt.sym("do_one_initcall") + 4]:
        assert kt.read(a, 5) == b"\x0f\x1f\x44\x00\x00"
        assert kt.read(a, 5) != _call(0xE8, a, fentry)
    # no retpoline is wanted: no call through the thunk array is left
    assert t[".retpoline_sites"]["changed"] == real_image.table(".retpoline_sites").count


REF = os.environ.get("TEXTPOKE_REF_DIR")


@pytest.mark.skipif(not REF, reason="set TEXTPOKE_REF_DIR to a QEMU reference (make test-kernel)")
def test_real_image_equals_the_kernels_own_text(real_image):
    from textpoke._alternative._kboot import kernel_text_of
    from textpoke.kernel import boot_kernel
    from textpoke._alternative._kdiff import diff_sections
    d = Path(REF)
    log = (d / "gdb.log").read_text()
    rows = re.findall(r"0xffffffff82e65f..:\s+(.*)", log)[6:12]
    words = [int(x, 16) for r in rows for x in r.split()]
    rt = int(re.search(r"0xffffffff82555cf8:\s+(0x[0-9a-f]+)", log).group(1), 16)
    ncpus = int(os.environ.get("TEXTPOKE_REF_CPUS", "1"))
    kt = kernel_text_of(real_image, data=(d / "before.bin").read_bytes())
    boot_kernel(kt, CpuCaps(words), BootOptions(return_thunk=rt, ncpus=ncpus))
    assert diff_sections(kt, (d / "after.bin").read_bytes()) == {
        n: 0 for n, _, _ in kt.exec_ranges}


def test_return_thunk_follows_the_its_selection_that_runs_last():
    from textpoke.kernel import CpuCaps
    from textpoke.cli._boot_real import derive_return_thunk, parse_cmdline

    def caps(*names):
        return CpuCaps.from_names(("always",) + names)
    its_cpu = caps("bug_its", "rethunk", "retpoline", "srso")
    assert derive_return_thunk(its_cpu) == "its_return_thunk"       # overrides srso's
    assert derive_return_thunk(its_cpu, parse_cmdline("indirect_target_selection=off")) \
        == "srso_return_thunk"
    assert derive_return_thunk(its_cpu, parse_cmdline("mitigations=off")) == "srso_return_thunk"
    assert derive_return_thunk(caps("bug_its", "rethunk", "retpoline", "call_depth")) \
        == "call_depth_return_thunk"                                # retpoline + stuffing
    assert derive_return_thunk(caps("bug_its", "rethunk", "retpoline", "retpoline_lfence")) \
        == "__x86_return_thunk"                                     # ITS refuses lfence
    assert derive_return_thunk(caps("rethunk", "retpoline")) == "__x86_return_thunk"
    assert derive_return_thunk(caps("bug_its", "retpoline")) == "__x86_return_thunk"


def test_cpuinfo_names_map_to_the_kernels_feature_names(tmp_path):
    import argparse
    from textpoke.cli._boot_real import caps_from_args
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 pni sse4_1 sse4_2 lm\n"
                 "bugs\t\t: spectre_v2\n")
    args = argparse.Namespace(cpu_caps=None, cpuinfo=str(f), cpu_features="",
                              cpu_features_given=False)
    caps, unknown = caps_from_args(args)
    assert unknown == []
    for name in ("xmm", "xmm2", "xmm3", "xmm4_1", "xmm4_2", "lm", "bug_spectre_v2"):
        assert caps.has(name), name


# ------------------------------------------- early boot's run-time state, derived
def test_dhash_shift_follows_memory_and_dhash_entries():
    from textpoke._alternative._kearly import dhash_shift, parse_size
    assert parse_size("1G") == 1 << 30 and parse_size("512M") == parse_size("512") == 512 << 20
    pages_1g = (1 << 30) // 4096 - 130
    # 1G under QEMU: 131072 buckets ("Dentry cache hash table entries: 131072")
    assert dhash_shift(pages_1g - 11000, pages_1g) == 15
    assert dhash_shift((4 << 30) // 4096 - 20000, (4 << 30) // 4096) == 13
    assert dhash_shift(1, 1 << 18, dhash_entries=65536) == 16
    with pytest.raises(KernelBootError):
        parse_size("lots")


def test_kernel_params_treat_dash_and_underscore_alike_and_last_wins():
    from textpoke._alternative._kearly import kernel_params
    p = kernel_params("preempt=full nox2apic random.trust-cpu=off preempt=none")
    assert p["preempt"] == "none" and "nox2apic" in p and p["random.trust_cpu"] == "off"


def _early(real_image, caps_names, **kw):
    from textpoke._alternative._kboot import kernel_text_of
    from textpoke._alternative._kearly import EarlyBoot, early_state, read_config
    cfg = Path(real_image.path).parent / "config"
    kt = kernel_text_of(real_image)
    eb = EarlyBoot(config=read_config(cfg) if cfg.exists() else None, **kw)
    return kt, early_state(kt, CpuCaps.from_names(["always", *caps_names]), eb)


def test_early_state_of_the_real_image(real_image):
    kt, st = _early(real_image, ["apic", "tsc", "hypervisor"], mem=1 << 30)
    assert st.choices["preempt"] == "voluntary"          # Debian's CONFIG_PREEMPT_VOLUNTARY
    assert st.static_calls["cond_resched"] == "__cond_resched"
    assert st.static_calls["preempt_schedule"] is None
    assert st.choices["apic"] == "physflat"
    names = {k: kt.describe(v) for k, v in st.static_calls.items()
             if k.startswith("apic_call_") and isinstance(v, int)}
    assert names["apic_call_write"] == "native_apic_mem_write"
    assert names["apic_call_send_IPI_mask"] == "default_send_IPI_mask_sequence_phys"
    assert st.static_calls["x86_idle"] == "default_idle"
    assert st.static_keys["virt_spin_lock_key"] == 1 and "crng_is_ready" not in st.static_keys
    assert st.runtime["d_hash_shift"] == 15
    assert any("dentry_hashtable" in n for n in st.notes)
    # the command line and the CPU move them
    _, st = _early(real_image, ["apic", "x2apic", "rdrand"],
                   cmdline="preempt=full idle=poll x2apic_phys")
    assert st.static_calls["preempt_schedule"] == "preempt_schedule_thunk"
    assert st.static_calls["cond_resched"] == "__static_call_return0"
    assert st.choices["apic"] == "x2apic_phys" and st.static_calls["x86_idle"] is None
    assert st.static_keys["crng_is_ready"] == 1 and "virt_spin_lock_key" not in st.static_keys
    _, st = _early(real_image, ["apic", "x2apic", "rdrand"], cmdline="nox2apic random.trust_cpu=0")
    assert st.choices["apic"] == "physflat" and "crng_is_ready" not in st.static_keys


def _cached_reference(name: str, version: str):
    from textpoke.images._qemu import cache_root, load_reference
    root = cache_root() / "reference" / version
    d = next(iter(sorted(root.glob(name + "-*"))), None) if root.exists() else None
    if d is None or not (d / "meta.json").exists():
        pytest.skip(f"no cached QEMU reference {name} (make test-kernel)")
    return load_reference(d)


@pytest.mark.parametrize("setup", ["qemu64-smp1-mitigations=off", "qemu64-smp1-default",
                                   "EPYC-smp1-default"])
def test_without_data_only_dentry_hashtable_is_left(real_image, setup):
    """Without the kernel's data: the run-time state is derived and the
    text matches the kernel's except the five runtime_const_ptr sites of
    dentry_hashtable (a memblock address); told that address, it all does."""
    from textpoke._alternative._kboot import kernel_text_of
    from textpoke.kernel import boot_kernel
    from textpoke._alternative._kdiff import diff_ranges, diff_sections
    from textpoke._alternative._kearly import EarlyBoot, read_config
    from textpoke.cli._boot_real import parse_cmdline
    ref = _cached_reference(setup, real_image.version)
    cfg = read_config(Path(real_image.path).parent / "config")
    cmd = parse_cmdline(ref.cmdline)
    caps = CpuCaps(ref.caps_before)
    opts = dict(return_thunk=ref.return_thunk_sym, ncpus=ref.smp,
                setup_max_cpus=cmd.get("setup_max_cpus"))
    kt = kernel_text_of(real_image)
    dht = kt.sym("dentry_hashtable")
    boot_kernel(kt, caps, BootOptions(**opts),
                early=EarlyBoot(cmdline=ref.kernel_cmdline, ncpus=ref.smp, mem=1 << 30, config=cfg))
    assert sum(diff_sections(kt, ref.after).values()) == 40
    assert {kt.describe(r.start).split("+")[0] for r in diff_ranges(kt, ref.after)} == {
        "__d_lookup_rcu_op_compare", "___d_drop", "__d_rehash", "__d_lookup_rcu", "__d_lookup"}
    kt = kernel_text_of(real_image)
    value = int.from_bytes(ref.read("before", dht, 8), "little")
    boot_kernel(kt, caps, BootOptions(**opts),
                early=EarlyBoot(cmdline=ref.kernel_cmdline, ncpus=ref.smp, mem=1 << 30, config=cfg,
                                dentry_hashtable=value))
    assert sum(diff_sections(kt, ref.after).values()) == 0


def test_pass_decoder_shortcuts_match_iced():
    """The passes' memoised decoder (_code.decode_buf) builds CALL/JMP
    rel32 by hand and finds instructions again by their bytes: each must be
    what iced-x86 decodes, whatever bytes follow the instruction."""
    import random
    from textpoke._alternative._code import decode_buf as _decode_buf
    from textpoke import insn_decode_kernel
    rng = random.Random(17)
    samples = [bytes([op]) + (d & 0xFFFFFFFF).to_bytes(4, "little")
               for op in (0xE8, 0xE9)
               for d in (0, 1, -1, -5, -6, 0x7FFFFFFF, -0x80000000,
                         *(rng.randint(-2**31, 2**31 - 1) for _ in range(200)))]
    samples += [bytes.fromhex(h) for h in ("0f1f440000", "488b05" "10203040", "90", "eb05",
                                           "0f8410203040", "2ee810203040")]
    for raw in samples:
        for _ in range(3):
            b = raw + bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
            assert _decode_buf(b, 0) == insn_decode_kernel(b, 0), b.hex()
    assert _decode_buf(b"\xe8\x00\x00", 0) is None      # truncated: not a CALL
