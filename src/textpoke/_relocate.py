# SPDX-License-Identifier: GPL-2.0-only
"""Moving a function's first instructions out of line, so that a 5-byte
JMP can take their place: the instruction relocator behind patching an
*ordinary* function entry (one the compiler gave no fentry NOP).

The model is the kernel's optimised kprobe (``arch/x86/kernel/kprobes/
opt.c``: ``can_optimize``, ``copy_optimized_instructions``) and kprobes'
copy rules (``__copy_instruction``): the whole instructions covering the
JMP's five bytes are copied to a trampoline, each re-targeted for its new
address, followed by a JMP back to the first instruction not moved.  Here,
as there, the trampoline runs the copies in place of the originals; unlike
optprobes (which only displaces "boostable" instructions), short and near
JMP/Jcc are re-encoded as their rel32 forms (the uprobes/Dyninst way), so
a prologue beginning with a test-and-branch can still be moved.

:func:`plan_entry` decides whether a function can be moved and what moves,
given its bytes (machine-agnostic: the caller reads them from a live
process, a kernel image or a file); a refusal is a :class:`RelocError`
with a short ``reason`` code (counted per module by ``live sites``) and a
sentence.  :func:`trampoline` writes the copies for a given address.

What is refused, and why (``REASONS``):

* a function whose body after an ENDBR64 is shorter than 5 bytes, or
  whose symbol has no size (its body cannot be scanned);
* a branch anywhere in the function into the bytes the JMP replaces (after
  their first): it would land inside the JMP (``can_optimize`` scans the
  function the same way); also the function's ``.cold`` part, when the
  symbol table names one, and another symbol starting inside them (a
  second entry point);
* an indirect jump in the function (a jump table or a computed goto could
  land there; the kernel refuses them the same way) -- except a RIP-relative
  ``jmp *X(%rip)`` without an index, a tail call through the GOT, whose
  target is a function's entry;
* among the moved instructions: a CALL (the callee's return address would
  point into the replaced bytes: a thread sleeping in it would return into
  the JMP), RET, SYSCALL/SYSENTER, INT/INT3/UD (they trap by design, or a
  breakpoint of someone else is there), LOOP/JRCXZ/XBEGIN (no rel32 form),
  a branch into the moved bytes themselves (a loop), and an undecodable
  byte;
* a RIP-relative operand or branch target beyond ±2 GiB of the trampoline.

ENDBR64 stays first: a function beginning with it is patched after it, so
an indirect call still lands on an ENDBR64 (IBT) and then takes the JMP.
Code of our own; the rules were learnt from the kernel's sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import iced_x86

from ._core._insn import Insn, insn_decode_kernel
from ._kprobes._insn import is_exception_insn, relocate

__all__ = ["ENDBR64", "JMP_SIZE", "REASONS", "EntryPlan", "RelocError", "plan_entry",
           "trampoline", "relocated_copies", "scan_function"]

ENDBR64 = bytes.fromhex("f30f1efa")
JMP_SIZE = 5
_S32 = (-(1 << 31), (1 << 31) - 1)

#: reason code -> what it means (``live sites`` counts functions by code)
REASONS = {
    "no-size": "the symbol has no size: the function body cannot be scanned",
    "short": "shorter than the 5-byte JMP (after an ENDBR64)",
    "undecodable": "an undecodable byte in the function (data in the code?)",
    "jump-into": "a branch in the function lands inside the bytes the JMP replaces",
    "indirect-jump": "an indirect jump (jump table, computed goto) in the function",
    "entry-point": "another symbol starts inside the bytes the JMP replaces",
    "call": "a CALL among the instructions to move (its return address would be inside the JMP)",
    "ret": "a RET among the instructions to move",
    "syscall": "a SYSCALL/SYSENTER among the instructions to move",
    "int": "an INT/INT3/UD among the instructions to move",
    "branch": "a LOOP/JRCXZ/XBEGIN among the instructions to move (no rel32 form)",
    "loop": "a branch among the moved instructions back into them",
    "reach": "an operand or branch target beyond ±2 GiB of the trampoline",
}


class RelocError(ValueError):
    """Why a function entry cannot be moved (nothing was written)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class EntryPlan:
    """What moves out of a function's entry."""

    func: int                      # the function's address
    addr: int                      # where the JMP goes (func, or func + 4 after ENDBR64)
    moved: tuple[Insn, ...]        # the whole instructions the JMP covers
    orig: bytes                    # their bytes

    @property
    def length(self) -> int:
        return len(self.orig)

    @property
    def endbr(self) -> bool:
        return self.addr != self.func


_FC = iced_x86.FlowControl
_NONE = iced_x86.Register.NONE
_INVALID = iced_x86.Code.INVALID
_NEAR_KINDS = frozenset({iced_x86.OpKind.NEAR_BRANCH16, iced_x86.OpKind.NEAR_BRANCH32,
                         iced_x86.OpKind.NEAR_BRANCH64})
_BRANCHING = frozenset({_FC.UNCONDITIONAL_BRANCH, _FC.CONDITIONAL_BRANCH, _FC.CALL,
                        _FC.XBEGIN_XABORT_XEND})


def scan_function(code: bytes, func: int, lo: int, hi: int, *, what: str = "") -> None:
    """Decode *code* (a function's body at *func*) and refuse (RelocError)
    a branch into [lo, hi), an indirect jump other than a RIP-relative tail
    call, or an undecodable byte."""
    dec = iced_x86.Decoder(64, code, ip=func)
    ins = iced_x86.Instruction()
    where = f" ({what})" if what else ""
    while dec.can_decode:
        dec.decode_out(ins)
        if ins.code == _INVALID:
            raise RelocError("undecodable", f"undecodable bytes at {ins.ip:#x}{where}")
        fc = ins.flow_control
        if fc == _FC.NEXT:
            continue
        if fc in _BRANCHING and ins.op0_kind in _NEAR_KINDS:
            t = ins.near_branch_target
            if lo <= t < hi:
                raise RelocError("jump-into", f"the branch at {ins.ip:#x}{where} lands at "
                                              f"{t:#x}, inside the bytes the JMP replaces "
                                              f"[{lo - 1:#x}, {hi:#x})")
        elif fc == _FC.INDIRECT_BRANCH:
            if not (ins.is_ip_rel_memory_operand and ins.memory_index == _NONE):
                raise RelocError("indirect-jump", f"an indirect jump at {ins.ip:#x}{where} "
                                                  "(a jump table or computed goto may land "
                                                  "inside the bytes the JMP replaces)")


def plan_entry(code: bytes, func: int, *, others: Iterable[int] = (),
               extra: Iterable[tuple[bytes, int, str]] = ()) -> EntryPlan:
    """The plan for moving the entry of the function whose whole body
    (``size`` bytes as its symbol says) is *code*, at address *func*.
    *others*: starts of other symbols of the module (a second entry point
    inside the moved bytes is refused); *extra*: (code, addr, name) of more
    code that may branch back into the function (its ``.cold`` part).
    RelocError says why not."""
    if not code:
        raise RelocError("no-size", REASONS["no-size"])
    addr = func + 4 if code[:4] == ENDBR64 else func
    off = addr - func
    if len(code) - off < JMP_SIZE:
        raise RelocError("short", f"the function is {len(code)} bytes long"
                                  + (" (after ENDBR64: " + str(len(code) - off) + ")" if off else "")
                                  + ": a 5-byte JMP does not fit")
    moved: list[Insn] = []
    pc = off
    while pc - off < JMP_SIZE:
        try:
            insn = insn_decode_kernel(code[pc:pc + 15], func + pc)
        except Exception:
            raise RelocError("undecodable", f"undecodable bytes at {func + pc:#x}") from None
        if pc + insn.length > len(code):
            raise RelocError("short", "the instructions the JMP covers run past the "
                                      f"function's end ({len(code)} bytes)")
        moved.append(insn)
        pc += insn.length
    end = func + pc
    for insn in moved:
        _check_moved(insn, addr, end)
    for o in others:
        if addr < o < end:
            raise RelocError("entry-point", f"a symbol starts at {o:#x}, inside the bytes the "
                                            f"JMP replaces [{addr:#x}, {end:#x})")
    # a branch to addr itself is fine (it takes the JMP, as a call would);
    # one to any later byte of the moved range is not
    scan_function(code, func, addr + 1, end)
    for xcode, xaddr, name in extra:
        scan_function(xcode, xaddr, addr + 1, end, what=name)
    return EntryPlan(func, addr, tuple(moved), bytes(code[off:pc]))


def _check_moved(insn: Insn, lo: int, hi: int) -> None:
    m, a = insn.mnemonic, insn.addr
    if insn.raw[:1] == b"\xcc" or is_exception_insn(insn):
        raise RelocError("int", f"{_text(insn)} at {a:#x} among the instructions to move")
    if m in ("syscall", "sysenter", "sysexit", "sysret"):
        raise RelocError("syscall", f"{m} at {a:#x} among the instructions to move")
    if insn.flow == "call" or (insn.flow == "indirect" and m == "call"):
        raise RelocError("call", f"a CALL at {a:#x} among the instructions to move (a thread in "
                                 "its callee would return into the JMP)")
    if insn.flow == "ret":
        raise RelocError("ret", f"a RET at {a:#x} among the instructions to move")
    if insn.flow == "int":
        raise RelocError("int", f"{_text(insn)} at {a:#x} among the instructions to move")
    if insn.flow in ("jmp", "jcc"):
        if insn.branch_target is None:
            raise RelocError("branch", f"{_text(insn)} at {a:#x}: no rel32 form")
        if lo <= insn.branch_target < hi:
            raise RelocError("loop", f"the branch at {a:#x} goes back into the moved bytes")
        if insn.flow == "jcc" and m in ("loop", "loope", "loopne", "jrcxz", "jecxz"):
            raise RelocError("branch", f"{m} at {a:#x}: no rel32 form")
    elif m in ("xbegin", "xabort", "xend"):
        raise RelocError("branch", f"{m} at {a:#x} among the instructions to move")
    elif insn.flow == "indirect":
        pass            # a RIP-relative tail JMP (scan_function refused the others)


def _text(insn: Insn) -> str:
    try:
        return repr(insn.text)
    except Exception:
        return insn.raw.hex(" ")


def _rel32(opcode: bytes, at: int, target: int) -> bytes:
    disp = target - (at + len(opcode) + 4)
    if not _S32[0] <= disp <= _S32[1]:
        raise RelocError("reach", f"the branch target {target:#x} is beyond ±2 GiB of the "
                                  f"trampoline at {at:#x}")
    return opcode + disp.to_bytes(4, "little", signed=True)


def relocated_copies(plan: EntryPlan, dest: int) -> bytes:
    """The moved instructions re-encoded to run at *dest*: RIP-relative
    operands re-targeted, JMP rel8 -> JMP rel32, Jcc rel8 -> Jcc rel32
    (same targets)."""
    out = bytearray()
    for insn in plan.moved:
        at = dest + len(out)
        if insn.flow == "jmp" and insn.branch_target is not None:
            out += _rel32(b"\xe9", at, insn.branch_target)
        elif insn.flow == "jcc" and insn.branch_target is not None:
            op = insn.opcode
            cc = (op[1] if op[0] == 0x0F else op[0]) & 0xF
            out += _rel32(bytes([0x0F, 0x80 | cc]), at, insn.branch_target)
        else:
            try:
                out += relocate(insn, at)
            except ValueError as e:
                raise RelocError("reach", str(e)) from None
    return bytes(out)


def trampoline(plan: EntryPlan, dest: int, head: bytes = b"") -> bytes:
    """*head* (e.g. a counter's increment), then the moved instructions
    re-encoded for ``dest + len(head)``, then ``jmp`` back to the first
    instruction not moved."""
    body = head + relocated_copies(plan, dest + len(head))
    return body + _rel32(b"\xe9", dest + len(body), plan.addr + plan.length)
