# SPDX-License-Identifier: GPL-2.0-only
"""The thunk passes: ``apply_retpolines`` (calls and jumps through
``__x86_indirect_thunk_<reg>``), ``apply_returns`` (``jmp
__x86_return_thunk``) and ``apply_seal_endbr`` (not modelled)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .._core import TextPoke
from .._core._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, JMP32_INSN_OPCODE,
                           RET_INSN_OPCODE, Insn, is_jcc32, text_gen_insn)
from ..images._tables import RetpolineSite, ReturnSite
from ._records import DA_RET, DA_RETPOLINE, AlternativeError, SitePatch
from ._reloc import optimize_nops
from ._shadow import DebugLog, Shadow, SymbolSource, Symbols, decode_at, has_feature, run_pass

__all__ = ["apply_retpolines", "apply_returns", "apply_seal_endbr", "retpolines_pass",
           "returns_pass"]

_NOP1 = 0x90
_LFENCE = b"\x0f\xae\xe8"
_RETPOLINE_THUNK_SIZE = 32           # one __x86_indirect_thunk_<reg> per 32 bytes
_REG_RSP = 4

_FEATURE_RETPOLINE = "retpoline"
_FEATURE_RETPOLINE_LFENCE = "retpoline_lfence"
_FEATURE_RETHUNK = "rethunk"


def _emit_indirect(op: int, reg: int) -> bytes | None:
    """``call *%reg`` / ``jmp *%reg`` (FF /2, FF /4, REX.B for r8..r15)."""
    if op == CALL_INSN_OPCODE:
        modrm = 0xD0
    elif op == JMP32_INSN_OPCODE:
        modrm = 0xE0
    else:
        return None
    rex = b"\x41" if reg >= 8 else b""
    return rex + bytes([0xFF, modrm + (reg & 7)])


def _patch_retpoline(insn: Insn, reg: int, feats: frozenset[int]) -> tuple[bytes | None, str]:
    """The bytes that replace a call/jump through a retpoline thunk, or
    (None, why) when the site stays as it is."""
    if has_feature(feats, _FEATURE_RETPOLINE) and not has_feature(feats, _FEATURE_RETPOLINE_LFENCE):
        return None, "retpoline wanted: the call through the thunk stays"
    out = bytearray()
    op = insn.opcode[0]
    if is_jcc32(insn):
        # Jcc thunk  ->  J!cc.d8 over the rest; [lfence]; jmp *%reg
        cc = (insn.opcode[1] & 0xF) ^ 1
        out += bytes([0x70 + cc, insn.length - 2])
        op = JMP32_INSN_OPCODE
    if has_feature(feats, _FEATURE_RETPOLINE_LFENCE):
        out += _LFENCE
    ind = _emit_indirect(op, reg)
    if ind is None:
        return None, f"cannot rewrite {insn.text!r}"
    out += ind
    if op == JMP32_INSN_OPCODE and len(out) < insn.length:
        out.append(INT3_INSN_OPCODE)          # straight-line speculation stop
    if len(out) > insn.length:
        return None, f"{len(out)}-byte rewrite does not fit the {insn.length}-byte site"
    out += bytes([_NOP1]) * (insn.length - len(out))
    return bytes(out), ""


def _undecodable(kind: str, shadow: Shadow, addr: int, sym: Symbols) -> SitePatch:
    raw = shadow.read(addr, 1)
    return SitePatch(kind, addr, raw, raw, "skipped", "cannot decode the site", sym(addr))


def _thunk(sym: Symbols, name: str, table: str) -> int:
    """The address of thunk *name*, which an image with *table* must have."""
    addr = sym.get(name)
    if addr is None:
        raise AlternativeError(f"image has {table} but no {name}", table=table)
    return addr


def retpolines_pass(shadow: Shadow, sites: Sequence[RetpolineSite], feats: frozenset[int],
                    sym: Symbols, dbg: DebugLog) -> list[SitePatch]:
    """The ``.retpoline_sites`` pass on *shadow*."""
    if not sites:
        return []
    array = _thunk(sym, "__x86_indirect_thunk_array", ".retpoline_sites")
    out: list[SitePatch] = []
    for i, s in enumerate(sites):
        addr = s.addr
        insn = decode_at(shadow, addr)
        if insn is None:
            out.append(_undecodable("retpoline", shadow, addr, sym))
            continue

        def leave(why: str, insn: Insn = insn, action: str = "skipped") -> None:
            out.append(SitePatch("retpoline", insn.addr, insn.raw, insn.raw, action, why,
                                 sym(insn.addr), insn.branch_target))

        op = insn.opcode[0]
        if 0x70 <= op <= 0x7F:
            leave("Jcc.d8 to a thunk (FineIBT only)")
            continue
        if op not in (CALL_INSN_OPCODE, JMP32_INSN_OPCODE) and not is_jcc32(insn):
            leave(f"not a CALL/JMP/Jcc.d32: {insn.text!r}")
            continue
        target = insn.branch_target
        off = target - array
        if off % _RETPOLINE_THUNK_SIZE or not 0 <= off // _RETPOLINE_THUNK_SIZE < 16:
            leave(f"target {sym(target)} is not a retpoline thunk")
            continue
        reg = off // _RETPOLINE_THUNK_SIZE
        if reg == _REG_RSP:
            raise AlternativeError(f".retpoline_sites entry {i} at {addr:#x} ({sym(addr)}): "
                                   "an indirect branch through %rsp", addr=addr,
                                   table=".retpoline_sites", index=i)
        dbg(DA_RETPOLINE, f"retpoline at: {sym(addr)} ({addr:#x}) len: {insn.length} to: "
                          f"{sym(target)}", addr)
        new, why = _patch_retpoline(insn, reg, feats)
        if new is None:
            leave(why, action="kept")
            continue
        buf = bytearray(new)
        optimize_nops(addr, buf, len(buf))
        new = bytes(buf)
        dbg.dump(DA_RETPOLINE, addr, "orig", insn.raw)
        dbg.dump(DA_RETPOLINE, addr, "repl", new)
        written = shadow.write(addr, new)
        out.append(SitePatch("retpoline", addr, insn.raw, new,
                             "patched" if written else "unchanged", "", sym(addr), target))
    return out


def returns_pass(shadow: Shadow, sites: Sequence[ReturnSite], feats: frozenset[int],
                 sym: Symbols, dbg: DebugLog) -> list[SitePatch]:
    """The ``.return_sites`` pass on *shadow*."""
    if not sites:
        return []
    thunk = _thunk(sym, "__x86_return_thunk", ".return_sites")
    rethunk = has_feature(feats, _FEATURE_RETHUNK)
    out: list[SitePatch] = []
    for s in sites:
        addr = s.addr
        insn = decode_at(shadow, addr)
        if insn is None:
            out.append(_undecodable("return", shadow, addr, sym))
            continue
        dest = insn.branch_target if insn.opcode[0] == JMP32_INSN_OPCODE else None
        if dest != thunk:
            # The kernel warns "missing return thunk" and leaves the site.
            out.append(SitePatch("return", addr, insn.raw, insn.raw, "skipped",
                                 f"missing return thunk: {insn.text!r}", sym(addr), dest))
            continue
        dbg(DA_RET, f"return thunk at: {sym(addr)} ({addr:#x}) len: {insn.length} to: "
                    f"{sym(dest)}", addr)
        if rethunk:
            new = text_gen_insn(JMP32_INSN_OPCODE, addr, thunk)
        else:
            new = bytes([RET_INSN_OPCODE])
        new += bytes([INT3_INSN_OPCODE]) * (insn.length - len(new))
        dbg.dump(DA_RET, addr, "orig", insn.raw)
        dbg.dump(DA_RET, addr, "repl", new)
        written = shadow.write(addr, new)
        out.append(SitePatch("return", addr, insn.raw, new,
                             "patched" if written else "unchanged",
                             "" if written or not rethunk else "the return thunk is wanted",
                             sym(addr), dest))
    return out


def apply_retpolines(core: TextPoke, sites: Iterable[RetpolineSite], features: Iterable[str | int],
                     *, image: SymbolSource | Mapping[str, int]) -> tuple[SitePatch, ...]:
    """Rewrite calls/jumps to ``__x86_indirect_thunk_<reg>`` (``.retpoline_sites``)."""
    return run_pass(core, retpolines_pass, sites, features, image)


def apply_returns(core: TextPoke, sites: Iterable[ReturnSite], features: Iterable[str | int],
                  *, image: SymbolSource | Mapping[str, int]) -> tuple[SitePatch, ...]:
    """Rewrite ``jmp __x86_return_thunk`` (``.return_sites``)."""
    return run_pass(core, returns_pass, sites, features, image)


def apply_seal_endbr(core: TextPoke, sites: Iterable[int] = ()) -> tuple[SitePatch, ...]:
    """IBT sealing is not modelled: there is no ENDBR in an image built with
    ``-fcf-protection=none`` and no ``.ibt_endbr_seal`` table.  An empty
    table is accepted (nothing to do); anything else is refused."""
    if any(True for _ in sites):
        raise AlternativeError("apply_seal_endbr: IBT/ENDBR sealing is not modelled",
                               table=".ibt_endbr_seal")
    return ()
