# SPDX-License-Identifier: GPL-2.0-only
"""Loadable modules: a GCC-built relocatable object placed in module text
while the CPUs run, as ``load_module`` and ``module_finalize`` do.

:class:`ModuleLoader` owns the state (an :class:`~textpoke._execmem.ExecMem`
for module text, a data allocator, the loaded :class:`Module` objects) and
works with the image's :class:`~textpoke._jump_label._keys.StaticKeys` and
:class:`~textpoke._static_call._calls.StaticCalls`.

:meth:`ModuleLoader.load`, in the kernel's order:

1. *layout*: every allocated section of the object is given an address --
   executable ones (``.text*``, ``.altinstr_replacement``) in one execmem
   chunk, the others (data, rodata, bss and the tables) in a data chunk;
2. *symbols*: undefined symbols are resolved against the kernel image
   (:class:`UnknownSymbolError` for a missing one, as "Unknown symbol");
3. *relocations* (``apply_relocate_add``): ``R_X86_64_64``, ``PC64``,
   ``PC32``, ``PLT32``, ``32`` and ``32S`` are applied to a staging copy of
   the sections; any other type, a value that does not fit its field, or a
   field that is not zero before the write is refused with
   :class:`ModuleRelocationError`.  (The kernel does not range-check PC32;
   here a displacement beyond rel32 reach is refused too.)
4. *finalize* (``module_finalize``): the module's own ``.retpoline_sites``,
   ``.return_sites`` and ``.altinstructions`` are applied by the boot passes
   of :mod:`textpoke._alternative`, for the features the kernel booted
   with, on a shadow of the staged text -- the text is not executable yet,
   so nothing but the staging buffer changes;
5. *coming* (``jump_label_add_module``, ``static_call_add_module``): every
   ``__jump_table`` entry and ``.static_call_sites`` site must name a key or
   call the image knows (:class:`UnknownKeyError` / :class:`UnknownCallError`
   otherwise) and gets, in the staging buffer, the code for the key's or
   call's *current* state;
6. the data is written, the text placed with ``text_poke_copy`` (the
   execmem read-only path of 6.12), every CPU is serialised once (so no CPU
   runs stale bytes of the range when it first calls in), and only then the
   entries are registered with the keys and calls: a key flipped from now
   on switches the module's sites too.

Every refusal happens before step 6: the text and the data are unchanged
and the memory is given back.

:meth:`ModuleLoader.unload` removes the module's entries from the keys and
calls, fills its text with INT3 (``text_poke_set``, so a stale pointer
traps) and frees both chunks.  The caller must first make sure no CPU is
inside the module (the kernel's refcount and RCU grace period).

Not modelled: module parameters, init sections, exports from modules,
module-defined static keys and calls (refused as unknown), ``.smp_locks``
(only applies to a uniprocessor boot) and ``__mcount_loc`` (relocated, not
used).

Rules learnt from ``arch/x86/kernel/module.c``, ``kernel/module/main.c``,
``kernel/jump_label.c`` and ``kernel/static_call_inline.c`` (Linux 6.12);
the code is our own.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ._alternative._apply import alt_instructions_pass
from ._alternative._shadow import DebugLog, Shadow, Symbols, features_of
from ._alternative._thunks import retpolines_pass, returns_pass
from ._errors import TextPokeError
from ._execmem import ExecMem
from ._jump_label._keys import StaticKeys, UnknownKeyError
from ._static_call._calls import StaticCalls, UnknownCallError
from .images._tables import ALT_FLAGS_SHIFT, AltInstr, RetpolineSite, ReturnSite
from .images._tables_clients import parse_jump_table, parse_static_call_sites

if TYPE_CHECKING:      # the self-test's result type lives with the sim's client harness
    from .sim._clients_demo import SelfTestResult

__all__ = ["ModuleLoader", "Module", "module_selftest", "module_demo_line", "ModuleError", "ModuleFormatError", "ModuleRelocationError",
           "UnknownSymbolError", "MODULE_DATA_BASE", "MODULE_DATA_SIZE", "RELOCATION_TYPES"]

MODULE_DATA_BASE = 0x0580_0000
MODULE_DATA_SIZE = 0x20_0000

R_X86_64_NONE, R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32 = 0, 1, 2, 4
R_X86_64_32, R_X86_64_32S, R_X86_64_PC64 = 10, 11, 24
#: type -> (name, field size)
RELOCATION_TYPES = {R_X86_64_NONE: ("R_X86_64_NONE", 0), R_X86_64_64: ("R_X86_64_64", 8),
                    R_X86_64_PC32: ("R_X86_64_PC32", 4), R_X86_64_PLT32: ("R_X86_64_PLT32", 4),
                    R_X86_64_32: ("R_X86_64_32", 4), R_X86_64_32S: ("R_X86_64_32S", 4),
                    R_X86_64_PC64: ("R_X86_64_PC64", 8)}
_SHF_ALLOC, _SHF_EXEC = 0x2, 0x4
#: undefined symbols the x86-64 loader lets pass (GOT-relative code names it)
_IGNORED_UNDEF = frozenset({"_GLOBAL_OFFSET_TABLE_"})
_ALT = struct.Struct("<iiIBB")
_M64 = (1 << 64) - 1


class ModuleError(TextPokeError):
    """A module the loader refuses; nothing was written."""


class ModuleFormatError(ModuleError, ValueError):
    """Not an x86-64 ELF relocatable object, or a malformed one."""


class ModuleRelocationError(ModuleError):
    """An unknown relocation type, a value that does not fit its field, or
    a field that is not zero before relocation (``-ENOEXEC``)."""

    def __init__(self, msg: str, *, rtype: int = 0, section: str = "", offset: int = 0,
                 symbol: str = "", value: int = 0) -> None:
        super().__init__(msg)
        self.rtype, self.section, self.offset, self.symbol, self.value = \
            rtype, section, offset, symbol, value


class UnknownSymbolError(ModuleError, LookupError):
    """An undefined symbol the kernel image does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(eq=False)
class Module:
    """A loaded module: where its sections and symbols are, what it registered."""

    name: str
    text: int                       # base of module text
    text_size: int
    data: int
    data_size: int
    sections: dict[str, int]        # allocated section -> address
    symbols: dict[str, int]         # defined symbols -> address
    sizes: dict[str, int]
    jump_entries: int = 0
    static_call_sites: int = 0
    finalize: dict[str, int] = field(default_factory=dict)   # patched sites per table
    patched: list[tuple[int, bytes]] = field(default_factory=list)  # (site, bytes) finalize wrote
    live: bool = True
    _text_alloc: int = 0
    _data_alloc: int = 0

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise UnknownSymbolError(f"module {self.name} has no symbol {name!r}") from None

    def as_dict(self) -> dict:
        return {"name": self.name, "text": self.text, "text_size": self.text_size,
                "data": self.data, "data_size": self.data_size, "jump_entries": self.jump_entries,
                "static_call_sites": self.static_call_sites, "finalize": dict(self.finalize),
                "live": self.live}


class _StagedText:
    """What the boot passes read through ``shadow.machine``: the staged
    module text and data where they will be, the machine elsewhere."""

    def __init__(self, machine, text: tuple[int, bytearray], data: tuple[int, bytearray]) -> None:
        self._m, self._text, self._data = machine, text, data
        self.mem = self
        self.text_ranges = machine.text_ranges

    @staticmethod
    def _in(area: tuple[int, bytearray], addr: int, size: int) -> bytes | None:
        base, buf = area
        if base <= addr and addr + size <= base + len(buf):
            return bytes(buf[addr - base:addr - base + size])
        return None

    def text_read(self, addr: int, size: int) -> bytes:
        got = self._in(self._text, addr, size)
        return self._m.text_read(addr, size) if got is None else got

    def read(self, addr: int, size: int) -> bytes:        # as machine.mem.read
        got = self._in(self._data, addr, size)
        return self._m.mem.read(addr, size) if got is None else got


class _ModuleShadow(Shadow):
    """A shadow whose only range is the staged module text: the passes
    rewrite the staging buffer in place; there is nothing to commit."""

    def __init__(self, core, text: tuple[int, bytearray], data: tuple[int, bytearray]) -> None:
        self.core = core
        self.machine = _StagedText(core.machine, text, data)
        base, buf = text
        self._ranges = [(base, base + len(buf), buf)]
        self.writes = []


def _align(v: int, a: int) -> int:
    a = max(a, 1)
    return -(-v // a) * a


def _sym_name(sym, secs) -> str:
    """A symbol's name, or its section's for a section symbol."""
    if sym.name:
        return sym.name
    shndx = sym["st_shndx"]
    return secs[shndx].name if isinstance(shndx, int) and shndx < len(secs) else "?"


def _s64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


class ModuleLoader:
    """Loads and unloads modules for one kernel image on one TextPoke.

    *image* provides the symbols modules link against (every symbol of the
    image is "exported"); *features* are those the image was booted with
    (``BootResult.features``).  Module data lives in a data region mapped
    at *data_base* (created on first use if the machine can map one)."""

    def __init__(self, core, image, keys: StaticKeys, calls: StaticCalls, *,
                 features: Iterable[str | int] = (), execmem: ExecMem | None = None,
                 data_base: int = MODULE_DATA_BASE, data_size: int = MODULE_DATA_SIZE) -> None:
        self.core = core
        self.machine = core.machine
        self.image = image
        self.keys, self.calls = keys, calls
        self.feats, self.features = features_of(features)
        self.execmem = execmem or ExecMem(core)
        self._data_base, self._data_size = data_base, data_size
        self._data_mem: ExecMem | None = None
        self.modules: dict[str, Module] = {}
        self.loads = self.unloads = 0

    @classmethod
    def for_client_machine(cls, cm, **kw) -> "ModuleLoader":
        """A loader over a :class:`~textpoke.sim._clients_demo.ClientMachine`."""
        return cls(cm.core, cm.image, cm.keys, cm.calls, features=cm.boot.features, **kw)

    # ------------------------------------------------------------ memory
    def _data_alloc(self, size: int) -> int:
        if self._data_mem is None:
            add = getattr(self.machine, "add_data_region", None)
            if add is None:
                raise ModuleError(f"{self.machine.name}: cannot map module data")
            add(self._data_base, self._data_size, "module-data")
            # the allocator logic of execmem over the data range; data is
            # never invalidated with text_poke_set
            self._data_mem = ExecMem(self.core, start=self._data_base,
                                     end=self._data_base + self._data_size, align=64)
        return self._data_mem.alloc(max(size, 1))

    def _data_free(self, addr: int) -> None:
        size = self._data_mem.used[addr]
        self.machine.mem.write(addr, bytes(size))
        self._data_mem.free(addr, invalidate=False)

    # ------------------------------------------------------------ load
    def load(self, obj: "bytes | str | Path", name: str | None = None) -> Module:
        """Load a relocatable object (its bytes or a path); return the
        :class:`Module`.  Refusals raise :class:`ModuleError` (or the keys'
        and calls' :class:`UnknownKeyError` / :class:`UnknownCallError`)
        with nothing written."""
        if not isinstance(obj, (bytes, bytearray)):
            path = Path(obj)
            name = name or path.stem
            obj = path.read_bytes()
        name = name or "module"
        if name in self.modules:
            raise ModuleError(f"module {name} is already loaded")
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        try:
            elf = ELFFile(io.BytesIO(bytes(obj)))
            if elf["e_type"] != "ET_REL" or elf["e_machine"] != "EM_X86_64":
                raise ModuleFormatError(f"module {name}: not an x86-64 relocatable object "
                                        f"({elf['e_type']}, {elf['e_machine']})")
            secs = list(elf.iter_sections())
        except ELFError as e:
            raise ModuleFormatError(f"module {name}: not an ELF object ({e})") from None

        # 1. layout
        text_off: dict[int, int] = {}
        data_off: dict[int, int] = {}
        tsize = dsize = 0
        talign = dalign = 16
        for i, s in enumerate(secs):
            if not s["sh_flags"] & _SHF_ALLOC or s["sh_size"] == 0:
                continue
            a = s["sh_addralign"] or 1
            if s["sh_flags"] & _SHF_EXEC:
                tsize = _align(tsize, a)
                text_off[i] = tsize
                tsize += s["sh_size"]
                talign = max(talign, a)
            else:
                dsize = _align(dsize, a)
                data_off[i] = dsize
                dsize += s["sh_size"]
                dalign = max(dalign, a)
        if not tsize:
            raise ModuleFormatError(f"module {name}: no executable section")
        talloc = self.execmem.alloc(tsize + talign - 16 if talign > 16 else tsize)
        dalloc = 0
        try:
            dalloc = self._data_alloc(dsize + dalign)
            tbase, dbase = _align(talloc, talign), _align(dalloc, dalign)
            text, data = bytearray(tsize), bytearray(dsize)
            addr: dict[int, int] = {}
            for i, off in text_off.items():
                addr[i] = tbase + off
                text[off:off + secs[i]["sh_size"]] = secs[i].data()
            for i, off in data_off.items():
                addr[i] = dbase + off
                if secs[i]["sh_type"] != "SHT_NOBITS":
                    data[off:off + secs[i]["sh_size"]] = secs[i].data()
            mod = Module(name, tbase, tsize, dbase, dsize,
                         {secs[i].name: a for i, a in addr.items()}, {}, {},
                         _text_alloc=talloc, _data_alloc=dalloc)
            # 2. symbols, 3. relocations
            symvals = self._symbols(elf, secs, addr, mod)
            self._relocate(elf, secs, addr, symvals, mod, text, data, text_off, data_off)
            # 4. module_finalize, 5. jump labels and static calls
            jump, scs = self._finalize(secs, addr, mod, text, data, data_off)
        except BaseException:
            self.execmem.free(talloc, invalidate=False)
            if dalloc:
                self._data_mem.free(dalloc, invalidate=False)
            raise
        # 6. place, serialise, register
        try:
            self.machine.mem.write(dbase, bytes(data)) if dsize else None
            self.core.text_poke_copy(tbase, bytes(text))
            self.core.smp_text_poke_sync_each_cpu()
            self.keys.add_module_entries(name, jump, mod.symbols, mod.sizes)
            self.calls.add_module_sites(name, scs, mod.symbols, mod.sizes)
        except BaseException:
            self.keys.remove_module_entries(name)
            self.calls.remove_module_sites(name)
            self.execmem.free(talloc)
            self._data_free(dalloc)
            raise
        mod.jump_entries, mod.static_call_sites = len(jump), len(scs)
        self.modules[name] = mod
        self.loads += 1
        return mod

    def _symbols(self, elf, secs, addr: dict[int, int], mod: Module) -> list[int]:
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise ModuleFormatError(f"module {mod.name}: no symbol table")
        kernel = self.image.symbols
        vals = []
        missing = []
        self._names = names = []
        for sym in symtab.iter_symbols():
            names.append(_sym_name(sym, secs))
            shndx = sym["st_shndx"]
            v = 0
            if shndx == "SHN_UNDEF":
                if sym.name:
                    if sym.name in kernel:
                        v = kernel[sym.name]
                    elif sym["st_info"]["bind"] != "STB_WEAK" and sym.name not in _IGNORED_UNDEF:
                        missing.append(sym.name)
            elif shndx == "SHN_ABS":
                v = sym["st_value"]
            elif shndx == "SHN_COMMON":
                raise ModuleFormatError(f"module {mod.name}: common symbol {sym.name} "
                                        "(build with -fno-common)")
            elif isinstance(shndx, int):
                if shndx in addr:
                    v = addr[shndx] + sym["st_value"]
                    if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT",
                                                               "STT_NOTYPE"):
                        mod.symbols[sym.name] = v
                        mod.sizes[sym.name] = sym["st_size"]
            vals.append(v)
        if missing:
            raise UnknownSymbolError(f"module {mod.name}: Unknown symbol "
                                     f"{', '.join(sorted(set(missing)))} (not in the kernel image)")
        return vals

    def _relocate(self, elf, secs, addr, symvals, mod, text, data, text_off, data_off) -> None:
        from elftools.elf.relocation import RelocationSection
        for rel in secs:
            if not isinstance(rel, RelocationSection):
                continue
            if rel["sh_type"] != "SHT_RELA":
                raise ModuleFormatError(f"module {mod.name}: {rel.name} is SHT_REL; x86-64 "
                                        "modules use RELA")
            tgt = rel["sh_info"]
            if tgt not in addr:         # relocations of non-allocated sections (debug info)
                continue
            buf, base = (text, text_off[tgt]) if tgt in text_off else (data, data_off[tgt])
            tname = secs[tgt].name
            names = self._names
            for off, info, addend in struct.iter_unpack("<QQq", rel.data()):
                t, symi = info & 0xFFFFFFFF, info >> 32
                if symi >= len(symvals):
                    raise ModuleFormatError(f"module {mod.name}: {rel.name} names symbol {symi} "
                                            "beyond the symbol table")
                sname = names[symi]
                where = f"{tname}+{off:#x}"
                if t not in RELOCATION_TYPES:
                    raise ModuleRelocationError(
                        f"module {mod.name}: unknown relocation type {t} at {where} against "
                        f"{sname}; nothing written", rtype=t, section=tname, offset=off,
                        symbol=sname)
                rname, size = RELOCATION_TYPES[t]
                if not size:
                    continue
                loc = addr[tgt] + off
                val = (symvals[symi] + addend) & _M64
                if t in (R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_PC64):
                    val = (val - loc) & _M64
                sv = _s64(val)
                ok = {R_X86_64_64: True, R_X86_64_PC64: True,
                      R_X86_64_32: 0 <= val < (1 << 32),
                      R_X86_64_32S: -(1 << 31) <= sv < (1 << 31),
                      R_X86_64_PC32: -(1 << 31) <= sv < (1 << 31),
                      R_X86_64_PLT32: -(1 << 31) <= sv < (1 << 31)}[t]
                if not ok:
                    raise ModuleRelocationError(
                        f"module {mod.name}: {rname} at {where} against {sname}: value "
                        f"{sv:#x} does not fit {size} bytes; nothing written", rtype=t,
                        section=tname, offset=off, symbol=sname, value=sv)
                at = base + off
                if at + size > len(buf) or off + size > secs[tgt]["sh_size"]:
                    raise ModuleFormatError(f"module {mod.name}: {rname} at {where} is outside "
                                            f"{tname}")
                if any(buf[at:at + size]):
                    raise ModuleRelocationError(
                        f"module {mod.name}: {rname} at {where}: the field is not zero "
                        f"({bytes(buf[at:at + size]).hex(' ')}) before relocation; nothing "
                        "written", rtype=t, section=tname, offset=off, symbol=sname, value=sv)
                buf[at:at + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _table(self, secs, addr, data, data_off, name: str) -> tuple[bytes, int] | None:
        for i, s in enumerate(secs):
            if s.name == name and i in data_off:
                off = data_off[i]
                return bytes(data[off:off + s["sh_size"]]), addr[i]
        return None

    def _finalize(self, secs, addr, mod: Module, text: bytearray, data: bytearray, data_off):
        tbase, tend = mod.text, mod.text + mod.text_size

        def check_in_text(what: str, a: int, size: int = 1) -> None:
            if not tbase <= a and a + size <= tend:
                raise ModuleFormatError(f"module {mod.name}: {what} at {a:#x} is outside its "
                                        "text")

        def s32_sites(name: str, cls) -> list:
            t = self._table(secs, addr, data, data_off, name)
            if t is None:
                return []
            raw, base = t
            out = []
            for k in range(len(raw) // 4):
                (o,) = struct.unpack_from("<i", raw, 4 * k)
                out.append(cls(addr=base + 4 * k + o, entry=base + 4 * k))
                check_in_text(f"{name} entry {k}", out[-1].addr)
            return out

        alts = []
        t = self._table(secs, addr, data, data_off, ".altinstructions")
        if t is not None:
            raw, base = t
            if len(raw) % _ALT.size:
                raise ModuleFormatError(f"module {mod.name}: .altinstructions is not whole entries")
            for k in range(len(raw) // _ALT.size):
                e = base + k * _ALT.size
                io_, ro, ft, il, rl = _ALT.unpack_from(raw, k * _ALT.size)
                a = AltInstr(instr=e + io_, repl=e + 4 + ro, cpuid=ft & 0xFFFF,
                             flags=ft >> ALT_FLAGS_SHIFT, instrlen=il, replacementlen=rl,
                             entry=e, index=k)
                check_in_text(f".altinstructions entry {k}", a.instr, max(il, 1))
                if rl:
                    check_in_text(f".altinstructions entry {k} replacement", a.repl, rl)
                alts.append(a)
        retp = s32_sites(".retpoline_sites", RetpolineSite)
        rets = s32_sites(".return_sites", ReturnSite)

        syms = dict(self.image.symbols)
        syms.update(mod.symbols)
        sizes = dict(getattr(self.image, "sizes", {}) or {})
        sizes.update(mod.sizes)
        sym = Symbols(syms, sizes)
        shadow = _ModuleShadow(self.core, (tbase, text), (mod.data, data))
        dbg = DebugLog(0)
        done = {}
        for label, fn, items in ((".retpoline_sites", retpolines_pass, retp),
                                 (".return_sites", returns_pass, rets),
                                 (".altinstructions", alt_instructions_pass, alts)):
            recs = fn(shadow, items, self.feats, sym, dbg) if items else []
            patched = [(r.instr, r.final) if label == ".altinstructions" else (r.addr, r.new)
                       for r in recs if getattr(r, "written", None) or
                       getattr(r, "action", "") == "patched"]
            done[label] = len(patched)
            mod.patched.extend(patched)
        mod.finalize = done

        # jump labels and static calls: known keys and calls, current state
        jump = []
        t = self._table(secs, addr, data, data_off, "__jump_table")
        if t is not None:
            jump = parse_jump_table(*t)
        scs = []
        t = self._table(secs, addr, data, data_off, ".static_call_sites")
        if t is not None:
            scs = parse_static_call_sites(*t)
        desc = sym
        for e in jump:
            check_in_text("jump label", e.code, 2)
            check_in_text("jump label target", e.target)
            try:
                self.keys.key(e.key)
            except UnknownKeyError:
                raise UnknownKeyError(f"module {mod.name}: jump label at {desc(e.code)} uses "
                                      f"{desc(e.key)} [{e.key:#x}], which is not a static key "
                                      "of the kernel; nothing written") from None
        for s in scs:
            check_in_text("static-call site", s.addr, 5)
            try:
                self.calls.call_of_key(s.key)
            except UnknownCallError:
                raise UnknownCallError(f"module {mod.name}: static-call site at {desc(s.addr)} "
                                       f"uses {desc(s.key)} [{s.key:#x}], which is no static "
                                       "call's key in the kernel; nothing written") from None
        for e in jump:
            size, code = self.keys.module_code(e, text, tbase)
            text[e.code - tbase:e.code - tbase + size] = code
        for s in scs:
            code = self.calls.module_code(s, text, tbase)
            text[s.addr - tbase:s.addr - tbase + len(code)] = code
        return jump, scs

    # ------------------------------------------------------------ unload
    def unload(self, mod: "Module | str") -> None:
        """Remove the module's entries from the keys and calls, fill its
        text with INT3 and free its memory.  No CPU may be inside it."""
        m = self.modules.get(mod if isinstance(mod, str) else mod.name)
        if m is None or not m.live:
            raise ModuleError(f"module {mod if isinstance(mod, str) else mod.name} is not loaded")
        self.keys.remove_module_entries(m.name)
        self.calls.remove_module_sites(m.name)
        self.execmem.free(m._text_alloc)            # text_poke_set(INT3) first
        self._data_free(m._data_alloc)
        m.live = False
        del self.modules[m.name]
        self.unloads += 1

    def unload_all(self) -> None:
        for name in list(self.modules):
            self.unload(name)


# ---------------------------------------------------------------- self-test
#: mod_clients.o's probes: (function, argument, value for (jl_key_false, jl_key_true, sc_op func))
_MOD_PROBES = (
    ("mod_key_false", 0, lambda kf, kt, f: int(kf)),
    ("mod_key_false_likely", 0, lambda kf, kt, f: int(kf)),
    ("mod_key_true", 0, lambda kf, kt, f: int(kt)),
    ("mod_call_op", 5, lambda kf, kt, f: f(5) + 1000),
    ("mod_tail_op", 6, lambda kf, kt, f: f(6)),
    # alternative taken (2 * 100) + sc_square(3) through a retpoline site + tbl[3] + sc_double(3)
    ("mod_misc", 3, lambda kf, kt, f: 200 + 9 + 11 + 6),
)


def module_selftest(cm, loader: ModuleLoader | None = None) -> SelfTestResult:
    """A module that uses a kernel key and a kernel static call, loaded
    while every CPU of *cm* (a ClientMachine) runs the probe loop, called
    from every CPU, switched both ways, unloaded, and loaded again with the
    key already flipped; then the refusals, each leaving module text and
    the allocators as they were.  Every check is a case of the result."""
    from .images.modules import module_path
    from .sim._clients_demo import SelfTestResult

    r = SelfTestResult("module")
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    L = loader or ModuleLoader.for_client_machine(cm)
    keys, calls = cm.keys, cm.calls
    funcs = {cm.sym("sc_double"): lambda x: 2 * x, cm.sym("sc_square"): lambda x: x * x}
    if not cm.started:
        cm.start()
    cm.wait_passes(1)

    def want_now(**change) -> list[int]:
        """What the probes must return now, or once *change* is made."""
        kf = change.get("kf", keys.static_key_enabled("jl_key_false"))
        kt = change.get("kt", keys.static_key_enabled("jl_key_true"))
        f = funcs[calls.resolve(change["f"]) if "f" in change else calls.static_call_query("sc_op")]
        return [spec(kf, kt, f) for _n, _a, spec in _MOD_PROBES]

    def load(label: str) -> tuple[Module, list[int]]:
        image_sites = {k: len(keys.key(k).sites) for k in ("jl_key_false", "jl_key_true")}
        m = L.load(module_path("mod_clients.o"))
        want = want_now()
        slots = [cm.add_probe(f"{m.name}:{n}", m.sym(n), arg=a, allow=[w])
                 for (n, a, _s), w in zip(_MOD_PROBES, want)]
        wrong = cm.expect(dict(zip(slots, want)))
        added = {k: len(keys.key(k).sites) - image_sites[k] for k in image_sites}
        r.case(f"{label}: load, every CPU calls in and sees the current state", not wrong
               and added == {"jl_key_false": 2, "jl_key_true": 1}
               and m.static_call_sites == 2, want=want, jump_entries=added,
               finalize=m.finalize, wrong={cm.probes[i].name if i >= 0 else "passes": v
                                           for i, v in wrong.items()})
        # module_finalize's passes, as the text reads now
        text_ok = all(cm.sim.text_read(a, len(b)) == b for a, b in m.patched)
        r.case(f"{label}: retpolines, returns and alternatives applied to its text",
               m.finalize.get(".return_sites", 0) >= 6 and m.finalize.get(".retpoline_sites") == 1
               and m.finalize.get(".altinstructions") == 1 and text_ok,
               finalize=m.finalize, text_reads_patched=text_ok)
        return m, slots

    def switch(m: Module, slots: list[int], label: str, action, **change) -> None:
        before, after = want_now(), want_now(**change)
        for i, b, a in zip(slots, before, after):
            cm.allow(i, [b, a])           # widen first: either variant while it switches
        action()
        wrong = cm.expect(dict(zip(slots, after)))
        r.case(f"{label}", not wrong and before != after and want_now() == after, want=after,
               wrong={cm.probes[i].name if i >= 0 else "passes": v for i, v in wrong.items()})

    def unload(m: Module, slots: list[int], label: str) -> None:
        for i in slots:
            cm.disable_probe(i)
        cm.wait_passes(2)                 # no CPU is inside the module any more
        text, size = m.text, m.text_size
        L.unload(m)
        gone = all(s.owner != m.name for k in keys.keys.values() for s in k.sites) and \
            all(s.owner != m.name for c in calls.calls.values() for s in c.sites)
        r.case(f"{label}: unload removes the entries and fills the text with INT3",
               gone and cm.sim.text_read(text, size) == b"\xcc" * size and not L.execmem.used,
               entries_gone=gone)
        # a key flipped after unload does not touch the freed text
        n = len(keys.key("jl_key_false").sites)
        b0 = cm.core.stats.batches
        on = keys.static_key_enabled("jl_key_false")
        (keys.static_key_disable if on else keys.static_key_enable)("jl_key_false")
        (keys.static_key_enable if on else keys.static_key_disable)("jl_key_false")
        cm.wait_passes(1)
        r.case(f"{label}: a key flipped after unload leaves the freed text alone",
               cm.sim.text_read(text, size) == b"\xcc" * size
               and cm.core.stats.batches - b0 == (2 if n else 0), image_entries=n)

    m, slots = load("first load")
    switch(m, slots, "static_key_enable(jl_key_false) switches the module's sites",
           lambda: keys.static_key_enable("jl_key_false"), kf=True)
    switch(m, slots, "static_key_disable(jl_key_false) switches them back",
           lambda: keys.static_key_disable("jl_key_false"), kf=False)
    switch(m, slots, "static_key_disable(jl_key_true)",
           lambda: keys.static_key_disable("jl_key_true"), kt=False)
    switch(m, slots, "static_key_enable(jl_key_true)",
           lambda: keys.static_key_enable("jl_key_true"), kt=True)
    switch(m, slots, "static_call_update(sc_op, sc_square) switches the module's sites",
           lambda: calls.static_call_update("sc_op", "sc_square"), f="sc_square")
    switch(m, slots, "static_call_update(sc_op, sc_double) switches them back",
           lambda: calls.static_call_update("sc_op", "sc_double"), f="sc_double")
    unload(m, slots, "first load")
    # loaded again while the key and the call are in their other states
    keys.static_key_enable("jl_key_false")
    calls.static_call_update("sc_op", "sc_square")
    m, slots = load("reload with jl_key_false on and sc_op = sc_square")
    switch(m, slots, "reload: static_key_disable(jl_key_false)",
           lambda: keys.static_key_disable("jl_key_false"), kf=False)
    switch(m, slots, "reload: static_call_update(sc_op, sc_double)",
           lambda: calls.static_call_update("sc_op", "sc_double"), f="sc_double")
    unload(m, slots, "reload")

    # refusals: typed errors, module text and the allocators unchanged
    expected = {"bad_reloc.o": ModuleRelocationError, "bad_range.o": ModuleRelocationError,
                "bad_sym.o": UnknownSymbolError, "bad_key.o": UnknownKeyError,
                "bad_call.o": UnknownCallError}
    rng = next(t for t in cm.sim.text_ranges if not t.core)
    for obj, exc in expected.items():
        before = cm.sim.text_read(rng.start, rng.end - rng.start)
        used = dict(L.execmem.used), dict(L._data_mem.used) if L._data_mem else {}
        err = None
        try:
            L.load(module_path(obj))
        except TextPokeError as e:
            err = e
        after = cm.sim.text_read(rng.start, rng.end - rng.start)
        used2 = dict(L.execmem.used), dict(L._data_mem.used) if L._data_mem else {}
        r.case(f"refused {obj}: {exc.__name__}, text unchanged", isinstance(err, exc)
               and before == after and used == used2 and not L.modules,
               error=f"{type(err).__name__}: {err}" if err else None)
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r


def module_demo_line(*, cpus: int = 4, seed: int = 0) -> str:
    """The line ``make demo`` shows for modules."""
    from .sim._clients_demo import ClientMachine
    with ClientMachine(cpus=cpus, seed=seed) as cm:
        r = module_selftest(cm)
        refused = sum(c["name"].startswith("refused") and c["passed"] for c in r.cases)
        return (f"modules: a GCC-built module loaded into execmem on {cpus} running vCPUs, "
                f"its key and static call switched both ways, unloaded, reloaded; {refused} bad "
                f"objects refused with the text unchanged: {sum(c['passed'] for c in r.cases)}/"
                f"{len(r.cases)} checks passed, {r.syncs} syncs, {r.oopses} oopses")
