# SPDX-License-Identifier: GPL-2.0-only
"""A real x86-64 Linux kernel image: a bzImage (``/boot/vmlinuz-*``) or a
vmlinux, with the symbols it carries itself (its ``kallsyms`` tables, or a
vmlinux's ``.symtab``); a ``System.map``, when given, is checked against
them (or, for a kernel built without kallsyms, stands in for them).

:func:`load_kernel` returns a :class:`RealKernelImage`: the allocated
sections at the addresses the kernel runs them at (``.data..percpu`` is
linked at 0 but loaded inside init data: it is placed at its load
address), the symbols both ways, ``read(addr, n)`` over the kernel's
memory layout from ``_text`` to ``_end`` (as the kernel's memory looks
right after the decompressor; .bss and holes read as zeros), and views of
the patching tables bounded by sections or by ``__start_*``/``__stop_*``
symbols.  The image is checked against what it claims to be: x86-64,
linked at the kernel's addresses, symbols that agree with the image
(``_text``, ``_etext``, the table bounds, and the ``linux_banner`` string
read at its address; a given map must hold every symbol of the image's own
at the same address), and 6.12's table layouts (``struct alt_instr``
14 bytes packed; entries pointing into text).  Anything else raises
:class:`ImageError` with one line.

The ELF is read by the one ELF reader (``_elf.ElfFile``, struct-based):
section and program headers and, for a vmlinux with symbols, ``.symtab``
-- a 60 MB image in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ._bzimage import SetupHeader, extract_elf, is_bzimage
from ._elf import (ET_EXEC, SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS, SHT_SYMTAB, ElfFile,
                   ElfImage, ElfSection, ImageError, Section, Segment)
from ._kallsyms import decode_kallsyms
from ._symbols import Symbols
from ._system_map import parse_system_map, symbol_differences
from ._lines import LINE_612, KernelLine, line_of
from ._tables import Bounds, check_table

__all__ = ["RealKernelImage", "TableView", "load_kernel", "load_system_map",
           "DebianKernel", "KernelUnavailable", "ensure_debian_kernel", "newest_cloud_release",
           "START_KERNEL_MAP", "TABLES", "cache_root"]

#: the kernel's virtual base of the direct kernel-text mapping (x86-64)
START_KERNEL_MAP = 0xffffffff80000000


#: Patching tables of the 6.12 line (each line has its own: ``KernelLine.tables``):
#: name -> (entry size, start symbol, stop symbol, section).
#: The symbol pair is the kernel's own bound; the section (when there is
#: one of that name) must agree with it.
TABLES: dict[str, tuple[int, str, str, str | None]] = dict(LINE_612.tables)


@dataclass(frozen=True, slots=True)
class TableView:
    """One patching table: ``[start, stop)`` and its raw entries."""

    name: str
    start: int
    stop: int
    entry_size: int
    data: bytes
    section: str            # the section that holds it

    @property
    def count(self) -> int:
        return len(self.data) // self.entry_size

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, eq=False)
class RealKernelImage(ElfImage):
    """A loaded real kernel image.  Being an :class:`ElfImage`, it has
    ``sections``, ``symbols``, ``sym()``, ``section()``; ``name_at`` is
    fast here.  ``sections`` holds the allocated sections at their run
    addresses (``.data..percpu`` moved to its load address)."""

    version: str = ""               # "6.12.117+deb12-cloud-amd64"
    banner: str = ""                # the linux_banner string
    setup: SetupHeader | None = None
    compression: str = ""           # the bzImage payload's, or "" for a vmlinux
    map_path: str = ""
    text_start: int = 0             # _text
    end: int = 0                    # _end
    memory: bytes = b""             # _text.._end as the kernel lays it out
    tables: dict[str, TableView] = field(default_factory=dict)
    sha256: str = ""                # of the file given (bzImage or vmlinux)
    line: KernelLine | None = None  # the kernel line (layouts, passes, rules)
    symbol_source: str = ""         # "kallsyms", ".symtab" or the System.map's path

    # -------------------------------------------------------------- layout
    def read(self, addr: int, n: int) -> bytes:
        """*n* bytes of the kernel's memory layout at *addr*."""
        off = addr - self.text_start
        if n < 0 or off < 0 or off + n > len(self.memory):
            raise ImageError(f"{self.path}: read [{addr:#x}, +{n:#x}) lies outside "
                             f"_text.._end [{self.text_start:#x}, {self.end:#x})")
        return self.memory[off:off + n]

    def section_at(self, addr: int) -> ElfSection | None:
        for s in self.sections.values():
            if s.addr <= addr < s.end:
                return s
        return None

    def executable_sections(self) -> list[ElfSection]:
        return sorted((s for s in self.sections.values() if s.kind == "text"),
                      key=lambda s: s.addr)

    def table(self, name: str) -> TableView:
        return self._named(self.tables, "table", name)

    # ------------------------------------------------------------- symbols
    # ``symbols`` is a :class:`~textpoke.images._symbols.Symbols`: these
    # name addresses the way the kernel does (its preferred name first)
    def name_at(self, addr: int) -> str | None:
        """The symbol exactly at *addr*, or None."""
        return self.symbols.name_at(addr)

    def symbolize(self, addr: int) -> tuple[str, int] | None:
        """(symbol, offset) of the nearest symbol at or below *addr*."""
        return self.symbols.symbolize(addr)

    def describe(self, addr: int) -> str:
        return self.symbols.describe(addr)

    def symbol_size(self, name: str) -> int:
        """Size from the symbol table, else the distance to the next symbol."""
        self.sym(name)
        return self.symbols.size(name)

    def function_bytes(self, name: str) -> bytes:
        return self.read(self.sym(name), self.symbol_size(name))


# ------------------------------------------------------------------ ELF
def _elf_symbols(elf: ElfFile) -> Symbols | None:
    """The ``.symtab``'s functions, objects and untyped symbols, with the
    type letters ``nm`` would give them, or None without a ``.symtab``."""
    if not any(s.type == SHT_SYMTAB for s in elf.sections):
        return None
    secs = elf.sections
    letters = [("b" if s.type == SHT_NOBITS else "t" if s.flags & SHF_EXECINSTR
                else "d" if s.flags & SHF_WRITE else "r") for s in secs]
    ents = []
    sizes: dict[str, int] = {}
    for (name, value, size, typ, bind, shndx) in elf.symbols():
        letter = "a" if shndx >= 0xff00 else letters[shndx] if shndx < len(letters) else "?"
        letter = ("w" if typ == 1 else "W") if bind == 2 else \
            letter.upper() if bind == 1 else letter
        ents.append((value, letter, name, size))
    ents.sort(key=lambda e: e[0])
    for e in ents:              # a name defined twice: its lowest address's size
        sizes.setdefault(e[2], e[3])
    return Symbols.from_entries([e[:3] for e in ents], source=".symtab", sizes=sizes)


def _kallsyms(elf: ElfFile) -> Symbols | None:
    """The kernel's own symbol table (``kallsyms_*`` in ``.rodata``), or
    None when the image has none (``CONFIG_KALLSYMS=n``)."""
    secs = [s for s in elf.sections if s.name == ".rodata" and s.type != SHT_NOBITS]
    for s in secs:
        try:
            return decode_kallsyms(elf.raw, lo=s.offset, hi=s.offset + s.size)
        except ImageError as e:
            if not str(e).startswith("no kallsyms tables"):
                raise ImageError(f"{elf.path}: {e}") from None
    return None


# ------------------------------------------------------------- System.map


def _read_input(source: "str | Path | bytes", path: str | None, default: str,
                what: str) -> tuple[bytes, str]:
    """(bytes, name for messages) of a file path or of bytes given directly."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), path or default
    try:
        return Path(source).read_bytes(), str(source)
    except OSError as e:
        raise ImageError(f"cannot read {what} {source}: {e.strerror}") from None


def load_system_map(source: str | Path | bytes, path: str | None = None) -> Symbols:
    """A ``System.map``'s symbols (a name defined twice: its lowest address)."""
    raw, path = _read_input(source, path, "<System.map>", "System.map")
    return parse_system_map(raw, path)


# ------------------------------------------------------------------ loading
def _run_addr(s: Section, loads: list[Segment], path: str) -> int:
    """Where the kernel runs section *s*: its link address, except for
    sections linked at small addresses (per-CPU data), which run at their
    load address in the kernel map."""
    if s.addr >= START_KERNEL_MAP:
        return s.addr
    for p in loads:
        if p.vaddr <= s.addr < p.vaddr + max(p.memsz, 1):
            return START_KERNEL_MAP + p.paddr + (s.addr - p.vaddr)
    raise ImageError(f"{path}: section {s.name} at {s.addr:#x} is in no loadable segment")


def _lay_out(pieces: list[tuple[int, bytes]], size: int) -> bytes:
    """*size* bytes with each (offset, data) of *pieces* in place and zeros
    elsewhere (a later piece wins where two overlap).  One join when they
    do not overlap: a 50 MB image is copied once, not three times."""
    order = sorted(pieces, key=lambda p: p[0])
    out: list[bytes] = []
    pos = 0
    for off, data in order:
        if off < pos:
            break
        if off > pos:
            out.append(bytes(off - pos))
        out.append(data)
        pos = off + len(data)
    else:
        if pos < size:
            out.append(bytes(size - pos))
        return b"".join(out)
    mem = bytearray(size)
    for off, data in pieces:
        mem[off:off + len(data)] = data
    return bytes(mem)


def load_kernel(image: str | Path | bytes, system_map: str | Path | bytes | None = None,
                *, path: str | None = None) -> RealKernelImage:
    """Load a real kernel: a bzImage (with its *system_map*) or a vmlinux
    ELF (with its own ``.symtab``, or a *system_map*)."""
    raw, path = _read_input(image, path, "<bytes>", "kernel image")
    try:
        return _load(raw, path, system_map)
    except ImageError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeError) as e:
        raise ImageError(f"{path}: malformed kernel image ({type(e).__name__}: {e})") from None


def _load(raw: bytes, path: str, system_map) -> RealKernelImage:
    sha = hashlib.sha256(raw).hexdigest()
    map_syms = load_system_map(system_map) if system_map is not None else None
    setup = None
    compression = ""
    if is_bzimage(raw):
        setup, elf, compression = extract_elf(raw, path)
    elif raw[:4] == b"\x7fELF":
        elf = raw
    else:
        # let the bzImage parser name what it is
        from ._bzimage import parse_setup_header
        parse_setup_header(raw, path)
        raise ImageError(f"{path}: not a kernel image")  # pragma: no cover
    ef = ElfFile(elf, path)
    ef.require(ET_EXEC)
    if not ef.sections:
        raise ImageError(f"{path}: ELF without section headers")
    shdrs, phdrs, entry = ef.sections, ef.loads(), ef.entry
    for s in shdrs:
        if s.flags & SHF_ALLOC:
            ef.check_in_file(s)
    # the image's own symbols: a vmlinux's .symtab, else its kallsyms
    own = _elf_symbols(ef) or _kallsyms(ef)
    map_path = ""
    if map_syms is not None:
        map_path = "<System.map>" if isinstance(system_map, (bytes, bytearray)) else str(system_map)
        if own is not None and own.source == "kallsyms":
            diff = symbol_differences(own, map_syms, limit=1)
            if diff:
                raise ImageError(f"{map_path}: does not match {path} (not this image's "
                                 f"System.map): {diff[0]}")
            symbols = own         # the same, named the way the kernel names them
        else:
            symbols = map_syms
    elif own is not None:
        symbols = own
    else:
        raise ImageError(f"{path}: the image has no symbols (no kallsyms, no .symtab): "
                         f"give its System.map")
    sizes = symbols.sizes
    for need in ("_text", "_etext", "_end", "linux_banner"):
        if need not in symbols:
            raise ImageError(f"{map_path or path}: no symbol {need!r}: not a kernel's symbols")
    text_start, text_end, end = symbols["_text"], symbols["_etext"], symbols["_end"]
    if not (START_KERNEL_MAP <= text_start < text_end < end) or end - text_start > 1 << 30:
        raise ImageError(f"{path}: _text {text_start:#x} / _etext {text_end:#x} / _end {end:#x} "
                         f"are not an x86-64 kernel's layout")

    # _text.._end is allocated below: a map whose _end lies beyond the
    # image's last section (plus 2 MiB of alignment) describes another image
    last = max((_run_addr(s, phdrs, path) + s.size for s in shdrs
                if s.flags & SHF_ALLOC and s.size), default=end)
    if end > (last + 0x1FFFFF) & ~0x1FFFFF:
        raise ImageError(f"{map_path or path}: _end {end:#x} lies beyond the image's last "
                         f"section (which ends at {last:#x}): not this image's symbols")
    sections: dict[str, ElfSection] = {}
    pieces: list[tuple[int, bytes]] = []
    for s in shdrs:
        if not s.flags & SHF_ALLOC or s.size == 0:
            continue
        addr = _run_addr(s, phdrs, path)
        kind = s.kind
        data = ef.data(s)
        sections[s.name] = ElfSection(s.name, addr, data, kind)
        if kind != "bss" and text_start <= addr and addr + s.size <= end:
            pieces.append((addr - text_start, data))
    memory = _lay_out(pieces, end - text_start)
    text = sections.get(".text")
    if text is None or text.kind != "text":
        raise ImageError(f"{path}: no executable .text section")

    # ---- the map must describe this image
    where = map_path or path
    if (text.addr, text.end) != (text_start, text_end):
        raise ImageError(f"{where}: does not match {path}: _text.._etext is "
                         f"[{text_start:#x}, {text_end:#x}) but .text is [{text.addr:#x}, {text.end:#x})")
    banner_addr = symbols["linux_banner"]
    if not (text_start <= banner_addr < end - 16):
        raise ImageError(f"{where}: does not match {path}: linux_banner {banner_addr:#x} is "
                         f"outside _text.._end")
    off = banner_addr - text_start
    banner_raw = bytes(memory[off:off + 512]).split(b"\0", 1)[0]
    if not banner_raw.startswith(b"Linux version "):
        raise ImageError(f"{where}: does not match {path}: no 'Linux version' banner at "
                         f"linux_banner ({banner_addr:#x})")
    banner = banner_raw.decode("ascii", "replace").rstrip("\n")
    version = banner.split()[2]
    if setup is not None and setup.kernel_version and not setup.kernel_version.startswith(version + " "):
        raise ImageError(f"{path}: the setup header says {setup.kernel_version.split()[0]!r} "
                         f"but the payload's banner says {version!r}")
    line = line_of(version, symbols, path)
    for name, (_esz, start_sym, stop_sym, secname) in line.tables.items():
        sec = sections.get(secname) if secname else None
        if sec is not None and (symbols.get(start_sym), symbols.get(stop_sym)) != (sec.addr, sec.end):
            if start_sym not in symbols:
                continue
            if name == ".smp_locks" and symbols.get(start_sym) == sec.addr:
                continue        # the section may be padded beyond __smp_locks_end
            raise ImageError(f"{where}: does not match {path}: {start_sym}..{stop_sym} is "
                             f"[{symbols.get(start_sym, 0):#x}, {symbols.get(stop_sym, 0):#x}) "
                             f"but {secname} is [{sec.addr:#x}, {sec.end:#x})")

    tables: dict[str, TableView] = {}
    for name, (esz, start_sym, stop_sym, secname) in line.tables.items():
        if start_sym not in symbols or stop_sym not in symbols:
            continue
        a, b = symbols[start_sym], symbols[stop_sym]
        if b < a or not (text_start <= a and b <= end):
            raise ImageError(f"{where}: {start_sym}..{stop_sym} [{a:#x}, {b:#x}) is not a "
                             f"range inside _text.._end")
        if (b - a) % esz:
            raise ImageError(f"{path}: {name} is {b - a} bytes, not a multiple of its "
                             f"{esz}-byte entries: not the {line.name} layout")
        holder = next((s for s in sections.values()
                       if s.kind != "bss" and s.addr <= a and b <= s.end), None)
        if holder is None:
            raise ImageError(f"{path}: {name} [{a:#x}, {b:#x}) is not inside one section")
        tables[name] = TableView(name, a, b, esz, bytes(memory[a - text_start:b - text_start]),
                                 holder.name)
    _check_layouts(path, tables, sections, line)

    return RealKernelImage(
        path=path, entry=entry, sections=sections, symbols=symbols, sizes=sizes, raw=elf,
        version=version, banner=banner, setup=setup, compression=compression,
        map_path=map_path, text_start=text_start, end=end, memory=bytes(memory),
        tables=tables, sha256=sha, line=line,
        symbol_source=map_path if symbols is map_syms else symbols.source)


def _check_layouts(path, tables, sections, line: KernelLine) -> None:
    """Check a sample of each table's entries (by the one table reader):
    sites in executable sections, replacements in ``.altinstr_replacement``
    / ``.altinstr_aux`` (or other text), lengths within ``MAX_PATCH_LEN`` --
    a table of another line's layout fails here."""
    execs = tuple(sorted((s.addr, s.end) for s in sections.values() if s.kind == "text"))
    bounds = Bounds(path, execs, "executable sections", execs, "executable sections",
                    padding=frozenset({".smp_locks", "__mcount_loc"}))
    for name in (".altinstructions", ".retpoline_sites", ".return_sites", ".call_sites",
                 ".ibt_endbr_seal", ".smp_locks", "__mcount_loc", "__jump_table",
                 ".static_call_sites"):
        t = tables.get(name)
        if t is not None and t.count:
            check_table(name, t.data, t.start, t.start, t.stop, bounds,
                        layout=line.alt_layout, sample=64)


# ---------------------------------------------------------------- fetching
@dataclass(frozen=True)
class DebianKernel:
    """A Debian cloud kernel fetched with ``apt-get download`` and cached."""

    release: str                # "6.12.117+deb12-cloud-amd64" (uname -r)
    package_version: str        # "6.12.117-1~deb12u1"
    vmlinuz: Path
    system_map: Path | None     # only when asked for (it is in the -dbg package)
    config: Path
    vmlinux: Path | None = None

    def load(self) -> RealKernelImage:
        """The image, with the symbols it carries itself."""
        return load_kernel(self.vmlinuz)


class KernelUnavailable(RuntimeError):
    """The Debian kernel cannot be fetched here (the reason is the message)."""


def cache_root() -> Path:
    """Where downloaded kernels, QEMU references and module files are kept:
    ``$TEXTPOKE_CACHE``, else ``~/.cache/textpoke``."""
    env = os.environ.get("TEXTPOKE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "textpoke"


def _run(argv: list[str], **kw) -> str:
    import subprocess
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    except FileNotFoundError:
        raise KernelUnavailable(f"{argv[0]} is not available") from None
    if r.returncode:
        err = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise KernelUnavailable(f"{' '.join(argv[:3])} failed: {err}")
    return r.stdout


def newest_cloud_release(series: str = "6.12") -> str:
    """The newest ``linux-image-<series>.*-cloud-amd64-unsigned`` apt knows."""
    import functools
    out = _run(["apt-cache", "search", "--names-only",
                rf"^linux-image-{re.escape(series)}\.[0-9]+.*-cloud-amd64-unsigned$"])
    rels = [m.group(1) for m in re.finditer(r"^linux-image-(\S+)-unsigned ", out, re.M)]
    if not rels:
        raise KernelUnavailable(f"apt knows no linux-image-{series}.*-cloud-amd64-unsigned "
                                f"(apt-get update?)")

    def cmp(a: str, b: str) -> int:
        import subprocess
        if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0:
            return -1
        return 0 if a == b else 1
    return max(rels, key=functools.cmp_to_key(cmp))


def ensure_debian_kernel(release: str | None = None, *, with_system_map: bool = False,
                         with_vmlinux: bool = False, cache: Path | None = None) -> DebianKernel:
    """Fetch (once) and cache Debian's cloud kernel *release* (default: the
    newest 6.12 apt knows, or ``$TEXTPOKE_KERNEL_RELEASE``): its bzImage and
    config from the ``-unsigned`` package (~34 MB), which is all textpoke
    needs (the image carries its symbols).  The ``-dbg`` package (~320 MB)
    is fetched only for what only it has: the real ``System.map`` (the
    image package's is a placeholder) with *with_system_map*, the vmlinux
    with DWARF with *with_vmlinux*.  Raises :class:`KernelUnavailable`
    when apt cannot provide them."""
    import os
    import shutil
    import subprocess
    import tempfile
    root = (cache or cache_root()) / "kernel"
    release = release or os.environ.get("TEXTPOKE_KERNEL_RELEASE")
    if release is None:
        # the newest release already cached, unless asked to look again
        # (the 6.12 cloud build: other lines and flavours are asked for by release)
        done = sorted(p.parent.name for p in root.glob("6.12.*-cloud-amd64/meta.json"))
        if done and not os.environ.get("TEXTPOKE_KERNEL_REFRESH"):
            release = max(done, key=_release_key)
        else:
            try:
                release = newest_cloud_release()
            except KernelUnavailable:
                if not done:
                    raise
                release = max(done, key=_release_key)
    d = root / release
    meta = d / "meta.json"
    smap, vmlinux = d / "System.map", d / "vmlinux"
    have_image = meta.exists() and (d / "vmlinuz").exists() and (d / "config").exists()
    want_dbg = [(f"System.map-{release}", smap) for w in [with_system_map] if w and not smap.exists()]
    want_dbg += [(f"vmlinux-{release}", vmlinux) for w in [with_vmlinux] if w and not vmlinux.exists()]
    if have_image and not want_dbg:
        m = json_load(meta)
        return DebianKernel(release, m["package_version"], d / "vmlinuz",
                            smap if smap.exists() else None, d / "config",
                            vmlinux if vmlinux.exists() else None)
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pkgs = {"image": f"linux-image-{release}-unsigned"}
    if want_dbg:
        pkgs["dbg"] = f"linux-image-{release}-dbg"
    files = {}
    for what, pkg in pkgs.items():
        found = sorted(debs.glob(f"{pkg}_*_amd64.deb"))
        if not found:
            _run(["apt-get", "download", "-q", pkg], cwd=debs)
            found = sorted(debs.glob(f"{pkg}_*_amd64.deb"))
            if not found:
                raise KernelUnavailable(f"apt-get download {pkg} left no .deb in {debs}")
        files[what] = found[-1]
    pkgver = files["image"].name.split("_")[1].replace("%7e", "~").replace("%3a", ":")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not have_image:
            _run(["dpkg-deb", "-x", str(files["image"]), str(tmp)])
            boot = tmp / "boot"
            shutil.move(str(boot / f"vmlinuz-{release}"), d / "vmlinuz")
            shutil.move(str(boot / f"config-{release}"), d / "config")
        if want_dbg:
            names = [f"./usr/lib/debug/boot/{n}" for n, _ in want_dbg]
            tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(files["dbg"])],
                                   stdout=subprocess.PIPE)
            r = subprocess.run(["tar", "-x", "-C", str(tmp), *names], stdin=tar.stdout,
                               capture_output=True, text=True, check=False)
            tar.stdout.close()
            tar.wait()
            if r.returncode:
                raise KernelUnavailable(f"cannot extract {' '.join(names)} from "
                                        f"{files['dbg'].name}: {r.stderr.strip()[-200:]}")
            for n, dest in want_dbg:
                shutil.move(str(tmp / "usr/lib/debug/boot" / n), dest)
        old = json_load(meta).get("debs", []) if meta.exists() else []
        meta.write_text(json_dump({"release": release, "package_version": pkgver,
                                   "debs": sorted({*old, *(f.name for f in files.values())})}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ensure_debian_kernel(release, with_system_map=with_system_map,
                                with_vmlinux=with_vmlinux, cache=cache)


def _release_key(rel: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", rel.split("-")[0]))


def json_load(p: Path) -> dict:
    import json
    return json.loads(p.read_text())


def json_dump(d: dict) -> str:
    import json
    return json.dumps(d, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m textpoke.images._vmlinux IMAGE [SYSTEM.MAP]``: load and
    summarise a kernel image, or say in one line why it is refused."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m textpoke.images._vmlinux IMAGE [SYSTEM.MAP]", file=sys.stderr)
        return 2
    try:
        k = load_kernel(args[0], args[1] if len(args) > 1 else None)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(k.banner)
    if k.setup is not None:
        print(f"bzImage: boot protocol {k.setup.version_str}, setup_sects {k.setup.setup_sects}, "
              f"{k.compression} payload of {k.setup.payload_length} bytes")
    print(f"_text {k.text_start:#x}  _end {k.end:#x}")
    for s in sorted(k.sections.values(), key=lambda s: s.addr):
        print(f"  {s.name:<28} {s.addr:#x} {len(s.data):>10} {s.kind}")
    for t in k.tables.values():
        print(f"  table {t.name:<20} {t.count:>7} entries in {t.section} at {t.start:#x}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
