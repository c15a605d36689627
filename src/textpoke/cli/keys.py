# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke keys``: the bundled image's static keys on running vCPUs.

Boots the kernel image, sets every vCPU running the image's probe loop
(which passes through jump-label sites all the time) and, while they run,
lists the keys, enables or disables one, or runs the kernel's static-keys
self-test (``lib/test_static_keys.c``) plus a 1,000-site key switched both
ways.  Exit 1 when a self-test fails or a CPU oopses.
"""

from __future__ import annotations

import argparse
from typing import Callable

from . import _contract
from ._args import SEED, Bounds, UsageError, checked, int_in
from ._real_clients import add_image_arguments, refuse_image_only, run_on_image
from ._signals import Terminated

__all__ = ["add_arguments", "run", "NAME", "HELP", "DESCRIPTION", "on_clients", "settle",
           "report_selftest", "checks_passed",
           "start_workload"]

NAME = "keys"
HELP = "static keys (jump labels) switched on running vCPUs"
DESCRIPTION = ("Boot the kernel image, run the probe loop on every vCPU and, while they\n"
               "run, list the static keys, enable or disable one (every site of the key\n"
               "in one batch per 256 sites), or redo lib/test_static_keys.c.")
#: textpoke.sim._clients_demo.CLIENT_CPUS, repeated so that --help imports
#: no machine (a test checks they agree)
CLIENT_CPUS = 8
CLIENT_CPU_BOUNDS = Bounds(1, CLIENT_CPUS)

BOOTING = ("interrupted while the machine was being built (the boot writes no INT3); "
           "it was discarded before any client touched its text")


def _key_name(text: str) -> None:
    if not text or len(text) > 256 or not text.isascii() or \
            not text.replace("_", "a").replace(".", "a").isalnum():
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise UsageError(f"not a static key's name: {shown!r}")


KEY_NAME = checked(_key_name, "KEY")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=int_in(CLIENT_CPU_BOUNDS), default=4, metavar="N",
                   help=f"virtual CPUs, {CLIENT_CPU_BOUNDS} (default 4)")
    p.add_argument("--seed", type=int_in(SEED), default=0, metavar="N",
                   help=f"scheduler seed, {SEED} (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="list the keys (the default action)")
    p.add_argument("--enable", metavar="KEY", action="append", default=[], type=KEY_NAME,
                   help="static_key_enable(KEY) while the CPUs run (repeatable)")
    p.add_argument("--disable", metavar="KEY", action="append", default=[], type=KEY_NAME,
                   help="static_key_disable(KEY) while the CPUs run (repeatable)")
    p.add_argument("--selftest", action="store_true",
                   help="lib/test_static_keys.c and a 1,000-site key on the running CPUs")
    add_common(p)
    add_image_arguments(p, ())


def start_workload(cm) -> None:
    """Probes through many jump-label and static-call sites, any result allowed."""
    for name in sorted(n for n in cm.image.symbols
                       if n.startswith(("jl_many_", "tk_")) and n.endswith(("_true", "_false",
                                                                            "_likely", "_unlikely"))
                       or n in ("jl_many_1", "jl_many_100", "jl_many_1000", "sc_call_op",
                                "sc_selftest_call", "sc_run_hook")):
        if len(cm.probes) < 60:
            cm.add_probe(name, arg=3, allow=[], )
            cm.allow(len(cm.probes) - 1, [], rng=(-(1 << 62), 1 << 62))
    cm.start()
    cm.wait_passes(1)


def settle(cm) -> object:
    """After an interrupt: close the clients and the core (a batch in
    flight is finished or rolled back), keep the machine open so that its
    text can be read back; return the core."""
    core = getattr(cm, "core", None)
    kernel = getattr(cm, "kernel", None)
    try:
        if kernel is not None:
            kernel.close()
        elif core is not None:
            core.close()
    except Exception:
        pass                    # int3_left reads the text: it tells what is left
    return core


def on_clients(args, make: Callable[[], object],
               body: Callable[[object, dict, list[str]], bool], prefix: str = "") -> int:
    """Run *body(cm, doc, lines) -> failed* on the machine *make()* builds:
    the figures, the report and the exit status; on SIGINT/SIGTERM, the
    partial report with int3_left read back."""
    d: dict = {"command": args.command, "cpus": args.cpus, "seed": args.seed}
    lines: list[str] = []
    try:
        with make() as cm:
            s0, b0 = cm.core.stats.syncs, cm.core.stats.batches
            try:
                failed = body(cm, d, lines)
            except (KeyboardInterrupt, Terminated) as e:
                _figures(cm, d, lines, s0, b0, prefix)
                return _contract.interrupted_tail(args, d, lines, e, core=settle(cm))
            _figures(cm, d, lines, s0, b0, prefix)
            return _contract.finish(args, d, lines, failed or cm.oopses > 0, core=cm.core)
    except (KeyboardInterrupt, Terminated) as e:
        if "interrupted" in d:      # the report is out (a signal while closing)
            return _contract.exit_status(e)
        return _contract.interrupted_tail(args, d, lines, e, reason=BOOTING)


def _figures(cm, d: dict, lines: list[str], s0: int, b0: int, prefix: str) -> None:
    d["oopses"] = cm.oopses
    d["syncs"] = cm.core.stats.syncs - s0
    d["batches"] = cm.core.stats.batches - b0
    d["int3_hits"] = cm.core.stats.int3_hits
    lines.append(f"{prefix}{d['syncs']} syncs, {d['batches']} batches, {d['oopses']} oopses")


def checks_passed(cases: list[dict]) -> str:
    return f"{sum(c['passed'] for c in cases)}/{len(cases)} checks passed"


def report_selftest(d: dict, lines: list[str], what: str, cases: list[dict], passed: bool,
                    bad: list, prefix: str = "") -> bool:
    """A self-test's result as every client command reports it: the JSON
    record, the line ``WHAT: n/m checks passed`` and one line per failed
    case (each after *prefix*); whether it passed."""
    d["selftest"] = {"passed": passed, "cases": cases, "bad": bad}
    lines.append(f"{prefix}{what}: {checks_passed(cases)}")
    lines += [f"{prefix}  FAILED {c['name']}" for c in cases if not c["passed"]]
    return passed


def run_image(args: argparse.Namespace) -> int:
    """``keys --image``: the keys of the real image switched offline."""
    if args.selftest:
        raise UsageError("--selftest runs on the sim's CPUs: not with --image")

    def step(ok, d: dict, lines: list[str]) -> bool:
        from .._jump_label import UnknownKeyError
        keys = ok.kernel.keys
        try:
            for k in args.enable + args.disable:
                keys.key(k)
        except UnknownKeyError as e:
            raise UsageError(str(e)) from None
        acts: list[dict] = []
        for op, names in (("enable", args.enable), ("disable", args.disable)):
            for k in names:
                core = ok.kernel.core
                sb, ss = core.stats.batches, core.stats.syncs
                getattr(keys, f"static_key_{op}")(k)
                key = keys.key(k)
                acts.append({"op": op, "key": k, "enabled": key.enabled,
                             "entries": len(key.sites), "batches": core.stats.batches - sb,
                             "syncs": core.stats.syncs - ss})
                lines.append(f"static_key_{op}({k}): {len(key.sites)} entries, "
                             f"{acts[-1]['batches']} batches, {acts[-1]['syncs']} syncs; "
                             f"count now {key.enabled}")
        d["actions"] = acts
        if keys.warnings:
            d["warnings"] = list(keys.warnings)
        if args.list or not acts:
            d["keys"] = keys.as_list()
            lines.append(f"{'key':40} {'count':>5} {'sites':>6}  initial")
            for k in d["keys"]:
                lines.append(f"{k['name']:40} {k['enabled']:>5} {k['entries']:>6}  "
                             f"{'true' if k['initial'] else 'false'}")
        return False

    return run_on_image(args, (), step)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "image", None):
        return run_image(args)
    refuse_image_only(args, ())
    from ..sim._clients_demo import ClientMachine, many_key_flip, static_keys_selftest

    def body(cm, d: dict, lines: list[str]) -> bool:
        for k in args.enable + args.disable:
            cm.keys.key(k)          # UnknownKeyError -> exit 2 before anything runs
        failed = False
        if args.selftest:
            r = static_keys_selftest(cm)
            m = many_key_flip(cm, 1000, flips=2)
            failed |= not report_selftest(d, lines, f"static-keys self-test on {args.cpus} "
                                          "running vCPUs", r.cases + m.cases,
                                          r.passed and m.passed, r.bad + m.bad)
        if args.enable or args.disable:
            if not cm.started:
                start_workload(cm)
            acts: list[dict] = []
            d["actions"] = acts
            for op, names in (("enable", args.enable), ("disable", args.disable)):
                for k in names:
                    sb, ss = cm.core.stats.batches, cm.core.stats.syncs
                    getattr(cm.keys, f"static_key_{op}")(k)
                    cm.wait_passes(2)
                    key = cm.keys.key(k)
                    acts.append({"op": op, "key": k, "enabled": key.enabled,
                                 "entries": len(key.sites),
                                 "batches": cm.core.stats.batches - sb,
                                 "syncs": cm.core.stats.syncs - ss})
                    lines.append(f"static_key_{op}({k}): {len(key.sites)} sites, "
                                 f"{acts[-1]['batches']} batches, {acts[-1]['syncs']} syncs; "
                                 f"count now {key.enabled}")
        if args.list or not (args.selftest or args.enable or args.disable):
            d["keys"] = cm.keys.as_list()
            lines.append(f"{'key':32} {'count':>5} {'sites':>6}  initial")
            for k in d["keys"]:
                lines.append(f"{k['name']:32} {k['enabled']:>5} {k['entries']:>6}  "
                             f"{'true' if k['initial'] else 'false'}")
        return failed

    return on_clients(args, lambda: ClientMachine(cpus=args.cpus, seed=args.seed), body)
