# SPDX-License-Identifier: GPL-2.0-only
"""Optimised kprobes: the checks that decide whether a probe's INT3 may
become a JMP32 to a detour buffer, and the detour buffer itself.

The detour (guest code in execmem) is::

    pushfq; push rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r15   # the saved registers
    int3                                                      # "call optimized_callback"
    pop r15..r8, rbp, rdi, rsi, rdx, rcx, rbx, rax; popfq
    <copies of the displaced instructions, RIP-relative operands re-targeted>
    jmp <probe address + displaced length>

The INT3 in it is the call into the host: the handler reads the saved
registers from the frame on the guest stack (as ``optimized_callback``
gets a ``pt_regs`` built by the template), runs the pre-handlers with
``ip`` = probe address + 1 as the INT3 path shows them, and writes back
what they changed into the frame, which the pops then restore.

Rules learnt from ``arch/x86/kernel/kprobes/opt.c`` (Linux 6.12:
``can_optimize``, ``copy_optimized_instructions``,
``arch_optimize_kprobes``); the code is our own.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._core._insn import JMP32_INSN_OPCODE, JMP32_INSN_SIZE, Insn, text_gen_insn
from ._insn import can_boost, relocate

__all__ = ["FRAME_REGS", "OptError", "detour_code", "DETOUR_SIZE", "Detour", "RELATIVEJUMP_SIZE"]

RELATIVEJUMP_SIZE = JMP32_INSN_SIZE
DISP32_SIZE = 4
#: push order after pushfq; the frame, from the final sp upwards, is the
#: reverse of this, then flags
FRAME_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_REGNO = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rbp": 5, "rsi": 6, "rdi": 7,
          **{f"r{i}": i for i in range(8, 16)}}
DETOUR_SIZE = 128


class OptError(ValueError):
    """Why a probe cannot be optimised (the text is left as it was)."""


def _push(r: str) -> bytes:
    n = _REGNO[r]
    return bytes([0x41, 0x50 + n - 8]) if n >= 8 else bytes([0x50 + n])


def _pop(r: str) -> bytes:
    n = _REGNO[r]
    return bytes([0x41, 0x58 + n - 8]) if n >= 8 else bytes([0x58 + n])


@dataclass(frozen=True, slots=True)
class Detour:
    addr: int
    code: bytes
    call_int3: int        # address of the INT3 that calls the handler
    copies: int           # address of the relocated instructions
    length: int           # displaced bytes at the probe


def detour_code(buf: int, addr: int, insns: list[Insn]) -> Detour:
    """The detour buffer for a probe at *addr* displacing *insns*, to be
    placed at *buf*.  OptError when a copy or the jumps cannot reach."""
    save = b"\x9c" + b"".join(_push(r) for r in FRAME_REGS)
    restore = b"".join(_pop(r) for r in reversed(FRAME_REGS)) + b"\x9d"
    head = save + b"\xcc" + restore
    out = bytearray(head)
    copies = buf + len(out)
    for ins in insns:
        try:
            out += relocate(ins, buf + len(out))
        except ValueError as e:
            raise OptError(str(e)) from None
    length = sum(i.length for i in insns)
    try:
        out += text_gen_insn(JMP32_INSN_OPCODE, buf + len(out), addr + length)
    except Exception as e:
        raise OptError(f"the detour at {buf:#x} cannot jump back to {addr + length:#x} "
                       f"(beyond ±2 GiB): {e}") from None
    if len(out) > DETOUR_SIZE:
        raise OptError(f"detour of {len(out)} bytes exceeds {DETOUR_SIZE}")
    return Detour(buf, bytes(out), buf + len(save), copies, length)


def check_displaced(insns: list[Insn]) -> None:
    """The displaced instructions must be INT3-free and boostable
    (``copy_optimized_instructions``)."""
    for ins in insns:
        if ins.opcode[:1] == b"\xcc":
            raise OptError(f"INT3 at {ins.addr:#x} inside the range to displace")
        if not can_boost(ins):
            raise OptError(f"{ins.text!r} at {ins.addr:#x} cannot be displaced into a detour "
                           "(not boostable: branches, calls, LOCK/REP, ...)")


def check_function(func_insns: list[Insn], addr: int) -> None:
    """No instruction of the function may jump into the bytes the JMP32
    overwrites after its first, nor jump indirectly (``can_optimize``)."""
    lo, hi = addr + 1, addr + RELATIVEJUMP_SIZE
    for ins in func_insns:
        if ins.flow == "indirect" and ins.mnemonic == "jmp":
            raise OptError(f"indirect jump {ins.text!r} at {ins.addr:#x} in the function "
                           "(it may target the range)")
        t = ins.branch_target
        if t is not None and lo <= t < hi:
            raise OptError(f"{ins.text!r} at {ins.addr:#x} jumps into the range "
                           f"[{lo:#x}, {hi:#x}) the JMP32 would overwrite")


def check_reach(addr: int, buf: int) -> None:
    rel = buf - (addr + RELATIVEJUMP_SIZE)
    if not -(1 << 31) <= rel < (1 << 31):
        raise OptError(f"the detour at {buf:#x} is beyond ±2 GiB of the probe at {addr:#x}")
