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

By concern: :mod:`._link` (steps 1-3 on staging buffers), :mod:`._staging`
(the staged sections, their tables, the shadow the passes see, ITS pages),
:mod:`._finalize` (step 4), :mod:`._coming` (step 5), :mod:`._loader` (the
state, steps 6 and unload), :mod:`._types` (:class:`Module`).

Rules learnt from ``arch/x86/kernel/module.c``, ``kernel/module/main.c``,
``kernel/jump_label.c`` and ``kernel/static_call_inline.c`` (Linux 6.12);
the code is our own.
"""

from ._link import (ModuleError, ModuleFormatError, ModuleRelocationError,
                    UnknownSymbolError)
from ._loader import MODULE_DATA_BASE, MODULE_DATA_SIZE, ModuleLoader
from ._types import Module

__all__ = ["ModuleLoader", "Module", "MODULE_DATA_BASE", "MODULE_DATA_SIZE", "ModuleError",
           "ModuleFormatError", "ModuleRelocationError", "UnknownSymbolError"]
