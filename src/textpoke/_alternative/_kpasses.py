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
from ._code import CALL, INT3, JMP8, JMP32, LFENCE, NOP1, RET, rel32
from ._ktext import CpuCaps, KernelText

__all__ = ["BootOptions", "TableStats", "fast_decode", "CALL", "INT3", "JMP8", "JMP32", "RET",
           "NOP1", "LFENCE", "apply_returns_k", "cpu_wants_rethunk_at", "static_call_fixup"]
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
            code = rel32(JMP32, addr, return_thunk_addr(kt, opts))
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
            new = rel32(JMP32, addr, thunk) + bytes([INT3]) * (n - 5)
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


