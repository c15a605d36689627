# SPDX-License-Identifier: GPL-2.0-only
"""``tools/kernel_runtime_reference.py``: build (or take from the cache)
the run-time references of the CPU setups asked for and print, per
setup, what each step changed in the kernel's text (:func:`print_steps`)."""

from __future__ import annotations

import time

from ._elf import ImageError
from ._qemu import Setup, diff_count
from ._qemu_runtime import RuntimeReference, runtime_reference
from ._qemu_runtime_steps import RUNTIME_SETUPS
from ._qemu_vm import ReferenceError
from ._vmlinux import RealKernelImage

__all__ = ["main", "print_steps"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from ._qemu import resolve_kernel
    from ._vmlinux import KernelUnavailable, ensure_debian_kernel
    p = argparse.ArgumentParser(
        prog="kernel_runtime_reference",
        description="Run-time reference of a Debian kernel under QEMU: ftrace, kprobes, a "
                    "static-key sysctl, insmod/rmmod driven by an init script, the kernel's "
                    "text and run-time regions saved after each step, with a JSON manifest.")
    p.add_argument("--kernel", default="6.12-cloud",
                   help="6.12-cloud (default), another name tools/kernel_reference.py takes, "
                        "or a release")
    p.add_argument("--setup", action="append", choices=["nomit", "retpoline", "calldepth", "all"],
                   help="CPU setup(s): nomit = qemu64 mitigations=off (default), retpoline = "
                        "EPYC (retpolines and return thunks), calldepth = "
                        "Skylake-Client-v4 retbleed=stuff; repeat, or 'all'")
    p.add_argument("--cpu", help="a setup of your own: QEMU CPU model (with --cmdline)")
    p.add_argument("--cmdline", default="", help="with --cpu: added kernel command line")
    p.add_argument("--no-cache", action="store_true", help="boot again even when cached")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-table", action="store_true",
                   help="no per-step table (make test-kernel prints the run-time results "
                        "beside the boot table: tools/kernel_reference.py)")
    a = p.parse_args(argv)
    try:
        kernel = ensure_debian_kernel(resolve_kernel(a.kernel))
    except (ValueError, KernelUnavailable) as e:
        print(f"kernel_runtime_reference: {e}", file=sys.stderr)
        return 2
    names = {"nomit": 0, "retpoline": 1, "calldepth": 2}
    if a.cpu:
        setups = [Setup(a.cpu, a.cmdline)]
    else:
        chosen = a.setup or ["nomit"]
        setups = list(RUNTIME_SETUPS) if "all" in chosen else \
            [RUNTIME_SETUPS[names[c]] for c in dict.fromkeys(chosen)]
    import signal
    # SIGTERM unwinds like Ctrl-C: QEMU is quit and the partial directory removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prog = None if a.quiet else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    for st in setups:
        try:
            t = time.monotonic()
            ref = runtime_reference(kernel, st, use_cache=not a.no_cache, progress=prog)
        except (ReferenceError, ImageError) as e:
            print(f"kernel_runtime_reference: {st.label()}: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"kernel_runtime_reference: interrupted ({st.label()} not built)",
                  file=sys.stderr)
            return 130
        m = ref.manifest
        print(f"{m['kernel']['release']} {st.label()}: {len(m['steps'])} steps, "
              f"QEMU {m['seconds']['wall']:.1f} s wall / {m['seconds']['qemu_cpu']:.1f} s CPU "
              f"(this call {time.monotonic() - t:.1f} s) -> {ref.path / 'manifest.json'}")
        if not a.no_table:
            print_steps(kernel.load(), ref)
    return 0


def print_steps(image: RealKernelImage, ref: RuntimeReference, out=print) -> None:
    """One line per step: bytes of the core kernel's executable sections
    the step changed (against the step before), and the run-time regions."""
    execs = [(s.addr - image.text_start, s.end - image.text_start)
             for s in image.executable_sections()]
    prev = None
    out(f"  {'step':<28} {'changed':>7}  run-time regions")
    for st in ref.steps:
        text = ref.text(st)
        changed = 0 if prev is None else diff_count(prev, text, 0, execs)
        kinds: dict[str, int] = {}
        for r in st["regions"]:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        regs = ", ".join(f"{k} x{n}" for k, n in kinds.items()) or "-"
        out(f"  {st['name']:<28} {changed if prev is not None else '':>7}  {regs}")
        prev = text
