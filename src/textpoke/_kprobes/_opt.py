# SPDX-License-Identifier: GPL-2.0-only
"""Optimised kprobes: the checks that decide whether a probe's INT3 may
become a JMP32 to an out-of-line buffer, and that buffer, laid out as the
kernel lays it out (``optprobe_template`` and
``arch_prepare_optimized_kprobe``), so that on a real image it is the
kernel's byte for byte::

    push $__KERNEL_DS; push %rsp; pushfq      # pt_regs' ss, sp (- 8), flags
    NOP3 | CLAC                               # CLAC when the CPU has SMAP
    sub $24, %rsp                             # cs, ip, orig_ax: left to the callback
    push rdi, rsi, rdx, rcx, rax, r8..r11, rbx, rbp, r12..r15   # a struct pt_regs
    mov %rsp, %rsi                            # arg 2: the pt_regs
    movabs $op, %rdi                          # arg 1: the struct optimized_kprobe
    call optimized_callback
    mov 18*8(%rsp), %rdx; mov %rdx, 20*8(%rsp)   # flags into the ss slot
    pop r15..rdi; add $24, %rsp; add $16, %rsp; popfq
    <copies of the displaced instructions, RIP-relative operands re-targeted>
    jmp <probe address + displaced length>

Each buffer is a slot of :data:`MAX_OPTINSN_SIZE` bytes (the template, the
longest displaced run and the JMP back) in a page of such slots
(:class:`OptinsnSlots`, ``kprobe_optinsn_slots``); only the bytes above
are written, the rest of the slot keeps what the page held.

On a machine whose CPUs run (the sim), ``optimized_callback`` is a stub
of two bytes, ``int3; ret``: its INT3 is the call into the host, which
reads the ``struct pt_regs`` the template built on the guest stack, runs
the pre-handlers with ``ip`` = probe address + 1 (as the INT3 path shows
them) and writes back what they changed; the template's pops restore it.
On a real image offline the call goes to the image's own
``optimized_callback`` (never run there).

Rules learnt from ``arch/x86/kernel/kprobes/opt.c`` and
``kernel/kprobes.c`` (Linux 6.12: ``can_optimize``,
``copy_optimized_instructions``, ``arch_prepare_optimized_kprobe``,
``__get_insn_slot``); the code is our own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._core._insn import CALL_INSN_OPCODE, JMP32_INSN_OPCODE, JMP32_INSN_SIZE, Insn, text_gen_insn
from ._insn import can_boost, relocate

__all__ = ["PT_REGS", "OptError", "detour_code", "optprobe_template", "Detour", "buffer_op",
           "OptinsnSlots", "InsnSlots", "MAX_INSN_SIZE", "RELATIVEJUMP_SIZE", "MAX_OPTINSN_SIZE",
           "TMPL_CLAC_IDX",
           "TMPL_MOVE_IDX", "TMPL_CALL_IDX", "TMPL_END_IDX", "KERNEL_CS"]

RELATIVEJUMP_SIZE = JMP32_INSN_SIZE
DISP32_SIZE = 4
PAGE_SIZE = 4096
#: GDT selectors of x86-64 Linux (entries 2 and 3)
KERNEL_CS, KERNEL_DS = 0x10, 0x18
#: struct pt_regs on x86-64, from its lowest address up
PT_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
           "rdx", "rsi", "rdi", "orig_ax", "ip", "cs", "flags", "sp", "ss")
_GPRS = PT_REGS[:15]
_REGNO = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rbp": 5, "rsi": 6, "rdi": 7,
          **{f"r{i}": i for i in range(8, 16)}}
_NOP3 = bytes.fromhex("0f1f00")
_NOP5 = bytes.fromhex("0f1f440000")
_CLAC = bytes.fromhex("0f01ca")
#: the longest run of instructions a JMP32 can displace: up to 4 bytes of
#: whole instructions and one more of at most 16 (MAX_INSN_SIZE + 4)
MAX_OPTIMIZED_LENGTH = 16 + DISP32_SIZE
#: x86's MAX_INSN_SIZE: a kprobe instruction slot's size, and the longest
#: copy and tail it holds
MAX_INSN_SIZE = 16


class OptError(ValueError):
    """Why a probe cannot be optimised (the text is left as it was)."""


def _push(r: str) -> bytes:
    n = _REGNO[r]
    return bytes([0x41, 0x50 + n - 8]) if n >= 8 else bytes([0x50 + n])


def _pop(r: str) -> bytes:
    n = _REGNO[r]
    return bytes([0x41, 0x58 + n - 8]) if n >= 8 else bytes([0x58 + n])


def _rsp_disp32(op: int, slot: int) -> bytes:
    # mov between %rdx and slot*8(%rsp), the way GAS encodes it (SIB, disp32)
    return bytes([0x48, op, 0x94, 0x24]) + struct.pack("<i", slot * 8)


def _template() -> tuple[bytes, int, int, int]:
    out = bytearray()
    out += bytes([0x6A, KERNEL_DS])          # ss
    out += b"\x54"                           # sp (as pushed: 8 too low, fixed by the callback)
    out += b"\x9c"                           # flags
    clac = len(out)
    out += _NOP3
    out += b"\x48\x83\xec\x18"               # orig_ax, ip, cs: not pushed
    for r in reversed(_GPRS):                # rdi first: r15 ends at the lowest address
        out += _push(r)
    out += b"\x48\x89\xe6"                   # mov %rsp, %rsi
    move = len(out)
    out += _NOP5 + _NOP5
    call = len(out)
    out += _NOP5
    out += _rsp_disp32(0x8B, PT_REGS.index("flags"))    # mov flags(%rsp), %rdx
    out += _rsp_disp32(0x89, PT_REGS.index("ss"))       # mov %rdx, ss(%rsp)
    for r in _GPRS:
        out += _pop(r)
    out += b"\x48\x83\xc4\x18"               # past orig_ax, ip, cs
    out += b"\x48\x83\xc4\x10"               # past flags and sp
    out += b"\x9d"                           # flags, from the ss slot
    return bytes(out), clac, move, call


_TEMPLATE, TMPL_CLAC_IDX, TMPL_MOVE_IDX, TMPL_CALL_IDX = _template()
TMPL_END_IDX = len(_TEMPLATE)
#: one optinsn slot: the template, the displaced copies, the JMP back
MAX_OPTINSN_SIZE = TMPL_END_IDX + MAX_OPTIMIZED_LENGTH + JMP32_INSN_SIZE


def optprobe_template() -> bytes:
    """``optprobe_template_entry .. _end`` as built (NOP3 at the CLAC, the
    argument and the call still NOPs)."""
    return _TEMPLATE


@dataclass(frozen=True, slots=True)
class Detour:
    addr: int
    code: bytes           # what is written at addr (the slot's first len(code) bytes)
    call_ret: int         # the return address of its call to optimized_callback
    copies: int           # address of the relocated instructions
    length: int           # displaced bytes at the probe
    op: int               # the pointer given as the callback's first argument


def detour_code(buf: int, addr: int, insns: list[Insn], *, op: int, callback: int,
                smap: bool = False) -> Detour:
    """The out-of-line buffer for a probe at *addr* displacing *insns*, to
    be placed at *buf*: the template with CLAC when *smap*, *op* as the
    first argument and a call of *callback*, then the copies and the jump
    back.  OptError when a copy or a jump cannot reach."""
    out = bytearray(_TEMPLATE)
    if smap:
        out[TMPL_CLAC_IDX:TMPL_CLAC_IDX + 3] = _CLAC
    out[TMPL_MOVE_IDX:TMPL_MOVE_IDX + 10] = b"\x48\xbf" + struct.pack("<Q", op & (1 << 64) - 1)
    try:
        out[TMPL_CALL_IDX:TMPL_CALL_IDX + 5] = text_gen_insn(CALL_INSN_OPCODE,
                                                             buf + TMPL_CALL_IDX, callback)
    except Exception as e:
        raise OptError(f"the buffer at {buf:#x} cannot call optimized_callback at "
                       f"{callback:#x} (beyond ±2 GiB): {e}") from None
    copies = buf + len(out)
    for ins in insns:
        try:
            out += relocate(ins, buf + len(out))
        except ValueError as e:
            raise OptError(str(e)) from None
    length = sum(i.length for i in insns)
    if length > MAX_OPTIMIZED_LENGTH:
        raise OptError(f"{length} displaced bytes exceed {MAX_OPTIMIZED_LENGTH}")
    try:
        out += text_gen_insn(JMP32_INSN_OPCODE, buf + len(out), addr + length)
    except Exception as e:
        raise OptError(f"the buffer at {buf:#x} cannot jump back to {addr + length:#x} "
                       f"(beyond ±2 GiB): {e}") from None
    return Detour(buf, bytes(out), buf + TMPL_CALL_IDX + 5, copies, length, op)


def buffer_op(code: bytes) -> int | None:
    """The ``struct optimized_kprobe`` address an optprobe buffer passes to
    its callback (a kernel's buffer, e.g. from a run-time reference's
    optinsn page), or None when *code* does not start like one."""
    if len(code) < TMPL_END_IDX or code[:TMPL_CLAC_IDX] != _TEMPLATE[:TMPL_CLAC_IDX] or \
            code[TMPL_MOVE_IDX:TMPL_MOVE_IDX + 2] != b"\x48\xbf":
        return None
    return struct.unpack_from("<Q", code, TMPL_MOVE_IDX + 2)[0]


class OptinsnSlots:
    """A ``struct kprobe_insn_cache``: pages of *slot_size*-byte slots taken
    from *mem* (an :class:`~textpoke.ExecMem`) a page at a time --
    ``kprobe_optinsn_slots`` (:data:`MAX_OPTINSN_SIZE`, the default) and
    ``kprobe_insn_slots`` (:class:`InsnSlots`, 16 bytes).  A slot is the
    first clean one of the newest page with room (the kernel puts a new
    page at the head of its list).  Freeing a slot never clears it (the
    kernel's slots are only marked): a clean free makes it reusable at
    once; a *dirty* one (a boosted copy, an optimised buffer: a task may
    still be running in it) waits for a garbage collection, run when more
    slots than a page holds are dirty or when no clean slot is left.  A page
    left with no slot in use is given back unless it is the last one."""

    def __init__(self, mem, slot_size: int = MAX_OPTINSN_SIZE) -> None:
        self.mem, self.slot_size = mem, slot_size
        self.per_page = PAGE_SIZE // slot_size
        #: newest first: (page, state of each slot: 0 clean, 1 used, 2 dirty)
        self.pages: list[tuple[int, list[int]]] = []
        self.nr_garbage = 0

    def alloc(self) -> int:
        for _retry in range(2):
            for base, used in self.pages:
                for i, u in enumerate(used):
                    if u == 0:
                        used[i] = 1
                        return base + i * self.slot_size
            if not self.nr_garbage:
                break
            self.collect_garbage()
        base = self.mem.alloc(PAGE_SIZE)
        used = [0] * self.per_page
        used[0] = 1
        self.pages.insert(0, (base, used))
        return base

    def free(self, addr: int, dirty: bool = False) -> None:
        for base, used in self.pages:
            i, r = divmod(addr - base, self.slot_size)
            if 0 <= i < self.per_page and not r and used[i] == 1:
                if dirty:
                    used[i] = 2
                    self.nr_garbage += 1
                    if self.nr_garbage > self.per_page:
                        self.collect_garbage()
                else:
                    self._collect_one(base, used, i)
                return
        raise ValueError(f"instruction slot {addr:#x} was not allocated")

    def _collect_one(self, base: int, used: list[int], i: int) -> bool:
        used[i] = 0
        if any(used):
            return False
        if len(self.pages) > 1:
            self.pages = [pg for pg in self.pages if pg[0] != base]
            self.mem.free(base)
        return True

    def collect_garbage(self) -> None:
        """``collect_garbage_slots``: every dirty slot clean again (the
        kernel waits for an RCU grace period first)."""
        for base, used in list(self.pages):
            for i, u in enumerate(used):
                if u == 2 and self._collect_one(base, used, i):
                    break
        self.nr_garbage = 0

    def is_slot_addr(self, addr: int) -> bool:
        return any(base <= addr < base + PAGE_SIZE for base, _u in self.pages)


class InsnSlots(OptinsnSlots):
    """``kprobe_insn_slots``: the out-of-line copies of probed instructions,
    :data:`MAX_INSN_SIZE` bytes each (256 a page)."""

    def __init__(self, mem) -> None:
        super().__init__(mem, MAX_INSN_SIZE)


def check_displaced(insns: list[Insn]) -> None:
    """The displaced instructions must be INT3-free and boostable
    (``copy_optimized_instructions``)."""
    for ins in insns:
        if ins.opcode[:1] == b"\xcc":
            raise OptError(f"INT3 at {ins.addr:#x} inside the range to displace")
        if not can_boost(ins):
            raise OptError(f"{ins.text!r} at {ins.addr:#x} cannot be displaced into a detour "
                           "(not boostable: branches, calls, LOCK/REP, ...)")


def check_function(func_insns: list[Insn], addr: int, *, jump_tables: bool = True,
                   thunks: "tuple[int, int] | None" = None) -> None:
    """No instruction of the function may jump into the bytes the JMP32
    overwrites after its first -- the kernel's test takes the byte after
    the JMP32 too --, nor, in a kernel that may have jump tables, jump
    indirectly (``can_optimize``: a kernel built with retpolines or IBT
    has none, and takes indirect jumps; *jump_tables* False).  *thunks*
    (6.1's rule): a jump (not a call) into ``[start, end)`` counts as an
    indirect jump too."""
    lo, hi = addr + 1, addr + RELATIVEJUMP_SIZE
    for ins in func_insns:
        if jump_tables and ins.flow == "indirect" and ins.mnemonic == "jmp":
            raise OptError(f"indirect jump {ins.text!r} at {ins.addr:#x} in the function "
                           "(it may target the range)")
        t = ins.branch_target
        if thunks is not None and t is not None and ins.flow in ("jmp", "jcc") and \
                thunks[0] <= t < thunks[1]:
            raise OptError(f"{ins.text!r} at {ins.addr:#x} jumps into the thunks "
                           f"[{thunks[0]:#x}, {thunks[1]:#x}): an indirect jump to 6.1's "
                           "can_optimize")
        if t is not None and lo <= t <= hi:
            raise OptError(f"{ins.text!r} at {ins.addr:#x} jumps into the range "
                           f"[{lo:#x}, {hi:#x}] the JMP32 would overwrite")


def check_reach(addr: int, buf: int) -> None:
    rel = buf - (addr + RELATIVEJUMP_SIZE)
    if not -(1 << 31) <= rel < (1 << 31):
        raise OptError(f"the detour at {buf:#x} is beyond ±2 GiB of the probe at {addr:#x}")
