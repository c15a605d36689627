# SPDX-License-Identifier: GPL-2.0-only
"""The reference: a real kernel's own boot-time patching, observed under QEMU.

:func:`reference` boots a bzImage with ``qemu-system-x86_64`` (TCG, no
KVM, no initrd, ``nokaslr``, serial console), stopped at reset by the
gdbstub.  It speaks the gdb remote serial protocol itself over a unix
socket and sets **hardware breakpoints** only (``Z1`` packets -- nothing is
ever written to guest memory):

* at the ``call alternative_instructions`` in ``arch_cpu_finalize_init``
  (found by disassembling that function from the image), and
* at the instruction after that call (the return address).

At each stop it saves guest-physical memory ``_text.._end`` with the QMP
``pmemsave`` command (with ``nokaslr`` the kernel runs at its link address
and ``phys = virt - __START_KERNEL_map + phys_base``; ``phys_base`` is read
from the guest and the mapping is checked by comparing ``linux_banner``
read through the gdbstub's virtual view with the same bytes in the dump),
and reads ``boot_cpu_data.x86_capability`` (24 u32 words at offset 48)
and ``x86_return_thunk`` through gdb memory reads.

References are cached on disk, keyed by (image sha256/version, CPU model,
command line, number of CPUs), under ``$TEXTPOKE_CACHE`` or
``~/.cache/textpoke``; the two dumps are stored zstd-compressed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._elf import ImageError
from ._lines import LINE_612
from ._qemu_vm import BASE_CMDLINE, QEMU, ReferenceError, guest, qemu_version
from ._vmlinux import RealKernelImage, cache_root

__all__ = ["Reference", "ReferenceError", "reference", "find_alternatives_call",
           "cache_root", "QEMU", "HARNESS_VERSION", "CAPS_OFFSET", "NCAPS", "run_matrix",
           "resolve_kernel", "KERNEL_FLAVOURS", "DEFAULT_KERNELS"]

#: bump when what a reference contains or how it is taken changes
HARNESS_VERSION = 2
#: struct cpuinfo_x86: x86_capability[NCAPINTS + NBUGINTS] at offset 48 (6.12,
#: checked with the -dbg package's DWARF: ptype /o struct cpuinfo_x86); each
#: kernel line has its own (KernelLine.caps_offset: 40 in 6.1)
CAPS_OFFSET = LINE_612.caps_offset
NCAPS = LINE_612.ncaps


@dataclass
class Reference:
    """What the kernel did to its own text, observed around
    ``alternative_instructions()``."""

    version: str
    image_sha256: str
    cpu: str
    smp: int
    cmdline: str                    # what was added to the base command line
    kernel_cmdline: str             # the whole kernel command line
    qemu_argv: list[str]
    text_start: int                 # _text: offset 0 of the dumps
    end: int                        # _end
    phys_base: int
    call_site: int                  # the CALL alternative_instructions
    return_site: int                # the instruction after it
    caps_before: list[int]
    caps_after: list[int]
    return_thunk: int
    return_thunk_sym: str
    seconds_to_call: float          # QEMU start -> the first stop
    seconds_in_alternatives: float  # first stop -> second stop
    qemu_version: str = ""
    serial: str = ""                # the console up to the second stop
    before: bytes = field(default=b"", repr=False)
    after: bytes = field(default=b"", repr=False)
    path: str = ""                  # the cache directory

    def read(self, which: str, addr: int, n: int) -> bytes:
        data = self.before if which == "before" else self.after
        off = addr - self.text_start
        return data[off:off + n]

    def changed_bytes(self, ranges: list[tuple[int, int]] | None = None) -> int:
        """Bytes that differ between the two dumps (within *ranges*)."""
        return diff_count(self.before, self.after, self.text_start, ranges)

    def mitigations(self) -> list[str]:
        """The console's lines about speculation mitigations (what the
        kernel chose on this CPU and command line)."""
        keys = ("Mitigation", "Vulnerable", "Spectre", "RETBleed", "SRSO", "ITS", "MDS",
                "Retbleed", "GDS", "BHI", "call depth", "Speculative")
        out = []
        for line in self.serial.splitlines():
            text = re.sub(r"^\[[ 0-9.]+\] ", "", line).strip()
            if any(k in text for k in keys) and text not in out:
                out.append(text)
        return out

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("before"), d.pop("after"), d.pop("path")
        return d


def diff_count(a: bytes, b: bytes, base: int, ranges: list[tuple[int, int]] | None = None) -> int:
    if ranges is None:
        ranges = [(base, base + min(len(a), len(b)))]
    total = 0
    for lo, hi in ranges:
        x, y = a[lo - base:hi - base], b[lo - base:hi - base]
        if x == y:
            continue
        # fast path: compare in 4 KiB blocks, count bytes only where they differ
        for off in range(0, len(x), 4096):
            bx, by = x[off:off + 4096], y[off:off + 4096]
            if bx != by:
                total += sum(1 for p, q in zip(bx, by) if p != q)
    return total


# --------------------------------------------------------- finding the call
def find_alternatives_call(image: RealKernelImage) -> tuple[int, int]:
    """(address of ``call alternative_instructions`` in
    ``arch_cpu_finalize_init``, address of the next instruction)."""
    import iced_x86

    fn = image.sym("arch_cpu_finalize_init")
    target = image.sym("alternative_instructions")
    code = image.function_bytes("arch_cpu_finalize_init")
    if not code:
        raise ImageError(f"{image.path}: arch_cpu_finalize_init has no size")
    dec = iced_x86.Decoder(64, code, ip=fn)
    for ins in dec:
        if ins.mnemonic == iced_x86.Mnemonic.CALL and ins.op0_kind == iced_x86.OpKind.NEAR_BRANCH64 \
                and ins.near_branch_target == target:
            return ins.ip, ins.next_ip
    raise ImageError(f"{image.path}: no call to alternative_instructions in arch_cpu_finalize_init")


# ----------------------------------------------------------------- the boot


def _key(image: RealKernelImage, cpu: str, cmdline: str, smp: int) -> str:
    h = hashlib.sha256(json.dumps([HARNESS_VERSION, image.sha256, cpu, cmdline, smp,
                                   qemu_version()]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9.=,_-]+", "_", cmdline).strip("_") or "default"
    return f"{cpu}-smp{smp}-{slug[:60]}-{h}"


def reference_dir(image: RealKernelImage, cpu: str, cmdline: str = "", smp: int = 1) -> Path:
    return cache_root() / "reference" / image.version / _key(image, cpu, cmdline, smp)


def reference(image: RealKernelImage, bzimage: str | Path, *, cpu: str = "qemu64",
              cmdline: str = "", smp: int = 1, memory: str = "1G", timeout: float = 300.0,
              use_cache: bool = True) -> Reference:
    """The kernel's text just before and just after ``alternative_instructions()``
    when *bzimage* (the file *image* was loaded from) boots on QEMU CPU
    model *cpu* with *cmdline* added to ``console=ttyS0 nokaslr``."""
    d = reference_dir(image, cpu, cmdline, smp)
    if use_cache and (d / "meta.json").exists():
        try:
            return load_reference(d)
        except (OSError, ValueError, KeyError) as e:
            print(f"textpoke: ignoring a damaged cached reference {d}: {e}")
    ref = _boot(image, Path(bzimage), cpu=cpu, cmdline=cmdline, smp=smp, memory=memory,
                timeout=timeout)
    save_reference(ref, d)
    ref.path = str(d)
    return ref


def save_reference(ref: Reference, d: Path) -> None:
    import zstandard
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c = zstandard.ZstdCompressor(level=3, threads=-1)
    (tmp / "before.bin.zst").write_bytes(c.compress(ref.before))
    (tmp / "after.bin.zst").write_bytes(c.compress(ref.after))
    (tmp / "meta.json").write_text(json.dumps(ref.meta(), indent=1) + "\n")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)


def load_reference(d: Path) -> Reference:
    import zstandard
    meta = json.loads((d / "meta.json").read_text())
    dz = zstandard.ZstdDecompressor()
    before = dz.decompress((d / "before.bin.zst").read_bytes())
    after = dz.decompress((d / "after.bin.zst").read_bytes())
    n = meta["end"] - meta["text_start"]
    if len(before) != n or len(after) != n:
        raise ValueError("dump size does not match _text.._end")
    return Reference(**meta, before=before, after=after, path=str(d))


def _boot(image: RealKernelImage, bzimage: Path, *, cpu: str, cmdline: str, smp: int,
          memory: str, timeout: float) -> Reference:
    call_site, ret_site = find_alternatives_call(image)
    kcmd = f"{BASE_CMDLINE} {cmdline}".strip()
    with guest(bzimage, cpu=cpu, smp=smp, memory=memory, append=kcmd) as g:
        g.gdb.hbreak(call_site)
        t0 = time.monotonic()
        deadline = t0 + timeout

        def stop_at(addr: int, what: str) -> None:
            g.run_to(image, addr, what, deadline,
                     f"the kernel did not reach {what} within {timeout:.0f} s")

        stop_at(call_site, "the call of alternative_instructions")
        t1 = time.monotonic()
        phys_base = g.u64(image.sym("phys_base"))
        banner_addr = image.sym("linux_banner")
        if g.gdb.read(banner_addr, 64) != image.read(banner_addr, 64):
            raise ReferenceError("linux_banner read from the guest differs from the image's: "
                                 "not the same kernel, or not at its link address (KASLR?)")
        before = g.text(image, phys_base)
        caps_before = g.caps(image)
        g.gdb.hbreak(call_site, on=False)
        g.gdb.hbreak(ret_site)
        stop_at(ret_site, "the return from alternative_instructions")
        t2 = time.monotonic()
        after = g.text(image, phys_base)
        caps_after = g.caps(image)
        rthunk = g.u64(image.sym("x86_return_thunk"))
        g.gdb.hbreak(ret_site, on=False)
        return Reference(
            version=image.version, image_sha256=image.sha256, cpu=cpu, smp=smp, cmdline=cmdline,
            kernel_cmdline=kcmd, qemu_argv=g.argv, text_start=image.text_start, end=image.end,
            phys_base=phys_base, call_site=call_site, return_site=ret_site,
            caps_before=caps_before, caps_after=caps_after, return_thunk=rthunk,
            return_thunk_sym=image.describe(rthunk), seconds_to_call=round(t1 - t0, 3),
            seconds_in_alternatives=round(t2 - t1, 3), qemu_version=qemu_version(),
            serial=g.tail(1 << 20), before=before, after=after)


# ------------------------------------------------------------ the matrix
@dataclass(frozen=True)
class Setup:
    cpu: str
    cmdline: str = ""
    smp: int = 1

    def label(self) -> str:
        return f"{self.cpu} smp{self.smp} {self.cmdline or '(default)'}"


#: what ``make test-kernel`` boots: CPU models x command lines x CPUs
SETUPS: tuple[Setup, ...] = (
    Setup("qemu64"),
    Setup("qemu64", "", 2),
    Setup("qemu64", "mitigations=off"),
    Setup("qemu64", "maxcpus=1", 2),
    Setup("Haswell"),
    Setup("Skylake-Client-v4", "", 2),
    Setup("Skylake-Client-v4", "spectre_v2=retpoline,lfence"),
    Setup("Skylake-Client-v4", "retbleed=stuff"),
    Setup("Skylake-Client-v4", "retbleed=stuff", 2),
    Setup("EPYC"),
    Setup("EPYC", "mitigations=off", 2),
)


def textpoke_can_dump() -> bool:
    """Whether this checkout's ``textpoke boot`` patches real images yet."""
    import sys
    r = subprocess.run([sys.executable, "-m", "textpoke", "boot", "--help"],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0 and all(o in r.stdout for o in ("--image", "--dump", "--cpu-caps",
                                                              "--data"))


def _memory_arg(ref: Reference) -> str:
    argv = list(ref.qemu_argv)
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else "128M"


def textpoke_dump(kernel, image: RealKernelImage, ref: Reference, *, extra: tuple = (),
                  timeout: float = 600.0, data: bool = True) -> tuple[bytes | None, str, float]:
    """textpoke's own dump for *ref*'s setup: (bytes or None, error, seconds).
    With ``data=False`` no snapshot is given: textpoke derives the run-time
    state from the command line, the CPUs and the memory size (QEMU's -m)."""
    import sys
    with tempfile.TemporaryDirectory(prefix="textpoke-dump-") as td:
        out = Path(td) / "dump.bin"
        argv = [sys.executable, "-m", "textpoke", "boot", "--image", str(kernel.vmlinuz),
                *(["--system-map", str(kernel.system_map)] if kernel.system_map else []),
                "--cpu-caps", ",".join(f"{w:#x}" for w in ref.caps_before),
                "--cpus", str(ref.smp), "--dump", str(out), "--no-progress"]
        if data:
            snap = Path(td) / "before.bin"
            snap.write_bytes(ref.before)
            argv += ["--data", str(snap)]
        else:
            argv += ["--mem", _memory_arg(ref)]
        if ref.cmdline:
            argv += ["--cmdline", ref.cmdline]
        argv += list(extra)
        t = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
        dt = time.monotonic() - t
        if r.returncode or not out.exists():
            err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            return None, err[:120], dt
        return out.read_bytes(), "", dt


def _compare(kernel, image, ref, execs, extra=(), data=True) -> tuple[str, dict | None]:
    dump, err, dt = textpoke_dump(kernel, image, ref, extra=extra, data=data)
    if dump is None:
        return f"failed: {err}", None
    if len(dump) != len(ref.after):
        return f"dump is {len(dump)} bytes, not {len(ref.after)} (_text.._end)", None
    d = {s.name: diff_count(dump, ref.after, image.text_start, [(s.addr, s.end)])
         for s in execs}
    text = f"{sum(d.values())}"
    if sum(d.values()):
        text += " [" + ", ".join(f"{k} {v}" for k, v in d.items() if v) + "]"
    return text, d


# ------------------------------------------------------------- the kernels
#: kernel names the reference tool takes: Debian's x86-64 image packages by
#: line and flavour (the newest release apt offers, or the newest cached)
KERNEL_FLAVOURS = {"6.1-cloud": ("6.1", "cloud-amd64"), "6.1-amd64": ("6.1", "amd64"),
                   "6.12-cloud": ("6.12", "cloud-amd64"), "6.12-amd64": ("6.12", "amd64"),
                   "6.12-rt": ("6.12", "rt-amd64")}
#: what ``make test-kernel`` checks by default
DEFAULT_KERNELS = ("6.12-cloud", "6.12-rt", "6.1-cloud")


def _flavour_of(release: str) -> str:
    for fl in ("cloud-amd64", "rt-amd64"):
        if release.endswith("-" + fl):
            return fl
    return "amd64"


def resolve_kernel(name: str) -> str:
    """A release (``uname -r``) for *name*: a key of :data:`KERNEL_FLAVOURS`
    (the newest such release apt offers, else the newest cached) or a
    release itself."""
    import functools
    if name not in KERNEL_FLAVOURS:
        if not re.fullmatch(r"\d+\.\d+\.\d+[-+][A-Za-z0-9.+~-]+", name):
            raise ValueError(f"unknown kernel {name!r}: give one of "
                             f"{', '.join(KERNEL_FLAVOURS)} or a release (6.12.118+deb12-rt-amd64)")
        return name
    series, flavour = KERNEL_FLAVOURS[name]

    def ours(rel: str) -> bool:
        return (re.match(rf"{re.escape(series)}\.\d", rel) is not None
                and _flavour_of(rel) == flavour and rel.endswith("-" + flavour))

    rels: list[str] = []
    exe = shutil.which("apt-cache")
    if exe:
        r = subprocess.run([exe, "search", "--names-only",
                            rf"^linux-image-{re.escape(series)}\..*-{flavour}-unsigned$"],
                           capture_output=True, text=True, check=False)
        rels = [m.group(1) for m in re.finditer(r"^linux-image-(\S+)-unsigned ", r.stdout, re.M)]
    rels = [r for r in rels if ours(r)]
    if not rels:
        rels = [p.parent.name for p in (cache_root() / "kernel").glob("*/meta.json")
                if ours(p.parent.name)]
    if not rels:
        raise ValueError(f"no {name} kernel: apt knows none (apt-get update?) and none is cached")

    def cmp(a: str, b: str) -> int:
        if a == b:
            return 0
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0
        return -1 if lt else 1
    return max(rels, key=functools.cmp_to_key(cmp))


#: the run-time column's width in the one table
RUNTIME_WIDTH = 46


def run_matrix(kernels, setups=SETUPS, *, use_cache: bool = True, compare: bool | None = None,
               out=print, no_data: bool = False, runtime=None) -> list[dict]:
    """Boot every kernel in every setup (or take it from the cache), print
    ONE table and return its rows.  *kernels*: DebianKernel objects (or one).
    *runtime(kernel, image, setup) -> (cell, legend)*, when given, fills a
    run-time column on the same rows (``textpoke.kernel._runtime_table``)."""
    if not isinstance(kernels, (list, tuple)):
        kernels = [kernels]
    if compare is None:
        compare = textpoke_can_dump()
    out(f"{qemu_version()}, TCG; base command line {BASE_CMDLINE!r}")
    loaded = []
    for kernel in kernels:
        image = kernel.load()
        execs = image.executable_sections()
        loaded.append((kernel, image, execs))
        line = image.line.name if image.line else "?"
        out(f"{image.version} (Debian {kernel.package_version}, line {line}, "
            f"{image.compression or 'ELF'}): "
            + ", ".join(f"{n} {t.count}" for n, t in image.tables.items()))
    out("")
    rt = f"{'run time: textpoke vs kernel':<{RUNTIME_WIDTH}}  " if runtime else ""
    hdr = (f"{'kernel':<27} {'setup':<44} {'boot s':>6} {'alt s':>5} {'return thunk':<24} "
           f"{'changed':>7}  {rt}{'textpoke vs kernel: differing bytes (executable sections)'}")
    out(hdr)
    out("-" * len(hdr))
    rows = []
    for kernel, image, execs in loaded:
        for st in setups:
            rows.append(_row(kernel, image, execs, st, use_cache, compare, no_data, out,
                             runtime))
    out("")
    out("changed: bytes of executable sections that differ between the kernel's memory at the")
    out("call of alternative_instructions() and right after it returns; boot s / alt s: seconds")
    out("from reset to that call, and inside it, under TCG (when booted, not cached).  textpoke:")
    out("'data' is boot --image with the kernel's memory at the call (--data); 'no data' derives")
    out("early boot's run-time state from the command line, CPU and memory size; 'told' adds")
    out("--dentry-hashtable (a memblock address no model can derive: 5 sites x 8 bytes in 6.12).")
    return rows


def _row(kernel, image, execs, st, use_cache, compare, no_data, out, runtime=None) -> dict:
    cached = (reference_dir(image, st.cpu, st.cmdline, st.smp) / "meta.json").exists()
    ref = reference(image, kernel.vmlinuz, cpu=st.cpu, cmdline=st.cmdline, smp=st.smp,
                    use_cache=use_cache)
    per = {s.name: ref.changed_bytes([(s.addr, s.end)]) for s in execs}
    changed = sum(per.values())
    row = {"kernel": image.version, "line": image.line.name if image.line else "",
           "setup": st.label(), "cpu": st.cpu, "cmdline": st.cmdline, "smp": st.smp,
           "seconds_to_call": ref.seconds_to_call,
           "seconds_in_alternatives": ref.seconds_in_alternatives,
           "cached": cached and use_cache, "return_thunk": ref.return_thunk_sym,
           "changed": per, "caps": ref.caps_before, "path": ref.path,
           "mitigations": ref.mitigations()}
    if compare:
        # textpoke derives x86_return_thunk from the capability words; when
        # that does not match, run it again told the kernel's choice
        text, d = _compare(kernel, image, ref, execs)
        row["textpoke"], row["textpoke_diff"] = f"data {text}", d
        if d and sum(d.values()) and ref.return_thunk_sym:
            text, d2 = _compare(kernel, image, ref, execs,
                                ("--return-thunk", ref.return_thunk_sym))
            row["textpoke_forced_thunk_diff"] = d2
            row["textpoke"] += f" (told --return-thunk {ref.return_thunk_sym}: {text})"
        if no_data:
            text, d3 = _compare(kernel, image, ref, execs, data=False)
            row["textpoke_no_data_diff"] = d3
            row["textpoke"] += f"; no data {text}"
            dht = image.symbols.get("dentry_hashtable")
            if d3 and sum(d3.values()) and dht is not None:
                value = int.from_bytes(ref.read("before", dht, 8), "little")
                text, d4 = _compare(kernel, image, ref, execs,
                                    ("--dentry-hashtable", hex(value)), data=False)
                row["textpoke_no_data_told_diff"] = d4
                row["textpoke"] += f"; told {text}"
    else:
        row["textpoke"] = "(not compared)"
    note = " (cached)" if row["cached"] else ""
    rt = ""
    if runtime is not None:
        row["runtime"] = runtime(kernel, image, st)
        rt = f"{row['runtime']:<{RUNTIME_WIDTH}}  "
    out(f"{image.version:<27} {st.label():<44} {ref.seconds_to_call:>6.2f} "
        f"{ref.seconds_in_alternatives:>5.2f} {ref.return_thunk_sym:<24} {changed:>7}  "
        f"{rt}{row['textpoke']}{note}")
    return row


def main(argv: list[str] | None = None, runtime=None) -> int:
    """The tool; *runtime* as :func:`run_matrix` takes it (the run-time
    column, given by a caller that can run the clients)."""
    import argparse
    import sys
    from ._vmlinux import KernelUnavailable, ensure_debian_kernel
    p = argparse.ArgumentParser(prog="kernel_reference",
                                description="Reference dumps of Debian's x86-64 kernels booted "
                                            "under QEMU, and textpoke against them: one table.")
    p.add_argument("--kernel", action="append", metavar="NAME",
                   help=f"a kernel: {', '.join(KERNEL_FLAVOURS)} (the newest release apt "
                        f"offers) or a release such as 6.1.0-57-cloud-amd64; repeat or "
                        f"comma-separate (default: {','.join(DEFAULT_KERNELS)}; 'all': every "
                        f"flavour)")
    p.add_argument("--release", help="same as --kernel RELEASE (kept for scripts)")
    p.add_argument("--fetch-only", action="store_true", help="download and cache, then stop")
    p.add_argument("--cpu", help="one setup: QEMU CPU model")
    p.add_argument("--cmdline", default="", help="one setup: added kernel command line")
    p.add_argument("--smp", type=int, default=1, help="one setup: CPUs")
    p.add_argument("--no-cache", action="store_true", help="boot again even when cached")
    p.add_argument("--no-compare", action="store_true", help="skip textpoke's dumps")
    p.add_argument("--no-data", action="store_true",
                   help="also compare textpoke without --data (run-time state derived from "
                        "the command line, CPUs and memory size)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    a = p.parse_args(argv)
    names = [n for k in (a.kernel or []) for n in k.split(",") if n]
    if a.release:
        names.append(a.release)
    if not names:
        env = os.environ.get("TEXTPOKE_KERNELS")
        names = env.split(",") if env else list(DEFAULT_KERNELS)
    if "all" in names:
        names = [n for n in names if n != "all"] + [k for k in KERNEL_FLAVOURS if k not in names]
    kernels = []
    for n in dict.fromkeys(names):
        try:
            kernels.append(ensure_debian_kernel(resolve_kernel(n)))
        except ValueError as e:
            print(f"kernel_reference: {e}", file=sys.stderr)
            return 2
        except KernelUnavailable as e:
            print(f"kernel_reference: cannot fetch the Debian kernel {n}: {e}", file=sys.stderr)
            return 2
    if a.fetch_only:
        for k in kernels:
            print(f"{k.release} (Debian {k.package_version}): {k.vmlinuz}, {k.system_map}")
        return 0
    setups = (Setup(a.cpu, a.cmdline, a.smp),) if a.cpu else SETUPS
    try:
        rows = run_matrix(kernels, setups, use_cache=not a.no_cache,
                          compare=False if a.no_compare else None, no_data=a.no_data,
                          runtime=runtime)
    except (ReferenceError, ImageError) as e:
        print(f"kernel_reference: {e}", file=sys.stderr)
        return 1
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0
