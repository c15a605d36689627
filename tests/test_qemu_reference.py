# SPDX-License-Identifier: GPL-2.0-only
"""The reference harness: Debian's kernels (by default 6.12 cloud, 6.12 rt
and 6.1 cloud; TEXTPOKE_KERNELS=6.12-amd64,... picks others) booted under
QEMU (TCG), stopped with hardware breakpoints around
alternative_instructions(); every test runs for each kernel.

These boot QEMU (a few seconds each, cached afterwards) and belong to
``make test-kernel``: they run only with TEXTPOKE_KERNEL_TESTS=1.
"""

from __future__ import annotations

import os
import shutil
import struct

import iced_x86
import pytest

from textpoke.images._qemu import (DEFAULT_KERNELS, ReferenceError, find_alternatives_call,
                                   reference, reference_dir, resolve_kernel)
from textpoke.images import KernelUnavailable, ensure_debian_kernel

KERNELS = [k for k in os.environ.get("TEXTPOKE_KERNELS", ",".join(DEFAULT_KERNELS)).split(",")
           if k]

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                       reason="boots QEMU: run with make test-kernel (TEXTPOKE_KERNEL_TESTS=1)"),
]

X86_FEATURE_ALWAYS = 3 * 32 + 21      # the same in 6.1 and 6.12


def has(caps: list[int], bit: int | str, kernel=None) -> bool:
    """Whether capability words *caps* have *bit* (a number, or a feature
    name in *kernel*'s line's numbering)."""
    if isinstance(bit, str):
        bit = kernel.line.features[bit]
    return bool(caps[bit // 32] >> (bit % 32) & 1)


@pytest.fixture(scope="module", params=KERNELS)
def debian(request):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        return ensure_debian_kernel(resolve_kernel(request.param))
    except (KernelUnavailable, ValueError) as e:
        pytest.skip(f"Debian's {request.param} kernel cannot be fetched here: {e}")


@pytest.fixture(scope="module")
def kernel(debian):
    return debian.load()


def ref_of(debian, kernel, cpu="qemu64", cmdline="", smp=1, **kw):
    return reference(kernel, debian.vmlinuz, cpu=cpu, cmdline=cmdline, smp=smp, **kw)


def exec_ranges(kernel):
    return [(s.addr, s.end) for s in kernel.executable_sections()]


def decode_at(data: bytes, base: int, addr: int) -> iced_x86.Instruction:
    off = addr - base
    return next(iter(iced_x86.Decoder(64, data[off:off + 16], ip=addr)))


def test_the_stops_are_around_the_call(kernel):
    call, ret = find_alternatives_call(kernel)
    fn = kernel.sym("arch_cpu_finalize_init")
    assert fn < call < ret == call + 5 <= fn + kernel.symbol_size("arch_cpu_finalize_init")
    code = kernel.read(call, 5)
    assert code[0] == 0xE8
    assert ret + struct.unpack("<i", code[1:])[0] == kernel.sym("alternative_instructions")


def test_default_qemu64_boot(debian, kernel):
    r = ref_of(debian, kernel)
    size = kernel.end - kernel.text_start
    assert len(r.before) == len(r.after) == size and r.phys_base == 0
    assert r.kernel_cmdline == "console=ttyS0 nokaslr"
    # the dumps are the kernel's memory: its banner, at its link address
    b = kernel.sym("linux_banner") - kernel.text_start
    assert r.before[b:b + 80] == r.after[b:b + 80] == kernel.memory[b:b + 80]
    # init passes ran before (ftrace's NOPs, static calls, jump labels) ...
    assert r.changed_bytes(exec_ranges(kernel)) > 100_000
    assert sum(x != y for x, y in zip(kernel.memory[:1 << 20], r.before[:1 << 20])) > 1000
    # ... every fentry site is a 5-byte NOP when alternatives start
    mc = [a for (a,) in struct.iter_unpack("<Q", kernel.table("__mcount_loc").data) if a]
    nop5 = bytes.fromhex("0f1f440000")
    assert all(r.read("before", a, 5) == nop5 for a in mc[::97])
    assert len(r.caps_before) == kernel.line.ncaps == 24
    assert has(r.caps_before, X86_FEATURE_ALWAYS)
    # qemu64 (an AMD family 15 model) is not affected by retbleed: retpolines, no return thunk
    assert has(r.caps_before, "retpoline", kernel) and not has(r.caps_before, "rethunk", kernel)
    assert r.return_thunk_sym == "__x86_return_thunk"
    assert r.return_thunk == kernel.sym("__x86_return_thunk")
    assert "Spectre V2 : Mitigation: Retpolines" in r.mitigations()
    assert 0 < r.seconds_to_call and 0 < r.seconds_in_alternatives
    # one CPU: the SMP-alternatives memory (.smp_locks) was given back
    assert "Freeing SMP alternatives memory" in r.serial


def test_cache_is_keyed_and_reused(debian, kernel):
    r1 = ref_of(debian, kernel)
    r2 = ref_of(debian, kernel)
    assert r1.path == r2.path and r1.after == r2.after
    other = reference_dir(kernel, "qemu64", "mitigations=off", 1)
    assert other != reference_dir(kernel, "qemu64", "", 1) != reference_dir(kernel, "qemu64", "", 2)
    assert other.parent == reference_dir(kernel, "EPYC", "", 1).parent


def test_boots_are_deterministic(debian, kernel):
    cached = ref_of(debian, kernel)
    again = ref_of(debian, kernel, use_cache=False)
    ex = exec_ranges(kernel)
    from textpoke.images._qemu import diff_count
    assert diff_count(cached.before, again.before, kernel.text_start, ex) == 0
    assert diff_count(cached.after, again.after, kernel.text_start, ex) == 0
    assert cached.caps_before == again.caps_before


def test_mitigations_off_unthunks(debian, kernel):
    r = ref_of(debian, kernel, cmdline="mitigations=off")
    assert not has(r.caps_before, "retpoline", kernel)
    assert not has(r.caps_before, "rethunk", kernel)
    rs = kernel.table(".return_sites")
    sites = [rs.start + 4 * i + o for i, (o,) in enumerate(struct.iter_unpack("<i", rs.data))]
    text = kernel.section(".text")
    # (sites inside the retpoline thunks are rewritten by their own alternatives)
    sites = [a for a in sites if text.addr <= a < text.end
             and not kernel.describe(a).startswith("__x86_indirect")][::50]
    # before: JMP __x86_return_thunk; after: RET + INT3 padding
    for a in sites:
        before = decode_at(r.before, kernel.text_start, a)
        assert before.mnemonic in (iced_x86.Mnemonic.JMP, iced_x86.Mnemonic.JE,
                                   iced_x86.Mnemonic.JNE) or before.flow_control != 0
        after = r.read("after", a, 5)
        if before.mnemonic == iced_x86.Mnemonic.JMP and before.len == 5:
            assert after == b"\xc3\xcc\xcc\xcc\xcc", hex(a)
    # retpoline sites become indirect calls/jumps
    rp = kernel.table(".retpoline_sites")
    for i, (o,) in list(enumerate(struct.iter_unpack("<i", rp.data)))[::200]:
        a = rp.start + 4 * i + o
        if not text.addr <= a < text.end:
            continue
        ins = decode_at(r.after, kernel.text_start, a)
        assert ins.mnemonic in (iced_x86.Mnemonic.CALL, iced_x86.Mnemonic.JMP) or \
            ins.code == iced_x86.Code.NOPD or ins.mnemonic == iced_x86.Mnemonic.NOP \
            or ins.flow_control != 0, hex(a)
        if ins.mnemonic in (iced_x86.Mnemonic.CALL, iced_x86.Mnemonic.JMP):
            assert ins.op0_kind == iced_x86.OpKind.REGISTER, hex(a)


def test_two_cpus_keep_lock_prefixes(debian, kernel):
    up = ref_of(debian, kernel)
    smp = ref_of(debian, kernel, smp=2)
    locks = kernel.table(".smp_locks")
    addrs = [locks.start + 4 * i + o for i, (o,) in enumerate(struct.iter_unpack("<i", locks.data)) if o]
    text = kernel.section(".text")
    # only core text is patched, and only where the byte is a LOCK prefix
    # (6.12.117 has one entry on a 0x66 prefix, in __pv_queued_spin_lock_slowpath)
    core = [a for a in addrs if text.addr <= a < text.end and kernel.read(a, 1) == b"\xf0"]
    other = [a for a in addrs if not text.addr <= a < text.end]
    assert len(core) > 8000 and other
    # SMP keeps LOCK (f0); a one-CPU boot turns it into DS (3e)
    assert all(smp.read("after", a, 1) == b"\xf0" for a in core)
    assert all(up.read("before", a, 1) == b"\xf0" for a in core)
    assert all(up.read("after", a, 1) == b"\x3e" for a in core)
    assert all(up.read("after", a, 1) == kernel.read(a, 1) for a in other)


def test_retbleed_stuff_enables_call_depth_tracking(debian, kernel):
    r = ref_of(debian, kernel, cpu="Skylake-Client-v4", cmdline="retbleed=stuff")
    if "call_depth" not in kernel.line.features:
        # 6.1 predates call-depth tracking: no such thunk, retbleed=stuff is unknown to it
        assert "call_depth_return_thunk" not in kernel.symbols
        assert r.return_thunk_sym != "call_depth_return_thunk"
        return
    assert has(r.caps_before, "call_depth", kernel) and has(r.caps_before, "rethunk", kernel)
    assert r.return_thunk_sym == "call_depth_return_thunk"
    assert "RETBleed: Mitigation: Stuffing" in r.mitigations()


def test_a_bad_cpu_model_is_a_reference_error(debian, kernel):
    with pytest.raises(ReferenceError):
        ref_of(debian, kernel, cpu="no-such-cpu-model", timeout=30, use_cache=False)


@pytest.mark.parametrize("cpu,cmdline,smp", [("qemu64", "", 1), ("Skylake-Client-v4", "retbleed=stuff", 1),
                                             ("EPYC", "mitigations=off", 2)])
def test_textpoke_matches_the_kernel(debian, kernel, cpu, cmdline, smp):
    from textpoke.images._qemu import diff_count, textpoke_can_dump, textpoke_dump
    if not textpoke_can_dump():
        pytest.skip("textpoke boot cannot patch a real image in this checkout yet")
    r = ref_of(debian, kernel, cpu=cpu, cmdline=cmdline, smp=smp)
    dump, err, _ = textpoke_dump(debian, kernel, r)
    assert dump is not None, err
    assert len(dump) == len(r.after)
    per = {s.name: diff_count(dump, r.after, kernel.text_start, [(s.addr, s.end)])
           for s in kernel.executable_sections()}
    assert per == {s.name: 0 for s in kernel.executable_sections()}


@pytest.mark.parametrize("cpu,cmdline,smp", [("qemu64", "mitigations=off", 1), ("qemu64", "", 1),
                                             ("Skylake-Client-v4", "", 2), ("EPYC", "", 1)])
def test_textpoke_without_data_derives_the_run_time_state(debian, kernel, cpu, cmdline, smp):
    """No snapshot of the kernel's data: textpoke derives the preemption
    model, the APIC driver, x86_idle, the static keys and d_hash_shift from
    the command line, the CPU and the memory size.  Only dentry_hashtable
    (a memblock address) is left -- 5 sites x 8 bytes -- and given it
    (--dentry-hashtable), nothing is."""
    from textpoke.images._qemu import diff_count, textpoke_can_dump, textpoke_dump
    if not textpoke_can_dump():
        pytest.skip("textpoke boot cannot patch a real image in this checkout yet")
    r = ref_of(debian, kernel, cpu=cpu, cmdline=cmdline, smp=smp)
    execs = [(s.addr, s.end) for s in kernel.executable_sections()]
    dump, err, _ = textpoke_dump(debian, kernel, r, data=False)
    assert dump is not None, err
    # 6.12's runtime constants: dentry_hashtable's 5 sites; 6.1 has none
    rc = any(n.startswith("__start_runtime_ptr_") for n in kernel.symbols)
    assert diff_count(dump, r.after, kernel.text_start, execs) == (40 if rc else 0)
    dht = kernel.symbols["dentry_hashtable"]
    value = int.from_bytes(r.read("before", dht, 8), "little")
    dump, err, _ = textpoke_dump(debian, kernel, r, data=False,
                                 extra=("--dentry-hashtable", hex(value)))
    assert dump is not None, err
    assert diff_count(dump, r.after, kernel.text_start, execs) == 0
