# SPDX-License-Identifier: GPL-2.0-only
"""NOP handling of the real-kernel passes: ``add_nops`` and the two
flavours of ``optimize_nops`` the kernel lines have (6.12: any run of NOP
instructions, JMP over long runs, NOPs up to 11 bytes; 6.1: runs of 0x90
bytes only, NOPs up to 8 bytes).  Position independent, so memoised by the
input bytes.  Rules learnt from arch/x86/kernel/alternative.c; the code is
our own."""

from __future__ import annotations

from .._core._insn import Insn, insn_decode_kernel, x86_nops
from .._errors import BadInstructionError

__all__ = ["optimize_nops_k", "optimize_nop1_k", "add_nops_k"]

INT3 = 0xCC
JMP32 = 0xE9
JMP8 = 0xEB
NOP1 = 0x90


def _is_nop(ins: Insn) -> bool:
    # NOP (0x90, not REP NOP) and NOPL (0F 1F) -- the kernel's insn_is_nop()
    op = ins.opcode
    if op[:1] == b"\x90":
        return ins.raw[:1] != b"\xf3"
    return op[:2] == b"\x0f\x1f"


_DECODE_CACHE: dict[bytes, Insn | None] = {}
_BY_RAW: dict[bytes, Insn] = {}
_RAW_LENS: list[int] = []


def _decode_buf(buf: bytes | bytearray, i: int) -> Insn | None:
    """The instruction at *buf[i]*, decoded at address 0 (memoised: the
    passes meet the same few hundred instructions thousands of times, and
    an :class:`Insn` is immutable).  An instruction's decoding depends on
    its own bytes only, and no instruction's bytes are a proper prefix of
    another's, so an instruction seen once is found again by its bytes
    whatever follows it."""
    key = bytes(buf[i:i + 15])
    try:
        return _DECODE_CACHE[key]
    except KeyError:
        pass
    b0 = key[0] if key else -1
    if (b0 == 0xE8 or b0 == 0xE9) and len(key) >= 5:
        # CALL/JMP rel32: most of what the passes decode (a relocated
        # replacement's displacement is new at every site), built here the
        # way insn_decode_kernel reports it at address 0
        imm = int.from_bytes(key[1:5], "little", signed=True)
        call = b0 == 0xE8
        return Insn(0, 5, key[:5], key[:1], "call" if call else "jmp", 1, 4, imm, 0, 0, 0,
                    False, "call" if call else "jmp", (5 + imm) & 0xFFFFFFFFFFFFFFFF)
    for n in _RAW_LENS:
        ins = _BY_RAW.get(key[:n])
        if ins is not None:
            return ins
    try:
        ins = insn_decode_kernel(key, 0)
    except BadInstructionError:
        ins = None
    if len(_DECODE_CACHE) < 200_000:
        _DECODE_CACHE[key] = ins
        if ins is not None and ins.raw not in _BY_RAW:
            _BY_RAW[ins.raw] = ins
            if ins.length not in _RAW_LENS:
                _RAW_LENS.append(ins.length)
    return ins


def _add_nop(buf: bytearray, at: int, n: int) -> None:
    if not n:
        return
    if n <= 11:
        buf[at:at + n] = x86_nops[n]
        return
    if n < 128:
        j = bytes([JMP8, n - 2])
    else:
        j = bytes([JMP32]) + (n - 5).to_bytes(4, "little")
    buf[at:at + n] = j + bytes([INT3]) * (n - len(j))


def add_nops_k(buf: bytearray, at: int, n: int, nop_max: int) -> None:
    """``add_nops`` of a line whose longest NOP is *nop_max* bytes and that
    never jumps over padding (6.1): NOPs of at most *nop_max*, back to back."""
    while n > 0:
        k = min(n, nop_max)
        buf[at:at + k] = x86_nops[k]
        at += k
        n -= k


_OPT1_CACHE: dict[bytes, bytes] = {}


def optimize_nop1_k(buf: bytearray, n: int, nop_max: int = 8) -> None:
    """``optimize_nops()`` as 6.1 has it: walk the instructions of
    ``buf[:n]``; at a one-byte NOP, turn the run of 0x90 bytes that starts
    there (if longer than one) into NOPs of at most *nop_max* bytes; stop at
    the first instruction that does not decode or that ends past *n*."""
    key = bytes(buf[:n])
    hit = _OPT1_CACHE.get(key)
    if hit is not None:
        buf[:n] = hit
        return
    work = bytearray(buf)
    i = 0
    while True:
        ins = _decode_buf(work, i)
        if ins is None:
            break
        if ins.length == 1 and work[i] == NOP1:
            j = i
            while j < n and work[j] == NOP1:
                j += 1
            if j - i > 1:
                add_nops_k(work, i, j - i, nop_max)
            i = j
        else:
            i += ins.length
        if i >= n:
            break
    res = bytes(work[:n])
    if len(_OPT1_CACHE) < 200_000:
        _OPT1_CACHE[key] = res
    buf[:n] = res


_OPT_CACHE: dict[bytes, bytes] = {}


def optimize_nops_k(buf: bytearray, n: int, line=None) -> None:
    """The kernel's ``optimize_nops()`` over ``buf[:n]`` (position
    independent: memoised by the bytes).  Note the kernel decodes without a
    length limit, so an instruction may run past *n*.  *line* (a
    :class:`~textpoke.images._lines.KernelLine`) chooses the flavour: 6.12's
    (any NOP run, by default) or 6.1's (:func:`optimize_nop1_k`)."""
    if line is not None and line.nops == "nop1":
        optimize_nop1_k(buf, n, line.nop_max)
        return
    if n == 5 and (buf[0] == JMP32 or buf[0] == 0xE8):
        return      # one CALL/JMP rel32, not a NOP: nothing to do (and no memo)
    key = bytes(buf[:n])
    hit = _OPT_CACHE.get(key)
    if hit is not None:
        buf[:n] = hit
        return
    work = bytearray(buf)       # decoding may look past n, as the kernel's does
    i = 0
    while i < n:
        ins = _decode_buf(work, i)
        if ins is None:
            break
        nxt = i + ins.length
        if _is_nop(ins):
            if nxt == n:
                break
            j = nxt
            while j < n:
                x = _decode_buf(work, j)
                if x is None or not _is_nop(x):
                    break
                j += x.length
            nxt = j
            _add_nop(work, i, nxt - i)
        i = nxt
    res = bytes(work[:n])
    if len(_OPT_CACHE) < 200_000:
        _OPT_CACHE[key] = res
    buf[:n] = res
