# SPDX-License-Identifier: GPL-2.0-only
"""The ``textpoke`` command: rich output for people, --json for programs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator

__all__ = ["main"]

#: Extra sub-commands register here: name -> (add_arguments, run).
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                             Callable[[argparse.Namespace], int], str]] = {}


def escape(text: str) -> str:
    """Keep rich from reading '[cc cc ...]' in a message as markup."""
    from rich.markup import escape as _escape
    return _escape(text)


def _console(stderr: bool = False):
    from rich.console import Console
    return Console(stderr=stderr, highlight=False)


@contextlib.contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (only on a terminal, never with --json);
    yields the update(done, total) callback for the long-running job."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=_console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def _emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


# ----------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=int, default=4, help="virtual CPUs (default 4)")
    p.add_argument("--toggles", type=int, default=1000, help="batches: each flips every site (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="scheduler seed (default 0)")
    p.add_argument("--line-size", type=int, default=64, help="fetch-view line size in bytes (default 64)")
    p.add_argument("--no-boot", action="store_true",
                   help="run the bare workload image instead of booting the kernel image first")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _demo(args: argparse.Namespace) -> int:
    from ..sim._demo import run_demo
    if args.cpus < 1 or args.toggles < 0:
        raise SystemExit("textpoke demo: --cpus must be >= 1 and --toggles >= 0")
    with _progress(not args.json and sys.stderr.isatty(), "toggling sites") as update:
        r = run_demo(cpus=args.cpus, toggles=args.toggles, seed=args.seed,
                     line_size=args.line_size, boot=not args.no_boot, progress=update)
    if args.json:
        _emit_json(r.as_dict())
    else:
        _print_demo(r)
    return 0 if (not r.oopses and r.misbehaviours == 0 and r.final_ok) else 1


def _print_demo(r) -> None:
    from rich.table import Table
    con = _console()
    if r.boot:
        b = r.boot
        p = b["patched"]
        tests = ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in b["selftests"].items())
        con.print(f"[bold]boot[/] {b['image']} on {r.cpus} vCPUs, features {','.join(b['features'])}: "
                  f"alternatives {p['.altinstructions']['taken']}/{p['.altinstructions']['entries']} taken, "
                  f"retpoline sites {p['.retpoline_sites']['patched']}, return sites "
                  f"{p['.return_sites']['patched']} patched; {tests}")
    con.print(f"[bold]textpoke demo[/] — {r.cpus} vCPUs ran the workload while every site was "
              f"toggled {r.toggles} times through smp_text_poke_batch_*() (seed {r.seed})")
    t = Table(title="sites (bytes now; times each variant ran, all CPUs)", title_justify="left")
    for col in ("site", "kind", "len", "bytes now"):
        t.add_column(col)
    for col in ("old", "new", "not-taken", "wrong"):
        t.add_column(col, justify="right")
    for s in r.sites:
        b = s["behaviours"]
        wrong = f"[red]{s['misbehaviours']:,}[/]" if s["misbehaviours"] else "0"
        t.add_row(s["name"], s["kind"], str(s["len"]), s["now"], f"{b.get('old', 0):,}",
                  f"{b.get('new', 0):,}", f"{b.get('not-taken', 0):,}", wrong)
    con.print(t)
    c = Table(title="CPUs", title_justify="left")
    for col in ("cpu", "instructions ≥", "loop iterations"):
        c.add_column(col, justify="right")
    for i, (n, it) in enumerate(zip(r.instructions, r.iterations)):
        c.add_row(str(i), f"{n:,}", f"{it:,}")
    con.print(c)
    con.print(f"batches {r.batches:,}  site pokes {r.pokes:,}  byte writes {r.writes:,}  "
              f"syncs {r.syncs:,}  IPIs taken {r.ipis:,}  stale-line refills {r.line_refills:,}")
    con.print(f"INT3 hits {r.int3_hits:,}  emulated {r.int3_emulated:,}  "
              f"scheduler steps {r.steps:,}  host time {r.elapsed:.2f} s")
    oops = len(r.oopses)
    colour = "green" if not oops and not r.misbehaviours and r.final_ok else "red"
    con.print(f"[{colour}]oopses {oops}  wrong behaviours {r.misbehaviours}  "
              f"every CPU runs the final code: {'yes' if r.final_ok else 'NO'}[/]")
    for o in r.oopses[:5]:
        con.print(f"  [red]oops[/] cpu{o['cpu']} {o['kind']} at {o['rip']:#x} "
                  + escape(f"[{o['bytes']}] {o['detail']}"))
    con.print("(instructions count slices that ran to their budget; a slice cut short by "
              "a trap is not counted)", style="dim")


# --------------------------------------------------------------------- verify
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="all", help="scenario name or 'all' (see --list)")
    p.add_argument("--schedules", type=int, default=200, help="seeded schedules per scenario (default 200)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--strategy", choices=("int3", "naive"), default="int3")
    p.add_argument("--mutation", default=None, help="remove one protocol step (see --list)")
    p.add_argument("--cpus", type=int, default=3, help="virtual CPUs per schedule (default 3)")
    p.add_argument("--line-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores); results do not depend on it")
    p.add_argument("--replay", type=int, default=None, metavar="SEED",
                   help="run the one schedule with this seed and show its violations")
    p.add_argument("--list", action="store_true", help="list scenarios and mutations")
    p.add_argument("--json", action="store_true")


def _verify(args: argparse.Namespace) -> int:
    from .._core import MUTATIONS
    from ..sim._verify import SCENARIOS, check_arguments, run_schedule, verify
    if args.list:
        if args.json:
            _emit_json({"scenarios": {k: v.description for k, v in SCENARIOS.items()},
                        "mutations": list(MUTATIONS), "strategies": ["int3", "naive"]})
        else:
            con = _console()
            con.print("[bold]scenarios[/]")
            for k, v in SCENARIOS.items():
                con.print(f"  {k:12} {v.description}")
            con.print("[bold]mutations[/] (each removes one step of the INT3 protocol)")
            for m in MUTATIONS:
                con.print(f"  {m}")
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    try:
        check_arguments(names, args.strategy, args.mutation)
    except ValueError as e:
        raise SystemExit(f"textpoke verify: {e}") from None
    if args.schedules < 1:
        raise SystemExit("textpoke verify: --schedules must be >= 1")
    if args.replay is not None:
        if len(names) != 1:
            raise SystemExit("textpoke verify: --replay needs one --scenario")
        r = run_schedule(names[0], args.replay, strategy=args.strategy, mutation=args.mutation,
                         ncpus=args.cpus, line_size=args.line_size)
        out = {"scenario": names[0], "seed": args.replay, "steps": r.steps,
               "violations": [v.as_dict() for v in r.violations], "behaviours": r.behaviours}
        if args.json:
            _emit_json(out)
        else:
            con = _console()
            con.print(f"schedule {args.replay} of {names[0]}: {len(r.violations)} violation(s)")
            for v in r.violations:
                con.print(f"  [red]{v.kind}[/] " + escape(v.detail))
        return 1 if r.violations else 0
    with _progress(not args.json and sys.stderr.isatty(), "schedules") as update:
        rep = verify(names, args.schedules, seed=args.seed, strategy=args.strategy,
                     mutation=args.mutation, ncpus=args.cpus, line_size=args.line_size,
                     jobs=args.jobs, progress=update)
    if args.json:
        _emit_json(rep.as_dict())
    else:
        from rich.table import Table
        con = _console()
        what = args.strategy + (f" minus {args.mutation}" if args.mutation else "")
        t = Table(title=f"verify: {what}, {args.schedules} schedules per scenario, "
                        f"{args.cpus} vCPUs, base seed {args.seed}", title_justify="left")
        t.add_column("scenario")
        t.add_column("schedules", justify="right")
        t.add_column("violating", justify="right")
        for k, st in rep.by_scenario.items():
            style = "red" if st["violations"] else "green"
            t.add_row(k, f"{st['schedules']:,}", f"[{style}]{st['violations']:,}[/]")
        con.print(t)
        share = rep.violating_schedules / max(1, rep.schedules)
        con.print(f"violating schedules {rep.violating_schedules:,} of {rep.schedules:,} "
                  f"({share:.1%})  by kind {rep.violations_by_kind or '{}'}  "
                  f"INT3s emulated {rep.int3_emulated:,}  syncs {rep.syncs:,}")
        if rep.first:
            f = rep.first
            con.print(f"[red]first violation[/]: {f.kind} in {f.scenario}, seed {f.seed}: " + escape(f.detail))
            mut = f" --mutation {args.mutation}" if args.mutation else ""
            con.print(f"replay: textpoke verify --scenario {f.scenario} --strategy {args.strategy}"
                      f"{mut} --cpus {args.cpus} --replay {f.seed}", style="dim")
    return 1 if rep.violating_schedules else 0


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="textpoke", description=(
        "The Linux kernel's x86 text-patching machinery (text_poke, INT3 SMP batch "
        "patching) on an emulated SMP x86-64 machine."))
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="patch live code on every vCPU, many times over")
    _demo_args(p)
    p.set_defaults(run=_demo)
    p = sub.add_parser("verify", help="check the protocol under many seeded schedules")
    _verify_args(p)
    p.set_defaults(run=_verify)
    _load_plugins()
    for name, (add, run, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add(p)
        p.set_defaults(run=run)
    return ap


def _load_plugins() -> None:
    import importlib
    for mod in ("textpoke.cli.boot",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    ap = _build_parser()
    args = ap.parse_args(argv)
    from .._errors import TextPokeError
    try:
        return args.run(args)
    except TextPokeError as e:
        print(f"textpoke {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # e.g. piped into head: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so that sub-commands
    # registering themselves in textpoke.cli.SUBCOMMANDS are seen.
    from textpoke.cli import main as _main
    raise SystemExit(_main())
