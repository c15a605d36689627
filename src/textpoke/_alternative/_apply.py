# SPDX-License-Identifier: GPL-2.0-only
"""``apply_alternatives``: every ``struct alt_instr`` in table order, one
implementation for every text buffer (a real kernel's flat memory, the
bundled image's shadow, a module's staged text).

What differs between kernel lines is data (the buffer's
:class:`~textpoke.images._lines.KernelLine`):

* ``alt_shared_len`` (6.12, the bundled image): consecutive entries at one
  address all take the largest instrlen among them (the outer ALTERNATIVE
  may pad more than the inner one);
* ``alt_fixup``: ``"relocate"`` (6.12, the bundled image) relocates every
  relative operand of the replacement (``text_poke_apply_relocation``) and
  knows ``ALT_FLAG_DIRECT_CALL``; ``"call_jmp"`` (6.1) moves only a 5-byte
  CALL's displacement, recomputes a 5-byte JMP (``recompute_jump``), pads
  with 0x90 and runs ``optimize_nops`` over the site in place afterwards,
  taken or not.

Where the kernel would ``BUG()`` (a replacement longer than its site, an
instrlen above ``MAX_PATCH_LEN``, a feature number past the capability
words, a direct-call entry on something else than ``call *disp(%rip)``, a
displacement that no longer fits) :class:`AlternativeError` is raised; a
replacement longer than its site is refused before anything is written.
Rules learnt from ``arch/x86/kernel/alternative.c``; the code is our own.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .._core import TextPoke
from .._core._insn import MAX_PATCH_LEN, x86_nops
from .._errors import BadAddressError, BadInstructionError
from ..images._tables import ALT_FLAG_DIRECT_CALL, ALT_FLAG_NOT, AltInstr
from ._code import CALL, JMP8, JMP32, NOP1, fits
from ._ktext import CpuCaps, TextBuffer
from ._records import DA_ALT, AlternativeError, AltSitePatch, DebugLog, KernelBootError, PassLog
from ._reloc import apply_relocation, nops_pass
from ._shadow import Shadow, SymbolSource, Symbols, run_pass
from ._thunks import shadow_pass

__all__ = ["alternatives", "apply_alternatives", "alt_instructions_pass", "recompute_jump"]

_CALL_RIP_REL = b"\xff\x15"          # call *disp32(%rip)
_LOOKAHEAD = 16                      # the kernel decodes its buffer without a limit


def _refuse(tb: TextBuffer, a: AltInstr, why: str) -> AlternativeError:
    return AlternativeError(f".altinstructions entry {a.index} at {a.instr:#x} "
                            f"({tb.describe(a.instr)}): {why}", addr=a.instr,
                            table=".altinstructions", index=a.index)


def _lengths(entries: Sequence[AltInstr], shared: bool) -> list[int]:
    """Each entry's instrlen; with *shared*, the nested-site rule."""
    lens = [e.instrlen for e in entries]
    i = 0
    while shared and i < len(entries):
        j = i + 1
        while j < len(entries) and entries[j].instr == entries[i].instr:
            j += 1
        if j - i > 1:
            m = max(lens[i:j])
            lens[i:j] = [m] * (j - i)
        i = j
    return lens


def _site(tb: TextBuffer, addr: int, n: int) -> bytearray:
    """The site's bytes and, where the buffer has them, the bytes after it
    that the kernel's decoder may look at."""
    b = tb.peek(addr, n + _LOOKAHEAD)
    if not isinstance(b, bytearray):
        b = bytearray(b)
    if len(b) < n:
        tb.read(addr, n)            # raises: the site is not all in the buffer
    return b


def _direct_call(tb: TextBuffer, a: AltInstr, instrlen: int, buf: bytearray) -> tuple[int, int]:
    """ALT_FLAG_DIRECT_CALL: the replacement's ``call BUG_func`` becomes a
    direct call to whatever the original ``call *disp(%rip)`` reaches.
    Returns (bytes of *buf* to keep: 0 when the target is nop_func, else 5;
    the call target)."""
    if a.replacementlen != 5 or buf[:1] != bytes([CALL]):
        raise _refuse(tb, a, "ALT_FLAG_DIRECT_CALL on a replacement that is not a 5-byte CALL "
                             f"({bytes(buf[:a.replacementlen]).hex(' ')})")
    cur = tb.read(a.instr, instrlen)
    if instrlen != 6 or cur[:2] != _CALL_RIP_REL:
        raise _refuse(tb, a, "ALT_FLAG_DIRECT_CALL on a site that is not "
                             f"'call *disp32(%rip)' ({cur.hex(' ')})")
    slot = a.instr + instrlen + int.from_bytes(cur[2:6], "little", signed=True)
    try:
        target = tb.data_u64(slot)
    except KernelBootError as e:
        raise _refuse(tb, a, f"cannot read the call pointer at {slot:#x}: {e}") from None
    imm = int.from_bytes(buf[1:5], "little", signed=True)
    # assembled as "call BUG_func": (BUG_func - .) + (target - BUG_func)
    bug = tb.opt("BUG_func")
    if bug is None:
        bug = a.repl + 5 + imm
    if target == 0:
        target = bug              # a NULL pointer calls BUG_func
    rel = imm + (target - bug)
    if not fits(rel, 4):
        raise _refuse(tb, a, f"call target {target:#x} is beyond rel32 reach")
    buf[1:5] = rel.to_bytes(4, "little", signed=True)
    return (0 if target == tb.opt("nop_func") else 5), target


def recompute_jump(b: bytearray, instr: int, repl: int) -> None:
    """6.1's ``recompute_jump``: a 5-byte JMP replacement aimed from the
    site; the 2-byte form when the target lies ahead within reach (then a
    3-byte NOP), else JMP rel32 (behind the site always takes rel32)."""
    o_dspl = int.from_bytes(b[1:5], "little", signed=True)
    n_dspl = repl + 5 + o_dspl - instr
    if n_dspl >= 0 and n_dspl - 2 <= 127:
        b[0] = JMP8
        b[1] = (n_dspl - 2) & 0xFF
        b[2:5] = x86_nops[3]
    else:
        b[0] = JMP32
        b[1:5] = ((n_dspl - 5) & 0xFFFFFFFF).to_bytes(4, "little")


def _call_jmp(tb: TextBuffer, a: AltInstr, instrlen: int, replacement: bytes) -> bytes:
    """A taken entry of a line without replacement relocation (6.1): a
    5-byte CALL gets its displacement moved by (replacement - site), a
    5-byte JMP is recomputed, the rest of the site is 0x90."""
    b = bytearray(replacement)
    if a.replacementlen == 5 and b[0] == CALL:
        v = int.from_bytes(b[1:5], "little", signed=True) + (a.repl - a.instr)
        b[1:5] = (v & 0xFFFFFFFF).to_bytes(4, "little")
    if a.replacementlen == 5 and replacement[0] in (JMP8, JMP32):
        recompute_jump(b, a.instr, a.repl)
    return bytes(b + bytes([NOP1]) * (instrlen - a.replacementlen))


def alternatives(tb: TextBuffer, entries: Sequence[AltInstr], caps: CpuCaps,
                 log: PassLog) -> None:
    """The ``.altinstructions`` pass over *tb*, in table order; with
    ``log.records`` a list, one :class:`AltSitePatch` per entry."""
    line = tb.line
    relocate = line.alt_fixup == "relocate"
    lens = _lengths(entries, line.alt_shared_len)
    ncap = line.ncaps * 32
    st, records, dbg = log.stats, log.records, log.dbg
    debug = bool(dbg.mask & DA_ALT)
    # A replacement longer than its site would overwrite the code after it
    # on a CPU that takes it: such a table is broken whatever this CPU's
    # features are, so it is refused before anything is written.
    for a, instrlen in zip(entries, lens):
        if a.replacementlen > instrlen:
            raise _refuse(tb, a, f"replacement of {a.replacementlen} bytes does not fit the "
                                 f"{instrlen}-byte site")
    if entries and debug:
        dbg(DA_ALT, f"alt table {len(entries)} entries, {entries[0].entry:#x} -> "
                    f"{entries[-1].entry + line.alt_instr_size:#x}")
    nested = 0
    for k, a in enumerate(entries):
        nested = nested + 1 if k and entries[k - 1].instr == a.instr else 1
        instrlen = lens[k]
        if instrlen > MAX_PATCH_LEN:
            raise _refuse(tb, a, f"instrlen {instrlen} exceeds MAX_PATCH_LEN")
        if a.cpuid >= ncap:
            raise _refuse(tb, a, f"feature {a.cpuid} is past the {line.ncaps} capability words")
        taken = caps.has_bit(a.cpuid) != bool(a.flags & ALT_FLAG_NOT)
        try:
            old = tb.read(a.instr, instrlen) if records is not None or debug else b""
            replacement = (tb.read(a.repl, a.replacementlen)
                           if a.replacementlen and (taken or records is not None) else b"")
        except BadAddressError as e:
            raise _refuse(tb, a, str(e)) from None
        target = None
        if taken and debug:
            dbg(DA_ALT, f"feat: {'!' if a.flags & ALT_FLAG_NOT and not relocate else ''}"
                        f"{a.cpuid >> 5}*32+{a.cpuid & 31}, old: ({tb.describe(a.instr)} "
                        f"({a.instr:#x}) len: {instrlen}), repl: ({a.repl:#x}, len: "
                        f"{a.replacementlen})" + (f" flags: {a.flags:#x}" if relocate else ""),
                a.instr)
        if not relocate:
            # 6.1: the replacement as it is (CALL/JMP fixed), then NOPs
            # merged over the site in place, taken or not
            written = False
            if taken:
                st.applied += 1
                written = tb.write(".altinstructions", a.instr, _call_jmp(tb, a, instrlen,
                                                                        replacement))
                st.changed += written
                if debug:
                    dbg(DA_ALT, f"{a.instr:#x}: final_insn: "
                                f"{tb.read(a.instr, instrlen).hex(' ')}", a.instr)
            b = _site(tb, a.instr, instrlen)
            nops_pass(b, instrlen, line)
            if tb.write(".altinstructions", a.instr, bytes(b[:instrlen])):
                written = True
                st.changed += not taken
        elif not taken:
            # the original stays; only its padding NOPs are merged
            b = _site(tb, a.instr, instrlen)
            nops_pass(b, instrlen, line)
            written = tb.write(".altinstructions", a.instr, bytes(b[:instrlen]))
            st.changed += written
            if written and debug:
                dbg(DA_ALT, f"{a.instr:#x}: optimized NOPs: {bytes(b[:instrlen]).hex(' ')}",
                    a.instr)
        else:
            b = bytearray(replacement)
            keep = a.replacementlen
            if a.flags & ALT_FLAG_DIRECT_CALL:
                keep, target = _direct_call(tb, a, instrlen, b)
            del b[keep:]
            b += bytes([NOP1]) * (instrlen - keep)
            b += bytes(_LOOKAHEAD)      # decode look-ahead, as the kernel's buffer has
            try:
                apply_relocation(b, a.instr, instrlen, a.repl, a.replacementlen, line)
            except BadInstructionError as e:
                raise _refuse(tb, a, str(e)) from None
            new = bytes(b[:instrlen])
            if debug:
                dbg.dump(DA_ALT, a.instr, "  old_insn", old)
                dbg.dump(DA_ALT, a.repl, "  rpl_insn", replacement)
                dbg.dump(DA_ALT, a.instr, "final_insn", new)
            st.applied += 1
            written = tb.write(".altinstructions", a.instr, new)
            st.changed += written
        if records is not None:
            records.append(AltSitePatch(
                index=a.index, instr=a.instr, repl=a.repl, instrlen=instrlen,
                replacementlen=a.replacementlen, cpuid=a.cpuid, flags=a.flags,
                feature=a.feature, taken=taken, old=old, replacement=replacement,
                final=tb.read(a.instr, instrlen), written=written, nested=nested,
                symbol=tb.describe(a.instr), direct_call_target=target))


def alt_instructions_pass(shadow: Shadow, entries: Sequence[AltInstr], feats: frozenset[int],
                          sym: Symbols, dbg: DebugLog) -> list[AltSitePatch]:
    """The ``.altinstructions`` pass on a machine's *shadow*, one record an
    entry; refuses before staging anything the kernel would BUG() on."""
    return shadow_pass(alternatives, shadow, entries, feats, sym, dbg)


def apply_alternatives(core: TextPoke, entries: Iterable[AltInstr], features: Iterable[str | int],
                       *, image: SymbolSource | Mapping[str, int] | None = None,
                       debug_alternative: int = 0) -> tuple[AltSitePatch, ...]:
    """Apply ``.altinstructions`` entries (:class:`~textpoke.images._tables.AltInstr`
    records, in table order) for a CPU with *features*.  Refuses -- with the
    text untouched -- any entry the kernel would BUG() on.  *image* (an
    ElfImage or a symbol dict) names sites and provides ``nop_func`` /
    ``BUG_func`` for ALT_FLAG_DIRECT_CALL."""
    return run_pass(core, alt_instructions_pass, entries, features, image, debug_alternative)
