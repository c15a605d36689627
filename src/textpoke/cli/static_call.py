# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke static-call``: the bundled image's static calls on running vCPUs.

Boots the kernel image, runs the probe loop on every vCPU and, while they
run, lists the static calls, points one at a function (or NULL), or redoes
the kernel's ``static_call_selftest`` with every site kind switched both
ways.  Exit 1 when the self-test fails or a CPU oopses.
"""

from __future__ import annotations

import argparse

from ._args import UsageError
from .keys import add_common, on_clients, report_selftest, start_workload

__all__ = ["add_arguments", "run", "NAME", "HELP", "DESCRIPTION"]

NAME = "static-call"
HELP = "static calls retargeted on running vCPUs"
DESCRIPTION = ("Boot the kernel image, run the probe loop on every vCPU and, while they\n"
               "run, list the static calls, update one (trampoline and every inline\n"
               "site, each through the INT3 protocol), or redo static_call_selftest.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="list the static calls (the default action)")
    p.add_argument("--update", nargs=2, metavar=("NAME", "FUNC"), action="append", default=[],
                   help="static_call_update(NAME, FUNC) while the CPUs run; FUNC is a symbol, "
                        "an 0x address or NULL (repeatable)")
    p.add_argument("--selftest", action="store_true",
                   help="static_call_selftest and every site kind on the running CPUs")
    add_common(p)


def _check_func(func: str) -> None:
    """FUNC's form, before any machine is built: a symbol, NULL or 0xHEX."""
    if func.lower().startswith(("0x", "-0x", "+0x")):
        try:
            v = int(func, 16)
        except ValueError:
            raise UsageError(f"--update: {func!r} is not a hexadecimal address") from None
        if not 0 <= v < 1 << 64:
            raise UsageError(f"--update: {func} is not a 64-bit address")
    elif not func or not func.replace("_", "a").replace(".", "a").isalnum():
        raise UsageError(f"--update: {func!r} is not a symbol name, NULL or an 0x address")


def run(args: argparse.Namespace) -> int:
    for _name, func in args.update:
        _check_func(func)
    from ..sim._clients_demo import ClientMachine, static_call_selftest

    def body(cm, d: dict, lines: list[str]) -> bool:
        for name, func in args.update:
            cm.calls.call(name)
            cm.calls.resolve(func)      # unknown names: exit 2 before anything runs
        failed = False
        if args.selftest:
            r = static_call_selftest(cm)
            failed |= not report_selftest(d, lines, f"static_call_selftest on {args.cpus} running vCPUs",
                                          r.cases, r.passed, r.bad)
        if args.update:
            if not cm.started:
                start_workload(cm)
            acts: list[dict] = []
            d["actions"] = acts
            for name, func in args.update:
                ss = cm.core.stats.syncs
                n = cm.calls.static_call_update(name, func)
                cm.wait_passes(2)
                c = cm.calls.call(name)
                acts.append({"call": c.name, "func": func, "pokes": n, "sites": len(c.sites),
                             "syncs": cm.core.stats.syncs - ss})
                lines.append(f"static_call_update({c.name}, {func}): trampoline + {len(c.sites)} "
                             f"sites, {n} pokes, {acts[-1]['syncs']} syncs")
        if args.list or not (args.selftest or args.update):
            d["calls"] = cm.calls.as_list()
            lines.append(f"{'call':20} {'function':28} {'sites':>5} {'tail':>5}")
            for c in d["calls"]:
                lines.append(f"{c['name']:20} {str(c['func'] or 'NULL'):28} {c['sites']:>5} "
                             f"{c['tail_sites']:>5}")
        return failed

    return on_clients(args, lambda: ClientMachine(cpus=args.cpus, seed=args.seed), body)
