# SPDX-License-Identifier: GPL-2.0-only
"""``static_call_init``: every inline site in ``.static_call_sites`` is set
to what its key's current function asks for.

Site kinds (tail call or not) times "function or NULL" give CALL, NOP5,
JMP or RET; a JMP/RET site that is a conditional tail call (Jcc.d32) stays
a Jcc to the function (or to ``__static_call_return`` when NULL).  A call
to ``__static_call_return0`` is written as ``2e 2e 2e 31 c0`` (xor
%eax,%eax).  Each site is first validated: a non-tail site must hold a
CALL, NOP5 or that xor; a tail site a JMP, RET or Jcc.d32 -- else the
kernel BUG()s.  Rules learnt from ``kernel/static_call_inline.c`` and
``arch/x86/kernel/static_call.c`` (Linux 6.12); the code is our own.

At ``static_call_init`` time (``setup_arch``), the mitigations are not yet
chosen, so RET-type sites become ``ret; int3 x4`` whatever the CPU.
"""

from __future__ import annotations

from operator import attrgetter

from .._alternative._code import rel32
from .._alternative._kpasses import CALL, INT3, JMP32, RET, TableStats
from .._alternative._ktext import KernelBootError, KernelText
from .._core._insn import x86_nops
from ..images._symbols import with_prefix
from ..images._tables import StaticCallSite

__all__ = ["static_call_init", "static_call_sync", "sc_transform"]

_XOR5RAX = b"\x2e\x2e\x2e\x31\xc0"
_RETINSN = bytes([RET, INT3, INT3, INT3, INT3])
_NOP5 = x86_nops[5]


def _validate(kt: KernelText, addr: int, tail: bool) -> None:
    cur = kt.read(addr, 6)
    if tail:
        if cur[0] in (JMP32, RET) or (cur[0] == 0x0F and cur[1] & 0xF0 == 0x80):
            return
    elif cur[0] == CALL or cur[:5] in (_NOP5, _XOR5RAX):
        return
    raise KernelBootError(f"unexpected static_call insn opcode {cur[0]:#x} at "
                          f"{kt.describe(addr)}")


def sc_transform(kt: KernelText, addr: int, func: int, tail: bool, *,
                 rethunk_at: bool = False, rethunk: bool = False,
                 return_thunk: int | None = None) -> bytes:
    """The bytes ``__static_call_transform`` writes at an inline site."""
    kind = 2 * tail + (func == 0)
    cur = kt.read(addr, 2)
    jcc = cur[0] == 0x0F and cur[1] & 0xF0 == 0x80
    if kind >= 2 and jcc:
        dest = func
        if not func:
            dest = return_thunk if rethunk and return_thunk else kt.sym("__static_call_return")
        return bytes([0x0F, cur[1]]) + ((dest - (addr + 6)) & 0xFFFFFFFF).to_bytes(4, "little")
    if kind == 0:
        if func == kt.opt("__static_call_return0"):
            return _XOR5RAX
        return rel32(CALL, addr, func)
    if kind == 1:
        return _NOP5
    if kind == 2:
        return rel32(JMP32, addr, func)
    if rethunk_at and return_thunk:
        return rel32(JMP32, addr, return_thunk)
    return _RETINSN


def static_call_init(kt: KernelText, sites: list[StaticCallSite]) -> TableStats:
    """Every site, with the function its key holds in the image's data."""
    st = TableStats(entries=len(sites))
    for s in sites:
        _validate(kt, s.addr, s.tail)
        func = kt.data_u64(s.key)
        new = sc_transform(kt, s.addr, func, s.tail)
        st.applied += 1
        st.changed += kt.write(".static_call_sites", s.addr, new)
    return st


def static_call_sync(kt: KernelText, sites: list[StaticCallSite],
                     text_ranges: list[tuple[int, int]]) -> TableStats:
    """What ``static_call_update`` calls made between boot and the
    snapshot in ``kt.data`` did: sites inside kernel text (core and init;
    ``.exit.text`` is never updated) follow their key's current function,
    and so do the trampolines (``__SCT__x`` for key ``__SCK__x``)."""
    st = TableStats(entries=len(sites))
    for s in kt.synced(sites, attrgetter("addr"), text_ranges):
        func = kt.data_u64(s.key)
        new = sc_transform(kt, s.addr, func, s.tail)
        st.applied += 1
        st.changed += kt.write(".static_call_sites", s.addr, new)
    if kt.data is None:
        return st
    for name, tramp in with_prefix(kt.symbols, "__SCT__"):
        key = kt.symbols.get("__SCK__" + name[7:])
        if key is None:
            continue
        if kt.read(tramp + 5, 3) != b"\x0f\xb9\xcc":
            continue
        func = kt.data_u64(key)
        new = rel32(JMP32, tramp, func) if func else _RETINSN
        st.changed += kt.write(".static_call_sites(tramp)", tramp, new)
    return st
