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
   so nothing but the staging buffer changes; then, when the kernel's
   call-depth thunks are initialised (``callthunks_patch_module_calls``),
   every direct CALL listed in ``.call_sites`` or at an ``.altinstructions``
   site whose destination is this module's text or core kernel text is
   aimed at the destination's accounting thunk (written into the staged
   padding for a function of the module, into core text with
   ``text_poke_copy_locked`` for a kernel function -- that write stays even
   if the load is refused later, as in the kernel); and with
   ``CONFIG_X86_KERNEL_IBT`` (*ibt*) each ENDBR listed in
   ``.ibt_endbr_seal`` is sealed (``apply_seal_endbr``: ``66 0f 1f 00``);
5. *coming* (``jump_label_add_module``, ``static_call_add_module``): every
   ``__jump_table`` entry and ``.static_call_sites`` site must name a key or
   call the image knows, or one the module defines in its own data (a
   tracepoint's key and ``tp_func_*`` call, a ``DEFINE_STATIC_KEY`` of its
   own: made with the module, in the state its initialiser gives, and
   dropped at unload) -- :class:`UnknownKeyError` / :class:`UnknownCallError`
   otherwise -- and gets, in the staging buffer, the code for the key's or
   call's *current* state (a CALL to a module function through its
   call-depth thunk, as ``callthunks_translate_call_dest`` takes module
   text); an entry's "init" bit is whether it lies in the module's init
   text;
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

With ``X86_FEATURE_INDIRECT_THUNK_ITS`` the retpoline pass hands out the
module's ITS thunks (``jmp *%reg; int3``) from pages of its own, as
``its_init_mod``/``its_alloc`` do: a fresh execmem page for the first
(:attr:`ModuleLoader.its_pages` gives their addresses where a real kernel
chose them), INT3 around the thunks, freed at unload (``its_free_mod``).

Not modelled: kCFI/FineIBT (a module with ``.cfi_sites``, from a clang
``CONFIG_CFI_CLANG`` build, is refused), module parameters, init sections
(kept, never freed) and exports from modules.

Rules learnt from ``arch/x86/kernel/module.c``, ``kernel/module/main.c``,
``kernel/jump_label.c`` and ``kernel/static_call_inline.c`` (Linux 6.12);
the code is our own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .._alternative._apply import alt_instructions_pass
from .._alternative._shadow import DebugLog, Shadow, Symbols, features_of
from .._alternative._records import PassLog
from .._alternative._kpasses import F_INDIRECT_THUNK_ITS, BootOptions
from .._alternative._thunks import (ItsThunks, retpolines_pass, returns_pass, seal_endbr,
                                   shadow_pass)
from .._core._insn import CALL_INSN_OPCODE, text_gen_insn
from .._core._machine import Capability
from ..images._elf import ET_REL, SHT_NOBITS, ElfFile, ImageError
from .._execmem import ExecMem
from .._jump_label._keys import StaticKeys, UnknownKeyError
from ._link import (ModuleError, ModuleFormatError, UnknownSymbolError, align, layout,
                           placed, relocate, resolve_symbols)
from .._static_call._calls import StaticCall, StaticCalls, UnknownCallError
from ..images._tables import (Bounds, RetpolineSite, ReturnSite, alt_instr_table, check_entries,
                             jump_table, mcount_sites, s32_sites, static_call_table)

__all__ = ["ModuleLoader", "Module", "MODULE_DATA_BASE", "MODULE_DATA_SIZE"]

MODULE_DATA_BASE = 0x0580_0000
MODULE_DATA_SIZE = 0x20_0000


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
    #: static keys the module defines itself (addresses in its data)
    own_keys: list[int] = field(default_factory=list)
    #: static calls the module defines itself (keys in its data)
    own_calls: list = field(default_factory=list)
    finalize: dict[str, int] = field(default_factory=dict)   # patched sites per table
    patched: list[tuple[int, bytes]] = field(default_factory=list)  # (site, bytes) finalize wrote
    live: bool = True
    #: ITS thunk pages of the module's own (its_init_mod): page -> thunks (addr, reg)
    its_pages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    _text_alloc: int = 0
    _data_alloc: int = 0
    _its_allocs: list[int] = field(default_factory=list)

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


PAGE_SIZE = 4096


class _ModuleIts(ItsThunks):
    """``its_allocate_thunk`` while a module is finalised: when the page in
    use is full -- or none was taken for this module yet -- a new one comes
    from *alloc*, never the image's static thunk array."""

    def __init__(self, tb, alloc) -> None:
        super().__init__(tb)
        self._alloc = alloc

    def get(self, reg: int) -> int:
        size = 3 + reg // 8
        if (self.page is None or self.off + size - 1 >= PAGE_SIZE) and not self.pages:
            self.pages.append(self._alloc())
        return super().get(reg)


def its_page_bytes(thunks: "list[tuple[int, int]]", page: int) -> bytes:
    """An ITS thunk page as the kernel leaves it: INT3 everywhere but the
    thunks, ``jmp *%reg; int3`` each (REX.B for r8-r15)."""
    out = bytearray(b"\xcc" * PAGE_SIZE)
    for a, reg in thunks:
        code = (b"\x41" if reg >= 8 else b"") + bytes([0xFF, 0xE0 + reg % 8, 0xCC])
        out[a - page:a - page + len(code)] = code
    return bytes(out)


class ModuleLoader:
    """Loads and unloads modules for one kernel image on one TextPoke.

    *image* provides the symbols modules link against (every symbol of the
    image is "exported"); *features* are those the image was booted with
    (``BootResult.features``).  Module data lives in a data region mapped
    at *data_base* (created on first use if the machine can map one)."""

    def __init__(self, core, image, keys: StaticKeys, calls: StaticCalls, *,
                 features: Iterable[str | int] = (), execmem: ExecMem | None = None,
                 data_base: int = MODULE_DATA_BASE, data_size: int = MODULE_DATA_SIZE,
                 ibt: bool = False) -> None:
        self.core = core
        #: CONFIG_X86_KERNEL_IBT: .ibt_endbr_seal is applied
        self.ibt = ibt
        self.machine = core.machine
        self.image = image
        self.keys, self.calls = keys, calls
        self.feats, self.features = features_of(features)
        self.execmem = execmem or ExecMem(core)
        self._data_base, self._data_size = data_base, data_size
        self._data_mem: ExecMem | None = None
        self.modules: dict[str, Module] = {}
        self.loads = self.unloads = 0
        #: where the next ITS thunk pages go (a real kernel's execmem_alloc
        #: answers, read from a run-time reference); empty: taken from execmem
        self.its_pages: list[int] = []

    # ------------------------------------------------------------ memory
    def _data_alloc(self, size: int, *, at: int | None = None) -> int:
        if at is not None:
            # data where a real kernel put it: outside our data range
            self.machine.require(Capability.DATA, "module data")
            self._placed_data = getattr(self, "_placed_data", {})
            self._placed_data[at] = size
            return at
        if self._data_mem is None:
            if not self.machine.has(Capability.DATA):
                raise ModuleError(f"{self.machine.name}: cannot map module data (no DATA capability)")
            self._data_base = self.machine.map_data(self._data_size, "module-data", self._data_base)
            # the allocator logic of execmem over the data range; data is
            # never invalidated with text_poke_set
            self._data_mem = ExecMem(self.core, start=self._data_base,
                                     end=self._data_base + self._data_size, align=64)
        return self._data_mem.alloc(max(size, 1))

    def _data_free(self, addr: int) -> None:
        placed = getattr(self, "_placed_data", {})
        if addr in placed:
            self.machine.mem.write(addr, bytes(placed.pop(addr)))
            return
        size = self._data_mem.used[addr]
        self.machine.mem.write(addr, bytes(size))
        self._data_mem.free(addr, invalidate=False)

    # ------------------------------------------------------------ load
    def load(self, obj: "bytes | str | Path", name: str | None = None, *,
             at: "dict[str, int] | None" = None) -> Module:
        """Load a relocatable object (its bytes or a path); return the
        :class:`Module`.  Refusals raise :class:`ModuleError` (or the keys'
        and calls' :class:`UnknownKeyError` / :class:`UnknownCallError`)
        with nothing written.

        *at* places every allocated section at the address given by name
        (what a real kernel chose: ``/sys/module/NAME/sections``) instead
        of laying them out here; executable sections must fall in execmem,
        the others are data."""
        if not isinstance(obj, (bytes, bytearray)):
            path = Path(obj)
            name = name or path.stem
            obj = path.read_bytes()
        name = name or "module"
        if name in self.modules:
            raise ModuleError(f"module {name} is already loaded")
        elf = ElfFile(bytes(obj), f"module {name}", error=ModuleFormatError)
        elf.require(ET_REL, "an x86-64 relocatable object")
        secs = elf.sections

        # 1. layout
        text_off, data_off, tsize, dsize, talign, dalign = layout(secs, name)
        if at is not None:
            text_off, data_off, tbase, tsize, dbase, dsize = placed(secs, at, name)
            talloc = self.execmem.alloc_at(tbase, tsize)
        else:
            talloc = self.execmem.alloc(tsize + talign - 16 if talign > 16 else tsize)
        dalloc = 0
        try:
            if at is not None:
                dalloc = self._data_alloc(dsize, at=dbase) if dsize else 0
            else:
                dalloc = self._data_alloc(dsize + dalign)
                tbase, dbase = align(talloc, talign), align(dalloc, dalign)
            text, data = bytearray(tsize), bytearray(dsize)
            addr: dict[int, int] = {}
            for i, off in text_off.items():
                addr[i] = tbase + off
                text[off:off + secs[i].size] = elf.data(secs[i])
            for i, off in data_off.items():
                addr[i] = dbase + off
                if secs[i].type != SHT_NOBITS:
                    data[off:off + secs[i].size] = elf.data(secs[i])
            mod = Module(name, tbase, tsize, dbase, dsize,
                         {secs[i].name: a for i, a in addr.items()}, {}, {},
                         _text_alloc=talloc, _data_alloc=dalloc)
            # 2. symbols, 3. relocations
            symvals, names = resolve_symbols(elf, secs, addr, mod, self.image.symbols)
            relocate(elf, secs, addr, symvals, names, mod, text, data, text_off, data_off)
            # 4. module_finalize, 5. jump labels and static calls
            jump, scs = self._finalize(secs, addr, mod, text, data, data_off)
        except BaseException:
            self.execmem.free(talloc, invalidate=False)
            if dalloc:
                self._data_free(dalloc)
            if "mod" in locals():
                self._free_its(mod, invalidate=False)
            raise
        # 6. place, serialise, register
        try:
            self.machine.mem.write(dbase, bytes(data)) if dsize else None
            for page, thunks in mod.its_pages.items():
                self.core.text_poke_copy(page, its_page_bytes(thunks, page))
            self.core.text_poke_copy(tbase, bytes(text))
            self.core.smp_text_poke_sync_each_cpu()
            self.keys.add_module_entries(name, jump, mod.symbols, mod.sizes,
                                         own_keys=mod.own_keys)
            self.calls.add_module_sites(name, scs, mod.symbols, mod.sizes,
                                        own_calls=mod.own_calls)
        except BaseException:
            self.keys.remove_module_entries(name)
            self.calls.remove_module_sites(name)
            self.execmem.free(talloc)
            self._data_free(dalloc)
            self._free_its(mod)
            raise
        mod.jump_entries, mod.static_call_sites = len(jump), len(scs)
        self.modules[name] = mod
        self.loads += 1
        return mod

    def _table(self, secs, addr, data, data_off, name: str) -> tuple[bytes, int] | None:
        for i, s in enumerate(secs):
            if s.name == name and i in data_off:
                off = data_off[i]
                return bytes(data[off:off + s.size]), addr[i]
        return None

    def _finalize(self, secs, addr, mod: Module, text: bytearray, data: bytearray, data_off):
        tbase, tend = mod.text, mod.text + mod.text_size

        # the image's table reader, its checks against the module's text
        bounds = Bounds(f"module {mod.name}", ((tbase, tend),), "its text", ((tbase, tend),),
                        "its text", error=ModuleFormatError)

        def read(name: str, reader, *args) -> list:
            t = self._table(secs, addr, data, data_off, name)
            if t is None:
                return []
            raw, base = t
            try:
                recs = reader(raw, base, base, base + len(raw), *args)
            except ImageError as e:
                raise ModuleFormatError(f"module {mod.name}: {e}") from None
            check_entries(name, enumerate(recs), bounds)
            return recs

        line = getattr(self.image, "line", None)
        # struct alt_instr as the kernel line has it (6.1: 12 bytes, u16 cpuid)
        alts = read(".altinstructions", alt_instr_table,
                    getattr(line, "alt_layout", "ft_flags"))
        retp = read(".retpoline_sites", s32_sites, RetpolineSite, ".retpoline_sites")
        rets = read(".return_sites", s32_sites, ReturnSite, ".return_sites")

        syms = dict(self.image.symbols)
        syms.update(mod.symbols)
        sizes = dict(getattr(self.image, "sizes", {}) or {})
        sizes.update(mod.sizes)
        sym = Symbols(syms, sizes)
        shadow = _ModuleShadow(self.core, (tbase, text), (mod.data, data))
        if line is not None:
            shadow.line = line          # a real kernel's feature numbering and rules
        dbg = DebugLog(0)
        done = {}
        rt = getattr(self, "return_thunk", None)
        if rt:
            # the boot's x86_return_thunk (a real kernel's: call_depth_,
            # srso_, its_return_thunk...), not the default one
            from .._alternative._thunks import returns

            def ret_pass(shadow, sites, feats, sym, dbg):
                return shadow_pass(lambda tb, addrs, caps, log: returns(
                    tb, addrs, caps, BootOptions(return_thunk=rt), log),
                    shadow, [x.addr for x in sites], feats, sym, dbg)
        else:
            ret_pass = returns_pass
        if any(x.name == ".parainstructions" and x.size for x in secs):
            # 6.1's module_finalize runs apply_paravirt over them first
            raise ModuleError(f"module {mod.name}: .parainstructions (6.1's paravirt patch "
                              "sites) are not supported for modules; nothing written")
        if read(".cfi_sites", s32_sites, RetpolineSite, ".cfi_sites"):
            # kCFI/FineIBT (CONFIG_CFI_CLANG): not modelled -- refused rather
            # than loaded with its preambles and callers left as compiled
            raise ModuleError(f"module {mod.name}: .cfi_sites (kCFI/FineIBT, a clang "
                              "CONFIG_CFI_CLANG build) is not supported; nothing written")

        def retp_pass(shadow, sites, feats, sym, dbg):
            # its_init_mod: with X86_FEATURE_INDIRECT_THUNK_ITS the module's
            # ITS thunks go to pages of its own, the first one fresh
            made: list[ItsThunks] = []

            def its(tb, caps):
                made.append(_ModuleIts(tb, lambda: self._its_page(mod))
                            if caps.has(F_INDIRECT_THUNK_ITS) else ItsThunks(tb))
                return made[-1]
            recs = retpolines_pass(shadow, sites, feats, sym, dbg, its=its)
            for a, reg in (t for m in made for t in m.allocated):
                mod.its_pages[a & ~0xFFF].append((a, reg))
            return recs

        for label, fn, items in ((".retpoline_sites", retp_pass, retp),
                                 (".return_sites", ret_pass, rets),
                                 (".altinstructions", alt_instructions_pass, alts)):
            recs = fn(shadow, items, self.feats, sym, dbg) if items else []
            patched = [(r.instr, r.final) if label == ".altinstructions" else (r.addr, r.new)
                       for r in recs if getattr(r, "written", None) or
                       getattr(r, "action", "") == "patched"]
            done[label] = len(patched)
            mod.patched.extend(patched)
        calls = read(".call_sites", s32_sites, RetpolineSite, ".call_sites")
        if (calls or alts) and getattr(self.calls, "thunks_initialized", False):
            # only calls from, and thunks for, the module's core text: its
            # init text is freed after init (within_coretext)
            init = [(addr[i], addr[i] + x.size) for i, x in enumerate(secs)
                    if i in addr and x.name.startswith(".init")]
            done[".call_sites"] = self._callthunks(mod, text, [c.addr for c in calls] +
                                                   [a.instr for a in alts], init)
        seal = read(".ibt_endbr_seal", s32_sites, RetpolineSite, ".ibt_endbr_seal")
        if seal and self.ibt:
            # the boot's own .ibt_endbr_seal pass, on the staging copy
            recs: list = []
            seal_endbr(shadow, [e.addr for e in seal],
                       PassLog(len(seal), shadow.describe, dbg, recs))
            sealed = [(r.addr, r.new) for r in recs if r.action == "patched"]
            done[".ibt_endbr_seal"] = len(sealed)
            mod.patched.extend(sealed)
        # alternatives_smp_module_add: after a uniprocessor boot the
        # module's LOCK prefixes in its .text become DS, as the kernel's did
        if getattr(self, "uniproc", False):
            locks = read(".smp_locks", s32_sites, RetpolineSite, ".smp_locks")
            ts = addr.get(next((i for i, x in enumerate(secs) if x.name == ".text"), -1))
            if locks and ts is not None:
                tn = secs[[x.name for x in secs].index(".text")].size
                n = 0
                for e in locks:
                    o = e.addr - mod.text
                    if ts <= e.addr < ts + tn and text[o] == 0xF0:
                        text[o] = 0x3E
                        mod.patched.append((e.addr, b"\x3e"))
                        n += 1
                done[".smp_locks"] = n
        # ftrace_module_init: every fentry call of the module becomes NOP5
        # (the kernel's records are made then; here only the bytes)
        mc = read("__mcount_loc", mcount_sites)
        if mc:
            done["__mcount_loc"] = self._fentry_nops(mod, text, [m.addr for m in mc if m.addr])
        mod.finalize = done

        # jump labels and static calls: known keys and calls, current state
        jump = read("__jump_table", jump_table)
        # jump_entry_set_init: bit 1 of a built entry is objtool's mark;
        # for the kernel it says "in the module's init text"
        init_text = [(addr[i], addr[i] + x.size) for i, x in enumerate(secs)
                     if i in addr and x.name.startswith(".init")]
        jump = [e._replace(init=any(lo <= e.code < hi for lo, hi in init_text)) for e in jump]
        scs = read(".static_call_sites", static_call_table)
        # a site whose key is a trampoline (the key is not exported) gets
        # the key the kernel's static_call_tramp_key table pairs with it
        scs = [s._replace(key=self._tramp_key(s.key)) for s in scs]
        desc = sym
        # jump_label_add_module: a key inside the module (its tracepoints'
        # keys, a DEFINE_STATIC_KEY of its own) gets the module's entries,
        # which take the state the key's initialiser gives it
        own: dict[int, bool] = {}
        for e in jump:
            if e.key in own or not (mod.data <= e.key < mod.data + mod.data_size):
                continue
            o = e.key - mod.data
            own[e.key] = int.from_bytes(data[o:o + 4], "little", signed=True) > 0
        mod.own_keys = sorted(own)
        for e in jump:
            if e.key in own:
                continue
            try:
                self.keys.key(e.key)
            except UnknownKeyError:
                raise UnknownKeyError(f"module {mod.name}: jump label at {desc(e.code)} uses "
                                      f"{desc(e.key)} [{e.key:#x}], which is not a static key "
                                      "of the kernel; nothing written") from None
        # static_call_add_module: likewise a key in the module (its
        # tracepoints' tp_func_* calls): its sites call the key's function
        calls: dict[int, StaticCall] = {}
        for s in scs:
            if s.key in calls or not (mod.data <= s.key < mod.data + mod.data_size):
                continue
            o = s.key - mod.data
            sck = next((n for n, a in mod.symbols.items()
                        if a == s.key and n.startswith("__SCK__")), f"__SCK__{s.key:#x}")
            cname = sck[len("__SCK__"):]
            if cname in self.calls.calls:
                cname = f"{mod.name}:{cname}"
            calls[s.key] = StaticCall(cname, s.key, mod.symbols.get("__SCT__" + sck[7:], 0),
                                      int.from_bytes(data[o:o + 8], "little"))
        mod.own_calls = list(calls.values())
        stand: dict[int, StaticCall] = {}
        for s in scs:
            if s.key in calls:
                continue
            try:
                self.calls.call_of_key(s.key)
            except UnknownCallError:
                raise UnknownCallError(f"module {mod.name}: static-call site at {desc(s.addr)} "
                                       f"uses {desc(s.key)} [{s.key:#x}], which is no static "
                                       "call's key in the kernel; nothing written") from None
        for e in jump:
            size, code = self.keys.module_code(e, text, tbase, own.get(e.key))
            text[e.code - tbase:e.code - tbase + size] = code
        if calls and getattr(self.calls, "thunks_initialized", False):
            # a CALL site of a module's own call goes to its function's
            # accounting thunk too (callthunks_translate_call_dest takes
            # module core text): a stand-in with the thunk's address makes
            # the code; the call keeps its function
            th = self.calls._callthunks()
            init = [(addr[i], addr[i] + x.size) for i, x in enumerate(secs)
                    if i in addr and x.name.startswith(".init")]
            for k, c in calls.items():
                f = c.func
                if not (tbase <= f < tend) or th.skip_addr(f) or \
                        any(lo <= f < hi for lo, hi in init):
                    continue
                pad = self._module_thunk(mod, text, f, th)
                if pad is not None:
                    stand[k] = StaticCall(c.name, c.key, c.tramp, pad)
        for s in scs:
            code = self.calls.module_code(s, text, tbase, stand.get(s.key, calls.get(s.key)))
            text[s.addr - tbase:s.addr - tbase + len(code)] = code
        return jump, scs

    def _tramp_key(self, addr: int) -> int:
        """``tramp_key_lookup``: the key of the exported trampoline at
        *addr* from the image's ``.static_call_tramp_key`` (pairs of s32
        offsets, each from its own field), else *addr* unchanged."""
        pairs = getattr(self, "_tramp_keys", None)
        if pairs is None:
            pairs = self._tramp_keys = {}
            syms = self.image.symbols
            lo = syms.get("__start_static_call_tramp_key")
            hi = syms.get("__stop_static_call_tramp_key")
            if lo is not None and hi is not None and 0 < hi - lo <= 1 << 20:
                import struct
                raw = self.machine.mem.read(lo, hi - lo)
                for i in range(0, len(raw) - 7, 8):
                    t, k = struct.unpack_from("<ii", raw, i)
                    pairs[lo + i + t] = lo + i + 4 + k
        return pairs.get(addr, addr)

    def _callthunks(self, mod: Module, text: bytearray, sites: list[int],
                    init: "list[tuple[int, int]]" = ()) -> int:
        """``callthunks_patch_module_calls`` on the staged text: returns the
        calls re-aimed at a thunk."""
        calls = self.calls
        if not getattr(calls, "thunks_initialized", False):
            return 0
        tbase, tend = mod.text, mod.text + mod.text_size
        th = calls._callthunks()                # the boot's model of the thunks
        size = th.size
        n = 0
        for addr in sites:
            if not tbase <= addr < tend or any(lo <= addr < hi for lo, hi in init):
                continue                        # not this module's core text
            o = addr - tbase
            if text[o] != 0xE8:
                continue                        # patched out, or not a direct call
            dest = addr + 5 + int.from_bytes(text[o + 1:o + 5], "little", signed=True)
            if th.skip_addr(dest):
                continue
            if any(lo <= dest < hi for lo, hi in init):
                continue                        # its init text: not core text
            if tbase <= dest < tend:
                pad = self._module_thunk(mod, text, dest, th)
                if pad is None:
                    continue
            elif th.in_core(dest):
                pad = calls.callthunks_translate_call_dest(dest)
                if pad == dest:
                    continue
            else:
                continue
            new = text_gen_insn(CALL_INSN_OPCODE, addr, pad)
            text[o:o + 5] = new
            mod.patched.append((addr, new))
            n += 1
        return n

    def _its_page(self, mod: Module) -> int:
        """``its_alloc`` for *mod*: a page of module execmem (the next of
        :attr:`its_pages` when given)."""
        if self.its_pages:
            a = self.execmem.alloc_at(self.its_pages.pop(0), PAGE_SIZE)
            page = a
        else:
            a = self.execmem.alloc(2 * PAGE_SIZE)          # one whole page inside
            page = -(-a // PAGE_SIZE) * PAGE_SIZE
        mod._its_allocs.append(a)
        mod.its_pages[page] = []
        return page

    def _free_its(self, mod: Module, *, invalidate: bool = True) -> None:
        for a in mod._its_allocs:
            self.execmem.free(a, invalidate=invalidate)
        mod._its_allocs.clear()
        mod.its_pages.clear()

    @staticmethod
    def _module_thunk(mod: Module, text: bytearray, dest: int, th) -> int | None:
        """The accounting thunk of the module's function at *dest*, in its
        padding in the staging copy (written there if the padding is
        NOPs): its address, or None ("Invalid padding area")."""
        size = th.size
        pad = dest - size
        if pad < mod.text:
            return None
        o = pad - mod.text
        want = th.code_at(pad)
        cur = bytes(text[o:o + size])
        if cur != want:
            if cur != b"\x90" * size:
                return None
            text[o:o + size] = want
            mod.patched.append((pad, want))
        return pad

    def _fentry_nops(self, mod: Module, text: bytearray, sites: list[int]) -> int:
        """``ftrace_module_init`` on the staged text: each site holding a
        CALL to the kernel's ``__fentry__`` becomes the ideal NOP5; a site
        holding anything else is left (the kernel's ftrace_bug)."""
        fentry = self.image.symbols.get("__fentry__")
        if fentry is None:
            return 0
        nop5 = bytes.fromhex("0f1f440000")
        n = 0
        for addr in sites:
            o = addr - mod.text
            if text[o:o + 5] == text_gen_insn(CALL_INSN_OPCODE, addr, fentry):
                text[o:o + 5] = nop5
                mod.patched.append((addr, nop5))
                n += 1
        return n

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
        self._free_its(m)                           # its_free_mod
        m.live = False
        del self.modules[m.name]
        self.unloads += 1

    def unload_all(self) -> None:
        for name in list(self.modules):
            self.unload(name)
