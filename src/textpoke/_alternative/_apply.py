# SPDX-License-Identifier: GPL-2.0-only
"""``apply_alternatives``: every ``struct alt_instr`` in table order, with
the nested-site padding rule and ``ALT_FLAG_DIRECT_CALL``."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .._core import TextPoke
from .._core._insn import CALL_INSN_OPCODE, MAX_PATCH_LEN
from .._errors import BadAddressError, BadInstructionError, TextPokeError
from ..images._tables import AltInstr
from ._records import DA_ALT, AlternativeError, AltSitePatch, hexbytes
from ._reloc import optimize_nops, text_poke_apply_relocation
from ._shadow import DebugLog, Shadow, SymbolSource, Symbols, run_pass

__all__ = ["apply_alternatives", "alt_instructions_pass"]

_NOP1 = 0x90
_CALL_RIP_REL = b"\xff\x15"          # call *disp32(%rip)
_ALT_INSTR_SIZE = 14                 # sizeof(struct alt_instr), packed


def _refuse(a: AltInstr, sym: Symbols, why: str) -> AlternativeError:
    return AlternativeError(f".altinstructions entry {a.index} at {a.instr:#x} ({sym(a.instr)}): "
                            f"{why}", addr=a.instr, table=".altinstructions", index=a.index)


def _group_lengths(entries: Sequence[AltInstr]) -> list[int]:
    """Each entry's instrlen after the nested-site rule: consecutive entries
    at one address all take the largest instrlen among them (the outer
    ALTERNATIVE may pad more than the inner one)."""
    lens = [e.instrlen for e in entries]
    i = 0
    while i < len(entries):
        j = i + 1
        while j < len(entries) and entries[j].instr == entries[i].instr:
            j += 1
        m = max(lens[i:j])
        lens[i:j] = [m] * (j - i)
        i = j
    return lens


def _alt_replace_call(shadow: Shadow, a: AltInstr, instrlen: int, buf: bytearray,
                      sym: Symbols) -> tuple[int, int]:
    """ALT_FLAG_DIRECT_CALL: turn the replacement's ``call BUG_func`` into a
    direct call to whatever the original ``call *disp(%rip)`` would reach.
    Returns (bytes of *buf* to keep: 0 when the target is nop_func, else 5;
    the call target)."""
    if a.replacementlen != 5 or buf[:1] != bytes([CALL_INSN_OPCODE]):
        raise _refuse(a, sym, "ALT_FLAG_DIRECT_CALL on a replacement that is not a 5-byte CALL "
                              f"({hexbytes(bytes(buf[:a.replacementlen]))})")
    cur = shadow.read(a.instr, instrlen)
    if instrlen != 6 or cur[:2] != _CALL_RIP_REL:
        raise _refuse(a, sym, "ALT_FLAG_DIRECT_CALL on a site that is not "
                              f"'call *disp32(%rip)' ({hexbytes(cur)})")
    disp = int.from_bytes(cur[2:6], "little", signed=True)
    slot = a.instr + 6 + disp
    try:
        target = int.from_bytes(shadow.machine.mem.read(slot, 8), "little")
    except TextPokeError as e:
        raise _refuse(a, sym, f"cannot read the call pointer at {slot:#x}: {e}") from None
    # The replacement was assembled as "call BUG_func"; its own target is
    # the placeholder a NULL pointer resolves to.
    bug = a.repl + 5 + int.from_bytes(buf[1:5], "little", signed=True)
    if target == 0:
        target = sym.get("BUG_func") or bug
    rel = target - (a.repl + 5)
    if not -(1 << 31) <= rel < (1 << 31):
        raise _refuse(a, sym, f"call target {target:#x} is beyond rel32 reach")
    buf[1:5] = rel.to_bytes(4, "little", signed=True)
    nop_func = sym.get("nop_func")
    return (0 if nop_func is not None and target == nop_func else 5), target


def alt_instructions_pass(shadow: Shadow, entries: Sequence[AltInstr], feats: frozenset[int],
                          sym: Symbols, dbg: DebugLog) -> list[AltSitePatch]:
    """The ``.altinstructions`` pass on *shadow*; refuses before staging
    anything the kernel would BUG() on."""
    machine = shadow.machine
    lens = _group_lengths(entries)
    # A replacement longer than its site would overwrite the code after it
    # on a CPU that takes it.  Such a table is broken whatever this CPU's
    # features are, so it is refused before anything else happens.
    for a, instrlen in zip(entries, lens):
        if a.replacementlen > instrlen:
            raise _refuse(a, sym, f"replacement of {a.replacementlen} bytes does not fit the "
                                  f"{instrlen}-byte site")
    out: list[AltSitePatch] = []
    if entries:
        dbg(DA_ALT, f"alt table {len(entries)} entries, {entries[0].entry:#x} -> "
                    f"{entries[-1].entry + _ALT_INSTR_SIZE:#x}")
    nested = 0
    for k, a in enumerate(entries):
        nested = nested + 1 if k and entries[k - 1].instr == a.instr else 1
        instrlen = lens[k]
        if instrlen > MAX_PATCH_LEN:
            raise _refuse(a, sym, f"instrlen {instrlen} exceeds MAX_PATCH_LEN")
        try:
            old = shadow.read(a.instr, instrlen)
            replacement = machine.text_read(a.repl, a.replacementlen) if a.replacementlen else b""
        except BadAddressError as e:
            raise _refuse(a, sym, str(e)) from None
        taken = a.wanted(feats)
        target = None
        if not taken:
            # The original stays; only its padding NOPs are merged.
            buf = bytearray(old)
            optimize_nops(a.instr, buf, instrlen)
        else:
            dbg(DA_ALT, f"feat: {a.cpuid >> 5}*32+{a.cpuid & 31}, old: ({sym(a.instr)} "
                        f"({a.instr:#x}) len: {instrlen}), repl: ({a.repl:#x}, len: "
                        f"{a.replacementlen}) flags: {a.flags:#x}", a.instr)
            buf = bytearray(replacement)
            keep = a.replacementlen
            if a.direct_call:
                keep, target = _alt_replace_call(shadow, a, instrlen, buf, sym)
            # Pad to the site with single-byte NOPs; the relocation pass
            # merges them (and refuses a replacement longer than the site).
            buf[keep:] = bytes([_NOP1]) * max(0, instrlen - keep)
            try:
                text_poke_apply_relocation(buf, a.instr, instrlen, a.repl, a.replacementlen)
            except BadInstructionError as e:
                raise _refuse(a, sym, str(e)) from None
            dbg.dump(DA_ALT, a.instr, "  old_insn", old)
            dbg.dump(DA_ALT, a.repl, "  rpl_insn", replacement)
            dbg.dump(DA_ALT, a.instr, "final_insn", bytes(buf[:instrlen]))
        final = bytes(buf[:instrlen])
        written = shadow.write(".altinstructions", a.instr, final)
        if written and not taken:
            dbg(DA_ALT, f"{a.instr:#x}: optimized NOPs: {hexbytes(final)}", a.instr)
        out.append(AltSitePatch(
            index=a.index, instr=a.instr, repl=a.repl, instrlen=instrlen,
            replacementlen=a.replacementlen, cpuid=a.cpuid, flags=a.flags, feature=a.feature,
            taken=taken, old=old, replacement=replacement, final=final, written=written,
            nested=nested, symbol=sym(a.instr), direct_call_target=target))
    return out


def apply_alternatives(core: TextPoke, entries: Iterable[AltInstr], features: Iterable[str | int],
                       *, image: SymbolSource | Mapping[str, int] | None = None,
                       debug_alternative: int = 0) -> tuple[AltSitePatch, ...]:
    """Apply ``.altinstructions`` entries (:class:`~textpoke.images._tables.AltInstr`
    records, in table order) for a CPU with *features*.  Refuses -- with the
    text untouched -- any entry the kernel would BUG() on.  *image* (an
    ElfImage or a symbol dict) names sites and provides ``nop_func`` /
    ``BUG_func`` for ALT_FLAG_DIRECT_CALL."""
    return run_pass(core, alt_instructions_pass, entries, features, image, debug_alternative)
