# SPDX-License-Identifier: GPL-2.0-only
"""BPF-JIT text pokes: ``bpf_arch_text_poke``, ``bpf_arch_text_copy``,
``bpf_arch_text_invalidate`` and a tiny JIT.

``bpf_arch_text_poke(ip, type, old_addr, new_addr)`` turns the 5-byte
instruction at *ip* from "what *old_addr* says" into "what *new_addr*
says": a NOP5 for no address, else a CALL (``BPF_MOD_CALL``) or JMP
(``BPF_MOD_JUMP``) there.  *ip* must be core kernel text or the text of a
BPF program (:meth:`BpfJit.text_poke` knows its programs; the bare
function takes an ``is_bpf_text`` predicate): anything else -- module
text, data -- is refused with :class:`BpfTextPokeInvalid` (``-EINVAL``).
On a kernel built with IBT (``ibt=True``, as Debian's 6.12 is) an ENDBR
at *ip* (ENDBR64, ENDBR32 or the sealed-ENDBR poison ``66 0f 1f 00``) is
stepped over: the hook is the instruction after it, as a JIT-ed
program's prologue puts it.  If *ip* does not hold the expected old
instruction the poke is refused with :class:`BpfTextPokeBusy` (the
kernel's ``-EBUSY``) and nothing is written; if it already holds the new
one nothing is done (returns 1); else it is patched with the SMP batch
(``smp_text_poke_single``) and 0 is returned.  ``text_mutex`` is held
across the check and the poke.

:class:`BpfJit` places programs in execmem with ``text_poke_copy`` and
frees them with ``text_poke_set(INT3)``; :func:`jit_add_const` emits a
program ``int prog(long x) { return x + k; }`` with iced-x86's encoder.

Rules learnt from ``arch/x86/net/bpf_jit_comp.c`` (Linux 6.12); the code
is our own.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Callable

import iced_x86

from ._core._insn import CALL_INSN_OPCODE, JMP32_INSN_OPCODE, text_gen_insn, x86_nops
from ._errors import TextPokeError
from ._execmem import ExecMem

__all__ = ["BPF_MOD_CALL", "BPF_MOD_JUMP", "BpfTextPokeBusy", "BpfTextPokeInvalid",
           "bpf_arch_text_poke", "is_endbr",
           "bpf_arch_text_copy", "bpf_arch_text_invalidate", "BpfJit", "BpfProg",
           "jit_add_const"]

BPF_MOD_CALL = "call"
BPF_MOD_JUMP = "jump"
_NOP5 = x86_nops[5]


class BpfTextPokeBusy(TextPokeError, RuntimeError):
    """The site does not hold the expected old instruction (``-EBUSY``)."""

    errno = errno.EBUSY

    def __init__(self, msg: str, *, ip: int = 0, found: bytes = b"", expected: bytes = b"") -> None:
        super().__init__(msg)
        self.ip, self.found, self.expected = ip, found, expected


class BpfTextPokeInvalid(TextPokeError, ValueError):
    """*ip* is neither core kernel text nor BPF text (``-EINVAL``; the
    kernel does not poke module text for BPF).  Nothing was written."""

    errno = errno.EINVAL

    def __init__(self, msg: str, *, ip: int = 0) -> None:
        super().__init__(msg)
        self.ip = ip


ENDBR_INSN_SIZE = 4
_ENDBR64 = 0xFA1E0FF3           # f3 0f 1e fa, little-endian
_ENDBR_POISON = 0x001F0F66      # 66 0f 1f 00: what apply_seal_endbr leaves


def is_endbr(word: int) -> bool:
    """ENDBR64, ENDBR32 (one bit apart) or the sealed-ENDBR NOP."""
    return word == _ENDBR_POISON or word & ~0x01000000 == _ENDBR64


def _insn(ip: int, t: str, target: int | None) -> bytes:
    if not target:
        return _NOP5
    if t == BPF_MOD_CALL:
        return text_gen_insn(CALL_INSN_OPCODE, ip, target)
    if t == BPF_MOD_JUMP:
        return text_gen_insn(JMP32_INSN_OPCODE, ip, target)
    raise ValueError(f"poke type must be BPF_MOD_CALL or BPF_MOD_JUMP, not {t!r}")


def bpf_arch_text_poke(core, ip: int, t: str, old_addr: int | None, new_addr: int | None, *,
                       is_bpf_text: Callable[[int], bool] | None = None,
                       ibt: bool = True) -> int:
    """1 if *ip* already holds the new instruction, 0 once written;
    :class:`BpfTextPokeInvalid` outside kernel/BPF text,
    :class:`BpfTextPokeBusy` when the old instruction is not there."""
    m = core.machine
    in_core = any(r.core and ip in r for r in m.text_ranges)
    if not in_core and not (is_bpf_text is not None and is_bpf_text(ip)):
        raise BpfTextPokeInvalid(f"bpf_arch_text_poke at {ip:#x}: neither kernel text nor BPF "
                                 "text (EINVAL); nothing written", ip=ip)
    if ibt and is_endbr(int.from_bytes(m.text_read(ip, ENDBR_INSN_SIZE), "little")):
        ip += ENDBR_INSN_SIZE
    old, new = _insn(ip, t, old_addr), _insn(ip, t, new_addr)
    with core.text_mutex:
        cur = core.machine.text_read(ip, 5)
        if cur != old:
            raise BpfTextPokeBusy(f"bpf_arch_text_poke at {ip:#x}: found {cur.hex(' ')}, expected "
                                  f"{old.hex(' ')} (EBUSY); nothing written", ip=ip, found=cur,
                                  expected=old)
        if cur == new:
            return 1
        core.smp_text_poke_single(ip, new)
    return 0


def bpf_arch_text_copy(core, dst: int, code: bytes) -> int:
    return core.text_poke_copy(dst, code)


def bpf_arch_text_invalidate(core, dst: int, length: int) -> int:
    return core.text_poke_set(dst, 0xCC, length)


def jit_add_const(k: int, ip: int = 0) -> bytes:
    """``lea eax, [rdi + k]; ret`` encoded by iced-x86."""
    R, M = iced_x86.Register, iced_x86.MemoryOperand
    insns = [iced_x86.Instruction.create_reg_mem(iced_x86.Code.LEA_R32_M, R.EAX,
                                                 M(R.RDI, displ=k, displ_size=1 if -128 <= k < 128 else 8)),
             iced_x86.Instruction.create(iced_x86.Code.RETNQ),
             iced_x86.Instruction.create(iced_x86.Code.INT3)]
    enc = iced_x86.Encoder(64)
    out = b""
    for ins in insns:
        enc.encode(ins, ip + len(out))
        out += bytes(enc.take_buffer())
    return out


@dataclass(frozen=True, slots=True)
class BpfProg:
    addr: int
    size: int
    code: bytes


class BpfJit:
    """Programs in execmem, placed and freed the BPF way."""

    def __init__(self, core, execmem: ExecMem | None = None, *, ibt: bool = True) -> None:
        self.core = core
        self.execmem = execmem or ExecMem(core)
        self.progs: dict[int, BpfProg] = {}
        self.ibt = ibt

    def is_bpf_text_address(self, addr: int) -> bool:
        """Inside one of this JIT's programs."""
        return any(p.addr <= addr < p.addr + p.size for p in self.progs.values())

    def load(self, code: bytes) -> BpfProg:
        addr = self.execmem.alloc(len(code))
        bpf_arch_text_copy(self.core, addr, code)
        p = BpfProg(addr, len(code), bytes(code))
        self.progs[addr] = p
        return p

    def free(self, prog: BpfProg) -> None:
        self.progs.pop(prog.addr)
        self.execmem.free(prog.addr)      # text_poke_set(INT3) first

    def text_poke(self, ip: int, t: str, old: BpfProg | int | None, new: BpfProg | int | None) -> int:
        a = old.addr if isinstance(old, BpfProg) else old
        b = new.addr if isinstance(new, BpfProg) else new
        return bpf_arch_text_poke(self.core, ip, t, a, b, is_bpf_text=self.is_bpf_text_address,
                                  ibt=self.ibt)
