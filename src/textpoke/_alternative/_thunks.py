# SPDX-License-Identifier: GPL-2.0-only
"""The thunk passes, one implementation for every text buffer (a real
kernel's flat memory, the bundled image's shadow, a module's staged text):

* ``apply_retpolines`` -- calls and jumps through
  ``__x86_indirect_thunk_<reg>`` become plain indirect branches (optionally
  LFENCE-guarded) when the CPU needs no retpoline, call-depth thunks with
  ``call_depth``, ITS thunks for branches that would end in the lower half
  of a cache line (``indirect_thunk_its``);
* ``apply_returns`` -- ``jmp __x86_return_thunk`` becomes ``ret; int3...``
  or a jump to the return thunk in use (``x86_return_thunk``; with ITS's
  ``its_return_thunk`` only where bit 5 of the address is clear), and a
  static-call trampoline in the table is rewritten as the RET type;
* ``apply_seal_endbr`` -- ENDBR64/ENDBR32 listed in ``.ibt_endbr_seal``
  become the 4-byte NOP ``66 0f 1f 00``.

The CPU features a pass tests are named (:class:`~._ktext.CpuCaps` reads
them under the buffer's kernel line: a feature the line does not number,
e.g. ``call_depth`` on the bundled image, is absent).  Rules learnt from
``arch/x86/kernel/alternative.c`` and ``static_call.c``; the code is our
own.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .._core import TextPoke
from ..images._tables import RetpolineSite, ReturnSite
from ._code import (CALL, INT3, JMP32, LFENCE, NOP1, RET, FastInsn, decode_site, emit_indirect,
                    rel32)
from ._kpasses import (ENDBR64, ENDBR_POISON, F_CALL_DEPTH, F_INDIRECT_THUNK_ITS, F_RETHUNK,
                       F_RETPOLINE, F_RETPOLINE_LFENCE, ITS_THUNK_SIZE, RETPOLINE_THUNK_SIZE,
                       TRAMP_UD, BootOptions)
from ._ktext import CpuCaps, TextBuffer, caps_of
from ._records import (DA_ENDBR, DA_RET, DA_RETPOLINE, AlternativeError, DebugLog, PassLog,
                       SitePatch)
from ._reloc import nops_pass
from ._shadow import Shadow, SymbolSource, Symbols, run_pass, symbols_of

__all__ = ["ItsThunks", "retpolines", "returns", "seal_endbr", "cpu_wants_rethunk_at", "return_thunk_at",
           "apply_retpolines", "apply_returns", "apply_seal_endbr", "retpolines_pass",
           "returns_pass", "shadow_pass"]

_REG_RSP = 4


class ItsThunks:
    """``its_allocate_thunk()``: ``jmp *%reg; int3`` thunks handed out in
    the upper half of 64-byte lines of pages from *pages* (in order); with
    no pages, the static ``__x86_indirect_its_thunk_array``."""

    def __init__(self, tb: TextBuffer, pages: Sequence[int] = ()) -> None:
        self.tb = tb
        self.pages = list(pages)
        self.page: int | None = None
        self.off = 0
        self.allocated: list[tuple[int, int]] = []      # (address, reg)

    def get(self, reg: int) -> int:
        size = 3 + reg // 8
        if self.page is None or self.off + size - 1 >= 4096:
            if not self.pages:
                return self.tb.sym("__x86_indirect_its_thunk_array") + ITS_THUNK_SIZE * reg
            self.page = self.pages.pop(0)
            self.off = 32
        if (self.off + size - 1) % 64 < 32:
            self.off = ((self.off - 1) | 0x3F) + 33
        a = self.page + self.off
        self.off += size
        self.allocated.append((a, reg))
        return a


def _thunk(tb: TextBuffer, name: str, table: str) -> int:
    """The address of thunk *name*, which an image with *table* must have."""
    addr = tb.opt(name)
    if addr is None:
        raise AlternativeError(f"image has {table} but no {name}", table=table)
    return addr


def _raw(tb: TextBuffer, log: PassLog, addr: int, n: int) -> bytes:
    """The site's bytes, read only when records are kept."""
    return tb.read(addr, n) if log.records is not None else b""


# -------------------------------------------------------------- retpolines
def _emit_trampoline(addr: int, ins: FastInsn, call_dest: int, jmp_dest: int) -> bytes | None:
    """The site as a direct CALL/JMP/Jcc.d32 to a thunk (call-depth or ITS)."""
    op = ins.op1
    if op == 0x0F:
        out = bytes([0x0F, ins.op2]) + ((jmp_dest - (addr + 6)) & 0xFFFFFFFF).to_bytes(4, "little")
        return out if len(out) == ins.length else None
    pre = b"\x2e" if ins.length == 6 else b""
    if op == CALL:
        return pre + rel32(CALL, addr + len(pre), call_dest)
    if op == JMP32:
        return pre + rel32(JMP32, addr + len(pre), jmp_dest)
    return None


def _emit_indirect_site(addr: int, ins: FastInsn, reg: int, lfence: bool,
                        its: ItsThunks | None) -> bytes:
    """``[J!cc over; ][lfence; ]call/jmp *%reg[; int3]`` padded with NOPs,
    or a branch to an ITS thunk where the indirect branch would end in the
    lower half of a cache line."""
    out = bytearray()
    op = ins.op1
    if op == 0x0F:
        # Jcc thunk  ->  J!cc.d8 over the rest; [lfence]; jmp *%reg
        out += bytes([0x70 + ((ins.op2 & 0xF) ^ 1), ins.length - 2])
        op = JMP32
    if lfence:
        out += LFENCE
    if its is not None and not (addr + len(out) + 1 + reg // 8) & 0x20:
        th = its.get(reg)
        return _emit_trampoline(addr, ins, th, th) or b""
    out += emit_indirect(op, reg)
    if op == JMP32 and len(out) < ins.length:
        out.append(INT3)                  # straight-line speculation stop
    while len(out) < ins.length:
        out.append(NOP1)
    return bytes(out)


def retpolines(tb: TextBuffer, sites: Sequence[int], caps: CpuCaps, opts: BootOptions,
               its: ItsThunks | None, log: PassLog) -> None:
    """The ``.retpoline_sites`` pass over *tb*."""
    if not sites:
        return
    array = _thunk(tb, "__x86_indirect_thunk_array", ".retpoline_sites")
    call_arr = tb.opt("__x86_indirect_call_thunk_array")
    jump_arr = tb.opt("__x86_indirect_jump_thunk_array")
    retpoline = caps.has(F_RETPOLINE)
    lfence = caps.has(F_RETPOLINE_LFENCE)
    depth = caps.has(F_CALL_DEPTH)
    its_on = its if caps.has(F_INDIRECT_THUNK_ITS) else None
    dbg = log.dbg
    debug = bool(dbg.mask & DA_RETPOLINE)
    for i, addr in enumerate(sites):
        ins = tb.decode(addr)
        if ins is None:
            log.leave("retpoline", addr, _raw(tb, log, addr, 1), "skipped",
                      "cannot decode the site", "undecodable")
            continue
        op = ins.op1
        if not (op == CALL or op == JMP32 or (op == 0x0F and 0x80 <= ins.op2 <= 0x8F)):
            why = ("Jcc.d8 to a thunk (FineIBT only)" if 0x70 <= op <= 0x7F else
                   f"not a CALL/JMP/Jcc.d32: {ins.text()!r}")
            log.leave("retpoline", addr, _raw(tb, log, addr, ins.length), "skipped", why,
                      "not CALL/JMP/Jcc.d32", ins.target)
            continue
        target = ins.target
        off = target - array
        if off % RETPOLINE_THUNK_SIZE or not 0 <= off < 16 * RETPOLINE_THUNK_SIZE:
            log.leave("retpoline", addr, _raw(tb, log, addr, ins.length), "skipped",
                      f"target {tb.describe(target)} is not a retpoline thunk",
                      "not a retpoline thunk", target)
            continue
        reg = off // RETPOLINE_THUNK_SIZE
        if reg == _REG_RSP:
            raise AlternativeError(f".retpoline_sites entry {i} at {addr:#x} "
                                   f"({tb.describe(addr)}): an indirect branch through %rsp",
                                   addr=addr, table=".retpoline_sites", index=i)
        if debug:
            dbg(DA_RETPOLINE, f"retpoline at: {tb.describe(addr)} ({addr:#x}) len: "
                              f"{ins.length} to: {tb.describe(target)}", addr)
        if retpoline and not lfence:
            if not depth or call_arr is None or jump_arr is None:
                log.leave("retpoline", addr, _raw(tb, log, addr, ins.length), "kept",
                          "retpoline wanted: the call through the thunk stays", None, target)
                continue
            new = _emit_trampoline(addr, ins, call_arr + RETPOLINE_THUNK_SIZE * reg,
                                   jump_arr + RETPOLINE_THUNK_SIZE * reg)
        else:
            new = _emit_indirect_site(addr, ins, reg, lfence, its_on)
        if not new or len(new) != ins.length:
            log.leave("retpoline", addr, _raw(tb, log, addr, ins.length), "kept",
                      f"the rewrite does not fit the {ins.length}-byte site", "does not fit",
                      target)
            continue
        b = bytearray(new)
        nops_pass(b, len(b), tb.line)
        new = bytes(b)
        old = tb.read(addr, ins.length) if debug or log.records is not None else b""
        if debug:
            dbg.dump(DA_RETPOLINE, addr, "orig", old)
            dbg.dump(DA_RETPOLINE, addr, "repl", new)
        log.done("retpoline", addr, old, new, tb.write(".retpoline_sites", addr, new), target)


# ----------------------------------------------------------------- returns
def _return_thunk(tb: TextBuffer, opts: BootOptions) -> int:
    rt = opts.return_thunk
    return rt if isinstance(rt, int) else tb.sym(rt)


def return_thunk_at(thunk: int | None, its_thunk: int | None, addr: int) -> int | None:
    """Where a return at *addr* goes at run time when the boot chose
    *thunk* (None: plain returns): the thunk, except ITS's where bit 5 of
    the address is set -- the clients' side of :func:`cpu_wants_rethunk_at`."""
    if thunk is None or (thunk == its_thunk and addr & 0x20):
        return None
    return thunk


def cpu_wants_rethunk_at(tb: TextBuffer, caps: CpuCaps, opts: BootOptions, addr: int) -> bool:
    """Whether a return at *addr* jumps to the return thunk: with
    ``rethunk``, except where ITS's return thunk is in use and bit 5 of the
    address is set."""
    if not caps.has(F_RETHUNK):
        return False
    if _return_thunk(tb, opts) != tb.opt("its_return_thunk"):
        return True
    return not addr & 0x20


def returns(tb: TextBuffer, sites: Sequence[int], caps: CpuCaps, opts: BootOptions,
            log: PassLog) -> None:
    """The ``.return_sites`` pass over *tb*."""
    if not sites:
        return
    rt_sym = _thunk(tb, "__x86_return_thunk", ".return_sites")
    thunk = _return_thunk(tb, opts)
    rethunk = caps.has(F_RETHUNK)
    its_rt = thunk == tb.opt("its_return_thunk")
    dbg, st, records = log.dbg, log.stats, log.records
    debug = bool(dbg.mask & DA_RET)
    ret_cache: dict[int, bytes] = {}
    for addr in sites:
        head = tb.peek(addr, 15)
        ins = None
        if head[:1] == b"\xe9" and len(head) >= 5:
            # jmp rel32: nearly every site, read without the decoder
            n, op = 5, JMP32
            dest = addr + 5 + int.from_bytes(head[1:5], "little", signed=True)
        else:
            ins = decode_site(head, 0, addr) if head else None
            if ins is None:
                log.leave("return", addr, bytes(head[:1]), "skipped", "cannot decode the site",
                          "undecodable")
                continue
            n, op = ins.length, ins.op1
            dest = ins.target if op == JMP32 else None
        if head[5:8] == TRAMP_UD:
            # __static_call_fixup: a static-call trampoline is rewritten as
            # the RET type
            if op == RET or dest == rt_sym:
                if cpu_wants_rethunk_at(tb, caps, opts, addr):
                    code = rel32(JMP32, addr, thunk)
                else:
                    code = bytes([RET, INT3, INT3, INT3, INT3])
                tb.write(".return_sites", addr, code)
            log.leave("return", addr, bytes(head[:n]), "skipped", "a static-call trampoline",
                      "static_call trampoline", dest)
            continue
        if dest != rt_sym:
            # the kernel warns "missing return thunk" and leaves the site
            text = ins.text() if ins is not None else f"jmp {dest:#x}"
            log.leave("return", addr, bytes(head[:n]), "skipped",
                      f"missing return thunk: {text!r}", "missing return thunk", dest)
            continue
        if debug:
            dbg(DA_RET, f"return thunk at: {tb.describe(addr)} ({addr:#x}) len: {n} to: "
                        f"{tb.describe(dest)}", addr)
        if rethunk and (not its_rt or not addr & 0x20):
            new = rel32(JMP32, addr, thunk) + bytes([INT3]) * (n - 5)
        else:
            new = ret_cache.get(n)
            if new is None:
                new = ret_cache[n] = bytes([RET]) + bytes([INT3]) * (n - 1)
        if debug:
            dbg.dump(DA_RET, addr, "orig", bytes(head[:n]))
            dbg.dump(DA_RET, addr, "repl", new)
        written = tb.write(".return_sites", addr, new)
        if records is None:             # ~60,000 sites on a real kernel: only counted
            st.applied += 1
            st.changed += written
        else:
            log.done("return", addr, bytes(head[:n]), new, written, dest,
                     "" if written or not rethunk else "the return thunk is wanted")


# -------------------------------------------------------------- ENDBR seal
def seal_endbr(tb: TextBuffer, sites: Sequence[int], log: PassLog) -> None:
    """The ``.ibt_endbr_seal`` pass over *tb*: each listed ENDBR64/ENDBR32
    (or an already sealed one) becomes ``66 0f 1f 00``; anything else is
    left."""
    poison = ENDBR_POISON.to_bytes(4, "little")
    dbg, st, records = log.dbg, log.stats, log.records
    debug = bool(dbg.mask & DA_ENDBR)
    for addr in sites:
        cur = bytes(tb.peek(addr, 4))
        v = int.from_bytes(cur, "little")
        if len(cur) < 4 or (v != ENDBR_POISON and (v & ~0x01000000) != ENDBR64):
            log.leave("endbr", addr, cur, "skipped", "not an ENDBR", "not ENDBR")
            continue
        if debug:
            dbg(DA_ENDBR, f"ENDBR at: {tb.describe(addr)} ({addr:#x})", addr)
        written = tb.write(".ibt_endbr_seal", addr, poison)
        if records is None:             # ~12,000 sites on a real kernel: only counted
            st.applied += 1
            st.changed += written
        else:
            log.done("endbr", addr, cur, poison, written)


# -------------------------------------------------- on a machine's shadow
def shadow_pass(run, shadow: Shadow, items: Sequence, feats: frozenset[int], sym: Symbols,
                dbg: DebugLog) -> list:
    """Run pass *run* (``run(tb, items, caps, log)``) on a machine's
    *shadow* named by *sym*, for a CPU with feature numbers *feats*; its
    records, one per site."""
    out: list = []
    shadow.symbols = sym
    run(shadow, items, caps_of(feats, shadow.line), PassLog(len(items), shadow.describe, dbg, out))
    return out


def retpolines_pass(shadow: Shadow, sites: Sequence[RetpolineSite], feats: frozenset[int],
                    sym: Symbols, dbg: DebugLog, its=None) -> list[SitePatch]:
    """The ``.retpoline_sites`` pass on a machine's *shadow*; *its*, given
    the buffer and the CPU's caps, makes where ITS thunks come from (a
    module's own pages; default: the image's static array)."""
    return shadow_pass(lambda tb, addrs, caps, log: retpolines(
        tb, addrs, caps, BootOptions(), ItsThunks(tb) if its is None else its(tb, caps), log),
        shadow, [s.addr for s in sites], feats, sym, dbg)


def returns_pass(shadow: Shadow, sites: Sequence[ReturnSite], feats: frozenset[int],
                 sym: Symbols, dbg: DebugLog) -> list[SitePatch]:
    """The ``.return_sites`` pass on a machine's *shadow*."""
    return shadow_pass(lambda tb, addrs, caps, log: returns(tb, addrs, caps, BootOptions(), log),
                       shadow, [s.addr for s in sites], feats, sym, dbg)


def apply_retpolines(core: TextPoke, sites: Iterable[RetpolineSite], features: Iterable[str | int],
                     *, image: SymbolSource | Mapping[str, int]) -> tuple[SitePatch, ...]:
    """Rewrite calls/jumps to ``__x86_indirect_thunk_<reg>`` (``.retpoline_sites``)."""
    return run_pass(core, retpolines_pass, sites, features, image)


def apply_returns(core: TextPoke, sites: Iterable[ReturnSite], features: Iterable[str | int],
                  *, image: SymbolSource | Mapping[str, int]) -> tuple[SitePatch, ...]:
    """Rewrite ``jmp __x86_return_thunk`` (``.return_sites``)."""
    return run_pass(core, returns_pass, sites, features, image)


def apply_seal_endbr(core: TextPoke, sites: Iterable[int] = (), *,
                     image: SymbolSource | Mapping[str, int] | None = None
                     ) -> tuple[SitePatch, ...]:
    """Seal the ENDBRs at *sites* (``.ibt_endbr_seal`` addresses) on the
    machine: each becomes ``66 0f 1f 00``; a site that holds no ENDBR is
    left and recorded as skipped.  The bundled image is built with
    ``-fcf-protection=none``: it has no such table."""
    out: list[SitePatch] = []
    addrs = list(sites)
    shadow = Shadow(core, symbols_of(image))
    seal_endbr(shadow, addrs, PassLog(len(addrs), shadow.describe, None, out))
    shadow.commit()
    return tuple(out)
