# SPDX-License-Identifier: GPL-2.0-only
"""The run-time reference checked against itself: Debian's 6.12 cloud
kernel under QEMU, driven by the init script step by step (ftrace, kprobes,
a static-key sysctl, insmod/rmmod), its text saved after each step.  These
tests read the saved memory with the image's own symbols and tables and
check that each step did to the text what the kernel's interfaces say it
did -- a check of the reference, not of textpoke.

They boot QEMU (a few minutes per CPU setup, cached afterwards) and belong
to ``make test-kernel``: they run only with TEXTPOKE_KERNEL_TESTS=1.
TEXTPOKE_RUNTIME_SETUPS=nomit,retpoline,calldepth picks the CPU setups
(default: all three).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct

import pytest

from textpoke.images._elf import ElfFile
from textpoke.images._kmodules import module_exec_sections
from textpoke.images._qemu_runtime import runtime_reference
from textpoke.images._qemu_runtime_steps import DEFAULT_MODULES, RUNTIME_SETUPS, STEPS
from textpoke.images._tables import jump_table, mcount_table
from textpoke.images import KernelUnavailable, ensure_debian_kernel

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                       reason="boots QEMU: run with make test-kernel (TEXTPOKE_KERNEL_TESTS=1)"),
]

NOP5 = bytes.fromhex("0f1f440000")
SETUP_NAMES = {"nomit": 0, "retpoline": 1, "calldepth": 2}
SETUPS = [RUNTIME_SETUPS[SETUP_NAMES[n]]
          for n in os.environ.get("TEXTPOKE_RUNTIME_SETUPS", "nomit,retpoline,calldepth").split(",")
          if n]


@pytest.fixture(scope="module")
def debian():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if shutil.which("busybox") is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    from textpoke.images._qemu import resolve_kernel
    try:
        return ensure_debian_kernel(resolve_kernel("6.12-cloud"))
    except (KernelUnavailable, ValueError) as e:
        pytest.skip(f"Debian's 6.12 cloud kernel cannot be fetched here: {e}")


@pytest.fixture(scope="module")
def kernel(debian):
    return debian.load()


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: s.label().replace(" ", "-"))
def ref(request, debian):
    return runtime_reference(debian, request.param)


@pytest.fixture(scope="module")
def texts(ref):
    """step name -> the saved _text.._end"""
    return {st["name"]: ref.text(st) for st in ref.steps}


def at(kernel, text: bytes, addr: int, n: int) -> bytes:
    off = addr - kernel.text_start
    return text[off:off + n]


def call_target(code: bytes, addr: int) -> int | None:
    """The target of a 5-byte CALL/JMP rel32 at *addr*, else None."""
    if len(code) < 5 or code[0] not in (0xE8, 0xE9):
        return None
    return (addr + 5 + struct.unpack("<i", code[1:5])[0]) & (1 << 64) - 1


def fentry_sites(kernel) -> dict[int, str]:
    """fentry site -> the function it is in."""
    mc = kernel.table("__mcount_loc")
    return {a: kernel.describe(a).split("+")[0]
            for a in mcount_table(mc.data, mc.start, mc.start, mc.stop) if a}


def site_of(kernel, sites: dict[int, str], fn: str) -> int:
    lo, hi = kernel.sym(fn), kernel.sym(fn) + kernel.symbol_size(fn)
    found = [a for a in sites if lo <= a < hi]
    assert len(found) == 1, (fn, found)
    return found[0]


def in_page(addr: int | None, pages: list[int]) -> bool:
    return addr is not None and any(p & ~0xfff <= addr < (p & ~0xfff) + 4096 for p in pages)


def test_manifest_is_whole_and_its_files_check(ref, kernel):
    m = ref.manifest
    assert m["format"] == "textpoke-runtime-reference" and m["format_version"] == 1
    assert m["kernel"]["release"] == kernel.version
    assert m["kernel"]["image_sha256"] == kernel.sha256
    assert (m["kernel"]["text_start"], m["kernel"]["end"]) == (kernel.text_start, kernel.end)
    names = [s["name"] for s in m["steps"]]
    mods = [n for n, _ in DEFAULT_MODULES]
    assert names == [s.name for s in STEPS] + [f"insmod-{n}" for n in mods] + \
        [f"rmmod-{n}" for n in reversed(mods)]
    assert [s["index"] for s in m["steps"]] == list(range(len(names)))
    assert len(m["caps"]) == 24 and m["seconds"]["wall"] > 0 and m["seconds"]["qemu_cpu"] > 0
    for st in m["steps"]:
        data = ref.text(st)
        assert len(data) == st["text"]["size"] == kernel.end - kernel.text_start
        assert hashlib.sha256(data).hexdigest() == st["text"]["sha256"]
        # the dump is this kernel at its link address
        b = kernel.sym("linux_banner")
        assert at(kernel, data, b, 80) == kernel.read(b, 80)
        for r in st["regions"]:
            raw = ref.region(r)
            assert len(raw) == r["size"] and hashlib.sha256(raw).hexdigest() == r["sha256"]
    for n, info in m["modules"].items():
        assert hashlib.sha256((ref.path / info["file"]).read_bytes()).hexdigest() == info["sha256"]


def test_setup_is_the_one_asked_for(ref, kernel):
    """The CPU setups are what they are named: no mitigations; retpolines
    with return thunks; call-depth tracking."""
    caps, f = ref.manifest["caps"], kernel.line.features

    def has(name: str) -> bool:
        return bool(caps[f[name] // 32] >> (f[name] % 32) & 1)
    setup = ref.manifest["setup"]
    if "mitigations=off" in setup["cmdline"]:
        assert not has("retpoline") and not has("rethunk")
        assert ref.manifest["return_thunk_sym"] == "__x86_return_thunk"
    elif "retbleed=stuff" in setup["cmdline"]:
        assert has("call_depth") and has("rethunk")
        assert ref.manifest["return_thunk_sym"] == "call_depth_return_thunk"
    else:
        assert has("retpoline") and has("rethunk")
        assert ref.manifest["return_thunk_sym"] != "__x86_return_thunk"


def test_function_tracer_calls_the_trampoline_then_nops(ref, kernel, texts):
    sites = fentry_sites(kernel)
    on = ref.step("ftrace-function-on")
    glob = ref.manifest["probes"]["ftrace_glob"]
    names = on["tracefs"]["set_ftrace_filter"]
    rx = re.compile(glob.replace("*", ".*") + "$")
    assert names and all(rx.match(n) for n in names)
    # every function of the image with an fentry site that matches the glob is in the filter
    want = {f for f in sites.values() if rx.match(f)}
    assert set(names) == want
    tramps = on["allocated"]["ftrace_trampolines"]
    assert tramps and any(r["kind"] == "ftrace_trampoline" for r in on["regions"])
    enabled = {ln.split()[0]: ln for ln in on["tracefs"]["enabled_functions"]}
    assert set(enabled) == set(names)
    for fn in names:
        a = site_of(kernel, sites, fn)
        assert at(kernel, texts["boot"], a, 5) == NOP5, fn
        code = at(kernel, texts["ftrace-function-on"], a, 5)
        target = call_target(code, a)
        assert code[0] == 0xE8 and in_page(target, tramps), (fn, code.hex())
        # the trampoline the kernel says the site calls
        said = int(re.search(r"tramp: (0x[0-9a-f]+)", enabled[fn]).group(1), 16)
        assert target == said
        assert at(kernel, texts["ftrace-function-off"], a, 5) == NOP5, fn
    # the tracer's call sites in ftrace_caller/ftrace_regs_caller call the
    # tracer while on, and ftrace_stub again once off (with call-depth
    # tracking the boot aimed them at ftrace_stub's accounting thunk, in the
    # padding before it; the kernel's update aims at ftrace_stub itself)
    stub = kernel.sym("ftrace_stub")
    for sym in ("ftrace_call", "ftrace_regs_call"):
        a = kernel.sym(sym)
        assert call_target(at(kernel, texts["ftrace-function-on"], a, 5), a) == \
            kernel.sym("function_trace_call")
        for step in ("boot", "ftrace-function-off"):
            t = call_target(at(kernel, texts[step], a, 5), a)
            assert t is not None and stub - 16 <= t <= stub, (sym, step, hex(t or 0))
        assert call_target(at(kernel, texts["ftrace-function-off"], a, 5), a) == stub


def test_function_graph_calls_its_own_trampoline(ref, kernel, texts):
    sites = fentry_sites(kernel)
    on = ref.step("ftrace-graph-on")
    tramps = on["allocated"]["ftrace_trampolines"]
    for ln in on["tracefs"]["enabled_functions"]:
        fn = ln.split()[0]
        assert "ftrace_graph_func" in ln
        a = site_of(kernel, sites, fn)
        target = call_target(at(kernel, texts["ftrace-graph-on"], a, 5), a)
        assert in_page(target, tramps)
        assert target == int(re.search(r"tramp: (0x[0-9a-f]+)", ln).group(1), 16)
        assert at(kernel, texts["ftrace-graph-off"], a, 5) == NOP5
    assert on["tracefs"]["enabled_functions"]
    assert ref.step("ftrace-graph-off")["tracefs"]["enabled_functions"] == []


def test_optimized_kprobe_is_a_jmp_to_its_buffer(ref, kernel, texts):
    p = ref.manifest["probes"]
    addr = p["kprobe_addr"]
    on = ref.step("kprobe-optimized-on")
    assert any(ln.split()[0] == f"{addr:x}" and "[OPTIMIZED]" in ln
               for ln in on["tracefs"]["kprobes_list"])
    before = at(kernel, texts["boot"], addr, 5)
    assert before == kernel.read(addr, 5)      # pushes and moves nothing patches at boot
    code = at(kernel, texts["kprobe-optimized-on"], addr, 5)
    target = call_target(code, addr)
    assert code[0] == 0xE9 and in_page(target, on["allocated"]["kprobe_optinsn_pages"]), code.hex()
    # the buffer holds the probed instructions (copied) and jumps back after them
    page = next(r for r in on["regions"] if r["kind"] == "kprobe_optinsn_page")
    assert before in ref.region(page)
    # off: the original instructions again
    assert at(kernel, texts["kprobes-off"], addr, 5) == before
    assert ref.step("kprobes-off")["tracefs"]["kprobes_list"] == []


def test_kretprobe_on_entry_goes_through_ftrace(ref, kernel, texts):
    fn = ref.manifest["probes"]["kretprobe"]
    sites = fentry_sites(kernel)
    a = site_of(kernel, sites, fn)
    on = ref.step("kretprobe-on")
    assert any(f"{fn}+0x0" in ln and "[FTRACE]" in ln for ln in on["tracefs"]["kprobes_list"])
    line = next(ln for ln in on["tracefs"]["enabled_functions"] if ln.split()[0] == fn)
    assert "kprobe_ftrace_handler" in line
    target = call_target(at(kernel, texts["kretprobe-on"], a, 5), a)
    assert target == int(re.search(r"tramp: (0x[0-9a-f]+)", line).group(1), 16)
    assert in_page(target, on["allocated"]["ftrace_trampolines"])
    assert at(kernel, texts["kprobe-optimized-on"], a, 5) == NOP5
    assert at(kernel, texts["kprobes-off"], a, 5) == NOP5


def test_schedstats_sysctl_flips_its_static_key_sites(ref, kernel, texts):
    assert ref.step("boot")["sysctl"] == {"kernel.sched_schedstats": "0"}
    assert ref.step("schedstats-on")["sysctl"] == {"kernel.sched_schedstats": "1"}
    assert ref.step("schedstats-off")["sysctl"] == {"kernel.sched_schedstats": "0"}
    jt = kernel.table("__jump_table")
    key = kernel.sym("sched_schedstats")
    text = kernel.section(".text")
    entries = [e for e in jump_table(jt.data, jt.start, jt.start, jt.stop)
               if e.key == key and text.addr <= e.code < text.end]
    assert len(entries) > 20
    before, on, off = texts["kprobes-off"], texts["schedstats-on"], texts["schedstats-off"]

    def is_jmp(code: bytes) -> bool:
        return code[0] in (0xE9, 0xEB)

    def is_nop(code: bytes) -> bool:
        return code == NOP5 or code[:2] == b"\x66\x90"
    for e in entries:
        a = e.code
        x, y, z = at(kernel, before, a, 5), at(kernel, on, a, 5), at(kernel, off, a, 5)
        assert x != y and x == z, hex(a)
        # a site emitted for "unlikely" is a NOP while the key is off and a
        # JMP while on; a "likely" one the other way round
        assert (is_jmp(x), is_nop(y)) == (e.branch, e.branch), (hex(a), e.branch, x.hex(), y.hex())
        assert (is_nop(x), is_jmp(y)) == (not e.branch, not e.branch), (hex(a), x.hex(), y.hex())


def _ko_fentry_offsets(path) -> list[int]:
    """Offsets in .text of a .ko's fentry sites (its __mcount_loc relocations)."""
    elf = ElfFile(path.read_bytes(), str(path))
    rela = elf.section(".rela__mcount_loc")
    symtab = next(s for s in elf.sections if s.name == ".symtab")
    syms = elf.symbol_table(symtab)
    text = elf.section(".text").index
    out = []
    for _off, _typ, si, addend in elf.relocations(rela):
        _name, value, _size, _t, _b, shndx = syms[si]
        if shndx == text:
            out.append(value + addend)
    return out


def test_modules_text_is_saved_while_loaded(ref, kernel, texts):
    for name, _ in DEFAULT_MODULES:
        ko = ref.path / ref.manifest["modules"][name]["file"]
        execs = module_exec_sections(ko)
        ins = ref.step(f"insmod-{name}")
        secs = ins["allocated"]["modules"][name]
        assert ".text" in secs and secs[".text"] >= 0xffffffffa0000000
        regs = {r["name"]: r for r in ins["regions"]
                if r["kind"] == "module" and r["name"].startswith(f"{name} ")}
        assert set(regs) == {f"{name} {s}" for s in execs if s in secs}
        body = ref.region(regs[f"{name} .text"])
        assert len(body) == execs[".text"]
        # every fentry site of the module is a NOP once loaded
        offs = _ko_fentry_offsets(ko)
        assert offs and all(body[o:o + 5] == NOP5 for o in offs)
        # and the region is gone once the module is
        rm = ref.step(f"rmmod-{name}")
        assert name not in rm["allocated"]["modules"]
        assert not any(r["name"].startswith(f"{name} ") for r in rm["regions"])
    # rmmod leaves the core kernel's executable text alone; insmod too, but
    # for call-depth tracking's accounting thunks, written into the NOP
    # padding before the kernel functions the module calls
    caps, f = ref.manifest["caps"], kernel.line.features
    depth = bool(caps[f["call_depth"] // 32] >> (f["call_depth"] % 32) & 1)
    names = [st["name"] for st in ref.steps]
    first = names.index(f"insmod-{DEFAULT_MODULES[0][0]}")
    for prev, name in zip(names[first - 1:], names[first:]):
        for s in kernel.executable_sections():
            if s.name == ".init.text":
                continue
            lo, hi = s.addr - kernel.text_start, s.end - kernel.text_start
            x, y = texts[prev][lo:hi], texts[name][lo:hi]
            if name.startswith("rmmod-") or not depth:
                assert x == y, (name, s.name)
                continue
            changed = [i for i in range(0, len(x), 4096) if x[i:i + 4096] != y[i:i + 4096]]
            for blk in changed:
                for i in range(blk, min(blk + 4096, len(x))):
                    if x[i] != y[i]:
                        assert x[i] == 0x90, (name, hex(s.addr + i), kernel.describe(s.addr + i))
