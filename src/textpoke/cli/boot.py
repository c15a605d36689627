# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke boot``: boot the bundled kernel-like image and show what the
boot-time patcher did -- the kernel's ``debug-alternative`` output as
readable tables, the self-tests, and per-table counts.

    textpoke boot [--cpus N] [--cpu-features LIST] [--debug-alternative[=MASK]]
                  [--disasm SYMBOL] [--json]

Exit status as for every command (see :mod:`textpoke.cli`): 1 when a
self-test fails, 2 for a bad option, feature or symbol.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from . import _output as out
from ._args import CPUS, Bounds, UsageError, checked, int_in, number
from ._boot_real import add_real_arguments, disassemble, refuse_real_only, run_real
from ._signals import Terminated, reporting

__all__ = ["add_arguments", "disassemble", "run", "run_boot"]

NAME = "boot"
HELP = ("boot the bundled kernel image: alternatives, retpolines, returns, SMP locks, "
        "self-tests")
DESCRIPTION = ("Boot the bundled kernel-like image and show what the boot-time patcher did:\n"
               "the kernel's debug-alternative output as tables, the self-tests, and\n"
               "per-table counts.")


#: textpoke._alternative's DEFAULT_FEATURES and DA_ALL and the bundled
#: image's name, repeated so that parsing and --help import no patcher
#: (iced-x86, the tables); tests/test_cli_startup.py checks they agree.
DEFAULT_FEATURES = ("xmm2", "rdtscp", "lfence_rdtsc", "popcnt", "avx2", "bmi2", "erms",
                    "fsrm", "smap", "clflushopt")
DA_ALL = 0x1F
KERNEL_IMAGE = "kernel.elf"

_BYTES_SHOWN = 12
#: Width used when the output is not a terminal (a file, a pager): the
#: byte columns need room, and nothing forces 80 columns there.
_PIPE_WIDTH = 160


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=int_in(CPUS), default=1, metavar="N",
                   help=f"virtual CPUs present at boot, {CPUS} (default 1: LOCK prefixes "
                        "become DS)")
    p.add_argument("--cpu-features", dest="cpu_features_raw", default=None,
                   metavar="LIST",
                   help="comma-separated CPU features (X86_FEATURE_* names without the prefix, "
                        "or word*32+bit); 'none' for a CPU with none; 'list' to list them "
                        f"(default: {', '.join(DEFAULT_FEATURES)})")
    p.add_argument("--debug-alternative", nargs="?", const="all", default=None, metavar="MASK",
                   type=checked(debug_mask, "MASK"),
                   help="also print the patcher's debug records; MASK as on the kernel "
                        "command line, a number from 0x1 to 0x1f (0x1 alt, 0x2 ret, 0x4 "
                        "retpoline, 0x8 endbr, 0x10 smp), or names (alt,ret,retpoline,endbr,"
                        "smp, or all); no MASK means all; anything else is refused (the kernel "
                        "would take it as all)")
    p.add_argument("--disasm", metavar="SYMBOL", action="append", default=None,
                   help="show SYMBOL's disassembly before and after patching (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_real_arguments(p)


def _features_or_usage(text: str) -> str | list[str]:
    try:
        return _features(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--cpu-features: {e}") from None


def _features(text: str) -> str | list[str]:
    """argparse type of --cpu-features: 'list', or the checked feature names."""
    if text.strip().lower() == "list":
        return "list"
    try:
        return _parse_features(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_features(text: str) -> list[str] | None:
    from ..images._tables import feature_number
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts in ([], ["none"]):
        return []
    for p in parts:
        feature_number(p)            # ValueError names the culprit
    return parts


def _function_range(image: Any, name: str) -> tuple[int, int]:
    addr = image.symbols[name]
    size = image.sizes.get(name, 0)
    if not size:
        # A label: run to the next symbol.
        later = sorted(a for a in image.symbols.values() if a > addr)
        size = (later[0] - addr) if later else 16
    return addr, min(size, 4096)


def _show_bytes(b: bytes) -> str:
    if not b:
        return "[dim]—[/]"
    if len(b) <= _BYTES_SHOWN:
        return b.hex(" ")
    return b[:_BYTES_SHOWN].hex(" ") + f" …(+{len(b) - _BYTES_SHOWN})"


_DA_NAMES = ("alt", "ret", "retpoline", "endbr", "smp")


def debug_mask(text: str) -> int:
    """--debug-alternative's MASK, checked: 1..0x1f, names, or all."""
    t = text.strip().lower()
    if t in ("", "all"):
        return DA_ALL
    if t[:1].isdigit() or t.startswith(("-", "+")):
        return number(t, Bounds(1, DA_ALL, f"0x1..{DA_ALL:#x}"), "--debug-alternative")
    parts = t.split(",")
    bad = [p for p in parts if p not in _DA_NAMES]
    if bad:
        raise UsageError(f"--debug-alternative: unknown record kind {bad[0]!r} (choose from "
                         f"{', '.join(_DA_NAMES)}, all, or a mask 0x1..{DA_ALL:#x})")
    from .._alternative import parse_debug_alternative
    return parse_debug_alternative(t)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (KeyboardInterrupt, Terminated) as e:
        from ._contract import interrupted_tail
        real = bool(getattr(args, "image", None))
        return interrupted_tail(
            args, {"command": NAME, "image": args.image if real else KERNEL_IMAGE}, [], e,
            core=getattr(e, "textpoke_core", None),
            reason=("interrupted while the real image's passes patched a copy of its memory in "
                    "this process (no INT3 written, nothing runs it); the copy was discarded"
                    if real else "interrupted before the machine's text was patched"))


class _ReadBack:
    """int3_left as read back before the machine was closed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def int3_left(self) -> int:
        return self.n


def _run(args: argparse.Namespace) -> int:
    raw = args.cpu_features_raw
    if raw is not None and not raw.replace(",", "").strip():
        raise UsageError("--cpu-features: an empty list (say 'none' for a CPU with no "
                         "features)")
    if getattr(args, "image", None):
        args.cpu_features_given = args.cpu_features_raw is not None
        args.cpu_features = args.cpu_features_raw or ""
        return run_real(args)
    refuse_real_only(args)
    args.cpu_features = (_features_or_usage(args.cpu_features_raw)
                         if args.cpu_features_raw is not None else list(DEFAULT_FEATURES))
    if args.cpu_features == "list":
        from ..images._tables import X86_FEATURES
        if args.json:
            out.emit_json({"features": {k: f"{v // 32}*32+{v % 32}" for k, v in X86_FEATURES.items()}})
        else:
            con = out.console()
            for k, v in sorted(X86_FEATURES.items(), key=lambda kv: kv[1]):
                con.print(f"  {k:18} {v // 32:2}*32+{v % 32}")
        return 0
    features = args.cpu_features

    from .._alternative import alternative_instructions, parse_debug_alternative
    from ..images import load_bundled
    image = load_bundled(KERNEL_IMAGE)
    for name in args.disasm or ():
        if name not in image.symbols:
            close = difflib.get_close_matches(name, list(image.symbols), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"unknown symbol {name!r} in {KERNEL_IMAGE}{hint}")
    mask = parse_debug_alternative(args.debug_alternative) if args.debug_alternative else 0

    from .._core import TextPoke
    from ..sim._boot import boot_kernel_image      # Unicorn: only when a boot runs
    sim, image, tables = boot_kernel_image(args.cpus, image)
    with sim, TextPoke(sim) as core:
        ranges = {n: _function_range(image, n) for n in args.disasm or ()}
        before = {n: sim.text_read(a, s) for n, (a, s) in ranges.items()}
        try:
            result = alternative_instructions(core, image, tables, features,
                                              debug_alternative=mask or 0, strict=False)
        except (KeyboardInterrupt, Terminated) as e:
            # the core finished or rolled back a self-test batch in flight:
            # read the text back before the machine goes
            e.textpoke_core = _ReadBack(core.int3_left())
            raise
        after = {n: sim.text_read(a, s) for n, (a, s) in ranges.items()}
        left = core.int3_left()
    disasm = {n: {"addr": ranges[n][0], "size": ranges[n][1],
                  "before": disassemble(before[n], ranges[n][0]),
                  "after": disassemble(after[n], ranges[n][0])} for n in ranges}
    if args.json:
        doc = result.as_dict(debug_mask=mask)
        if not mask:
            doc.pop("debug_alternative")
        doc["image"] = KERNEL_IMAGE
        if disasm:
            doc["disasm"] = disasm
        doc["interrupted"], doc["int3_left"] = False, left
        reporting()
        out.emit_json(doc)
    else:
        _print_boot(result, disasm, mask, DA_ALL)
    return 0 if result.ok and not left else 1


def _print_boot(r: Any, disasm: dict, mask: int, da_all: int) -> None:
    from rich import box
    from rich.table import Table
    con = out.console()
    if not con.is_terminal:
        con.width = max(con.width, _PIPE_WIDTH)
    feats = ", ".join(f for f in r.features if f != "always") or "none"
    mode = "UP (LOCK → DS)" if r.uniproc_patched else "SMP"
    con.print(f"[bold]textpoke boot[/] — kernel.elf on {r.ncpus} vCPU(s), {mode}; "
              f"CPU features: {feats}")

    t = Table(title="alternatives (.altinstructions, in table order; bold: bytes written)",
              title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("#", "site", "if", "taken", "len", "old", "replacement", "final"):
        t.add_column(col, justify="right" if col in ("#", "len") else "left",
                     no_wrap=col in ("#", "site", "if", "taken", "len"))
    for a in r.alternatives:
        cond = a.condition + (" call" if a.flags & 2 else "")
        nest = f" [dim]({a.nested})[/]" if a.nested > 1 else ""
        taken = "[green]yes[/]" if a.taken else "[dim]no[/]"
        final = _show_bytes(a.final)
        if a.written:
            final = f"[bold]{final}[/]"
        t.add_row(str(a.index), a.symbol + nest, cond, taken, str(a.instrlen),
                  _show_bytes(a.old), _show_bytes(a.replacement), final)
    con.print(t)

    if r.retpolines:
        t = Table(title="retpoline sites (.retpoline_sites)", title_justify="left",
                  box=box.SIMPLE_HEAD)
        for col in ("site", "old", "new", "action", "why"):
            t.add_column(col)
        for s in r.retpolines:
            t.add_row(s.symbol, _show_bytes(s.old), _show_bytes(s.new), s.action, s.reason)
        con.print(t)
    if r.returns:
        by: dict[tuple[str, str], int] = {}
        for s in r.returns:
            key = (s.action, s.new.hex(" ") if s.action != "skipped" else s.reason)
            by[key] = by.get(key, 0) + 1
        parts = ", ".join(f"{n} {act} ({what})" for (act, what), n in by.items())
        con.print(f"return sites (.return_sites): {len(r.returns)}: {parts}")
    if r.smp_locks:
        t = Table(title="SMP lock prefixes (.smp_locks)", title_justify="left",
                  box=box.SIMPLE_HEAD)
        for col in ("site", "old", "new", "action"):
            t.add_column(col)
        for s in r.smp_locks:
            t.add_row(s.symbol, _show_bytes(s.old), _show_bytes(s.new), s.action)
        con.print(t)
    elif not r.uniproc_patched:
        con.print("SMP lock prefixes: left as LOCK (more than one CPU present)")
    con.print(f"apply_seal_endbr: {r.seal_endbr}", style="dim")

    c = Table(title="tables", title_justify="left", box=box.SIMPLE_HEAD)
    c.add_column("table", no_wrap=True)
    for col in ("entries", "taken", "written", "patched", "unchanged", "kept", "skipped"):
        c.add_column(col, justify="right")
    for name, row in r.counts().items():
        c.add_row(name, *(str(row[k]) if k in row else "" for k in
                          ("entries", "taken", "written", "patched", "unchanged", "kept", "skipped")))
    con.print(c)

    for name, d in disasm.items():
        for when in ("before", "after"):
            other = {(i["addr"], i["bytes"]) for i in d["after" if when == "before" else "before"]}
            t = Table(title=f"{name} {when} patching ({d['size']} bytes at {d['addr']:#x})",
                      title_justify="left", show_edge=False)
            t.add_column("addr", justify="right")
            t.add_column("bytes")
            t.add_column("instruction")
            for i in d[when]:
                changed = (i["addr"], i["bytes"]) not in other
                style = ("red" if when == "before" else "green") if changed else ""
                t.add_row(f"{i['addr']:#x}", i["bytes"], i["text"], style=style)
            con.print(t)

    if mask:
        con.print(f"[bold]debug-alternative={mask:#x}[/]")
        for d in r.debug:
            if d.mask & mask:
                con.print(f"SMP alternatives: {d.message}", style="dim", markup=False)

    for s in r.selftests:
        if s.passed is None:
            con.print(f"[yellow]{s.name}: not run[/] — {s.detail}")
        elif s.passed:
            con.print(f"[green]{s.name}: passed[/] — {s.detail}")
        else:
            con.print(f"[red]{s.name}: FAILED[/] — {s.detail}")


#: the name this function had when boot was a plug-in
run_boot = run
