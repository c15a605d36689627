# SPDX-License-Identifier: GPL-2.0-only
"""Addresses by name in a running process: ``/proc/PID/maps`` + ELF symbols.

An address expression is one of::

    0x401136            a number (decimal or 0x-hex)
    symbol              a function (or object) of any loaded module, the
                        main executable first
    symbol+0x10         an offset into it, which must fall on an instruction
                        boundary (decoded from the function start)
    lib:symbol[+off]    in the module whose file name starts with *lib*
                        ("libc" matches libc.so.6; the full path works too)

Each module's *load bias* (runtime address minus link-time address) comes
from its mapping of the lowest file offset and the ``PT_LOAD`` segment that
covers that offset: 0 for a non-PIE (``ET_EXEC``) executable, the mapping
base for a PIE executable or shared library.  Symbols come from ``.symtab``
and ``.dynsym`` (the union; a stripped file still has ``.dynsym``).  The
headers and tables are read by the one ELF reader
(:class:`textpoke.images._elf.ElfFile`, ``struct`` over an mmap of the
file): a program of 10,000 functions must resolve in milliseconds.

Instruction boundaries are decoded from the *file's* bytes of the function
(with :func:`textpoke._core._insn.insn_decode_kernel`), not from the live
text: live text may hold an INT3 or a patched instruction, and a boundary
is a property of the code as built.
"""

from __future__ import annotations

import bisect
import fnmatch
from itertools import accumulate, compress
import mmap
import os
import re
import struct
from typing import Iterable

from .._core._insn import insn_decode_kernel
from .._errors import BadAddressError, BadInstructionError, TextPokeError
from ..images._elf import _SYM, ET_DYN, ET_EXEC, SHT_NOBITS, ElfFile
from ..images._symbols import Symbols as KernelSymbols
from ..images._symbols import format_symbol

__all__ = ["SymbolError", "Mapping", "Symbol", "Module", "Symbols", "read_maps",
           "parse_address"]


class SymbolError(TextPokeError, ValueError):
    """A name that does not resolve, or an offset that is not an
    instruction boundary of its function."""

    #: the CLI prints the message alone (one line, exit 2): it says what
    #: was refused and why, a class name adds nothing for the user
    plain = True


from ._process import Mapping, read_maps   # the one /proc/PID/maps parser


class Symbol:
    """A symbol of a module, at its runtime address.  Immutable, compared
    and hashed by (name, addr, size, func) -- a frozen dataclass written
    out: the dataclass machinery cost a millisecond of every command's
    start."""

    __slots__ = ("name", "addr", "size", "module", "func", "ifunc")
    __match_args__ = __slots__

    name: str
    addr: int          # runtime address
    size: int
    module: "Module"
    func: bool
    ifunc: bool        # STT_GNU_IFUNC: the resolver

    def __init__(self, name: str, addr: int, size: int, module: "Module", func: bool = True,
                 ifunc: bool = False) -> None:
        st = object.__setattr__
        st(self, "name", name)
        st(self, "addr", addr)
        st(self, "size", size)
        st(self, "module", module)
        st(self, "func", func)
        st(self, "ifunc", ifunc)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a Symbol is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a Symbol is immutable")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.name, self.addr, self.size, self.func) == (
            other.name, other.addr, other.size, other.func)   # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, self.addr, self.size, self.func))

    def __reduce__(self):                      # copy and pickle: rebuilt, not assigned
        return (Symbol, (self.name, self.addr, self.size, self.module, self.func, self.ifunc))

    def __repr__(self) -> str:
        return (f"Symbol(name={self.name!r}, addr={self.addr!r}, size={self.size!r}, "
                f"func={self.func!r}, ifunc={self.ifunc!r})")

    @property
    def end(self) -> int:
        return self.addr + self.size

    def __str__(self) -> str:
        return f"{self.module.short}:{self.name}"


STT_OBJECT, STT_FUNC, STT_GNU_IFUNC = 1, 2, 10


class Module:
    """One ELF file mapped into the process."""

    def __init__(self, path: str, mappings: list[Mapping], pid: int) -> None:
        self.path = path
        self.mappings = mappings
        self.short = os.path.basename(path)
        self._pid = pid
        self._file = _open_mapped(pid, path, mappings)
        try:
            self._raw = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:                       # empty file
            raise SymbolError(f"{path}: empty file") from None
        self._parse_headers()
        self.bias = self._bias()
        self._symbols: list[Symbol] | None = None
        self._rows_: "_symcache.Rows | None" = None
        self._ftab: tuple[list[str], list[int], list[int], list[bool]] | None = None
        self._by_name: dict[str, Symbol] = {}
        self._starts: list[int] = []

    def _parse_headers(self) -> None:
        # the one ELF reader, over the mmap: headers only, symbols on demand
        try:
            self._elf = ElfFile(self._raw, self.path, error=SymbolError)
        except struct.error:
            raise SymbolError(f"{self.path}: truncated ELF headers") from None
        self.etype = {ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN"}.get(self._elf.type,
                                                              f"ET_{self._elf.type}")
        self.loads = self._elf.loads()

    @property
    def pie(self) -> bool:
        return self.etype == "ET_DYN"

    def _bias(self) -> int:
        if self.etype == "ET_EXEC":
            return 0
        m = min(self.mappings, key=lambda m: m.offset)
        for seg in self.loads:
            page = 0x1000
            if seg.offset // page * page <= m.offset < seg.offset + max(seg.filesz, 1):
                vaddr = seg.vaddr // page * page + (m.offset - seg.offset // page * page)
                return m.start - vaddr
        raise SymbolError(f"{self.path}: no PT_LOAD segment covers file offset {m.offset:#x}")

    # --- symbols ------------------------------------------------------------
    def _rows(self) -> "_symcache.Rows":
        """Every defined function, ifunc and object symbol of the file, one
        per (name, value): parallel lists of names, link-time values,
        sizes and types, in (value, not function, name) order -- from the
        cache (:mod:`._symcache`) when it holds this very file."""
        if self._rows_ is not None:
            return self._rows_
        from . import _symcache
        k = None
        if _symcache.enabled():
            import zlib
            crc, elf, raw = 0, self._elf, self._raw
            for sec in elf.symbol_tables():
                for t in (sec, elf.sections[sec.link] if sec.link < len(elf.sections) else sec):
                    crc = zlib.crc32(raw[t.offset:t.offset + t.size], crc)
            k = _symcache.key(os.fstat(self._file.fileno()), crc)
        rows = _symcache.load(k) if k is not None else None
        if rows is None:
            rows = self._parse_rows()
            if k is not None:
                _symcache.store(k, rows)
        self._rows_ = rows
        return rows

    def _parse_rows(self) -> "_symcache.Rows":
        found: dict[tuple[str, int], tuple[int, int]] = {}
        elf, raw, kinds = self._elf, self._raw, (STT_FUNC, STT_GNU_IFUNC, STT_OBJECT)
        for sec in elf.symbol_tables():
            if sec.link >= len(elf.sections):
                continue
            # the fields of every entry sliced out at once (Elf64_Sym: name
            # u32 at 0, info u8 at 4, shndx u16 at 6, value u64 at 8, size
            # u64 at 16), and the names of the string table split once (a
            # name may also start inside another: then looked for); ascii
            # with one U+FFFD per bad byte, so offsets are kept
            strs, _ents = elf._entries(sec)           # checks both lie in the file
            n = sec.size // _SYM.size
            mv = memoryview(bytes(raw[sec.offset:sec.offset + n * _SYM.size]))
            q, w = mv.cast("Q"), mv.cast("I")
            nms, infos = w[0::6].tolist(), mv[4::24].tolist()
            shndx, vals, sizes = mv.cast("H")[3::12].tolist(), q[1::3].tolist(), q[2::3].tolist()
            text = strs.decode("ascii", "replace")
            parts = text.split("\0")
            at = dict(zip(accumulate([len(x) + 1 for x in parts], initial=0), parts))
            for k, nm in enumerate(nms):
                typ = infos[k] & 0xF
                if nm == 0 or shndx[k] == 0 or typ not in kinds:
                    continue
                name = at.get(nm)
                if name is None:
                    j = text.find("\0", nm)
                    name = text[nm:j] if j >= 0 else text[nm:]
                key = (name, vals[k])
                if key not in found:
                    found[key] = (sizes[k], typ)
        order = sorted(found, key=lambda k: (k[1], found[k][1] == STT_OBJECT, k[0]))
        return ([k[0] for k in order], [k[1] for k in order], [found[k][0] for k in order],
                [found[k][1] for k in order])

    def function_table(self) -> tuple[list[str], list[int], list[int]]:
        """(names, runtime start addresses, sizes) of the function symbols
        (ifuncs too) in address order, aliases adjacent -- what
        :meth:`functions_sorted` holds, without a :class:`Symbol` each."""
        if self._ftab is None:
            names, vals, sizes, types = self._rows()
            bias = self.bias
            keep = [t != STT_OBJECT for t in types]
            self._ftab = (list(compress(names, keep)), [v + bias for v in compress(vals, keep)],
                          list(compress(sizes, keep)),
                          [t == STT_GNU_IFUNC for t in compress(types, keep)])
        return self._ftab[:3]

    def functions_matching(self, rx: "re.Pattern[str]") -> list[Symbol]:
        """The function symbols whose name *rx* matches, in address order
        (a :class:`Symbol` made for these only)."""
        if self._symbols is not None:
            return [s for s in self._funcs if rx.match(s.name)]
        self.function_table()
        names, starts, sizes, ifunc = self._ftab      # type: ignore[misc]
        return [Symbol(names[i], starts[i], sizes[i], self, True, ifunc[i])
                for i in matching(rx, names)]

    def _load(self) -> None:
        names, vals, sizes, types = self._rows()
        bias = self.bias
        self._symbols = [Symbol(n, v + bias, z, self, t != STT_OBJECT, t == STT_GNU_IFUNC)
                         for n, v, z, t in zip(names, vals, sizes, types)]
        for s in self._symbols:
            prev = self._by_name.get(s.name)
            if prev is None or (s.func and not prev.func):
                self._by_name[s.name] = s
        self._funcs = [s for s in self._symbols if s.func]
        self._starts = [s.addr for s in self._funcs]
        # named by the one symbolizer; a size-0 function covers its first byte
        self._table = KernelSymbols(self._starts, [s.name for s in self._funcs],
                                    source=self.path, esizes=[max(s.size, 1) for s in self._funcs])

    @property
    def symbols(self) -> list[Symbol]:
        if self._symbols is None:
            self._load()
        return self._symbols  # type: ignore[return-value]

    def lookup(self, name: str) -> Symbol | None:
        if self._symbols is None:
            # one name (a toggle of one function, a call target): found
            # without reading every symbol of the file -- 10,000 of a big
            # program cost more than the rest of a one-site toggle
            if name in self._by_name:
                return self._by_name[name]
            return self._find_in_rows(name) if self._rows_ is not None else self._find(name)
        return self._by_name.get(name)

    def _find_in_rows(self, name: str) -> Symbol | None:
        """:meth:`_find` from the rows already read (a glob's table): every
        entry of *name*, found by list.index (in C), the same choice."""
        names, vals, sizes, types = self._rows_        # type: ignore[misc]
        best = None
        i = -1
        while True:
            try:
                i = names.index(name, i + 1)
            except ValueError:
                break
            typ = types[i]
            # in (value, not function, name) order: the first function is the
            # lowest-addressed one; an object only while no function is seen
            if best is None or (typ != STT_OBJECT and not best.func):
                best = Symbol(name, vals[i] + self.bias, sizes[i], self, typ != STT_OBJECT,
                              typ == STT_GNU_IFUNC)
                if best.func:
                    break
        self._by_name[name] = best
        return best

    def _find(self, name: str) -> Symbol | None:
        """What :meth:`lookup` gives for *name*, from the string tables: the
        offsets where *name* + NUL sits (a name may be the tail of a longer
        string), then the entries naming one of them; the same choice as
        the full table (the lowest-addressed function, else object)."""
        key = name.encode() + b"\0"
        elf, raw = self._elf, self._raw
        found: dict[tuple[str, int], Symbol] = {}
        for sec in elf.symbol_tables():
            if sec.link >= len(elf.sections):
                continue
            st = elf.sections[sec.link]
            strs = raw[st.offset:st.offset + st.size]
            offs = set()
            i = strs.find(key, 1)
            while i >= 0:
                offs.add(i)
                i = strs.find(key, i + 1)
            if not offs:
                continue
            # the entries whose st_name is one of them: the names column
            # sliced out and tested in C, only those entries unpacked
            n = sec.size // _SYM.size
            tab = raw[sec.offset:sec.offset + n * _SYM.size]
            with memoryview(tab) as mv, mv.cast("I") as words:
                nms = words[0::6].tolist()
            for k in compress(range(n), map(offs.__contains__, nms)):
                nm, info, _o, shndx, value, size = _SYM.unpack_from(tab, k * _SYM.size)
                typ = info & 0xF
                if shndx != 0 and typ in (STT_FUNC, STT_GNU_IFUNC, STT_OBJECT):
                    addr = value + self.bias
                    found.setdefault((name, addr), Symbol(name, addr, size, self, typ != STT_OBJECT,
                                                          typ == STT_GNU_IFUNC))
        best = None
        for sym in sorted(found.values(), key=lambda x: (x.addr, not x.func)):
            if best is None or (sym.func and not best.func):
                best = sym
        self._by_name[name] = best          # None too: not looked for twice
        return best

    def function_at(self, addr: int) -> Symbol | None:
        """The function containing *addr* (the last one starting at or
        before it whose size covers it; a size-0 symbol covers its start)."""
        self.symbols
        i = self._table.index_of(addr, function=True)
        return None if i is None else self._funcs[i]

    def functions_sorted(self) -> list[Symbol]:
        """The function symbols in address order (aliases adjacent)."""
        self.symbols
        return self._funcs

    def names_at(self, addr: int) -> list[str]:
        self.symbols
        i = bisect.bisect_left(self._starts, addr)
        out = []
        while i < len(self._starts) and self._starts[i] == addr:
            out.append(self._funcs[i].name)
            i += 1
        return out

    # --- file contents -----------------------------------------------------
    def file_bytes_at(self, addr: int, size: int) -> bytes:
        """The file's bytes at runtime address *addr* (from the PT_LOAD
        that maps it); BadAddressError if no segment has file data there."""
        vaddr = addr - self.bias
        for seg in self.loads:
            if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
                off = seg.offset + vaddr - seg.vaddr
                return bytes(self._raw[off:off + size])
        raise BadAddressError(f"{addr:#x} is not file-backed code of {self.path}")

    def section_bytes(self, name: str) -> bytes | None:
        sec = self._elf.section(name)
        if sec is None or sec.type == SHT_NOBITS:
            return None
        return self._elf.data(sec)

    def executable_ranges(self) -> list[tuple[int, int]]:
        return [(m.start, m.end) for m in self.mappings if m.executable]

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            self._file.close()


def _open_mapped(pid: int, path: str, mappings: list[Mapping]):
    """Open the file behind a mapping: through the process's root (so that
    containers work), then the path itself, then /proc/PID/map_files (a
    deleted or replaced file).  The inode must match the mapping's."""
    inode = mappings[0].inode
    candidates = [f"/proc/{pid}/root{path}", path]
    m = mappings[0]
    candidates.append(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}")
    last = None
    for c in candidates:
        try:
            f = open(c, "rb")
        except OSError as e:
            last = e
            continue
        if inode and os.fstat(f.fileno()).st_ino != inode:
            f.close()
            continue
        return f
    raise SymbolError(f"cannot open {path} as mapped by process {pid}"
                      + (f": {last.strerror}" if last else " (the file was replaced)"))


_EXPR_RE = re.compile(r"^(?:(?P<lib>[^:+\s]+):)?(?P<sym>[^:+\s]+)(?:\+(?P<off>(?:0x[0-9a-fA-F]+|\d+)))?$")


def parse_address(text: str) -> tuple[str | None, str | None, int]:
    """Split an address expression: ``(lib, symbol, offset)``; a number gives
    ``(None, None, value)``."""
    t = text.strip()
    try:
        return None, None, int(t, 0)
    except ValueError:
        pass
    m = _EXPR_RE.match(t)
    if not m:
        raise SymbolError(f"bad address {text!r}: expected a number, symbol, symbol+off or lib:symbol[+off]")
    off = m["off"]
    return m["lib"], m["sym"], int(off, 0) if off else 0


class Symbols:
    """The ELF modules mapped into process *pid* and their symbols.

    Modules are loaded when first needed; :attr:`main` is the executable
    (``/proc/PID/exe``)."""

    def __init__(self, pid: int, maps: list[Mapping] | None = None) -> None:
        self.pid = pid
        self.maps = maps if maps is not None else read_maps(pid)
        try:
            self.exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            self.exe = None
        groups: dict[str, list[Mapping]] = {}
        for m in self.maps:
            if m.path.startswith("/") and m.inode:
                groups.setdefault(m.path, []).append(m)
        # only files with an executable mapping hold code we care about
        self._groups = {p: ms for p, ms in groups.items() if any(x.executable for x in ms)}
        order = sorted(self._groups, key=lambda p: (p != self.exe, min(x.start for x in self._groups[p])))
        self.paths = order
        self._modules: dict[str, Module] = {}

    def module_by_path(self, path: str) -> Module:
        mod = self._modules.get(path)
        if mod is None:
            mod = self._modules[path] = Module(path, self._groups[path], self.pid)
        return mod

    @property
    def main(self) -> Module:
        if not self.paths:
            raise SymbolError(f"process {self.pid} maps no ELF file")
        return self.module_by_path(self.paths[0])

    def modules(self) -> Iterable[Module]:
        for p in self.paths:
            try:
                yield self.module_by_path(p)
            except SymbolError:
                continue

    def module(self, name: str) -> Module:
        """The module named *name*: a full path, a file name, or a prefix of
        the file name ("libc" for libc.so.6).  Ambiguous prefixes are refused."""
        if name in self._groups:
            return self.module_by_path(name)
        exact = [p for p in self.paths if os.path.basename(p) == name]
        if exact:
            return self.module_by_path(exact[0])
        pref = [p for p in self.paths if os.path.basename(p).startswith(name)
                and os.path.basename(p)[len(name):len(name) + 1] in ("", ".", "-")]
        if len(pref) == 1:
            return self.module_by_path(pref[0])
        if len(pref) > 1:
            raise SymbolError(f"{name!r} matches several modules: "
                              + ", ".join(os.path.basename(p) for p in pref))
        raise SymbolError(f"no module {name!r} in process {self.pid} (have: "
                          + ", ".join(os.path.basename(p) for p in self.paths) + ")")

    def modules_named(self, lib: str | None) -> list[Module]:
        """The modules *lib* names: every module (None, or ``*``), the one
        :meth:`module` finds by name, or -- a glob (``libc*``, ``*python*``)
        -- every module whose file name or path matches it (SymbolError if
        none does)."""
        if not lib or lib == "*":
            return list(self.modules())
        if not _is_glob(lib):
            return [self.module(lib)]
        try:
            rx = re.compile(fnmatch.translate(lib))
        except re.error as e:
            raise SymbolError(f"bad module pattern {lib!r}: {e}") from None
        out = []
        for p in self.paths:
            if rx.match(os.path.basename(p)) or rx.match(p):
                try:
                    out.append(self.module_by_path(p))
                except SymbolError:
                    continue
        if not out:
            raise SymbolError(f"no module matching {lib!r} in process {self.pid} (have: "
                              + ", ".join(os.path.basename(p) for p in self.paths) + ")")
        return out

    def lookup(self, name: str, lib: str | None = None) -> Symbol:
        mods = self.modules_named(lib)
        if lib and _is_glob(lib):
            # a glob may name several modules: the symbol must be in one
            found = {}
            for mod in mods:
                s = mod.lookup(name)
                if s is not None:
                    found.setdefault(s.addr, s)
            if len(found) > 1:
                raise SymbolError(f"{name!r} is in several modules matching {lib!r}: "
                                  + ", ".join(f"{s.module.short} at {a:#x}"
                                              for a, s in sorted(found.items())))
            if found:
                return next(iter(found.values()))
        for mod in mods:
            s = mod.lookup(name)
            if s is not None:
                return s
        where = f" in {lib}" if lib else f" in process {self.pid}"
        raise SymbolError(f"no symbol {name!r}{where}")

    def resolve(self, text: str) -> int:
        """The address of an expression (see the module doc).  ``sym+off``
        must be an instruction boundary inside the function."""
        lib, name, off = parse_address(text)
        if name is None:
            return off
        s = self.lookup(name, lib)
        if off:
            check_boundary(s, off)
        return s.addr + off

    def functions(self, pattern: str, lib: str | None = None) -> list[Symbol]:
        """Functions whose name matches the glob *pattern* (``lib:glob``
        limits the search to a module), one per address, in address order."""
        if lib is None and ":" in pattern:
            lib, pattern = pattern.split(":", 1)
        mods = self.modules_named(lib)
        out: dict[int, Symbol] = {}
        exact = not _is_glob(pattern)
        if not exact:
            try:
                rx = re.compile(fnmatch.translate(pattern))
            except re.error as e:
                raise SymbolError(f"bad pattern {pattern!r}: {e}") from None
        for mod in mods:
            if exact:
                s = mod.lookup(pattern)
                cands = [s] if s is not None and s.func else []
            else:
                cands = mod.functions_matching(rx)
            for s in cands:
                out.setdefault(s.addr, s)
        return [out[a] for a in sorted(out)]

    def module_at(self, addr: int) -> Module | None:
        for p, ms in self._groups.items():
            if any(addr in m for m in ms):
                return self.module_by_path(p)
        return None

    def symbolize(self, addr: int) -> str:
        """``module:function+0x..`` for *addr*, or its hex when unknown."""
        mod = self.module_at(addr)
        if mod is None:
            return f"{addr:#x}"
        s = mod.function_at(addr)
        if s is None:
            return format_symbol(mod.short, addr - mod.bias, offset0=True)
        return format_symbol(s.name, addr - s.addr)

    def close(self) -> None:
        for m in self._modules.values():
            m.close()
        self._modules.clear()

    def __enter__(self) -> "Symbols":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def matching(rx: "re.Pattern[str]", names: list[str]) -> list[int]:
    """The indices of the *names* that *rx* matches (the loop in C: a
    third of a Python loop's time over 10,000 names)."""
    return list(compress(range(len(names)), map(rx.match, names)))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def check_boundary(s: Symbol, off: int) -> None:
    """SymbolError unless *off* is an instruction boundary of function *s*
    (decoding its file bytes from the start)."""
    if not s.func:
        raise SymbolError(f"{s.name} is not a function: an offset into it is not code")
    if off < 0 or (s.size and off >= s.size):
        raise SymbolError(f"{s.name}+{off:#x} is outside {s.name} (size {s.size:#x})")
    limit = s.size or off + 1
    try:
        code = s.module.file_bytes_at(s.addr, limit)
    except BadAddressError as e:
        raise SymbolError(str(e)) from None
    pc = 0
    while pc < off:
        try:
            insn = insn_decode_kernel(code[pc:pc + 15], s.addr + pc)
        except BadInstructionError as e:
            raise SymbolError(f"cannot decode {s.name} up to +{off:#x}: {e}") from None
        pc += insn.length
    if pc != off:
        prev = insn_decode_kernel(code[pc - insn.length:], s.addr + pc - insn.length)
        raise SymbolError(
            f"{s.name}+{off:#x} is not an instruction boundary: it falls inside "
            f"'{prev.text}' at {s.name}+{pc - insn.length:#x} ({insn.length} bytes; "
            f"boundaries there: +{pc - insn.length:#x}, +{pc:#x})")
