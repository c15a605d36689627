# SPDX-License-Identifier: GPL-2.0-only
"""The passes of ``alternative_instructions()`` over a real kernel's flat
memory (:class:`~._ktext.KernelText`), as Linux 6.12 and 6.1 stable (with
the ITS backports) run them -- where the lines differ, the rule is chosen
by the image's :class:`~textpoke.images._lines.KernelLine`: ``apply_retpolines`` (incl. LFENCE, call-depth and
ITS variants), ``apply_returns`` (the return thunk in use, ITS's address
rule, static-call trampolines), ``apply_alternatives`` (incl.
``ALT_FLAG_DIRECT_CALL``), ``apply_seal_endbr`` and the uniprocessor
``alternatives_smp_unlock``.

The rules were learnt from ``arch/x86/kernel/alternative.c`` and
``static_call.c``; the code is our own.  Speed matters (~100,000 sites):
the common shapes (``call/jmp rel32``, ``jmp __x86_return_thunk``) are
recognised from their bytes; anything else goes to the full decoder, and
the NOP optimisation and relocation results are memoised by their input
bytes where they cannot depend on the address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .._core._insn import Insn, insn_decode_kernel
from .._errors import BadInstructionError
from ._knops import _decode_buf, add_nops_k, optimize_nop1_k, optimize_nops_k
from ._ktext import CpuCaps, KernelBootError, KernelText

__all__ = ["BootOptions", "TableStats", "fast_decode", "optimize_nops_k", "optimize_nop1_k",
           "add_nops_k", "apply_relocation_k",
           "apply_returns_k", "cpu_wants_rethunk_at", "static_call_fixup"]

INT3 = 0xCC
CALL = 0xE8
JMP32 = 0xE9
JMP8 = 0xEB
RET = 0xC3
NOP1 = 0x90
LFENCE = b"\x0f\xae\xe8"
TRAMP_UD = b"\x0f\xb9\xcc"
RETPOLINE_THUNK_SIZE = 32
ITS_THUNK_SIZE = 64
ENDBR64 = 0xFA1E0FF3
ENDBR_POISON = 0x001F0F66

# features the passes test, by name: each kernel line numbers them its own way
# (CpuCaps.has reads the line's table; a feature the line lacks is absent)
F_RETPOLINE = "retpoline"
F_RETPOLINE_LFENCE = "retpoline_lfence"
F_RETHUNK = "rethunk"
F_CALL_DEPTH = "call_depth"
F_INDIRECT_THUNK_ITS = "indirect_thunk_its"


@dataclass
class BootOptions:
    """What the capability words do not say.

    *return_thunk*: the value of ``x86_return_thunk`` (a symbol name or an
    address); *its_page*: the address of the first page the ITS thunk
    allocator hands out (``execmem``), when the CPU uses dynamic ITS
    thunks -- None uses the static ``__x86_indirect_its_thunk_array`` (what
    the kernel does when the allocation fails)."""

    return_thunk: str | int = "__x86_return_thunk"
    its_pages: list[int] = field(default_factory=list)
    ncpus: int = 1
    noreplace_smp: bool = False
    setup_max_cpus: int | None = None


@dataclass
class TableStats:
    entries: int = 0
    applied: int = 0      # sites the pass acted on (wrote, possibly the same bytes)
    changed: int = 0      # sites whose bytes changed
    skipped: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    def note(self, why: str) -> None:
        self.notes[why] = self.notes.get(why, 0) + 1

    def as_dict(self) -> dict:
        d = {"entries": self.entries, "applied": self.applied, "changed": self.changed}
        if self.skipped:
            d["skipped"] = self.skipped
        if self.notes:
            d["notes"] = dict(self.notes)
        return d


# ---------------------------------------------------------------- decoding
class FastInsn:
    """The fields of ``struct insn`` the passes read."""
    __slots__ = ("length", "op1", "op2", "imm", "target", "full")

    def __init__(self, length: int, op1: int, op2: int, imm: int, target: int | None,
                 full: Insn | None = None) -> None:
        self.length, self.op1, self.op2, self.imm, self.target = length, op1, op2, imm, target
        self.full = full


def fast_decode(kt: KernelText, addr: int) -> FastInsn | None:
    """Decode at *addr*: rel32 CALL/JMP/Jcc (with CS prefixes) by hand,
    anything else with the full decoder.  None when it does not decode."""
    buf, o = kt.buf, addr - kt.base
    p = 0
    while p < 3 and buf[o + p] == 0x2E:
        p += 1
    b0 = buf[o + p]
    if b0 in (CALL, JMP32):
        imm = int.from_bytes(buf[o + p + 1:o + p + 5], "little", signed=True)
        n = p + 5
        return FastInsn(n, b0, 0, imm, addr + n + imm)
    if b0 == 0x0F and 0x80 <= buf[o + p + 1] <= 0x8F:
        imm = int.from_bytes(buf[o + p + 2:o + p + 6], "little", signed=True)
        n = p + 6
        return FastInsn(n, 0x0F, buf[o + p + 1], imm, addr + n + imm)
    try:
        ins = insn_decode_kernel(bytes(buf[o:o + 15]), addr)
    except BadInstructionError:
        return None
    op = ins.opcode
    return FastInsn(ins.length, op[0], op[1] if len(op) > 1 else 0,
                    ins.immediate_value, ins.branch_target, ins)


def _fits(v: int, nbytes: int) -> bool:
    b = nbytes * 8
    return -(1 << (b - 1)) <= v < (1 << (b - 1))


_REL_CACHE: dict[bytes, bool] = {}


def _needs_reloc_scan(buf: bytes) -> bool:
    """Whether a buffer holds any relative operand (memoised)."""
    if buf[:1] == b"\xe8" or buf[:1] == b"\xe9":
        return True     # a CALL/JMP rel32 first (or cut short: the slow path)
    hit = _REL_CACHE.get(buf)
    if hit is not None:
        return hit
    i, rel = 0, False
    while i < len(buf):
        ins = _decode_buf(buf, i)
        if ins is None:
            rel = True          # let the slow path meet it
            break
        b0 = ins.opcode[0]
        if (b0 in (JMP8, JMP32, CALL) or 0x70 <= b0 <= 0x7F or
                (b0 == 0x0F and len(ins.opcode) > 1 and 0x80 <= ins.opcode[1] <= 0x8F) or
                ins.rip_relative):
            rel = True
            break
        i += ins.length
    _REL_CACHE[buf] = rel
    return rel


def apply_relocation_k(buf: bytearray, instr: int, instrlen: int, repl: int,
                       repl_len: int) -> None:
    """``text_poke_apply_relocation()``: fix relative operands that point
    outside ``[repl, repl+repl_len]``, shrink JMP32 to JMP8 where the
    result fits, then ``optimize_nops``."""
    if _needs_reloc_scan(bytes(buf[:instrlen])):
        diff = repl - instr
        i = 0
        while i < instrlen:
            ins = _decode_buf(buf, i)
            if ins is None:
                break               # the kernel WARNs and stops relocating
            nxt = i + ins.length
            b0 = ins.opcode[0]
            is_br = (b0 in (JMP8, JMP32, CALL) or 0x70 <= b0 <= 0x7F or
                     (b0 == 0x0F and len(ins.opcode) > 1 and 0x80 <= ins.opcode[1] <= 0x8F))
            if is_br and ins.immediate_size:
                imm = ins.immediate_value
                tgt = nxt + imm
                if tgt < 0 or tgt > repl_len:
                    v = imm + diff
                    if not _fits(v, ins.immediate_size):
                        raise KernelBootError(f"relocation at {instr:#x}+{i}: displacement "
                                              f"{v:#x} does not fit")
                    o = i + ins.immediate_offset
                    buf[o:o + ins.immediate_size] = v.to_bytes(ins.immediate_size, "little",
                                                               signed=True)
                if b0 == JMP32:
                    # the kernel takes the immediate as decoded, before the
                    # relocation above, and adds the difference itself
                    v = imm + diff + 3
                    v = ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
                    if -128 <= v < 128:
                        buf[i] = JMP8
                        buf[i + 1] = v & 0xFF
                        buf[i + 2:nxt] = bytes([INT3]) * (ins.length - 2)
            if ins.rip_relative:
                tgt = nxt + ins.displacement_value
                if tgt < 0 or tgt > repl_len:
                    v = ins.displacement_value + diff
                    if not _fits(v, ins.displacement_size):
                        raise KernelBootError(f"relocation at {instr:#x}+{i}: RIP displacement "
                                              f"{v:#x} does not fit")
                    o = i + ins.displacement_offset
                    buf[o:o + ins.displacement_size] = v.to_bytes(ins.displacement_size,
                                                                  "little", signed=True)
            i = nxt
    optimize_nops_k(buf, instrlen)


# ----------------------------------------------------------- return thunk
def return_thunk_addr(kt: KernelText, opts: BootOptions) -> int:
    rt = opts.return_thunk
    return rt if isinstance(rt, int) else kt.sym(rt)


def cpu_wants_rethunk_at(kt: KernelText, caps: CpuCaps, opts: BootOptions, addr: int) -> bool:
    if not caps.has(F_RETHUNK):
        return False
    if return_thunk_addr(kt, opts) != kt.opt("its_return_thunk"):
        return True
    return not addr & 0x20


def _rel32(op: int, addr: int, dest: int) -> bytes:
    return bytes([op]) + ((dest - (addr + 5)) & 0xFFFFFFFF).to_bytes(4, "little")


# ----------------------------------------------------------------- returns
def static_call_fixup(kt: KernelText, caps: CpuCaps, opts: BootOptions, addr: int, op: int,
                      dest: int | None) -> bool:
    """``__static_call_fixup``: a return site that is a static-call
    trampoline (``tramp_ud`` after it) is rewritten as RET type."""
    o = addr - kt.base
    if kt.buf[o + 5:o + 8] != TRAMP_UD:
        return False
    if op == RET or dest == kt.sym("__x86_return_thunk"):
        if cpu_wants_rethunk_at(kt, caps, opts, addr):
            code = _rel32(JMP32, addr, return_thunk_addr(kt, opts))
        else:
            code = bytes([RET, INT3, INT3, INT3, INT3])
        kt.write(".return_sites", addr, code)
    return True


def apply_returns_k(kt: KernelText, sites: list[int], caps: CpuCaps, opts: BootOptions,
                    dbg: Callable[[str], None] | None = None) -> TableStats:
    st = TableStats(entries=len(sites))
    rt_sym = kt.sym("__x86_return_thunk")
    thunk = return_thunk_addr(kt, opts)
    rethunk = caps.has(F_RETHUNK)
    its_rt = thunk == kt.opt("its_return_thunk")
    buf, base = kt.buf, kt.base
    ret_cache: dict[int, bytes] = {}
    for addr in sites:
        o = addr - base
        if buf[o] == JMP32:
            n = 5
            dest = addr + 5 + int.from_bytes(buf[o + 1:o + 5], "little", signed=True)
            op = JMP32
        else:
            ins = fast_decode(kt, addr)
            if ins is None:
                st.skipped += 1
                st.note("undecodable")
                continue
            n, op = ins.length, ins.op1
            dest = ins.target if op == JMP32 else None
        if buf[o + 5:o + 8] == TRAMP_UD and static_call_fixup(kt, caps, opts, addr, op, dest):
            st.skipped += 1
            st.note("static_call trampoline")
            continue
        if dest != rt_sym:
            st.skipped += 1
            st.note("missing return thunk")
            continue
        if dbg:
            dbg(f"return thunk at: {kt.describe(addr)} ({addr:#x}) len: {n} to: "
                f"{kt.describe(dest)}")
        if rethunk and (not its_rt or not addr & 0x20):
            new = _rel32(JMP32, addr, thunk) + bytes([INT3]) * (n - 5)
        else:
            new = ret_cache.get(n)
            if new is None:
                new = ret_cache[n] = bytes([RET]) + bytes([INT3]) * (n - 1)
        if dbg:
            dbg(f"{addr:#x}: orig: {bytes(buf[o:o + n]).hex(' ')}")
            dbg(f"{addr:#x}: repl: {new.hex(' ')}")
        st.applied += 1
        st.changed += kt.write(".return_sites", addr, new)
    return st


