# SPDX-License-Identifier: GPL-2.0-only
"""``module_finalize`` on a module's staged text (step 4 of
:meth:`~textpoke._module.ModuleLoader.load`): the module's own
``.retpoline_sites``, ``.return_sites`` and ``.altinstructions`` through the
boot's passes of :mod:`textpoke._alternative` on a shadow of the staging
buffer, its calls re-aimed at call-depth thunks (``.call_sites``), its ENDBRs
sealed, its LOCK prefixes made DS after a uniprocessor boot, its fentry
calls made NOP5.  The text is not executable yet: nothing but the staging
buffer changes (and, for a call into the kernel, the kernel's padding)."""

from __future__ import annotations

from .._alternative._apply import alt_instructions_pass
from .._alternative._kpasses import F_INDIRECT_THUNK_ITS, BootOptions
from .._alternative._records import PassLog
from .._alternative._shadow import DebugLog, Symbols
from .._alternative._thunks import (ItsThunks, retpolines_pass, returns, returns_pass,
                                    seal_endbr, shadow_pass)
from .._core._insn import CALL_INSN_OPCODE, text_gen_insn
from ..images._tables import (RetpolineSite, ReturnSite, alt_instr_table, mcount_sites,
                              s32_sites)
from ._link import ModuleError
from ._staging import ModuleIts, ModuleShadow, Staged
from ._types import Module

__all__ = ["module_finalize", "callthunks", "module_thunk", "fentry_nops"]


def module_finalize(loader, st: Staged) -> Symbols:
    """Patch *st*'s staged text for *loader*'s kernel (its features, return
    thunk, call-depth thunks, IBT, uniprocessor state); record what was
    written in ``mod.patched`` and the count per table in ``mod.finalize``.
    Returns the symbols (the image's and the module's) sites are named by."""
    mod, secs, addr, text, data = st.mod, st.secs, st.addr, st.text, st.data
    tbase = mod.text
    read = st.read

    line = getattr(loader.image, "line", None)
    # struct alt_instr as the kernel line has it (6.1: 12 bytes, u16 cpuid)
    alts = read(".altinstructions", alt_instr_table,
                getattr(line, "alt_layout", "ft_flags"))
    retp = read(".retpoline_sites", s32_sites, RetpolineSite, ".retpoline_sites")
    rets = read(".return_sites", s32_sites, ReturnSite, ".return_sites")

    syms = dict(loader.image.symbols)
    syms.update(mod.symbols)
    sizes = dict(getattr(loader.image, "sizes", {}) or {})
    sizes.update(mod.sizes)
    sym = Symbols(syms, sizes)
    shadow = ModuleShadow(loader.core, (tbase, text), (mod.data, data))
    if line is not None:
        shadow.line = line          # a real kernel's feature numbering and rules
    dbg = DebugLog(0)
    done = {}
    rt = loader.return_thunk
    if rt:
        # the boot's x86_return_thunk (a real kernel's: call_depth_,
        # srso_, its_return_thunk...), not the default one
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
            made.append(ModuleIts(tb, lambda: loader._its_page(mod))
                        if caps.has(F_INDIRECT_THUNK_ITS) else ItsThunks(tb))
            return made[-1]
        recs = retpolines_pass(shadow, sites, feats, sym, dbg, its=its)
        for a, reg in (t for m in made for t in m.allocated):
            mod.its_pages[a & ~0xFFF].append((a, reg))
        return recs

    for label, fn, items in ((".retpoline_sites", retp_pass, retp),
                             (".return_sites", ret_pass, rets),
                             (".altinstructions", alt_instructions_pass, alts)):
        recs = fn(shadow, items, loader.feats, sym, dbg) if items else []
        patched = [(r.instr, r.final) if label == ".altinstructions" else (r.addr, r.new)
                   for r in recs if getattr(r, "written", None) or
                   getattr(r, "action", "") == "patched"]
        done[label] = len(patched)
        mod.patched.extend(patched)
    calls = read(".call_sites", s32_sites, RetpolineSite, ".call_sites")
    if (calls or alts) and getattr(loader.calls, "thunks_initialized", False):
        # only calls from, and thunks for, the module's core text: its
        # init text is freed after init (within_coretext)
        done[".call_sites"] = callthunks(loader.calls, mod, text, [c.addr for c in calls] +
                                         [a.instr for a in alts], st.init)
    seal = read(".ibt_endbr_seal", s32_sites, RetpolineSite, ".ibt_endbr_seal")
    if seal and loader.ibt:
        # the boot's own .ibt_endbr_seal pass, on the staging copy
        recs: list = []
        seal_endbr(shadow, [e.addr for e in seal],
                   PassLog(len(seal), shadow.describe, dbg, recs))
        sealed = [(r.addr, r.new) for r in recs if r.action == "patched"]
        done[".ibt_endbr_seal"] = len(sealed)
        mod.patched.extend(sealed)
    # alternatives_smp_module_add: after a uniprocessor boot the
    # module's LOCK prefixes in its .text become DS, as the kernel's did
    if loader.uniproc:
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
        done["__mcount_loc"] = fentry_nops(loader.image, mod, text, [m.addr for m in mc if m.addr])
    mod.finalize = done
    return sym


def callthunks(calls, mod: Module, text: bytearray, sites: list[int],
               init: "list[tuple[int, int]]" = ()) -> int:
    """``callthunks_patch_module_calls`` on the staged text: each direct
    CALL at one of *sites* in the module's core text (not in *init*) whose
    destination is a function of the module or of core kernel text is
    aimed at the destination's accounting thunk (*calls*: the kernel's
    :class:`StaticCalls`, which hold the boot's model of the thunks).
    Returns the calls re-aimed."""
    if not getattr(calls, "thunks_initialized", False):
        return 0
    tbase, tend = mod.text, mod.text + mod.text_size
    th = calls._callthunks()                # the boot's model of the thunks
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
            pad = module_thunk(mod, text, dest, th)
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


def module_thunk(mod: Module, text: bytearray, dest: int, th) -> int | None:
    """The accounting thunk of the module's function at *dest*, in its
    padding in the staging copy (written there if the padding is NOPs):
    its address, or None ("Invalid padding area")."""
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


def fentry_nops(image, mod: Module, text: bytearray, sites: list[int]) -> int:
    """``ftrace_module_init`` on the staged text: each site holding a CALL
    to *image*'s ``__fentry__`` becomes the ideal NOP5; a site holding
    anything else is left (the kernel's ftrace_bug)."""
    fentry = image.symbols.get("__fentry__")
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
