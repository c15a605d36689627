# SPDX-License-Identifier: GPL-2.0-only
"""The run-time clients over Debian's real 6.12 image, offline
(``textpoke.kernel._offline``): ftrace and static keys read the image's
own tables and patch its booted memory; the CLI's ``--image`` path writes
that memory and compares it.  Skips where the image is not cached."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke import x86_nops

NOP5 = x86_nops[5]
TRAMP = 0xFFFFFFFFC0000000
SLOTS = 0xFFFFFFFFC0200000
MODS = 0xFFFFFFFFC0400000


def _image_dir() -> Path | None:
    cached = sorted((Path.home() / ".cache/textpoke/kernel").glob("6.12.*-cloud-amd64"))
    for d in (os.environ.get("TEXTPOKE_KERNEL_DIR"), *[str(c) for c in cached[::-1]]):
        if d and (Path(d) / "vmlinuz").is_file():
            return Path(d)
    return None


@pytest.fixture(scope="module")
def booted():
    d = _image_dir()
    if d is None:
        pytest.skip("Debian's 6.12 cloud kernel is not cached (make test-kernel fetches it)")
    from textpoke._alternative._kearly import read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    img = load_kernel(str(d / "vmlinuz"))
    cfg = read_config(d / "config") if (d / "config").is_file() else None
    ok = offline_kernel(img, CpuCaps.from_names(["always"]), BootOptions(ncpus=1), config=cfg,
                        regions=[ExecRegion(TRAMP, 4096, "ftrace"),
                                 ExecRegion(SLOTS, 64 * 4096, "kprobes"),
                                 ExecRegion(MODS, 256 * 4096, "modules")])
    core = ok.machine.core
    ok.booted_text = bytes(ok.machine.text_read(core.start, core.end - core.start))
    yield d, ok
    ok.close()


def _text(ok) -> bytes:
    c = ok.machine.core
    return ok.machine.text_read(c.start, c.end - c.start)


def _call_target(site: int, insn: bytes) -> int:
    assert insn[0] == 0xE8, insn.hex()
    return site + 5 + struct.unpack("<i", insn[1:5])[0]


def test_the_kernel_object_follows_the_images_config(booted):
    d, ok = booted
    k = ok.kernel
    if (d / "config").is_file():
        # Debian's: preemptible (no kprobe boosting), kprobes on ftrace, IBT
        assert k.config == {"X86_KERNEL_IBT": True, "PREEMPTION": True,
                            "KPROBES_ON_FTRACE": True}
    assert "offline" in repr(k)


def test_ftrace_records_are_the_core_texts_mcount_sites(booted):
    _d, ok = booted
    ft = ok.kernel.ftrace
    lo, hi = ok.machine.core.start, ok.machine.core.end
    assert len(ft.records) > 40000
    assert all(lo <= r.ip < hi for r in ft.records)
    # every record holds the NOP5 that ftrace_init left, none is enabled
    assert all(ok.machine.text_read(r.ip, 5) == NOP5 for r in ft.records[::97])
    # records are named by their function, as available_filter_functions
    assert "vfs_read" in ft.by_name and ft.by_name["vfs_read"].ip in range(
        ok.image.sym("vfs_read"), ok.image.sym("vfs_read") + 16)


def test_ftrace_enables_the_filtered_sites_through_the_trampoline_and_restores(booted):
    _d, ok = booted
    ft = ok.kernel.ftrace
    img = ok.image
    n = ft.set_ftrace_filter("vfs_*")
    assert 10 < n < 500
    up = ft.start("function")
    try:
        assert up.enabled == n and up.batches == -(-n // 256)
        t = ft.trampolines["function"]
        assert t.addr == TRAMP            # the address given, as the kernel allocated it
        sel = {r.ip for r in ft.selected()}
        for r in ft.records:
            insn = ok.machine.text_read(r.ip, 5)
            if r.ip in sel:
                assert _call_target(r.ip, insn) == TRAMP, r.name
            else:
                assert insn == NOP5, r.name
        tb = ok.machine.text_read(TRAMP, t.size)
        # the copy of ftrace_caller calls the tracer, and its op load reads
        # the pointer after the return slot: global_ops
        call = t.call_offset
        assert _call_target(TRAMP + call, tb[call:call + 5]) == img.sym("function_trace_call")
        assert struct.unpack("<Q", tb[-8:])[0] == img.sym("global_ops")
    finally:
        dn = ft.stop()
    assert dn.disabled == n
    assert ok.kernel.core.int3_left() == 0
    # ftrace_call and every site back as boot left them
    assert _text(ok) == ok.booted_text


def test_a_static_key_switches_its_run_time_entries_and_back(booted):
    _d, ok = booted
    keys = ok.kernel.keys
    key = keys.key("sched_schedstats")
    assert key.enabled == 0 and len(key.sites) >= 50
    keys.static_key_enable("sched_schedstats")
    try:
        m = ok.machine
        live = [s for s in key.sites if not s.entry.init and m.is_text(s.entry.code, s.size)]
        assert live
        for s in live:
            b = m.text_read(s.entry.code, s.size)
            # the key is on and the entry is "unlikely": a jump to its target
            if not s.entry.branch:
                assert b[0] in (0xEB, 0xE9)
                rel = b[1] if s.size == 2 else struct.unpack("<i", b[1:5])[0]
                if s.size == 2 and rel > 127:
                    rel -= 256
                assert s.entry.code + s.size + rel == s.entry.target
        # the count is mirrored into the kernel's struct static_key
        assert struct.unpack("<i", m.mem.read(key.addr, 4))[0] == 1
    finally:
        keys.static_key_disable("sched_schedstats")
    assert _text(ok) == ok.booted_text


@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="a second boot of the real image (set TEXTPOKE_KERNEL_TESTS=1)")
def test_kprobes_follow_the_images_config_on_its_own_instructions(booted):
    _d, ok = booted
    k = ok.kernel
    if not k.config["KPROBES_ON_FTRACE"]:
        pytest.skip("the image's config is not cached next to it")
    kp = k.kprobes
    img = ok.image
    m = ok.machine
    start = img.sym("vfs_read")
    # a sealed ENDBR (66 0f 1f 00) is still an ENDBR to arch_adjust_kprobe_addr:
    # the bare symbol is the fentry NOP after it, probed through ftrace
    assert m.text_read(start, 4) == bytes.fromhex("660f1f00")
    p = kp.register_kprobe("vfs_read")
    q = kp.register_kprobe("vfs_read+0x13")
    try:
        assert p.addr == start + 4 and kp.site_info(p)["how"].startswith("ftrace")
        tramp = k.ftrace.trampolines[kp.site_info(p)["how"][8:-1]]
        assert _call_target(p.addr, m.text_read(p.addr, 5)) == tramp.addr
        assert TRAMP <= tramp.addr < TRAMP + 4096 and tramp.save_regs  # from ftrace_regs_caller
        # an INT3 probe elsewhere; PREEMPTION=y: never boosted
        assert m.text_read(q.addr, 1) == b"\xcc" and kp.site_info(q)["how"] == "single-step"
        kp.optimize_kprobe(q)
        b = m.text_read(q.addr, 5)
        assert b[0] == 0xE9
        detour = q.addr + 5 + struct.unpack("<i", b[1:5])[0]
        assert SLOTS <= detour < SLOTS + 64 * 4096
    finally:
        kp.unregister_kprobe(q)
        kp.unregister_kprobe(p)
    assert k.core.int3_left() == 0
    assert _text(ok) == ok.booted_text


def test_a_function_with_an_exception_table_entry_is_not_optimised(booted):
    """can_optimize: fixup code may jump into a function with an
    ``__ex_table`` entry, so its probes stay INT3 probes."""
    from textpoke import KprobeError
    _d, ok = booted
    kp = ok.kernel.kprobes
    start = ok.image.sym("strncpy_from_user")
    p = kp.register_kprobe("strncpy_from_user")       # notrace: after its ENDBR
    assert p.symbol == "strncpy_from_user" and not kp.site_info(p)["how"].startswith("ftrace")
    try:
        assert kp._extable_in(start, start + kp.functions["strncpy_from_user"][1])
        with pytest.raises(KprobeError, match="exception-table") as ei:
            kp.optimize_kprobe(p)
        assert ei.value.reason == "optimize" and not kp.is_optimized(p)
        assert kp.kprobe_optimizer() == []
    finally:
        kp.unregister_kprobe(p)
    assert _text(ok) == ok.booted_text


def test_the_optprobe_template_is_the_images_own(booted):
    """The buffer an optimised probe gets starts with the kernel's
    optprobe_template (``.rodata``, read from the image): the same bytes."""
    from textpoke._kprobes._opt import TMPL_END_IDX, optprobe_template
    _d, ok = booted
    img = ok.image
    lo, hi = img.symbols.get("optprobe_template_entry"), img.symbols.get("optprobe_template_end")
    if lo is None or hi is None:
        pytest.skip("the image's kallsyms has no optprobe_template_* (no KALLSYMS_ALL)")
    assert hi - lo == TMPL_END_IDX
    assert ok.machine.mem.read(lo, hi - lo) == optprobe_template()


_PACKAGE_MODULES: dict = {}


def _package_module(d: Path, tmp: Path, rel: str) -> bytes | None:
    """A module of the image's own package (the cached -unsigned .deb); the
    package is unpacked once per session for every module the tests use."""
    import lzma
    import shutil
    key = (str(d), rel)
    if key in _PACKAGE_MODULES:
        return _PACKAGE_MODULES[key]
    debs = sorted((d.parent / "debs").glob(f"linux-image-{d.name}-unsigned_*.deb"))
    if not debs or not shutil.which("dpkg-deb"):
        return None
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True,
                         check=True).stdout
    import io
    import tarfile
    wanted = {"drivers/net/dummy", "block/kyber-iosched", "block/bfq", rel}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t:
            for w in wanted:
                if m.name.endswith(w + ".ko.xz"):
                    _PACKAGE_MODULES[(str(d), w)] = lzma.decompress(t.extractfile(m).read())
    return _PACKAGE_MODULES.setdefault(key, None)


def test_a_module_of_the_images_package_is_linked_and_placed(booted, tmp_path):
    d, ok = booted
    raw = _package_module(d, tmp_path, "drivers/net/dummy")
    if raw is None:
        pytest.skip("the image's package (.deb with its modules) is not cached")
    k = ok.kernel
    mod = k.modules.load(raw, "dummy")
    try:
        m = ok.machine
        assert mod.text == MODS and mod.text_size > 0
        # ftrace_module_init: no fentry call is left in the module's text
        fentry = ok.image.sym("__fentry__")
        text = m.text_read(mod.text, mod.text_size)
        calls = [i for i in range(len(text) - 4) if text[i] == 0xE8 and
                 mod.text + i + 5 + struct.unpack("<i", text[i + 1:i + 5])[0] == fentry]
        assert calls == [] and mod.finalize["__mcount_loc"] >= 5
        # its static calls (cond_resched's trampoline, whose key is not
        # exported) are registered with the kernel's calls
        assert mod.static_call_sites == 3
        assert any(s.owner == "dummy" for c in k.calls.calls.values() for s in c.sites)
    finally:
        k.modules.unload("dummy")
    assert m.text_read(MODS, mod.text_size) == b"\xcc" * mod.text_size
    assert _text(ok) == ok.booted_text


def test_a_module_with_its_own_keys_and_calls(booted, tmp_path):
    """kyber-iosched defines tracepoints: static keys and static calls whose
    keys live in its own data.  They are made at load (jump_label_add_module,
    static_call_add_module), switch the module's sites and go with it."""
    d, ok = booted
    raw = _package_module(d, tmp_path, "block/kyber-iosched")
    if raw is None:
        pytest.skip("the image's package (.deb with its modules) is not cached")
    k = ok.kernel
    mod = k.modules.load(raw, "kyber_iosched")
    try:
        m = ok.machine
        assert len(mod.own_keys) == 3 and len(mod.own_calls) == 3
        key = k.keys.key("kyber_iosched:__tracepoint_kyber_latency") \
            if "kyber_iosched:__tracepoint_kyber_latency" in k.keys.keys else \
            k.keys.key(mod.sym("__tracepoint_kyber_latency") + 8)
        assert key.enabled == 0 and key.sites and all(s.owner == "kyber_iosched" for s in key.sites)
        # each site of the module's own tp_func_* call calls the key's function
        c = k.calls.call("tp_func_kyber_latency")
        assert c.func == mod.sym("__traceiter_kyber_latency") and c.tramp == \
            mod.sym("__SCT__tp_func_kyber_latency")
        for s in c.sites:
            assert _call_target(s.site.addr, m.text_read(s.site.addr, 5)) == c.func
        before = [m.text_read(s.entry.code, s.size) for s in key.sites]
        k.keys.static_key_enable(key)
        assert [m.text_read(s.entry.code, s.size) for s in key.sites] != before
        k.keys.static_key_disable(key)
        assert [m.text_read(s.entry.code, s.size) for s in key.sites] == before
    finally:
        k.modules.unload("kyber_iosched")
    assert key.addr not in {x.addr for x in k.keys.keys.values()}
    assert "tp_func_kyber_latency" not in k.calls.calls
    assert _text(ok) == ok.booted_text


def test_module_its_thunks_go_to_pages_of_its_own(tmp_path):
    """With X86_FEATURE_INDIRECT_THUNK_ITS (no run-time reference setup has
    it: TCG's CPU models never get there) a module's indirect branches that
    would end in the lower half of a cache line go to ``jmp *%reg; int3``
    thunks in an execmem page of the module's own (its_init_mod: a fresh
    page, thunks from offset 32, upper line halves), freed with it."""
    from textpoke._alternative._kearly import read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    d = _image_dir()
    if d is None:
        pytest.skip("Debian's 6.12 cloud kernel is not cached (make test-kernel fetches it)")
    raw = _package_module(d, tmp_path, "block/kyber-iosched")
    if raw is None:
        pytest.skip("the image's package (.deb with its modules) is not cached")
    cfg = read_config(d / "config") if (d / "config").is_file() else None
    with offline_kernel(load_kernel(str(d / "vmlinuz")),
                        CpuCaps.from_names(["always", "indirect_thunk_its"]),
                        BootOptions(ncpus=1), config=cfg,
                        regions=[ExecRegion(MODS, 256 * 4096, "modules")]) as ok:
        m = ok.machine
        loader = ok.kernel.modules
        mod = loader.load(raw, "kyber_iosched")
        assert len(mod.its_pages) == 1
        (page, thunks), = mod.its_pages.items()
        assert page % 4096 == 0 and page >= mod.text + mod.text_size
        assert thunks and thunks[0][0] == page + 32
        body = m.text_read(page, 4096)
        targets = set()
        for a, reg in thunks:
            code = (b"\x41" if reg >= 8 else b"") + bytes([0xFF, 0xE0 + reg % 8, 0xCC])
            assert body[a - page:a - page + len(code)] == code
            assert (a - page + len(code) - 2) % 64 >= 32        # the branch ends high
            targets.add(a)
        assert body.count(0xCC) == 4096 - sum(2 + (r >= 8) for _a, r in thunks)
        # each of them is the target of one of the module's former retpoline sites
        text = m.text_read(mod.text, mod.text_size)
        hits = {mod.text + i + 5 + struct.unpack("<i", text[i + 1:i + 5])[0]
                for i in range(len(text) - 5) if text[i] in (0xE8, 0xE9)}
        assert targets <= hits
        loader.unload(mod)
        assert m.text_read(page, 4096) == b"\xcc" * 4096 and loader.execmem.used == {}


def test_cli_keys_image_dumps_the_step_and_names_what_differs(booted, tmp_path):
    d, ok = booted
    keys = ok.kernel.keys
    off = tmp_path / "off.bin"
    off.write_bytes(bytes(ok.kt.buf))
    keys.static_key_enable("sched_schedstats")
    try:
        on = bytes(ok.kt.buf)
    finally:
        keys.static_key_disable("sched_schedstats")
    dump = tmp_path / "ours.bin"
    # one CPU: boot's default, what the library fixture booted
    argv = [sys.executable, "-m", "textpoke", "keys", "--image", str(d / "vmlinuz"), "--cpus", "1",
            "--no-early", "--enable", "sched_schedstats", "--dump", str(dump), "--reference", str(off),
            "--json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr         # it differs from the key-off memory
    doc = json.loads(p.stdout)
    assert doc["int3_left"] == 0 and doc["actions"][0]["enabled"] == 1 and doc["sites"] > 0
    assert dump.read_bytes() == on              # the same bytes as the library's step
    assert list(doc["differing_bytes"]) == [".text"] and doc["differing_bytes"][".text"] > 0
    assert doc["differing_ranges"] and all("+0x" in r["where"] for r in doc["differing_ranges"])


def test_real_image_options_are_refused_without_image():
    for argv in (["ftrace", "--trampoline", "0xffffffffc0000000"], ["keys", "--dump", "x.bin"]):
        p = subprocess.run([sys.executable, "-m", "textpoke", *argv], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and "give --image" in p.stderr, (argv, p.stderr)
    p = subprocess.run([sys.executable, "-m", "textpoke", "ftrace", "--trampoline",
                        "0xffffffffc0000010"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "page-aligned" in p.stderr


# ------------------------------------------- against the kernel at run time
def _runtime_refs() -> list[Path]:
    root = Path(os.environ.get("TEXTPOKE_CACHE", Path.home() / ".cache/textpoke")) / "reference"
    return sorted(root.glob("6.*/runtime-*/manifest.json"))


@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="boots the real image once per step group (set TEXTPOKE_KERNEL_TESTS=1)")
@pytest.mark.parametrize("manifest", _runtime_refs() or [None],
                         ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}" if p else "none")
def test_the_clients_equal_the_kernels_own_run_time_text(manifest):
    """Each step of the QEMU run-time reference, redone by the clients from
    the kernel's memory at the stop before it: 0 differing bytes in .text
    and in the run-time pages the step wrote."""
    if manifest is None:
        pytest.skip("no run-time reference cached (tools/kernel_runtime_reference.py)")
    import dataclasses
    import zstandard
    from textpoke._alternative._kdiff import diff_sections
    from textpoke._alternative._kearly import EarlyBoot, read_config
    from textpoke.kernel import BootOptions, CpuCaps, ExecRegion, load_kernel, offline_kernel
    from textpoke.kernel._offline import tracing_cmdline_record
    ref = manifest.parent
    m = json.loads(manifest.read_text())
    d = ref.parent.parent.parent / "kernel" / m["kernel"]["release"]
    if not (d / "vmlinuz").is_file():
        pytest.skip(f"{d}/vmlinuz is not cached")
    img = load_kernel(str(d / "vmlinuz"))
    cfg = read_config(d / "config")
    steps = {s["name"]: s for s in m["steps"]}
    index = [s["name"] for s in m["steps"]]
    if any(not (ref / s["text"]["file"]).is_file() for s in m["steps"]):
        pytest.skip(f"{ref.name}: incomplete (being retaken?)")

    def text(name: str) -> bytes:
        f = ref / steps[name]["text"]["file"]
        return zstandard.ZstdDecompressor().decompress(f.read_bytes(), max_output_size=1 << 27)

    def session(start: str, regions=()):
        mem = int(m["setup"]["memory"].rstrip("G")) << 30
        return offline_kernel(
            img, CpuCaps(m["caps"]), BootOptions(return_thunk=m["return_thunk_sym"],
                                                 ncpus=m["setup"]["smp"]),
            early=EarlyBoot(cmdline=m["setup"]["cmdline"], ncpus=m["setup"]["smp"], mem=mem,
                            config=cfg),
            config=cfg, regions=regions, before=text(start))

    def check(ok, name: str) -> None:
        live = dataclasses.replace(ok.kt, exec_ranges=[r for r in ok.kt.exec_ranges
                                                       if r[0] == ".text"], changes=[])
        assert diff_sections(live, text(name)) == {".text": 0}, name
        for r in steps[name]["regions"]:
            mine = [x for x in ok.machine.regions if x.start <= r["addr"] < x.end]
            if mine and (r["kind"] == "module" or mine[0].start == r["addr"]):
                got = ok.machine.text_read(r["addr"], r["size"])
                assert got == (ref / r["file"]).read_bytes()[:len(got)], (name, r["name"])

    on = steps["ftrace-function-on"]["allocated"]["ftrace_trampolines"]
    with session(index[index.index("ftrace-function-on") - 1],
                 [ExecRegion(on[0], 4096, "ftrace")]) as ok:
        ft = ok.kernel.ftrace
        ft.set_ftrace_filter(m["probes"]["ftrace_glob"])
        ft.start("function")
        tracing_cmdline_record(ok.kernel, True)
        check(ok, "ftrace-function-on")
        ft.stop()
        tracing_cmdline_record(ok.kernel, False)
        check(ok, "ftrace-function-off")

    # the optimised kprobe, then the kretprobe (KPROBES_ON_FTRACE puts it on
    # the fentry NOP through kprobe_ftrace_ops' own trampoline, a new page),
    # then both gone (kprobes-off): one session from the stop before the
    # first, each step compared
    al = steps["kretprobe-on"]["allocated"]
    tr = [a for a in al["ftrace_trampolines"]
          if a not in steps[index[index.index("kretprobe-on") - 1]]["allocated"][
              "ftrace_trampolines"]]
    with session(index[index.index("kprobe-optimized-on") - 1],
                 [ExecRegion(al["kprobe_insn_pages"][0], 4096, "kprobes"),
                  ExecRegion(al["kprobe_optinsn_pages"][0], 4096, "optprobes"),
                  ExecRegion(tr[0], 4096, "ftrace")]) as ok:
        from textpoke._kprobes._opt import buffer_op
        kp = ok.kernel.kprobes
        p = kp.register_kprobe(m["probes"]["kprobe"])
        tracing_cmdline_record(ok.kernel, True)
        # the buffer's first argument is a kmalloc address (struct
        # optimized_kprobe): an input, read from the kernel's own buffer
        page = next(r for r in steps["kprobe-optimized-on"]["regions"]
                    if r["kind"] == "kprobe_optinsn_page")
        kp.optprobe_ops[p.addr] = buffer_op((ref / page["file"]).read_bytes())
        kp.optimize_kprobe(p)
        assert kp.site_info(p)["detour"] == page["addr"]      # the page's first slot
        check(ok, "kprobe-optimized-on")        # the optinsn page compared too
        assert any(r.owner == "optprobes" for r in ok.machine.regions)
        rp = kp.register_kretprobe(m["probes"]["kretprobe"])
        check(ok, "kretprobe-on")
        # the events disabled, kprobe_events cleared: the probe's bytes back,
        # the ftrace site a NOP again, the cmdline probes gone -- and the
        # slot pages as the kernel leaves them (a freed slot is only marked)
        kp.unregister_kprobe(p)
        kp.unregister_kretprobe(rp)
        tracing_cmdline_record(ok.kernel, False)
        check(ok, "kprobes-off")
        compared = {r["name"] for r in steps["kprobes-off"]["regions"]
                    if any(x.start == r["addr"] for x in ok.machine.regions)}
        assert {"kprobe_insn_page", "kprobe_optinsn_page", "ftrace_trampoline"} <= compared

    # modules of the image's own package, each section where the kernel put it
    # (kyber_iosched defines static keys and calls of its own: its
    # tracepoints); then each rmmod: from the kernel's memory at the stop
    # before it (what the other module's load left in .text included: its
    # call-depth thunks), the module loaded where it is, then unloaded
    loaded = []
    for mname in m.get("modules", {}):
        for step in (f"insmod-{mname}", f"rmmod-{mname}"):
            if step not in steps:
                continue
            at = steps[f"insmod-{mname}"]["allocated"]["modules"][mname]
            base = min(a for a in at.values()) & ~0xFFF
            with session(index[index.index(step) - 1],
                         [ExecRegion(base, 1024 * 4096, "modules")]) as ok:
                ok.kernel.modules.load((ref / m["modules"][mname]["file"]).read_bytes(),
                                       mname, at=at)
                if step.startswith("insmod-"):
                    assert [r for r in steps[step]["regions"] if r["kind"] == "module"]
                else:
                    ok.kernel.modules.unload(mname)
                    assert not [r for r in steps[step]["regions"]
                                if r["name"].startswith(f"{mname} ")]
                check(ok, step)
                loaded.append(step)
    mods = [n for n in m.get("modules", {}) if f"insmod-{n}" in steps]
    assert loaded == [x for n in mods for x in (f"insmod-{n}", f"rmmod-{n}")]

    with session(index[index.index("schedstats-on") - 1]) as ok:
        ok.kernel.keys.static_key_enable("sched_schedstats")
        check(ok, "schedstats-on")
        ok.kernel.keys.static_key_disable("sched_schedstats")
        check(ok, "schedstats-off")


@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="unpacks a kernel package twice (set TEXTPOKE_KERNEL_TESTS=1)")
def test_package_modules_are_found_compressed_or_not(tmp_path, monkeypatch):
    """6.12's packages ship ``.ko.xz``, 6.1's plain ``.ko``: the run-time
    reference's module extraction takes either for the same name."""
    from textpoke.images._kmodules import module_file
    debs = Path.home() / ".cache/textpoke/kernel/debs"
    found = sorted(debs.glob("linux-image-6.1.*-cloud-amd64-unsigned_*.deb"))
    if not found or not __import__("shutil").which("dpkg-deb"):
        pytest.skip("Debian's 6.1 cloud image package is not cached")
    release = found[-1].name.removeprefix("linux-image-").split("-unsigned_")[0]
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "debs").symlink_to(debs)
    monkeypatch.setenv("TEXTPOKE_CACHE", str(tmp_path))
    ko = module_file(release, "kyber_iosched", "kernel/block/kyber-iosched.ko.xz")
    assert ko.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="boots Debian's 6.1 image offline (set TEXTPOKE_KERNEL_TESTS=1)")
def test_a_61_kernel_with_return_thunks_does_not_optimise_a_returning_function():
    """6.1's can_optimize (CONFIG_RETPOLINE) counts a jump into
    __indirect_thunk_start.._end as an indirect jump; 6.1 links the return
    thunks there, so with return thunks on (EPYC's default: SRSO) a
    function's ``jmp srso_return_thunk`` keeps its probes INT3 probes --
    the kernel under QEMU never optimised vfs_statx+5 in that setup."""
    from textpoke import KprobeError
    from textpoke._alternative._kearly import read_config
    from textpoke._alternative._kpasses import BootOptions
    from textpoke._alternative._ktext import CpuCaps
    from textpoke.images import load_kernel
    from textpoke.kernel import ExecRegion, offline_kernel
    root = Path.home() / ".cache/textpoke"
    kdirs = sorted((root / "kernel").glob("6.1.*-cloud-amd64"))
    metas = sorted((root / "reference").glob("6.1.*-cloud-amd64/EPYC-smp1-default-*/meta.json"))
    if not kdirs or not metas or not (kdirs[-1] / "vmlinuz").is_file():
        pytest.skip("Debian's 6.1 cloud kernel or its EPYC boot reference is not cached")
    d, meta = kdirs[-1], json.loads(metas[-1].read_text())
    img = load_kernel(str(d / "vmlinuz"))
    cfg = read_config(d / "config")
    lo, hi = img.sym("__indirect_thunk_start"), img.sym("__indirect_thunk_end")
    assert lo <= img.sym(meta["return_thunk_sym"]) < hi
    with offline_kernel(img, CpuCaps(meta["caps_after"]),
                        BootOptions(return_thunk=meta["return_thunk_sym"], ncpus=1), config=cfg,
                        regions=[ExecRegion(SLOTS, 4096, "kprobes"),
                                 ExecRegion(SLOTS + 0x10000, 4096, "optprobes")]) as ok:
        kp = ok.kernel.kprobes
        assert kp.thunk_range == (lo, hi)
        p = kp.register_kprobe("vfs_statx+5")
        try:
            with pytest.raises(KprobeError, match="jumps into the thunks"):
                kp.optimize_kprobe(p)
            assert kp.kprobe_optimizer() == [] and not kp.is_optimized(p)
        finally:
            kp.unregister_kprobe(p)
