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

from .keys import add_common, on_clients

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


def run(args: argparse.Namespace) -> int:
    from ..sim._clients_demo import ClientMachine
    from ..sim._module_selftest import module_selftest

    def body(cm, d: dict, lines: list[str]) -> bool:
        lines.append(f"module self-test on {args.cpus} running vCPUs: (interrupted)")
        r = module_selftest(cm)
        d["selftest"] = {"passed": r.passed, "cases": r.cases, "bad": r.bad}
        lines[-1] = (f"module self-test on {args.cpus} running vCPUs: "
                     f"{sum(c['passed'] for c in r.cases)}/{len(r.cases)} checks passed")
        lines += [f"  {'ok    ' if c['passed'] else 'FAILED'} {c['name']}" for c in r.cases]
        return not r.passed

    return on_clients(args, lambda: ClientMachine(cpus=args.cpus, seed=args.seed), body)
