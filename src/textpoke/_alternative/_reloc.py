# SPDX-License-Identifier: GPL-2.0-only
"""Byte-level fix-ups applied to a replacement block before it is written:
relocation, ``optimize_nops`` and ``add_nop`` -- one implementation for the
bundled image, a real kernel, a module, ftrace trampolines and the BPF JIT.

Boot-time patching copies machine code assembled at one address (``repl``)
to another (``instr``).  Relative operands in that copy must then be
adjusted so that whatever they point at *outside* the copied block is still
reached; references inside the block move with it and need nothing.
Afterwards the copy is tidied: runs of NOPs become as few instructions as
possible.

What differs between kernels is data, the image's
:class:`~textpoke.images._lines.KernelLine`:

* ``nops``/``nop_max``: 6.12 (and the bundled image) merge any run of NOP
  instructions into one NOP of up to ``nop_max`` bytes, or a JMP over INT3s
  when longer; 6.1 merges runs of 0x90 bytes into back-to-back NOPs;
* ``checked`` (the bundled image): where the kernel would silently get it
  wrong, refuse or do it right -- a block that does not decode into whole
  instructions is refused (the kernel WARNs and stops relocating), only the
  replacement itself is scanned and decoding never looks past it, LOOP/JrCXZ
  are relocated like Jcc.d8, a prefixed JMP32 keeps its target when shrunk
  to JMP8, and an XCHG ``41 90`` is not a NOP.  A real line follows the
  kernel byte for byte (decoding may run past the buffer's length, as the
  kernel's does).

This mirrors ``__apply_relocation()``, ``optimize_nops()`` and ``add_nop()``
(``add_nops()`` in 6.1) in ``arch/x86/kernel/alternative.c``.  The rules
were read from the kernel; the code is our own.  A displacement that no
longer fits its field (the kernel's ``BUG()``) raises
:class:`BadInstructionError`.  The results of both NOP passes are memoised
by their input bytes: they do not depend on the address.

Naming follows the kernel: ``instr`` is where the bytes will live, ``repl``
is where they were assembled, ``buf`` is the scratch copy being fixed.
"""

from __future__ import annotations

from .._core._insn import Insn, x86_nops
from .._errors import BadInstructionError
from ..images._lines import LINE_BUNDLED, KernelLine
from ._code import INT3, JMP8, JMP32, NOP1, decode_buf, fits, is_nop, signed

__all__ = ["text_poke_apply_relocation", "optimize_nops", "add_nop", "add_nops",
           "apply_relocation", "nops_pass"]

# A JMP8 over INT3 padding can skip at most this many bytes (rel8 of +125
# plus the two bytes of the jump itself still fits in a signed byte).
_JMP8_FILL_MAX = 127


# --------------------------------------------------------------------------
# NOP handling
# --------------------------------------------------------------------------

def add_nop(buf: bytearray, offset: int, length: int, nop_max: int = 11) -> None:
    """Fill ``buf[offset:offset+length]`` with one effective instruction.

    Up to *nop_max* bytes this is the single longest kernel NOP of that
    length.  A longer hole is not worth executing NOP by NOP, so (as the
    kernel's ``add_nop()`` does) a jump to the end of the hole is emitted --
    JMP8 while the distance fits a signed byte, JMP32 otherwise -- and the
    bytes it skips become INT3, which traps if anything ever lands in the
    middle.
    """
    if length < 0 or offset < 0 or offset + length > len(buf):
        raise BadInstructionError(
            f"add_nop: [{offset}, {offset + length}) outside a buffer of {len(buf)} bytes")
    if length == 0:
        return
    if length <= nop_max:
        buf[offset:offset + length] = x86_nops[length]
        return
    if length <= _JMP8_FILL_MAX:
        jmp = bytes([JMP8, length - 2])
    else:
        jmp = bytes([JMP32]) + (length - 5).to_bytes(4, "little")
    buf[offset:offset + length] = jmp + bytes([INT3]) * (length - len(jmp))


def add_nops(buf: bytearray, at: int, n: int, line: KernelLine) -> None:
    """The line's NOP fill of ``buf[at:at+n]``: one :func:`add_nop` (6.12,
    the bundled image), or NOPs of at most ``nop_max`` bytes back to back,
    never a jump (6.1's ``add_nops``)."""
    if line.nops == "nops":
        add_nop(buf, at, n, line.nop_max)
        return
    while n > 0:
        k = min(n, line.nop_max)
        buf[at:at + k] = x86_nops[k]
        at += k
        n -= k


_OPT_CACHE: dict[tuple[bool, bytes], bytes] = {}
_OPT1_CACHE: dict[tuple[int, bytes], bytes] = {}


def _optimize_nop1(buf: bytearray, n: int, line: KernelLine) -> None:
    """6.1: walk the instructions of ``buf[:n]``; at a one-byte NOP, turn the
    run of 0x90 bytes that starts there (if longer than one) into NOPs of at
    most ``nop_max`` bytes; stop at the first instruction that does not
    decode or that ends past *n*."""
    key = (line.nop_max, bytes(buf[:n]))
    hit = _OPT1_CACHE.get(key)
    if hit is not None:
        buf[:n] = hit
        return
    work = bytearray(buf)
    i = 0
    while True:
        ins = decode_buf(work, i)
        if ins is None:
            break
        if ins.length == 1 and work[i] == NOP1:
            j = i
            while j < n and work[j] == NOP1:
                j += 1
            if j - i > 1:
                add_nops(work, i, j - i, line)
            i = j
        else:
            i += ins.length
        if i >= n:
            break
    res = bytes(work[:n])
    if len(_OPT1_CACHE) < 200_000:
        _OPT1_CACHE[key] = res
    buf[:n] = res


def nops_pass(buf: bytearray, n: int, line: KernelLine = LINE_BUNDLED) -> None:
    """The line's ``optimize_nops()`` over ``buf[:n]``, in place.

    Only NOPs count (PAUSE, F3 90, is a spin-loop hint and is kept).  A lone
    NOP that already ends the buffer is taken as "done" and the scan stops
    there, and an undecodable byte ends the scan quietly -- this is an
    optimisation, never a reason to refuse.  A real line decodes without a
    length limit, as the kernel does (give *buf* look-ahead bytes past *n*).
    """
    if n < 0 or n > len(buf):
        raise BadInstructionError(f"optimize_nops: length {n} outside a buffer of "
                                  f"{len(buf)} bytes")
    if line.nops == "nop1":
        _optimize_nop1(buf, n, line)
        return
    if n == 5 and (buf[0] == JMP32 or buf[0] == 0xE8):
        return      # one CALL/JMP rel32, not a NOP: nothing to do (and no memo)
    checked = line.checked
    key = (checked, bytes(buf[:n]))
    hit = _OPT_CACHE.get(key)
    if hit is not None:
        buf[:n] = hit
        return
    # a real line's decoding may look past n, as the kernel's does
    work = bytearray(buf[:n]) if checked else bytearray(buf)
    limit = n if checked else None
    kernel = not checked
    i = 0
    while i < n:
        ins = decode_buf(work, i, limit)
        if ins is None:
            break
        nxt = i + ins.length
        if is_nop(ins, kernel):
            if nxt == n:
                break
            j = nxt
            while j < n:
                x = decode_buf(work, j, limit)
                if x is None or not is_nop(x, kernel):
                    break
                j += x.length
            nxt = j
            add_nop(work, i, nxt - i, line.nop_max)
        i = nxt
    res = bytes(work[:n])
    if len(_OPT_CACHE) < 200_000:
        _OPT_CACHE[key] = res
    buf[:n] = res


def optimize_nops(instr: int, buf: bytearray, length: int,
                  line: KernelLine = LINE_BUNDLED) -> None:
    """Rewrite every run of NOPs in ``buf[:length]`` with :func:`add_nop`
    (:func:`nops_pass`).  *instr* is the address the bytes are destined
    for; it only names them (NOP merging does not depend on it)."""
    nops_pass(buf, length, line)


# --------------------------------------------------------------------------
# Relocation
# --------------------------------------------------------------------------

def _kernel_branch(ins: Insn) -> bool:
    """JMP8/JMP32/CALL rel32, Jcc.d8, Jcc.d32: the branches the kernel
    relocates."""
    op = ins.opcode
    b0 = op[0]
    return (b0 == JMP8 or b0 == JMP32 or b0 == 0xE8 or 0x70 <= b0 <= 0x7F
            or (b0 == 0x0F and len(op) > 1 and 0x80 <= op[1] <= 0x8F))


def _checked_branch(ins: Insn) -> bool:
    """Every relative branch, LOOP/LOOPcc/JrCXZ (E0..E3) included: the
    kernel skips those (they never appear in alternatives) but a copy that
    moved them would silently jump elsewhere."""
    return ins.branch_target is not None or (
        bool(ins.opcode[:1]) and 0xE0 <= ins.opcode[0] <= 0xE3 and bool(ins.immediate_size))


_REL_CACHE: dict[bytes, bool] = {}


def _needs_reloc_scan(buf: bytes) -> bool:
    """Whether a buffer holds any relative operand (memoised; a real line)."""
    if buf[:1] == b"\xe8" or buf[:1] == b"\xe9":
        return True     # a CALL/JMP rel32 first (or cut short: the slow path)
    hit = _REL_CACHE.get(buf)
    if hit is not None:
        return hit
    i, rel = 0, False
    while i < len(buf):
        ins = decode_buf(buf, i)
        if ins is None or _kernel_branch(ins) or ins.rip_relative:
            rel = True          # undecodable: let the slow path meet it
            break
        i += ins.length
    _REL_CACHE[buf] = rel
    return rel


def _put_field(buf: bytearray, at: int, nbytes: int, old: int, diff: int, where: int,
               ins: Insn, what: str) -> int:
    new = old + diff
    if not fits(new, nbytes):
        raise BadInstructionError(
            f"relocating '{ins.text}' at +{where:#x} ({ins.raw.hex(' ')}): {what} "
            f"{old:#x} + {diff:#x} = {new:#x} does not fit {nbytes} byte(s)")
    buf[at:at + nbytes] = new.to_bytes(nbytes, "little", signed=True)
    return new


def apply_relocation(buf: bytearray, instr: int, instrlen: int, repl: int, repl_len: int,
                     line: KernelLine = LINE_BUNDLED) -> None:
    """``text_poke_apply_relocation()`` on *buf* in place: fix relative
    operands that point outside ``[repl, repl+repl_len]`` (the end counts as
    inside: "jmp 1f" with "1:" right after the replacement means "skip the
    rest of me"), shrink JMP32 to JMP8 + INT3s where the result fits, then
    :func:`nops_pass` over ``buf[:instrlen]``.  A real line scans all of
    ``buf[:instrlen]`` as the kernel does; the bundled image only the
    replacement, and refuses one that does not decode."""
    checked = line.checked
    scan = repl_len if checked else instrlen
    if checked or _needs_reloc_scan(bytes(buf[:instrlen])):
        diff = repl - instr
        branch = _checked_branch if checked else _kernel_branch
        limit = scan if checked else None
        i = 0
        while i < scan:
            # decoded at 0: targets come out in the block's own frame
            ins = decode_buf(buf, i, limit)
            if ins is None:
                if checked:
                    raise BadInstructionError(
                        f"relocation: cannot decode a whole instruction at +{i:#x} of the "
                        f"{repl_len}-byte block ({bytes(buf[i:min(i + 15, repl_len)]).hex(' ')})")
                break               # the kernel WARNs and stops relocating
            nxt = i + ins.length
            if ins.immediate_size and branch(ins):
                imm = signed(ins.immediate_value, ins.immediate_size)
                disp = imm
                tgt = nxt + imm
                if tgt < 0 or tgt > repl_len:
                    disp = _put_field(buf, i + ins.immediate_offset, ins.immediate_size, imm,
                                      diff, i, ins, "branch displacement")
                if ins.opcode[0] == JMP32:
                    if checked:
                        # measured from the end of a 2-byte jump, whatever
                        # prefixes the JMP32 had
                        short = disp + ins.length - 2
                        ok = fits(short, 1)
                    else:
                        # the kernel takes the immediate as decoded, before
                        # the relocation above, and adds the difference itself
                        short = imm + diff + 3
                        short = ((short + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
                        ok = -128 <= short < 128
                    if ok:
                        buf[i] = JMP8
                        buf[i + 1] = short & 0xFF
                        buf[i + 2:nxt] = bytes([INT3]) * (ins.length - 2)
            elif ins.rip_relative:
                tgt = nxt + ins.displacement_value
                if tgt < 0 or tgt > repl_len:
                    _put_field(buf, i + ins.displacement_offset, ins.displacement_size,
                               ins.displacement_value, diff, i, ins,
                               "RIP-relative displacement")
            i = nxt
    nops_pass(buf, instrlen, line)


def text_poke_apply_relocation(buf: bytearray, instr: int, instrlen: int,
                               repl: int, repl_len: int,
                               line: KernelLine = LINE_BUNDLED) -> None:
    """Fix a copy of a replacement block so it runs correctly at *instr*.

    ``buf[:repl_len]`` holds the bytes assembled at *repl*; ``buf[:instrlen]``
    is what will be written at *instr* (the caller pads the tail, normally
    with NOPs).  See :func:`apply_relocation`.

    Raises :class:`BadInstructionError` -- with *buf* unchanged -- when a
    displacement no longer fits its field, when the block does not decode
    into whole instructions, or when the block is longer than the site.
    """
    if repl_len < 0 or instrlen < 0:
        raise BadInstructionError("relocation: negative length")
    if repl_len > instrlen:
        raise BadInstructionError(
            f"relocation: replacement of {repl_len} bytes does not fit a {instrlen}-byte site")
    if instrlen > len(buf):
        raise BadInstructionError(f"text_poke_apply_relocation: length {instrlen} outside a "
                                  f"buffer of {len(buf)} bytes")
    work = bytearray(buf) if not line.checked else bytearray(buf[:instrlen])
    apply_relocation(work, instr, instrlen, repl, repl_len, line)
    buf[:instrlen] = work[:instrlen]
