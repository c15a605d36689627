# SPDX-License-Identifier: GPL-2.0-only
"""Boot-time patching of a kernel-like image: ``alternative_instructions``.

The compiler and objtool leave tables in the image; at boot the kernel walks
them, in this order, before any secondary CPU runs:

1. ``int3_selftest`` -- an INT3 at a known address must behave as a CALL
   once a trap handler emulates it (the SMP batch relies on exactly that);
2. ``apply_retpolines`` -- calls and jumps to ``__x86_indirect_thunk_<reg>``
   become plain indirect branches (optionally LFENCE-guarded) when the CPU
   needs no retpoline; this runs before the alternatives because the thunks
   are themselves alternative sites;
3. ``apply_returns`` -- ``jmp __x86_return_thunk`` becomes ``ret; int3...``
   when no return thunk is wanted;
4. ``apply_alternatives`` -- every ``struct alt_instr`` in table order;
5. ``apply_seal_endbr`` -- ENDBRs listed in ``.ibt_endbr_seal`` become NOPs (IBT);
6. SMP locks: when a single CPU is present, LOCK prefixes listed in
   ``.smp_locks`` become harmless DS prefixes (``alternatives_smp_unlock``),
   and go back (``alternatives_smp_lock``) when the machine goes SMP;
7. ``alt_reloc_selftest`` -- a replacement holding a RIP-relative LEA and a
   CALL, copied to its site, must still reach both targets.

The rules were learnt from ``arch/x86/kernel/alternative.c``; the code and
comments here are our own.  Differences, all Python manners:

* Where the kernel would ``BUG()`` (a replacement longer than its site, a
  displacement that no longer fits, a direct-call site that is not
  ``call *disp(%rip)``, a retpoline through %rsp) we raise
  :class:`AlternativeError` -- and on a machine nothing has been written:
  the text passes are computed on a shadow copy of text and committed with
  ``text_poke_early`` only when all of them succeeded (a failure while
  committing rolls back what was written).
* Where the kernel would ``WARN`` and skip a site, the site is skipped and
  the reason is kept in its record.
* Self-test failures are recorded; ``strict=True`` (the default) turns them
  into :class:`SelfTestError`.  A failing INT3 self-test stops the boot
  before anything is patched, as the kernel's ``BUG_ON`` would.
* Writes whose bytes equal what is already there are skipped (the kernel
  writes them anyway; nothing can observe the difference).
* The kernel's global SMP-alternatives state (``smp_alt_modules``,
  ``uniproc_patched``) is an object its owner keeps,
  :class:`SmpAlternatives`; the boot hands back the one it filled in
  ``BootResult.smp``.
* ``alternatives_text_reserved(start, end)`` takes *end* inclusive, as
  kprobes passes it (``(addr, addr)`` for one byte): the kernel compares
  exclusively there, so its one-byte query never matches a LOCK prefix.

One pipeline: the passes are written once, over a text-buffer protocol
(``_ktext.TextBuffer``: read, write, decode, describe, symbols, data),
which a booting machine's shadow (``_shadow.Shadow``, committed with
``text_poke_early``), a module's staged text (the same shadow), a running
machine (``_livetext.LiveText``, a ``text_poke`` per site: the SMP-lock
switch) and a real kernel's flat memory (``_ktext.KernelText``) all
implement.  What differs between the bundled image and Debian's kernels is
data, the buffer's :class:`~textpoke.images._lines.KernelLine`
(``LINE_BUNDLED``, 6.12, 6.1): the passes and their order, the NOP rules,
the nested-site and fix-up rules, the feature numbering, and one rule of the
bundled image's own (``checked``: refuse or do right what the kernel would
silently get wrong in a relocation).  ENDBR sealing, call-depth thunks, ITS
thunks and paravirt run wherever the line has them; the bundled image is
built with ``-fcf-protection=none`` and has no such tables.  Not modelled:
FineIBT/kCFI and paravirt capability setting; the static-call
re-initialisation ``apply_returns`` asks for is the static-call client's.
In the kernel ``X86_FEATURE_UP`` comes from CPU setup, not from here: the
feature set is exactly what the caller passes (plus ``always``).

One private module per concern: ``_code`` (opcodes, encoders, the
memoised decoder), ``_reloc`` (relocation of replacement code, NOP
merging), ``_thunks`` (retpolines, returns, ENDBR sealing), ``_apply``
(``.altinstructions``), ``_callthunks`` (call-depth thunks), ``_kparavirt``
(6.1's ``.parainstructions``), ``_smp_locks`` (LOCK <-> DS and the SMP
state), ``_passes`` (the text passes by the line's names), ``_boot`` (the
bundled image's sequence with its self-tests, ``_selftest``), ``_records``
(results, counts, the debug log, errors), and the text buffers: ``_ktext``
(the protocol, ``KernelText``, ``CpuCaps``), ``_shadow``, ``_livetext``.
A real kernel's boot in ``start_kernel``'s order, with the clients' init
passes, is ``textpoke.kernel.boot_kernel``, one layer up; its early-boot
state model (``_kearly``), table bounds (``_kboot``), runtime constants
(``_runtime_const``) and the comparison with a QEMU reference (``_kdiff``)
are here.
"""

from ._apply import apply_alternatives
from ._boot import DEFAULT_FEATURES, alternative_instructions
from ._records import (DA_ALL, DA_ALT, DA_ENDBR, DA_NAMES, DA_RET, DA_RETPOLINE, DA_SMP,
                       SITE_ACTIONS, AlternativeError, AltSitePatch, BootResult, DebugRecord,
                       SelfTest, SelfTestError, SitePatch, parse_debug_alternative)
from ._reloc import add_nop, optimize_nops, text_poke_apply_relocation
from ._selftest import alt_reloc_selftest, int3_selftest
from ._smp_locks import (SmpAlternatives, alternatives_enable_smp, alternatives_smp_lock,
                         alternatives_smp_module_add, alternatives_smp_module_del,
                         alternatives_smp_unlock, alternatives_text_reserved)
from ._thunks import apply_retpolines, apply_returns, apply_seal_endbr

__all__ = [
    # kernel entry points
    "DEFAULT_FEATURES", "alternative_instructions", "apply_alternatives", "apply_retpolines",
    "apply_returns", "apply_seal_endbr", "alternatives_smp_lock", "alternatives_smp_unlock",
    "alternatives_smp_module_add", "alternatives_smp_module_del", "alternatives_enable_smp",
    "alternatives_text_reserved", "int3_selftest", "alt_reloc_selftest",
    "text_poke_apply_relocation", "optimize_nops", "add_nop",
    # state
    "SmpAlternatives",
    # results
    "AltSitePatch", "SitePatch", "SITE_ACTIONS", "SelfTest", "DebugRecord", "BootResult",
    # errors
    "AlternativeError", "SelfTestError",
    # debug-alternative mask bits
    "DA_ALL", "DA_ALT", "DA_RET", "DA_RETPOLINE", "DA_ENDBR", "DA_SMP", "DA_NAMES",
    "parse_debug_alternative",
]
