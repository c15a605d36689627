# SPDX-License-Identifier: GPL-2.0-only
"""A module's jump labels and static calls, made for the kernel's keys and
calls as they stand (step 5 of :meth:`~textpoke._module.ModuleLoader.load`:
``jump_label_add_module``, ``static_call_add_module``): every
``__jump_table`` entry and ``.static_call_sites`` site must name a key or
call the kernel knows, or one the module defines in its own data; each gets
the code of the key's or call's current state in the staged text.  Nothing
is registered here: the loader does that once the text is placed."""

from __future__ import annotations

import struct

from .._alternative._shadow import Symbols
from .._jump_label._keys import UnknownKeyError
from .._static_call._calls import StaticCall, UnknownCallError
from ..images._tables import jump_table, static_call_table
from ._finalize import module_thunk
from ._staging import Staged

__all__ = ["module_coming", "tramp_key_pairs"]


def module_coming(loader, st: Staged, sym: Symbols) -> tuple[list, list]:
    """Check *st*'s jump entries and static-call sites against *loader*'s
    keys and calls and write their code into the staged text; record the
    keys and calls the module defines in ``mod.own_keys`` /
    ``mod.own_calls``.  Returns (jump entries, static-call sites) for the
    loader to register.  *sym* names addresses in refusals."""
    mod, text, data, read = st.mod, st.text, st.data, st.read
    tbase, tend = mod.text, mod.text + mod.text_size
    # jump labels and static calls: known keys and calls, current state
    jump = read("__jump_table", jump_table)
    # jump_entry_set_init: bit 1 of a built entry is objtool's mark;
    # for the kernel it says "in the module's init text"
    jump = [e._replace(init=any(lo <= e.code < hi for lo, hi in st.init)) for e in jump]
    scs = read(".static_call_sites", static_call_table)
    # a site whose key is a trampoline (the key is not exported) gets
    # the key the kernel's static_call_tramp_key table pairs with it
    scs = [s._replace(key=loader._tramp_key(s.key)) for s in scs]
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
    _known(jump, own, loader.keys.key, UnknownKeyError,
           lambda e: f"module {mod.name}: jump label at {desc(e.code)} uses {desc(e.key)} "
                     f"[{e.key:#x}], which is not a static key of the kernel; nothing written")
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
        if cname in loader.calls.calls:
            cname = f"{mod.name}:{cname}"
        calls[s.key] = StaticCall(cname, s.key, mod.symbols.get("__SCT__" + sck[7:], 0),
                                  int.from_bytes(data[o:o + 8], "little"))
    mod.own_calls = list(calls.values())
    stand: dict[int, StaticCall] = {}
    _known(scs, calls, loader.calls.call_of_key, UnknownCallError,
           lambda s: f"module {mod.name}: static-call site at {desc(s.addr)} uses "
                     f"{desc(s.key)} [{s.key:#x}], which is no static call's key in the "
                     "kernel; nothing written")
    for e in jump:
        size, code = loader.keys.module_code(e, text, tbase, own.get(e.key))
        text[e.code - tbase:e.code - tbase + size] = code
    if calls and getattr(loader.calls, "thunks_initialized", False):
        # a CALL site of a module's own call goes to its function's
        # accounting thunk too (callthunks_translate_call_dest takes
        # module core text): a stand-in with the thunk's address makes
        # the code; the call keeps its function
        th = loader.calls._callthunks()
        for k, c in calls.items():
            f = c.func
            if not (tbase <= f < tend) or th.skip_addr(f) or \
                    any(lo <= f < hi for lo, hi in st.init):
                continue
            pad = module_thunk(mod, text, f, th)
            if pad is not None:
                stand[k] = StaticCall(c.name, c.key, c.tramp, pad)
    for s in scs:
        code = loader.calls.module_code(s, text, tbase, stand.get(s.key, calls.get(s.key)))
        text[s.addr - tbase:s.addr - tbase + len(code)] = code
    return jump, scs


def _known(entries, own, lookup, error: type[Exception], why) -> None:
    """Every entry's key is the module's own (in *own*) or one *lookup*
    knows; else *error* with the sentence ``why(entry)``."""
    for e in entries:
        if e.key in own:
            continue
        try:
            lookup(e.key)
        except error:
            raise error(why(e)) from None


def tramp_key_pairs(symbols, mem) -> dict[int, int]:
    """The image's ``.static_call_tramp_key`` (pairs of s32 offsets, each
    from its own field) as {exported trampoline: its key}, read from *mem*
    (``tramp_key_lookup``'s table)."""
    pairs: dict[int, int] = {}
    lo = symbols.get("__start_static_call_tramp_key")
    hi = symbols.get("__stop_static_call_tramp_key")
    if lo is not None and hi is not None and 0 < hi - lo <= 1 << 20:
        raw = mem.read(lo, hi - lo)
        for i in range(0, len(raw) - 7, 8):
            t, k = struct.unpack_from("<ii", raw, i)
            pairs[lo + i + t] = lo + i + 4 + k
    return pairs
