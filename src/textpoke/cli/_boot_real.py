# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke boot --image IMG``: the boot-time passes of a real kernel
(Linux 6.12, x86-64) on its own image, for a given CPU, written out as the
kernel's memory ``_text`` .. ``_end``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from typing import TYPE_CHECKING

from . import _output as out
from ._args import U64, Bounds, UsageError, checked, number
from ._inputs import GiB, MiB, check_input, input_file, output_file, read_bounded

if TYPE_CHECKING:
    from .._alternative._kearly import EarlyBoot
    from .._alternative._kpasses import BootOptions
    from .._alternative._ktext import CpuCaps

# The patcher (iced-x86, the kernel's tables) is imported by the functions
# that boot, never at import time: ``textpoke boot --help`` needs none of it.

__all__ = ["add_real_arguments", "run_real", "caps_from_args", "derive_return_thunk",
           "parse_cmdline", "early_from_args", "disassemble"]


def disassemble(data: bytes, addr: int) -> list[dict[str, Any]]:
    """Decode *data* (at *addr*) instruction by instruction; a byte that
    starts no valid instruction is shown as ``(bad)`` and skipped.  (Here
    rather than in ``boot``, which imports this module: one direction.)"""
    from .._core._insn import insn_decode_kernel
    from .._errors import BadInstructionError
    out = []
    off = 0
    while off < len(data):
        try:
            insn = insn_decode_kernel(data[off:], addr + off)
            if insn.length > len(data) - off:
                raise BadInstructionError("runs past the end")
            raw, text = insn.raw, insn.text
        except BadInstructionError:
            raw, text = data[off:off + 1], "(bad)"
        out.append({"addr": addr + off, "bytes": raw.hex(" "), "text": text})
        off += len(raw)
    return out


def add_real_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real kernel image (Linux 6.12 x86-64)")
    g.add_argument("--image", metavar="IMG", type=input_file(IMAGE_MAX),
                   help="a bzImage (/boot/vmlinuz-*) or a vmlinux ELF to patch instead of the "
                        "bundled image")
    g.add_argument("--system-map", metavar="MAP", type=input_file(MAP_MAX),
                   help="not needed: the image carries its symbols (kallsyms); a System.map "
                        "given is checked against them (refused if it is not this image's) and "
                        "stands in for them only in a kernel built without kallsyms")
    g.add_argument("--cpu-caps", metavar="W0,W1,...", type=checked(cap_words, "u32 words"),
                   help="boot_cpu_data.x86_capability words (feature words, then bug words)")
    g.add_argument("--cpuinfo", metavar="FILE", type=input_file(TEXT_MAX), help="take feature names from a /proc/cpuinfo")
    g.add_argument("--cmdline", metavar="STR", default="", type=checked(_check_cmdline, "STR"),
                   help="kernel command line choices that are not feature bits (nosmp, "
                        "maxcpus=, noreplace-smp, debug-alternative, mitigations=off, "
                        "indirect_target_selection=)")
    g.add_argument("--return-thunk", metavar="SYMBOL", type=checked(_symbol_or_addr, "SYMBOL"),
                   help="x86_return_thunk (a symbol or 0xADDR); default: derived from the "
                        "capabilities")
    g.add_argument("--data", metavar="FILE", type=input_file(SPAN_MAX),
                   help="a snapshot of the kernel's memory (_text.._end) when "
                        "alternative_instructions() starts: run-time state (pv_ops, static "
                        "keys, static calls, runtime constants) is read from it")
    g.add_argument("--mem", metavar="SIZE", type=checked(mem_size, "SIZE"),
                   help="without --data: the machine's RAM (1G, 512M; a bare number is MiB, "
                        "as QEMU's -m): sizes the dentry hash, hence d_hash_shift")
    g.add_argument("--config", metavar="FILE", type=input_file(TEXT_MAX),
                   help="without --data: the image's kernel config (default: config-<release> "
                        "or config next to the image): the default preemption model, "
                        "init_on_alloc/free defaults")
    g.add_argument("--preempt", choices=["none", "voluntary", "full", "lazy"],
                   help="without --data: the preemption model (default: preempt= on --cmdline, "
                        "else the config's)")
    g.add_argument("--apic", choices=["physflat", "x2apic_phys", "x2apic_cluster", "noop"],
                   help="without --data: the APIC driver early boot installs (default: physflat, "
                        "or x2apic_cluster on an x2APIC CPU)")
    g.add_argument("--x86-idle", metavar="FUNC", type=checked(_symbol_name, "FUNC"),
                   help="without --data: x86_idle's function (default: from idle= and the CPU; "
                        "'none' for NULL)")
    g.add_argument("--dentry-hashtable", metavar="ADDR",
                   type=checked(lambda t: number(t, U64, "--dentry-hashtable"), "ADDR"),
                   help="without --data: dentry_hashtable's value (a memblock address early boot "
                        "allocates; it cannot be derived)")
    g.add_argument("--smt", action="store_true",
                   help="without --data: SMT siblings are active (MDS idle clearing)")
    g.add_argument("--no-early", action="store_true",
                   help="without --data: do not model early boot's run-time state (static "
                        "calls, static keys, runtime constants keep the image's values)")
    g.add_argument("--its-page", metavar="ADDR", action="append", default=[],
                   type=checked(its_page, "ADDR"),
                   help="address of a page the ITS thunk allocator hands out (repeatable)")
    g.add_argument("--dump", metavar="FILE", type=output_file(), help="write the patched _text.._end, raw")
    g.add_argument("--reference", metavar="FILE", type=input_file(SPAN_MAX),
                   help="compare with the kernel's own memory after alternative_instructions() "
                        "(raw _text.._end) and list the differing ranges")
    g.add_argument("--sites", action="store_true",
                   help="with --json: a record per changed site")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_cmdline(cmdline: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for tok in cmdline.split():
        key, _, val = tok.partition("=")
        if key == "nosmp":
            opts["setup_max_cpus"] = 0
        elif key == "maxcpus":
            try:
                opts["setup_max_cpus"] = number(val, MAXCPUS, "maxcpus")
            except UsageError:
                raise UsageError(f"--cmdline: bad maxcpus={val!r}") from None
        elif key == "noreplace-smp":
            opts["noreplace_smp"] = True
        elif key == "debug-alternative":
            opts["debug_alternative"] = True
        elif key == "mitigations" and val == "off":
            opts["mitigations_off"] = True
        elif key == "indirect_target_selection":
            opts["its"] = val
    return opts


def _find_config(image: str | None) -> str | None:
    import os
    if not image:
        return None
    d, base = os.path.split(os.path.abspath(image))
    cands = []
    for pre in ("vmlinuz-", "vmlinux-"):
        if base.startswith(pre):
            cands.append(os.path.join(d, "config-" + base[len(pre):]))
    cands.append(os.path.join(d, "config"))
    return next((c for c in cands if os.path.isfile(c)), None)


def config_from_args(args: argparse.Namespace) -> dict | None:
    """The kernel's .config as ``--config`` names it, or as found beside
    ``--image`` (None: neither); a file that cannot be read is a usage
    error, as for every input."""
    from .._alternative._kearly import read_config
    path = getattr(args, "config", None) or _find_config(getattr(args, "image", None))
    if not path:
        return None
    check_input(path, TEXT_MAX, "--config")
    try:
        return read_config(path)
    except OSError as e:
        raise UsageError(f"--config: cannot read {path}: {e.strerror}") from None


def early_from_args(args: argparse.Namespace) -> EarlyBoot | None:
    """The early-boot model's inputs (None with --data or --no-early)."""
    from .._alternative._kearly import EarlyBoot
    from .._alternative._ktext import KernelBootError
    if getattr(args, "data", None) or getattr(args, "no_early", False):
        return None
    cfg = config_from_args(args)
    try:
        mem = mem_size(args.mem) if getattr(args, "mem", None) else None
        dh = getattr(args, "dentry_hashtable", None)
        dht = number(dh, U64, "--dentry-hashtable") if dh else None
    except (KernelBootError, ValueError, UsageError) as e:
        raise UsageError(f"--mem/--dentry-hashtable: {e}") from None
    return EarlyBoot(cmdline=args.cmdline or "", ncpus=args.cpus, mem=mem, config=cfg,
                     preempt=getattr(args, "preempt", None), apic=getattr(args, "apic", None),
                     dentry_hashtable=dht, smt=bool(getattr(args, "smt", False)),
                     x86_idle=getattr(args, "x86_idle", None))


def _cpuinfo_names(path: str) -> list[str]:
    from ..images._lines import LINE_612
    text = read_bounded(path, TEXT_MAX, "--cpuinfo").decode("utf-8", "replace")
    names: list[str] = []
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() == "flags" and not names:
            names += v.split()
        elif k.strip() == "bugs" and not any(n.startswith("bug_") for n in names):
            names += ["bug_" + b for b in v.split()]
    if not names:
        raise UsageError(f"--cpuinfo: no 'flags' line in {path}")
    return [LINE_612.cpuinfo_names.get(n, n) for n in names]


def caps_from_args(args: argparse.Namespace) -> tuple[CpuCaps, list[str]]:
    """The CPU from --cpu-caps, --cpuinfo and --cpu-features (added on top);
    returns the unknown names skipped from a cpuinfo."""
    from .._alternative._ktext import CpuCaps, KernelBootError
    unknown: list[str] = []
    if args.cpu_caps:
        words = cap_words(args.cpu_caps)
        caps = CpuCaps(words)
    else:
        caps = CpuCaps()
    if args.cpuinfo:
        for n in _cpuinfo_names(args.cpuinfo):
            try:
                caps.set(n)
            except KernelBootError:
                unknown.append(n)
    feats = args.cpu_features
    if isinstance(feats, str) and feats and args.cpu_features_given:
        for n in feats.split(","):
            if n.strip() and n.strip() != "none":
                caps.set(n.strip())
    caps.set("always")
    return caps, unknown


def derive_return_thunk(caps: CpuCaps, cmd: dict[str, Any] | None = None) -> str:
    """``x86_return_thunk`` as the 6.12 mitigation code picks it, from the
    synthetic features it leaves behind and the command line (best effort:
    --return-thunk or the reference's value overrides it).

    The ITS selection runs last in the 6.12 stable tree's
    ``cpu_select_mitigations`` and so overrides the others: on a CPU with
    the ITS bug, unless ITS is off (``mitigations=off``,
    ``indirect_target_selection=off|vmexit``), Spectre v2 is unmitigated,
    retpolines are the LFENCE kind, or retpolines already come with call
    depth tracking, the aligned-thunks mitigation sets ``its_return_thunk``."""
    cmd = cmd or {}
    if not caps.has("rethunk"):
        return "__x86_return_thunk"
    its = cmd.get("its", "on")
    if (caps.has("bug_its") and not cmd.get("mitigations_off") and its in ("on", "force")
            and not caps.has("call_depth") and not caps.has("retpoline_lfence")
            and (caps.has("retpoline") or caps.has("indirect_thunk_its")
                 or caps.has("ibrs_enhanced") or caps.has("ibrs"))):
        return "its_return_thunk"
    if caps.has("call_depth"):
        return "call_depth_return_thunk"
    if caps.has("srso_alias"):
        return "srso_alias_return_thunk"
    if caps.has("srso"):
        return "srso_return_thunk"
    if caps.has("unret"):
        return "retbleed_return_thunk"
    if caps.has("indirect_thunk_its"):
        return "its_return_thunk"
    return "__x86_return_thunk"


def _progress_cb(enabled: bool):
    if not enabled:
        return None, lambda: None
    from rich.progress import Progress
    prog = Progress(transient=True, console=out.console(stderr=True))
    task = prog.add_task("patching", total=11)
    prog.start()

    def cb(step: str, i: int, n: int) -> None:
        prog.update(task, completed=i, total=n, description=step)
    return cb, prog.stop


def boot_options(args, caps, cmd: dict, sym) -> "BootOptions":
    """The boot's options from ``boot --image``'s arguments (shared by the
    clients' ``--image`` commands): the return thunk the command line and
    CPU choose, or ``--return-thunk`` (a symbol checked with *sym*), CPUs,
    SMP choices and ITS pages."""
    from .._alternative._kpasses import BootOptions
    rt: str | int = derive_return_thunk(caps, cmd)
    if args.return_thunk:
        rt = _symbol_or_addr(args.return_thunk)
        if isinstance(rt, str):
            sym(rt)
    return BootOptions(return_thunk=rt, ncpus=args.cpus,
                       noreplace_smp=cmd.get("noreplace_smp", False),
                       setup_max_cpus=cmd.get("setup_max_cpus"),
                       its_pages=[its_page(x) for x in args.its_page])


def load_image(args: argparse.Namespace) -> tuple[dict, Any, list[str], Any]:
    """What every ``--image`` command reads first: the kernel command line,
    the CPU's capabilities (and the cpuinfo names skipped), and the image
    (with its System.map when given); a bad image is a usage error."""
    from .._errors import TextPokeError
    from ..images._vmlinux import load_kernel
    cmd = parse_cmdline(args.cmdline or "")
    caps, unknown = caps_from_args(args)
    try:
        img = load_kernel(args.image, args.system_map)
    except TextPokeError as e:
        raise UsageError(str(e)) from None
    return cmd, caps, unknown, img


def run_real(args: argparse.Namespace) -> int:
    from .._alternative._kboot import kernel_text_of
    from .._alternative._kdiff import SiteIndex, diff_ranges, diff_sections
    from .._alternative._ktext import KernelBootError
    from ..kernel import boot_kernel
    cmd, caps, unknown, img = load_image(args)
    data = None
    if args.data:
        data = read_bounded(args.data, SPAN_MAX, "--data")
    try:
        kt = kernel_text_of(img, data=data, record=bool(args.sites))
        check_spans(args, len(kt.buf))
        caps = caps.for_line(kt.line)       # the image's kernel line numbers the features
        opts = boot_options(args, caps, cmd, kt.sym)
        names = args.disasm or []
        before = {n: _fn(kt, img, n) for n in names}
        show = sys.stderr.isatty() and not args.no_progress and not args.json
        cb, stop = _progress_cb(show)
        t0 = time.perf_counter()
        try:
            res = boot_kernel(kt, caps, opts, progress=cb, early=early_from_args(args),
                              debug_alternative=bool(args.debug_alternative
                                                     or cmd.get("debug_alternative")))
        finally:
            stop()
        elapsed = time.perf_counter() - t0
    except KernelBootError as e:
        raise UsageError(str(e)) from None
    after = {n: _fn(kt, img, n) for n in names}
    if args.dump:
        try:
            with open(args.dump, "wb") as f:
                f.write(kt.buf)
        except OSError as e:
            raise UsageError(f"--dump: cannot write {args.dump}: {e.strerror}") from None
    doc: dict[str, Any] = {"image": args.image, "version": getattr(img, "version", ""),
                           "cpu_caps": [f"{w:#010x}" for w in caps.words()],
                           "ncpus": args.cpus, **res.as_dict(), "seconds": round(elapsed, 3)}
    if unknown:
        doc["cpuinfo_unknown"] = unknown
    if args.reference:
        ref = read_bounded(args.reference, SPAN_MAX, "--reference")
        doc["differing_bytes"] = diff_sections(kt, ref)
        doc["differing_ranges"] = [r.as_dict() for r in
                                   diff_ranges(kt, ref, SiteIndex(kernel_text_of(img)), limit=200)]
    if args.sites:
        doc["sites"] = [{"table": c.table, "addr": hex(c.addr), "where": kt.describe(c.addr),
                         "old": c.old.hex(" "), "new": c.new.hex(" ")} for c in kt.changes]
    if names:
        doc["disasm"] = {n: {"addr": hex(before[n][0]),
                             "before": disassemble(before[n][1], before[n][0]),
                             "after": disassemble(after[n][1], after[n][0])} for n in names}
    if args.json:
        doc["interrupted"], doc["int3_left"] = False, None
        doc["int3_left_reason"] = ("the passes patched a copy of the image's memory in this "
                                   "process: no INT3 is written, nothing runs it")
        out.emit_json(doc)
    else:
        _print(doc, res.debug)
    return 1 if args.reference and any(doc["differing_bytes"].values()) else 0


def _fn(kt, img, name: str) -> tuple[int, bytes]:
    if name not in kt.symbols:
        raise UsageError(f"unknown symbol {name!r} in {img.path}")
    a = kt.symbols[name]
    n = img.symbol_size(name) or 64
    return a, kt.read(a, min(n, 4096))


def _print(doc: dict, debug: list[str]) -> None:
    p = print
    for line in debug:
        p(f"debug-alternative: {line}")
    p(f"{doc['image']}  {doc.get('version', '')}  return thunk {doc['return_thunk']}  "
      f"{'UP' if doc['uniproc_patched'] else 'SMP'}  {doc['seconds']} s")
    p(f"{'table':28} {'entries':>9} {'applied':>9} {'changed':>9}")
    for t, s in doc["tables"].items():
        p(f"{t:28} {s['entries']:9} {s['applied']:9} {s['changed']:9}")
    es = doc.get("early_state")
    if es:
        p("early boot (no --data): " + ", ".join(f"{k} {v}" for k, v in es["choices"].items()))
        for n in es["notes"]:
            p(f"  note: {n}")
    if "differing_bytes" in doc:
        p("bytes differing from the reference per executable section:")
        for sec, n in doc["differing_bytes"].items():
            p(f"  {sec:24} {n}")
        for r in doc["differing_ranges"][:50]:
            p(f"  {r['where']} ({r['start']}, {r['len']} bytes): ours {r['ours']} / kernel "
              f"{r['ref']}  {'; '.join(r['sites'][:2])}")
    for n, d in doc.get("disasm", {}).items():
        p(f"{n} @ {d['addr']}: before | after")
        for b, a in zip(d["before"], d["after"]):
            p(f"  {b['addr']:#x} {b['bytes']:24} {b['text']:40} | {a['bytes']:24} {a['text']}")


# ------------------------------------------------------------ input checks
IMAGE_MAX = 1 * GiB         # a vmlinux with its symbols; a bzImage is ~15 MiB
MAP_MAX = 128 * MiB         # a System.map is ~5 MiB
TEXT_MAX = 16 * MiB         # a kernel config, a /proc/cpuinfo
SPAN_MAX = 1 * GiB          # _text.._end, as the image loader bounds it
MAXCPUS = Bounds(0, 8192)
MEM = Bounds(1 * MiB, 1 << 46, "1M..64T")
#: options that mean something only for a real image (dest, option)
REAL_ONLY = (("system_map", "--system-map"), ("cpu_caps", "--cpu-caps"),
             ("cpuinfo", "--cpuinfo"), ("return_thunk", "--return-thunk"), ("data", "--data"),
             ("mem", "--mem"), ("config", "--config"), ("preempt", "--preempt"),
             ("apic", "--apic"), ("x86_idle", "--x86-idle"),
             ("dentry_hashtable", "--dentry-hashtable"), ("smt", "--smt"),
             ("no_early", "--no-early"), ("its_page", "--its-page"), ("dump", "--dump"),
             ("reference", "--reference"), ("sites", "--sites"), ("cmdline", "--cmdline"),
             ("no_progress", "--no-progress"))


def refuse_real_only(args: argparse.Namespace) -> None:
    """Without --image the real-image options would be ignored: refuse them."""
    for dest, opt in REAL_ONLY:
        if getattr(args, dest, None):
            raise UsageError(f"{opt} applies to a real kernel image: give --image too")


def cap_words(text: str) -> list[int]:
    """--cpu-caps: comma-separated u32 words, none empty (a stray comma
    would shift every later word)."""
    parts = text.replace(" ", "").split(",")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]              # one trailing comma is harmless
    if any(p == "" for p in parts):
        raise UsageError(f"--cpu-caps: an empty word in {text!r} (later words would shift)")
    if len(parts) > 32:
        raise UsageError(f"--cpu-caps: {len(parts)} words; at most 32")
    return [number(p, Bounds(0, 2**32 - 1, "0..0xffffffff"), f"--cpu-caps word {i}")
            for i, p in enumerate(parts)]


def mem_size(text: str) -> int:
    """--mem: 1G, 512M, a bare number of MiB, 0x bytes; 1M..64T."""
    from .._alternative._kearly import parse_size
    from .._alternative._ktext import KernelBootError
    try:
        n = parse_size(text)
    except KernelBootError as e:
        raise UsageError(f"--mem: {e}") from None
    if not MEM.lo <= n <= MEM.hi:
        raise UsageError(f"--mem: {text} is not from {MEM}")
    return n


def its_page(text: str) -> int:
    v = number(text, U64, "--its-page")
    if v % 4096:
        raise UsageError(f"--its-page: {text} is not page-aligned")
    return v


def _symbol_name(text: str) -> str:
    t = text.strip()
    if not t or not (t.replace("_", "a").replace(".", "a").isalnum() and t.isascii()) \
            or t[0].isdigit() or len(t) > 512:
        raise UsageError(f"not a symbol name: {text!r}")
    return t


def _symbol_or_addr(text: str) -> str | int:
    if text.strip().lower().startswith(("0x", "-")) or text.strip()[:1].isdigit():
        return number(text, U64, "--return-thunk")
    return _symbol_name(text)


def _check_cmdline(text: str) -> str:
    if len(text) > 4096:
        raise UsageError(f"--cmdline: {len(text):,} characters; at most 4096")
    parse_cmdline(text)
    return text


def check_spans(args: argparse.Namespace, span: int) -> None:
    """--data and --reference are the kernel's memory _text.._end: their
    size must be the image's span, checked before the boot runs."""
    for dest, opt in (("data", "--data"), ("reference", "--reference")):
        path = getattr(args, dest, None)
        if path:
            size = check_input(path, SPAN_MAX, opt)
            if size != span:
                raise UsageError(f"{opt}: {path} is {size:,} bytes but the image's _text.._end "
                                 f"is {span:,}")
