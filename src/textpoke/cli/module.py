# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke module``: loadable modules on running vCPUs.

Boots the kernel image, runs the probe loop on every vCPU and, while they
run, loads a GCC-built module that uses a kernel static key and a kernel
static call (relocations, module_finalize's passes, its sites in the
keys' and calls' current state, text_poke_copy), calls into it from every
CPU, switches the key and the call both ways, unloads it, loads it again,
and checks that malformed modules are refused with the text unchanged.
Exit 1 when a check fails or a CPU oopses.
"""

from __future__ import annotations

import argparse

from ._args import UsageError
from ._inputs import input_file
from ._real_clients import add_image_arguments, refuse_image_only, run_on_image
from .keys import add_common, checks_passed, on_clients

__all__ = ["add_arguments", "run", "NAME", "HELP", "DESCRIPTION"]

NAME = "module"
HELP = "modules loaded, switched and unloaded on running vCPUs"
DESCRIPTION = ("Boot the kernel image, run the probe loop on every vCPU and, while they\n"
               "run, load a module using a kernel key and static call, switch both ways,\n"
               "unload it, and check the loader's refusals.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selftest", action="store_true",
                   help="load, switch, unload and refuse on the running CPUs (the default action)")
    add_common(p)
    add_image_arguments(p, ("modules",))
    p.add_argument("--load", metavar="FILE.ko", type=input_file(64 << 20),
                   help="with --image: load this module of the image's package (.ko or .ko.xz)")
    p.add_argument("--module-sections", metavar="FILE.json", type=input_file(1 << 20),
                   help="with --image --load: where the kernel put each section (a JSON object "
                        "name -> address, as /sys/module/NAME/sections or the run-time "
                        "reference's manifest lists them) instead of our own layout")


def run_image(args: argparse.Namespace) -> int:
    """``module --image --load``: the module linked against the real image
    and placed at --module-base, offline."""
    if not args.load:
        raise UsageError("with --image: give --load FILE.ko (--selftest runs on the sim's CPUs)")

    def step(ok, d: dict, lines: list[str]) -> bool:
        import lzma
        from pathlib import Path

        from .._errors import NotSupportedError, TextPokeError
        path = Path(args.load)
        raw = path.read_bytes()
        name = path.name.split(".ko")[0]
        if path.suffix == ".xz":
            try:
                raw = lzma.decompress(raw)
            except lzma.LZMAError as e:
                raise UsageError(f"--load: {path}: not xz data ({e})") from None
        at = None
        if args.module_sections:
            import json
            try:
                at = {str(k): int(v, 0) if isinstance(v, str) else int(v)
                      for k, v in json.loads(Path(args.module_sections).read_text()).items()}
            except (ValueError, TypeError, AttributeError) as e:
                raise UsageError(f"--module-sections: not a JSON object of section -> "
                                 f"address: {e}") from None
        try:
            mod = ok.kernel.modules.load(raw, name, at=at)
        except NotSupportedError as e:
            raise UsageError(f"{e}: give --module-base ADDR") from None
        except TextPokeError as e:
            raise UsageError(f"--load: {e}") from None
        d["module"] = {"name": name, "text": hex(mod.text), "text_size": mod.text_size,
                       "data": hex(mod.data), "data_size": mod.data_size,
                       "finalize": dict(mod.finalize), "jump_entries": mod.jump_entries,
                       "static_call_sites": mod.static_call_sites}
        lines.append(f"module {name}: text {mod.text:#x} (+{mod.text_size:#x}), data "
                     f"{mod.data:#x} (+{mod.data_size:#x}); "
                     + ", ".join(f"{k} {v}" for k, v in mod.finalize.items())
                     + f"; {mod.jump_entries} jump entries, {mod.static_call_sites} static-call "
                       "sites")
        return False

    return run_on_image(args, ("modules",), step)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "image", None):
        return run_image(args)
    refuse_image_only(args, ("modules",))
    if args.load or args.module_sections:
        raise UsageError("--load/--module-sections apply to a real kernel image: give --image "
                         "too")
    from ..sim._clients_demo import ClientMachine
    from ..sim._module_selftest import module_selftest

    def body(cm, d: dict, lines: list[str]) -> bool:
        lines.append(f"module self-test on {args.cpus} running vCPUs: (interrupted)")
        r = module_selftest(cm)
        d["selftest"] = {"passed": r.passed, "cases": r.cases, "bad": r.bad}
        lines[-1] = f"module self-test on {args.cpus} running vCPUs: {checks_passed(r.cases)}"
        lines += [f"  {'ok    ' if c['passed'] else 'FAILED'} {c['name']}" for c in r.cases]
        return not r.passed

    return on_clients(args, lambda: ClientMachine(cpus=args.cpus, seed=args.seed), body)
