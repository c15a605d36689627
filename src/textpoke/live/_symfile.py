# SPDX-License-Identifier: GPL-2.0-only
"""One ELF file mapped into a running process: its symbols at their runtime
addresses and its bytes (:class:`Module`, :class:`Symbol`).

The file is opened as the process maps it (through the process's root, the
path, then ``/proc/PID/map_files``; the inode must match) and read by the
one ELF reader (:class:`textpoke.images._elf.ElfFile`, ``struct`` over an
mmap): headers at once, symbols on demand -- one name found from the
string tables without reading every symbol, every function read once (and
cached, :mod:`._symcache`) for globs and symbolizing.  The load bias
(runtime address minus link-time address) comes from the mapping of the
lowest file offset and the ``PT_LOAD`` segment that covers it.

The process's modules by name and address expressions are
:mod:`._symbols`'; this module knows one file.
"""

from __future__ import annotations

import bisect
from itertools import accumulate, compress
import mmap
import os
import re
import struct

from .._errors import BadAddressError, TextPokeError
from ..images._elf import _SYM, ET_DYN, ET_EXEC, SHT_NOBITS, ElfFile
from ..images._symbols import Symbols as KernelSymbols
from ._process import Mapping
from ._record import FrozenRecord

__all__ = ["SymbolError", "Symbol", "Module", "matching"]


class SymbolError(TextPokeError, ValueError):
    """A name that does not resolve, or an offset that is not an
    instruction boundary of its function."""

    #: the CLI prints the message alone (one line, exit 2): it says what
    #: was refused and why, a class name adds nothing for the user
    plain = True


class Symbol(FrozenRecord):
    """A symbol of a module, at its runtime address.  Immutable, compared
    and hashed by (name, addr, size, func) (see :mod:`._record`)."""

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

    def _key(self) -> tuple:
        return (self.name, self.addr, self.size, self.func)

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


def matching(rx: "re.Pattern[str]", names: list[str]) -> list[int]:
    """The indices of the *names* that *rx* matches (the loop in C: a
    third of a Python loop's time over 10,000 names)."""
    return list(compress(range(len(names)), map(rx.match, names)))
