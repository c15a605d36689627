# SPDX-License-Identifier: GPL-2.0-only
"""The run-time reference: a real kernel patching its own text at run time,
observed under QEMU step by step.

:func:`runtime_reference` boots Debian's kernel (the bzImage of a
:class:`~textpoke.images._vmlinux.DebianKernel`) under ``qemu-system-x86_64``
(TCG, ``nokaslr``) with a tiny initramfs: ``busybox-static`` and an init
script that drives the kernel's own interfaces, one *step* at a time
(:data:`~._qemu_runtime_steps.STEPS`, with the init script made there):
tracefs (``set_ftrace_filter`` with a small glob, the ``function`` tracer
on and off, ``function_graph`` on and off),
``kprobe_events`` (a kprobe past a function's fentry site, waited for until
``/sys/kernel/debug/kprobes/list`` says ``[OPTIMIZED]``; a kretprobe on a
function's entry, which ``KPROBES_ON_FTRACE`` puts on the fentry site),
a sysctl backed by a static key (``kernel.sched_schedstats`` 1, then 0), and
``insmod``/``rmmod`` of real modules of the same ``linux-image`` package
(``bfq``: alternatives, static keys, static calls, retpolines, ENDBR seal,
LOCK prefixes; ``kyber-iosched``: static keys and calls, retpolines).

After each step the script prints what the kernel allocated (lines
``RTREF <step> <key> ...`` written to ``/dev/kmsg``, so they are on the
serial console before the write returns), sets the host name to
``rt-<index>`` and calls ``sync(2)``.  The host has a **hardware
breakpoint** on ``__x64_sys_sync`` (gdbstub ``Z1``; nothing is written to
guest memory): at each stop it checks the stop is the script's (RIP, and
``init_uts_ns``'s nodename is ``rt-<index>``), saves guest-physical
``_text.._end`` (QMP ``pmemsave``, as the boot reference does) and every
run-time region by its virtual address (QMP ``memsave``), then lets the
guest go on (a stop whose host name is still the previous step's -- the
single step over the breakpoint did not leave it -- is let go on).
``rt-fail`` (a command of the script failed) ends the run with a
:class:`~textpoke.images._qemu.ReferenceError` carrying the console's tail.

A step changes more than its command names, as the kernel does: starting
the function tracer or enabling a kprobe event also turns on the
``sched_switch``/``sched_wakeup`` tracepoints the comm cache uses (their
static calls ``__SCT__tp_func_*`` and static-key sites in ``__schedule``,
``try_to_wake_up``...), and ``ftrace_call``/``ftrace_regs_call`` change
with the tracer; with call-depth tracking, ``insmod`` writes accounting
thunks into the core kernel's NOP padding.  The text is the kernel's, all
of it: compare the executable sections.

Manifest (``manifest.json`` in the reference directory; format 1)
================================================================

All addresses are JSON integers (kernel virtual addresses); every dump is
a file in the same directory, named by the first 16 hex digits of the
sha256 of its (uncompressed) bytes, so identical dumps are stored once::

  {
   "format": "textpoke-runtime-reference", "format_version": 1,
   "harness_version": N,
   "kernel": {"release": "6.12.118+deb12-cloud-amd64", "package_version": ...,
              "image_sha256": ..., "text_start": _text, "end": _end},
   "setup":  {"cpu": "qemu64", "cmdline": "mitigations=off", "smp": 1, "memory": "1G",
              "kernel_cmdline": the whole command line},
   "qemu":   {"version": ..., "argv": [...]},
   "caps":   [24 u32: boot_cpu_data.x86_capability at the first stop],
   "return_thunk": address in x86_return_thunk, "return_thunk_sym": its symbol,
   "probes": {"ftrace_glob": "vfs_read*", "kprobe": "vfs_statx+5",
              "kprobe_addr": address, "kretprobe": "do_sys_openat2"},
   "modules": {"bfq": {"file": "modules/bfq.ko" (in the reference dir; decompressed),
                       "sha256": ..., "source": "kernel/block/bfq.ko.xz" (in the .deb)}},
   "phys_base": the kernel's phys_base (the text dumps are guest-physical memory),
   "seconds": {"wall": QEMU start -> last stop, "qemu_cpu": QEMU's user+system CPU},
   "serial": the console (its last MiB),
   "steps": [
     {"index": 0, "name": "boot",
      "did": ["shell command", ...]      -- what the script ran for this step
                                          ("wait_optimized": poll kprobes/list every
                                          0.1 s until a probe is [OPTIMIZED]),
      "seconds": QEMU start -> this stop,
      "text": {"addr": _text, "size": _end - _text, "file": "text-<sha16>.bin.zst"
               (zstd), "sha256": sha256 of the uncompressed dump -- all of _text.._end,
               data and bss included: compare the executable sections},
      "regions": [                        -- run-time text (vmalloc/execmem), dumped here
         {"kind": "module" | "ftrace_trampoline" | "kprobe_insn_page" |
                  "kprobe_optinsn_page",
          "name": "bfq .text" | symbol name, "addr": A, "size": N,
          "file": "region-<sha16>.bin", "sha256": ...}],
      "allocated": {                      -- what the kernel said it allocated
         "kallsyms_builtin": [[addr, type, name, "[__builtin__ftrace]"], ...]
                              (a trampoline enabled_functions names but /proc/kallsyms
                              did not list has module "[enabled_functions]"),
         "ftrace_trampolines": [addr, ...], "kprobe_insn_pages": [addr, ...],
         "kprobe_optinsn_pages": [addr, ...],
         "modules": {"bfq": {".text": addr, "__jump_table": addr, ...}}  -- every
                     section /sys/module/<name>/sections lists, while loaded},
      "tracefs": {"set_ftrace_filter": [names], "enabled_functions": [lines],
                  "kprobes_list": [lines of /sys/kernel/debug/kprobes/list]},
      "sysctl": {"kernel.sched_schedstats": "0"}
     }, ...]
  }

Regions: a module's region is one executable section (``SHF_ALLOC|SHF_EXECINSTR``
in its ``.ko``, init sections excepted -- they are freed once the module's
init has run) at the address ``/sys/module/<name>/sections`` gives, its size
the section's in the ``.ko``; trampolines and kprobe instruction pages are
dumped as the whole page (4096 bytes) from the address ``/proc/kallsyms``
gives (``[__builtin__ftrace]`` / ``[__builtin__kprobes]``): the kernel's
code is at its start, the rest of the page is whatever the allocator left.
A step lists the regions alive at its stop (a module from its insmod step
to the step before its rmmod).

References are cached under ``$TEXTPOKE_CACHE`` (or ``~/.cache/textpoke``)
``/reference/<release>/runtime-<cpu>-smp<N>-<cmdline>-<key>/``, the key a
hash of (harness version, image sha256, setup, the modules' sha256, the
script, QEMU's version).  The command is ``tools/kernel_runtime_reference.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ._kmodules import module_exec_sections, module_file
from ._qemu import Setup, cache_root
from ._qemu_runtime_steps import (DEFAULT_MODULES, EXTRA_CMDLINE, FTRACE_GLOB,
                                  KRETPROBE_FUNCTION, RUNTIME_SETUPS, kprobe_target)
from ._qemu_runtime_steps import script as make_script
from ._qemu_runtime_steps import steps as make_steps
from ._qemu_vm import BASE_CMDLINE, ReferenceError, build_initramfs, guest, qemu_version
from ._vmlinux import RealKernelImage

__all__ = ["RuntimeReference", "runtime_reference", "runtime_reference_dir", "FORMAT_VERSION",
           "load_manifest"]

FORMAT_VERSION = 1
#: bump when what a run-time reference contains or how it is taken changes
RUNTIME_HARNESS_VERSION = 1
PAGE = 4096
# ------------------------------------------------------------- the record
@dataclass
class RuntimeReference:
    path: Path
    manifest: dict

    @property
    def steps(self) -> list[dict]:
        return self.manifest["steps"]

    def step(self, name: str) -> dict:
        for s in self.steps:
            if s["name"] == name:
                return s
        raise KeyError(name)

    def text(self, step: dict | str) -> bytes:
        import zstandard
        st = self.step(step) if isinstance(step, str) else step
        return zstandard.ZstdDecompressor().decompress((self.path / st["text"]["file"]).read_bytes())

    def region(self, reg: dict) -> bytes:
        return (self.path / reg["file"]).read_bytes()


def load_manifest(d: Path) -> RuntimeReference:
    m = json.loads((d / "manifest.json").read_text())
    if m.get("format") != "textpoke-runtime-reference" or m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d}: not a format-{FORMAT_VERSION} run-time reference")
    return RuntimeReference(d, m)


def runtime_reference_dir(image: RealKernelImage, setup: Setup, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.=,_-]+", "_", setup.cmdline).strip("_") or "default"
    return (cache_root() / "reference" / image.version /
            f"runtime-{setup.cpu}-smp{setup.smp}-{slug[:60]}-{key}")


def runtime_reference(kernel, setup: Setup = RUNTIME_SETUPS[0], *, memory: str = "1G",
                      modules: tuple[tuple[str, str], ...] = DEFAULT_MODULES,
                      timeout: float = 900.0, use_cache: bool = True,
                      progress=None) -> RuntimeReference:
    """The run-time reference of *kernel* (a DebianKernel) in *setup*: built
    (one QEMU boot) or taken from the cache."""
    image = kernel.load()
    kos = {n: module_file(image.version, n, src) for n, src in modules}
    kprobe, kprobe_addr = kprobe_target(image)
    subst = {"glob": FTRACE_GLOB, "kprobe": kprobe, "kretprobe": KRETPROBE_FUNCTION}
    steps = make_steps(modules)
    script = make_script(steps, subst)
    ko_sha = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in kos.items()}
    key = hashlib.sha256(json.dumps([RUNTIME_HARNESS_VERSION, image.sha256, setup.cpu,
                                     setup.cmdline, setup.smp, memory, ko_sha, script,
                                     qemu_version()]).encode()).hexdigest()[:12]
    d = runtime_reference_dir(image, setup, key)
    if use_cache and (d / "manifest.json").exists():
        try:
            return load_manifest(d)
        except (OSError, ValueError, KeyError) as e:
            print(f"textpoke: ignoring a damaged cached run-time reference {d}: {e}")
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for n, p in kos.items():
            (tmp / "modules").mkdir(exist_ok=True)
            shutil.copyfile(p, tmp / "modules" / f"{n}.ko")
        manifest = _run(kernel, image, setup, memory, steps, subst, script, kos, tmp, timeout,
                        progress)
        manifest["probes"] = {"ftrace_glob": FTRACE_GLOB, "kprobe": kprobe,
                              "kprobe_addr": kprobe_addr, "kretprobe": KRETPROBE_FUNCTION}
        manifest["modules"] = {n: {"file": f"modules/{n}.ko", "sha256": ko_sha[n], "source": src}
                               for n, src in modules}
        (tmp / "init.sh").write_text(script)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_manifest(d)


_LINE = re.compile(r"RTREF (\d+)-(\S+) (\S+) ?(.*)$")


def _parse(serial: str, index: int) -> dict:
    """The script's lines of step *index*: {key: [values]}."""
    out: dict[str, list[str]] = {}
    for line in serial.splitlines():
        m = _LINE.search(line)
        if m and int(m.group(1)) == index:
            out.setdefault(m.group(3), []).append(m.group(4).rstrip("\r"))
    return out


def _run(kernel, image, setup, memory, steps, subst, script, kos, out: Path, timeout,
         progress) -> dict:
    import zstandard
    kcmd = f"{BASE_CMDLINE} {EXTRA_CMDLINE} {setup.cmdline}".strip()
    comp = zstandard.ZstdCompressor(level=3, threads=-1)
    size = image.end - image.text_start
    sync_fn = image.sym("__x64_sys_sync")
    uts = image.sym("init_uts_ns")
    ko_exec = {n: module_exec_sections(p) for n, p in kos.items()}
    with guest(kernel.vmlinuz, cpu=setup.cpu, smp=setup.smp, memory=memory, append=kcmd,
               initrd=build_initramfs(script, kos), prefix="textpoke-rtref-",
               die_with_parent=True) as g:
        gdb = g.gdb
        gdb.hbreak(sync_fn)
        t0 = time.monotonic()
        deadline = t0 + timeout
        phys_base = None
        manifest_steps = []
        caps: list[int] = []
        rthunk = 0
        loaded: dict[str, dict[str, int]] = {}

        def store(data: bytes, prefix: str, compress: bool) -> tuple[str, str]:
            sha = hashlib.sha256(data).hexdigest()
            name = f"{prefix}-{sha[:16]}.bin" + (".zst" if compress else "")
            if not (out / name).exists():
                (out / name).write_bytes(comp.compress(data) if compress else data)
            return name, sha

        at_break = False
        for i, st in enumerate(steps):
            again = 0
            while True:
                if at_break:
                    # step over the breakpoint (else continuing stops at it again)
                    gdb.hbreak(sync_fn, on=False)
                    r = gdb.cmd("s", timeout=60)
                    if not r.startswith(("T", "S")):
                        raise ReferenceError(f"unexpected reply {r!r} to a single step")
                    gdb.hbreak(sync_fn)
                g.run_to(image, sync_fn, f"__x64_sys_sync (step {st.name})", deadline,
                         f"the init script did not reach step {i} ({st.name}) "
                         f"within {timeout:.0f} s", tail=2000)
                at_break = True
                name = gdb.read(uts, 130)
                if not name.startswith(b"Linux\0"):
                    raise ReferenceError("init_uts_ns does not start with 'Linux': "
                                         "not this kernel?")
                node = name[65:130].split(b"\0")[0].decode(errors="replace")
                if node == "rt-fail":
                    raise ReferenceError(f"the init script failed at step {i} ({st.name}): "
                                         f"{g.tail(3000)}")
                if i and node == f"rt-{i - 1}" and again < 3:
                    # the previous step's sync(2) stopped again (the single step
                    # did not leave the breakpoint's instruction): go on
                    again += 1
                    continue
                if node != f"rt-{i}":
                    raise ReferenceError(f"sync(2) with host name {node!r}, expected "
                                         f"'rt-{i}' (step {st.name})")
                break
            if phys_base is None:
                phys_base = g.u64(image.sym("phys_base"))
                caps = g.caps(image)
                rthunk = g.u64(image.sym("x86_return_thunk"))
            info = _parse(g.serial.read_text(errors="replace"), i)
            if "end" not in info:
                raise ReferenceError(f"step {st.name}: the script's lines are not on the console")
            text = g.text(image, phys_base)
            tfile, tsha = store(text, "text", True)
            # what the kernel allocated
            builtin = []
            for v in info.get("kallsyms", []):
                p = v.split()
                if len(p) >= 4:
                    builtin.append([int(p[0], 16), p[1], p[2], p[3]])
            for v in info.get("sect", []):
                mod, sec, addr = v.split()
                loaded.setdefault(mod, {})[sec] = int(addr, 16)
            if st.name.startswith("rmmod-"):
                loaded.pop(st.name[len("rmmod-"):], None)
            # the trampolines enabled_functions names are in use: listed even if
            # /proc/kallsyms did not show them
            used = [int(x, 16) for v in info.get("enabled", [])
                    for x in re.findall(r"tramp: (0x[0-9a-f]+)", v)]
            tramps = [b[0] for b in builtin if b[2] == "ftrace_trampoline"]
            for t_ in used:
                if t_ not in tramps:
                    tramps.append(t_)
                    builtin.append([t_, "t", "ftrace_trampoline", "[enabled_functions]"])
            if st.name == "kprobe-optimized-on" and not any(
                    "[OPTIMIZED]" in v for v in info.get("kprobes", [])):
                raise ReferenceError("kprobes/list as listed by the script shows no optimized "
                                     f"probe: {info.get('kprobes')}")
            allocated = {
                "kallsyms_builtin": builtin,
                "ftrace_trampolines": tramps,
                "kprobe_insn_pages": [b[0] for b in builtin if b[2] == "kprobe_insn_page"],
                "kprobe_optinsn_pages": [b[0] for b in builtin if b[2] == "kprobe_optinsn_page"],
                "modules": {m: dict(s) for m, s in loaded.items()},
            }
            regions = []
            for m, secs in loaded.items():
                for sec, n in ko_exec[m].items():
                    if sec not in secs:
                        continue
                    data = g.vdump(secs[sec], n)
                    fname, sha = store(data, "region", False)
                    regions.append({"kind": "module", "name": f"{m} {sec}", "addr": secs[sec],
                                    "size": n, "file": fname, "sha256": sha})
            for b in builtin:
                kind = b[2]
                if kind in ("ftrace_trampoline", "kprobe_insn_page", "kprobe_optinsn_page"):
                    base = b[0] & ~(PAGE - 1)
                    data = g.vdump(base, PAGE)
                    fname, sha = store(data, "region", False)
                    regions.append({"kind": kind, "name": kind, "addr": base, "size": PAGE,
                                    "symbol_addr": b[0], "file": fname, "sha256": sha})
            rec = {"index": i, "name": st.name,
                   "did": [c.format(**subst) for c in st.did],
                   "text": {"addr": image.text_start, "size": size, "file": tfile, "sha256": tsha},
                   "regions": regions, "allocated": allocated,
                   "seconds": round(time.monotonic() - t0, 3)}
            tfs = {}
            if "filter" in st.collect:
                tfs["set_ftrace_filter"] = [v for v in info.get("filter", []) if v
                                            and not v.startswith("#")]
            if "enabled" in st.collect:
                tfs["enabled_functions"] = info.get("enabled", [])
            if "kprobes" in st.collect:
                tfs["kprobes_list"] = info.get("kprobes", [])
            if tfs:
                rec["tracefs"] = tfs
            if "sysctl" in info:
                rec["sysctl"] = dict(v.split(None, 1) for v in info["sysctl"])
            manifest_steps.append(rec)
            if progress:
                progress(f"step {i} {st.name}: {time.monotonic() - t0:.1f} s")
        wall = time.monotonic() - t0
        cpu = g.cpu_seconds()
        return {
            "format": "textpoke-runtime-reference", "format_version": FORMAT_VERSION,
            "harness_version": RUNTIME_HARNESS_VERSION,
            "kernel": {"release": image.version, "package_version": kernel.package_version,
                       "image_sha256": image.sha256, "text_start": image.text_start,
                       "end": image.end},
            "setup": {"cpu": setup.cpu, "cmdline": setup.cmdline, "smp": setup.smp,
                      "memory": memory, "kernel_cmdline": kcmd},
            "qemu": {"version": qemu_version(), "argv": g.shown},
            "caps": caps, "return_thunk": rthunk, "return_thunk_sym": image.describe(rthunk),
            "phys_base": phys_base,
            "seconds": {"wall": round(wall, 3), "qemu_cpu": round(cpu, 3)},
            "steps": manifest_steps,
            "serial": g.tail(1 << 20),
        }
