# SPDX-License-Identifier: GPL-2.0-only
"""The run-time column of ``tools/kernel_reference.py``'s one table.

For a kernel and a CPU setup that have a run-time reference
(``images/_qemu_runtime.py``, built by ``tools/kernel_runtime_reference.py``),
:func:`compare_reference` redoes the reference's steps with the clients
over the image offline, each from the kernel's own memory at the stop
before it (``offline_kernel(before=)``), with the addresses the kernel
allocated given as inputs -- and counts the bytes that differ from the
kernel's memory after the step: ``.text`` plus the run-time pages the step
wrote (a trampoline, a kprobe slot page, a module's sections).
:func:`runtime_cell` makes that the table's cell:

``fn`` function tracer on/off, ``fg`` function_graph on/off, ``kp`` the
optimised kprobe (its slot and detour pages included), ``krp`` the
kretprobe, ``off`` both gone (``kprobes-off``), ``ss`` ``sched_schedstats``
on/off, then each module's ``insmod``/``rmmod`` (``refused``: the loader
refuses it).  ``-``: the setup has no
run-time reference.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["compare_reference", "runtime_cell", "find_reference", "main", "LEGEND"]

LEGEND = ("run time: bytes differing from the kernel's memory after each step (.text and the "
          "pages it wrote), each step redone from the kernel's memory before it -- fn function "
          "tracer on/off, fg function_graph on/off, kp optimised kprobe (with its slot and "
          "detour pages), krp kretprobe, off both removed, ss sched_schedstats on/off, "
          "then each module's insmod/rmmod ('refused': not loadable yet); '-': no run-time "
          "reference for the "
          "setup (tools/kernel_runtime_reference.py takes qemu64 mitigations=off, EPYC, "
          "Skylake-Client-v4 retbleed=stuff)")


def find_reference(image: Any, setup: Any) -> Path | None:
    """The newest cached run-time reference of *image* in *setup*."""
    from ..images._qemu import cache_root
    slug = re.sub(r"[^A-Za-z0-9.=,_-]+", "_", setup.cmdline).strip("_") or "default"
    root = cache_root() / "reference" / image.version
    found = sorted(root.glob(f"runtime-{setup.cpu}-smp{setup.smp}-{slug[:60]}-*/manifest.json"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def compare_reference(ref: Path, image: Any, config: Any = None) -> dict[str, Any]:
    """Step name -> differing bytes (or ``"refused"``) for every step the
    clients redo."""
    import zstandard
    from .._alternative._kdiff import diff_sections
    from .._alternative._kearly import EarlyBoot
    from .._alternative._kpasses import BootOptions
    from .._alternative._ktext import CpuCaps
    from .._ftrace._graph import FunctionGraph
    from ._offline import ExecRegion, offline_kernel, tracing_cmdline_record
    m = json.loads((ref / "manifest.json").read_text())
    steps = {s["name"]: s for s in m["steps"]}
    index = [s["name"] for s in m["steps"]]
    out: dict[str, Any] = {}

    def text(name: str) -> bytes:
        f = ref / steps[name]["text"]["file"]
        return zstandard.ZstdDecompressor().decompress(f.read_bytes(), max_output_size=1 << 28)

    def prev(name: str) -> str:
        return index[index.index(name) - 1]

    def new_pages(name: str, key: str) -> list[int]:
        return [a for a in steps[name]["allocated"][key]
                if a not in steps[prev(name)]["allocated"][key]]

    def session(name: str, regions=()):
        mem = int(m["setup"]["memory"].rstrip("G")) << 30
        return offline_kernel(
            image, CpuCaps(m["caps"]), BootOptions(return_thunk=m["return_thunk_sym"],
                                                   ncpus=m["setup"]["smp"]),
            early=EarlyBoot(cmdline=m["setup"]["cmdline"], ncpus=m["setup"]["smp"], mem=mem,
                            config=config),
            config=config, regions=regions, before=text(prev(name)))

    def differ(ok, name: str) -> int:
        live = dataclasses.replace(ok.kt, exec_ranges=[r for r in ok.kt.exec_ranges
                                                       if r[0] == ".text"], changes=[])
        n = sum(diff_sections(live, text(name)).values())
        for r in steps[name]["regions"]:
            mine = [x for x in ok.machine.regions if x.start <= r["addr"] < x.end]
            if mine and (r["kind"] == "module" or mine[0].start == r["addr"]):
                got = ok.machine.text_read(r["addr"], r["size"])
                want = (ref / r["file"]).read_bytes()[:len(got)]
                n += sum(a != b for a, b in zip(got, want))
        return n

    if "ftrace-function-on" in steps:
        with session("ftrace-function-on",
                     [ExecRegion(new_pages("ftrace-function-on", "ftrace_trampolines")[0],
                                 4096, "ftrace")]) as ok:
            ft = ok.kernel.ftrace
            ft.set_ftrace_filter(m["probes"]["ftrace_glob"])
            ft.start("function")
            tracing_cmdline_record(ok.kernel, True)
            out["ftrace-function-on"] = differ(ok, "ftrace-function-on")
            ft.stop()
            tracing_cmdline_record(ok.kernel, False)
            if "ftrace-function-off" in steps:
                out["ftrace-function-off"] = differ(ok, "ftrace-function-off")
    if "ftrace-graph-on" in steps:
        with session("ftrace-graph-on",
                     [ExecRegion(new_pages("ftrace-graph-on", "ftrace_trampolines")[0],
                                 4096, "ftrace")]) as ok:
            ok.kernel.ftrace.set_ftrace_filter(m["probes"]["ftrace_glob"])
            g = FunctionGraph(ok.kernel)
            g.start()
            out["ftrace-graph-on"] = differ(ok, "ftrace-graph-on")
            g.stop()
            if "ftrace-graph-off" in steps:
                out["ftrace-graph-off"] = differ(ok, "ftrace-graph-off")
    if "kprobe-optimized-on" in steps:
        # the optimised kprobe, the kretprobe (on the fentry NOP through
        # kprobe_ftrace_ops' own trampoline page), then both gone: one session
        last = "kretprobe-on" if "kretprobe-on" in steps else "kprobe-optimized-on"
        al = steps[last]["allocated"]
        pages = [ExecRegion(al["kprobe_insn_pages"][0], 4096, "kprobes"),
                 ExecRegion(al["kprobe_optinsn_pages"][0], 4096, "optprobes")]
        if last == "kretprobe-on":
            pages.append(ExecRegion(new_pages("kretprobe-on", "ftrace_trampolines")[0], 4096,
                                    "ftrace"))
        with session("kprobe-optimized-on", pages) as ok:
            from .._kprobes._opt import buffer_op
            kp = ok.kernel.kprobes
            p = kp.register_kprobe(m["probes"]["kprobe"])
            tracing_cmdline_record(ok.kernel, True)
            # the detour loads a kmalloc address (its struct optimized_kprobe):
            # an input, read from the kernel's own buffer
            page = next(r for r in steps["kprobe-optimized-on"]["regions"]
                        if r["kind"] == "kprobe_optinsn_page")
            kp.optprobe_ops[p.addr] = buffer_op((ref / page["file"]).read_bytes())
            kp.optimize_kprobe(p)
            out["kprobe-optimized-on"] = differ(ok, "kprobe-optimized-on")
            if last == "kretprobe-on":
                rp = kp.register_kretprobe(m["probes"]["kretprobe"])
                out["kretprobe-on"] = differ(ok, "kretprobe-on")
                if "kprobes-off" in steps:
                    kp.unregister_kprobe(p)
                    kp.unregister_kretprobe(rp)
                    tracing_cmdline_record(ok.kernel, False)
                    out["kprobes-off"] = differ(ok, "kprobes-off")
    if "schedstats-on" in steps:
        with session("schedstats-on") as ok:
            ok.kernel.keys.static_key_enable("sched_schedstats")
            out["schedstats-on"] = differ(ok, "schedstats-on")
            ok.kernel.keys.static_key_disable("sched_schedstats")
            if "schedstats-off" in steps:
                out["schedstats-off"] = differ(ok, "schedstats-off")
    from .._errors import TextPokeError
    for mname in m.get("modules", {}):
        step = f"insmod-{mname}"
        if step not in steps:
            continue
        at = steps[step]["allocated"]["modules"][mname]
        base = min(at.values()) & ~0xFFF
        with session(step, [ExecRegion(base, 1024 * 4096, "modules")]) as ok:
            try:
                ok.kernel.modules.load((ref / m["modules"][mname]["file"]).read_bytes(),
                                       mname, at=at)
            except (TextPokeError, ValueError) as e:
                out[step] = "refused"
                out[f"{step}:why"] = str(e)
                continue
            out[step] = differ(ok, step)
        # rmmod: from the kernel's memory before it, the module loaded where
        # it is and unloaded (what other modules left in .text included)
        if f"rmmod-{mname}" in steps:
            with session(f"rmmod-{mname}", [ExecRegion(base, 1024 * 4096, "modules")]) as ok:
                ok.kernel.modules.load((ref / m["modules"][mname]["file"]).read_bytes(),
                                       mname, at=at)
                ok.kernel.modules.unload(mname)
                out[f"rmmod-{mname}"] = differ(ok, f"rmmod-{mname}")
    return out


def runtime_cell(kernel: Any, image: Any, setup: Any) -> str:
    """The table's run-time cell for *kernel* (a DebianKernel) in *setup*."""
    ref = find_reference(image, setup)
    if ref is None:
        return "-"
    cfg = None
    from .._alternative._kearly import read_config
    path = Path(kernel.vmlinuz).parent / "config"
    if path.is_file():
        cfg = read_config(path)
    try:
        r = compare_reference(ref, image, cfg)
    except Exception as e:          # one row's failure is its cell, not the table's end
        return f"error: {type(e).__name__}: {str(e)[:40]}"

    def pair(a: str, b: str) -> str:
        return f"{r.get(a, '?')}/{r.get(b, '?')}"
    parts = [f"fn {pair('ftrace-function-on', 'ftrace-function-off')}",
             f"fg {pair('ftrace-graph-on', 'ftrace-graph-off')}",
             f"kp {r.get('kprobe-optimized-on', '?')}", f"krp {r.get('kretprobe-on', '?')}",
             f"off {r.get('kprobes-off', '?')}",
             f"ss {pair('schedstats-on', 'schedstats-off')}"]
    parts += [f"{k[len('insmod-'):].split('_')[0]} {v}/{r.get('rmmod-' + k[len('insmod-'):], '?')}"
              for k, v in r.items() if k.startswith("insmod-") and ":" not in k]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``tools/kernel_reference.py``: the boot table, with the run-time
    column unless ``--no-runtime``."""
    import sys
    from ..images._qemu import main as boot_main
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime = None
    if "--no-runtime" in argv:
        argv.remove("--no-runtime")
    elif "--fetch-only" not in argv and "--no-compare" not in argv:
        runtime = runtime_cell
    rc = boot_main(argv, runtime=runtime)
    if runtime is not None and rc == 0:
        import textwrap
        print("\n".join(textwrap.wrap(LEGEND, 90)))
    return rc
