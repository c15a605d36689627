# SPDX-License-Identifier: GPL-2.0-only
"""The module loader: its state (module text in an
:class:`~textpoke._execmem.ExecMem`, a data allocator, the loaded
:class:`Module` objects), :meth:`ModuleLoader.load` in the kernel's order
and :meth:`ModuleLoader.unload` -- see :mod:`textpoke._module`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .._alternative._shadow import features_of
from .._core._machine import Capability
from .._execmem import ExecMem
from .._jump_label._keys import StaticKeys
from .._static_call._calls import StaticCalls
from ..images._elf import ET_REL, SHT_NOBITS, ElfFile
from ._coming import module_coming, tramp_key_pairs
from ._finalize import module_finalize
from ._link import ModuleError, ModuleFormatError, align, layout, placed, relocate, resolve_symbols
from ._staging import PAGE_SIZE, Staged, its_page_bytes
from ._types import Module

__all__ = ["ModuleLoader", "MODULE_DATA_BASE", "MODULE_DATA_SIZE"]

MODULE_DATA_BASE = 0x0580_0000
MODULE_DATA_SIZE = 0x20_0000


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
        #: the boot's x86_return_thunk when it is not the default one (a
        #: real kernel's call_depth_, srso_, its_return_thunk...)
        self.return_thunk: int | None = None
        #: the kernel booted uniprocessor: module LOCK prefixes become DS
        self.uniproc = False
        self._placed_data: dict[int, int] = {}      # data placed with at=: addr -> size
        self._tramp_keys: dict[int, int] | None = None

    # ------------------------------------------------------------ memory
    def _data_alloc(self, size: int, *, at: int | None = None) -> int:
        if at is not None:
            # data where a real kernel put it: outside our data range
            self.machine.require(Capability.DATA, "module data")
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
        if addr in self._placed_data:
            self.machine.mem.write(addr, bytes(self._placed_data.pop(addr)))
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

    def _finalize(self, secs, addr, mod: Module, text: bytearray, data: bytearray, data_off):
        # 4. module_finalize, 5. jump labels and static calls, on the staging buffers
        st = Staged(mod, secs, addr, text, data, data_off)
        sym = module_finalize(self, st)
        return module_coming(self, st, sym)

    def _tramp_key(self, addr: int) -> int:
        """``tramp_key_lookup``: the key of the exported trampoline at
        *addr* from the image's ``.static_call_tramp_key``, else *addr*
        unchanged."""
        if self._tramp_keys is None:
            self._tramp_keys = tramp_key_pairs(self.image.symbols, self.machine.mem)
        return self._tramp_keys.get(addr, addr)

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
