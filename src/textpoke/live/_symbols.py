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

Each module is one mapped ELF file (:class:`~._symfile.Module`, in
``_symfile.py``): its *load bias* (runtime address minus link-time address)
comes from its mapping of the lowest file offset and the ``PT_LOAD`` segment
that covers that offset: 0 for a non-PIE (``ET_EXEC``) executable, the
mapping base for a PIE executable or shared library.  Symbols come from
``.symtab`` and ``.dynsym`` (the union; a stripped file still has
``.dynsym``).  The headers and tables are read by the one ELF reader
(:class:`textpoke.images._elf.ElfFile`, ``struct`` over an mmap of the
file): a program of 10,000 functions must resolve in milliseconds.  This
module is the process's side: its modules by name, glob and address, and
address expressions.

Instruction boundaries are decoded from the *file's* bytes of the function
(with :func:`textpoke._core._insn.insn_decode_kernel`), not from the live
text: live text may hold an INT3 or a patched instruction, and a boundary
is a property of the code as built.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Iterable

from .._core._insn import insn_decode_kernel
from .._errors import BadAddressError, BadInstructionError
from ..images._symbols import format_symbol
from ._process import Mapping, read_maps   # the one /proc/PID/maps parser
# one mapped file's symbols and bytes; importable from here as before
from ._symfile import Module, Symbol, SymbolError, matching  # noqa: F401

__all__ = ["SymbolError", "Mapping", "Symbol", "Module", "Symbols", "read_maps",
           "parse_address"]


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
