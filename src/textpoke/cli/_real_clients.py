# SPDX-License-Identifier: GPL-2.0-only
"""The client commands on a real kernel image (``--image``): ``ftrace``,
``keys``, ``kprobe`` and ``module`` boot the image exactly as ``boot
--image`` does (same options: CPU, command line, ``--data``, early-boot
inputs), then do their step with the same client objects as on the sim --
over an offline machine, the booted memory itself, no CPU running it --
and write ``_text.._end`` (``--dump``), compare it with the kernel's own
memory after the same step (``--reference``: the differing ranges by
symbol, as ``boot --reference`` lists them), or both.

What the real kernel allocates at run time (an ftrace ops' trampoline,
kprobes' instruction slots, a module's base) cannot be derived from the
image: each is an input, an address read from the kernel's run-time
reference (options below).  Without it that client has no executable
memory: ftrace's sites then call ``ftrace_caller`` (as when the kernel's
allocation fails), a kprobe or a module is refused.

Nothing here is imported before a command runs with ``--image``."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable

from ._args import U64, UsageError, checked, number
from ._boot_real import REAL_ONLY, SPAN_MAX, add_real_arguments, refuse_real_only
from ._inputs import input_file

__all__ = ["add_image_arguments", "refuse_image_only", "run_on_image", "REGIONS"]

#: the run-time allocations, per client: (dest, option, owner, pages, help)
REGIONS = {
    "ftrace": ("trampoline", "--trampoline", "ftrace", 1,
               "the page the kernel allocated for the tracer's dynamic trampoline "
               "(create_trampoline; from the run-time reference); without it the sites call "
               "ftrace_caller"),
    "kprobes": ("kprobe_slots", "--kprobe-slots", "kprobes", 1,
                "the page kprobes' instruction slots come from (kprobe_insn_slots' first page; "
                "from the run-time reference)"),
    "optprobes": ("optprobe_slots", "--optprobe-slots", "optprobes", 1,
                  "the page optimised kprobes' detours come from (kprobe_optinsn_slots' first "
                  "page; from the run-time reference); without it they share --kprobe-slots"),
    "modules": ("module_base", "--module-base", "modules", 1024,
                "where the kernel placed the module's text (its base, page-aligned; from the "
                "run-time reference); 4 MiB from there are the module's"),
}


def page_addr(text: str) -> int:
    v = number(text, U64, "address")
    if v % 4096:
        raise UsageError(f"{text} is not page-aligned")
    if v < 1 << 63:
        raise UsageError(f"{text} is not a kernel address (0xffff...)")
    return v


def add_image_arguments(p: argparse.ArgumentParser, clients: tuple[str, ...]) -> None:
    """``boot --image``'s options, and the run-time allocations of *clients*."""
    add_real_arguments(p)
    g = p.add_argument_group("run-time allocations of the real kernel (with --image)")
    g.add_argument("--before", metavar="FILE", type=input_file(SPAN_MAX),
                   help="the kernel's own memory (_text.._end) when the step starts -- the "
                        "run-time reference's previous stop: text and data start from it "
                        "instead of from the modelled boot (what the kernel changed by "
                        "itself since boot is then not counted as a difference)")
    for c in clients:
        dest, opt, _owner, _pages, hlp = REGIONS[c]
        g.add_argument(opt, dest=dest, metavar="ADDR", type=checked(page_addr, "ADDR"),
                       help=hlp)


def refuse_image_only(args: argparse.Namespace, clients: tuple[str, ...]) -> None:
    refuse_real_only(args)
    if getattr(args, "before", None):
        raise UsageError("--before applies to a real kernel image: give --image too")
    for c in clients:
        dest, opt = REGIONS[c][:2]
        if getattr(args, dest, None):
            raise UsageError(f"{opt} applies to a real kernel image: give --image too")


def _boot(args: argparse.Namespace, clients: tuple[str, ...]) -> Any:
    """The image booted as ``boot --image`` boots it, on an offline machine."""
    from .._alternative._ktext import KernelBootError
    from .._errors import TextPokeError
    from ..kernel._offline import ExecRegion, offline_kernel
    from ._boot_real import (SPAN_MAX, boot_options, check_spans, config_from_args,
                             early_from_args, load_image)
    from ._inputs import check_input, read_bounded
    if not hasattr(args, "cpu_features"):
        args.cpu_features, args.cpu_features_given = "", False
    cmd, caps, _unknown, img = load_image(args)
    check_spans(args, len(img.memory))
    before = None
    if args.before:
        size = check_input(args.before, SPAN_MAX, "--before")
        if size != len(img.memory):
            raise UsageError(f"--before: {args.before} is {size:,} bytes but the image's "
                             f"_text.._end is {len(img.memory):,}")
        before = read_bounded(args.before, SPAN_MAX, "--before")
    data = None
    if args.data:
        data = read_bounded(args.data, SPAN_MAX, "--data")
    cfg = config_from_args(args)
    regions = []
    for c in clients:
        dest, _opt, owner, pages, _h = REGIONS[c]
        a = getattr(args, dest, None)
        if a:
            regions.append(ExecRegion(page_addr(a), pages * 4096, owner))
    try:
        caps = caps.for_line(img.line)
        opts = boot_options(args, caps, cmd, img.sym)
        return offline_kernel(img, caps, opts, data=data, early=early_from_args(args),
                              config=cfg, regions=regions, ncpus=args.cpus,
                              before=before), cfg is not None
    except (KernelBootError, ValueError) as e:
        raise UsageError(str(e)) from None
    except TextPokeError as e:
        raise UsageError(str(e)) from None


def run_on_image(args: argparse.Namespace, clients: tuple[str, ...],
                 step: Callable[[Any, dict, list[str]], bool]) -> int:
    """Boot ``--image`` offline, run *step(offline_kernel, doc, lines) ->
    failed*, then the dump, the comparison and the report (exit 0; 1 when
    the step failed or the reference differs)."""
    from . import _contract
    from ._signals import Terminated
    d: dict = {"command": args.command, "image": args.image, "cpus": args.cpus}
    lines: list[str] = []
    ok = None
    try:
        t0 = time.perf_counter()
        ok, have_config = _boot(args, clients)
        d["version"] = ok.image.version
        d["boot_seconds"] = round(time.perf_counter() - t0, 3)
        d["config"] = {**ok.config, "from_image_config": have_config}
        core = ok.kernel.core
        s0, b0 = core.stats.syncs, core.stats.batches
        c0 = dict(core.events.counts)
        e0 = len(core.events)
        t1 = time.perf_counter()
        failed = step(ok, d, lines)
        d["seconds"] = round(time.perf_counter() - t1, 3)
        d["syncs"] = core.stats.syncs - s0
        d["batches"] = core.stats.batches - b0
        # sites changed through the batch, and single pokes/copies
        cnt = core.events.counts
        d["sites"] = cnt.get("batch", 0) - c0.get("batch", 0)
        d["copies"] = sum(cnt.get(p, 0) - c0.get(p, 0) for p in ("poke", "copy", "set"))
        lines.append(f"{d['sites']} sites changed in {d['batches']} batches, {d['syncs']} syncs, "
                     f"{d['seconds']} s ({ok.image.version}, booted in {d['boot_seconds']} s)")
        if getattr(args, "sites", False):
            evs = list(core.events)[e0:]
            d["site_records"] = [{"addr": hex(ev.addr), "where": ok.kt.describe(ev.addr),
                           "phase": ev.phase, "old": ev.old.hex(" "), "new": ev.new.hex(" ")}
                          for ev in evs]
        failed |= _dump_and_compare(args, ok, d, lines)
        return _contract.finish(args, d, lines, failed, core=core)
    except (KeyboardInterrupt, Terminated) as e:
        core = None
        if ok is not None:
            try:
                ok.kernel.close()       # a batch in flight is finished or rolled back
            except Exception:
                pass
            core = ok.kernel.core
        return _contract.interrupted_tail(
            args, d, lines, e, core=core,
            reason="interrupted while the image was loaded or booted (a copy in this "
                   "process; no INT3 written)")
    finally:
        if ok is not None:
            ok.close()


def _dump_and_compare(args: argparse.Namespace, ok: Any, d: dict, lines: list[str]) -> bool:
    from .._alternative._kboot import kernel_text_of
    from .._alternative._kdiff import SiteIndex, diff_ranges, diff_sections
    from ._boot_real import SPAN_MAX
    from ._inputs import read_bounded
    m = ok.machine
    written = [r for r in m.regions if any(m.region_bytes(r))]
    d["execmem"] = [{"owner": r.owner, "start": hex(r.start), "size": r.size,
                     "used": r in written} for r in m.regions]
    if args.dump:
        try:
            with open(args.dump, "wb") as f:
                f.write(ok.kt.buf)
            d["dump"] = {"text": args.dump}
            for r in written:
                p = f"{args.dump}.{r.owner}-{r.start:x}"
                with open(p, "wb") as f:
                    f.write(m.region_bytes(r))
                d["dump"][r.owner] = p
        except OSError as e:
            raise UsageError(f"--dump: cannot write {e.filename}: {e.strerror}") from None
        lines.append("wrote " + ", ".join(d["dump"].values()))
    if not args.reference:
        return False
    ref = read_bounded(args.reference, SPAN_MAX, "--reference")
    # at run time only .text is live: init text, .altinstr_* and .exit.text
    # were freed after boot (poisoned in the kernel's memory), not compared
    live = dataclasses.replace(ok.kt, exec_ranges=[r for r in ok.kt.exec_ranges
                                                   if r[0] == ".text"], changes=[])
    d["differing_bytes"] = diff_sections(live, ref)
    d["not_compared"] = [r[0] for r in ok.kt.exec_ranges if r[0] != ".text"]
    d["differing_ranges"] = [r.as_dict() for r in diff_ranges(
        live, ref, SiteIndex(kernel_text_of(ok.image)), limit=200)]
    lines.append("bytes differing from the reference per executable section live at run "
                 f"time (not compared, freed after boot: {', '.join(d['not_compared'])}):")
    for sec, n in d["differing_bytes"].items():
        lines.append(f"  {sec:24} {n}")
    for r in d["differing_ranges"][:50]:
        lines.append(f"  {r['where']} ({r['start']}, {r['len']} bytes): ours {r['ours']} / "
                     f"kernel {r['ref']}  {'; '.join(r['sites'][:2])}")
    return any(d["differing_bytes"].values())


#: every option that means something only with --image (for the refusals)
IMAGE_ONLY = tuple(REAL_ONLY) + tuple((v[0], v[1]) for v in REGIONS.values())
