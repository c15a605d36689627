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
* an indirect jump in the function that may land there (the kernel refuses
  every indirect jump; here two kinds are proved harmless, see
  :mod:`textpoke._indirect_jumps`: a tail call through a function pointer
  loaded just before, whose target is a function's entry, and a jump table whose
  size a ``cmp``/``ja`` bounds and whose entries, read, all land elsewhere);
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
from typing import Callable, Iterable

import iced_x86

from ._core._insn import Insn, insn_decode_kernel
from ._indirect_jumps import BRANCHING as _BRANCHING
from ._indirect_jumps import ENDS as _ENDS
from ._indirect_jumps import NEAR_KINDS as _NEAR_KINDS
from ._indirect_jumps import check_indirect
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
_INVALID = iced_x86.Code.INVALID
_IMM32 = frozenset({iced_x86.OpKind.IMMEDIATE32, iced_x86.OpKind.IMMEDIATE32TO64,
                    iced_x86.OpKind.IMMEDIATE64})


def scan_function(code: bytes, func: int, lo: int, hi: int, *, what: str = "",
                  read: Callable[[int, int], bytes] | None = None,
                  leaving: set[int] | None = None) -> None:
    """Decode *code* (a function's body at *func*) and refuse (RelocError)
    a branch into [lo, hi), an undecodable byte, or an indirect jump that
    may land there (see :func:`~textpoke._indirect_jumps.check_indirect`;
    *read* reads the data a jump table is in -- without it every table is
    refused).  *leaving*
    collects the targets of JMP/Jcc that leave the body."""
    dec = iced_x86.Decoder(64, code, ip=func)
    ins = iced_x86.Instruction()
    where = f" ({what})" if what else ""
    indirect = False
    end = func + len(code)
    while dec.can_decode:
        dec.decode_out(ins)
        if ins.code == _INVALID:
            raise RelocError("undecodable", f"undecodable bytes at {ins.ip:#x}{where}")
        fc = ins.flow_control
        if fc == _FC.NEXT:
            # an address inside the moved bytes taken (a label's, for a
            # computed goto): lea X(%rip), or an immediate in a non-PIE
            if (ins.is_ip_rel_memory_operand and lo <= ins.ip_rel_memory_address < hi) or \
                    (ins.op_count > 1 and ins.op1_kind in _IMM32
                     and lo <= ins.immediate(1) < hi):
                raise RelocError("jump-into", f"the instruction at {ins.ip:#x}{where} takes "
                                              "the address of a byte inside the ones the "
                                              "JMP replaces (a label for a computed goto?)")
            continue
        if fc in _BRANCHING and ins.op0_kind in _NEAR_KINDS:
            t = ins.near_branch_target
            if lo <= t < hi:
                raise RelocError("jump-into", f"the branch at {ins.ip:#x}{where} lands at "
                                              f"{t:#x}, inside the bytes the JMP replaces "
                                              f"[{lo - 1:#x}, {hi:#x})")
            if leaving is not None and fc != _FC.CALL and not func <= t < end:
                leaving.add(t)
        elif fc == _FC.INDIRECT_BRANCH:
            indirect = True
    if indirect:        # rare: decode again, keeping the instructions
        insns = list(iced_x86.Decoder(64, code, ip=func))
        targets = sorted(i.near_branch_target for i in insns
                         if i.flow_control in _BRANCHING and i.op0_kind in _NEAR_KINDS)
        memo: dict = {}          # a table dispatched from many places is read once
        for k, j in enumerate(insns):
            if j.flow_control == _FC.INDIRECT_BRANCH:
                why = check_indirect(insns, k, targets, lo, hi, (func, func + len(code)), read,
                                      memo)
                if why:
                    raise RelocError("indirect-jump", f"the indirect jump at {j.ip:#x}{where} "
                                                      f"may land inside the bytes the JMP "
                                                      f"replaces: {why}")


def plan_entry(code: bytes, func: int, *, others: Iterable[int] = (),
               extra: Iterable[tuple[bytes, int, str]] = (),
               read: Callable[[int, int], bytes] | None = None,
               starts: Iterable[int] = (),
               code_read: Callable[[int, int], bytes] | None = None) -> EntryPlan:
    """The plan for moving the entry of the function whose whole body
    (``size`` bytes as its symbol says) is *code*, at address *func*.
    *others*: starts of other symbols of the module (a second entry point
    inside the moved bytes is refused); *extra*: (code, addr, name) of more
    code that may branch back into the function (its ``.cold`` part);
    *read*: reads the process's (or image's) memory, for jump tables and
    for the code the function jumps to outside its body (its unnamed cold
    part), followed unless it starts a function of *starts* (read with
    *code_read* when given: e.g. the file, cheaper than the process).
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
    leaving: set[int] = set()
    scan_function(code, func, addr + 1, end, read=read, leaving=leaving)
    for xcode, xaddr, name in extra:
        scan_function(xcode, xaddr, addr + 1, end, what=name, read=read)
    if (code_read or read) is not None and leaving:
        _follow_out(leaving, (func, func + len(code)), addr + 1, end, code_read or read,
                    starts if isinstance(starts, (set, frozenset)) else set(starts))
    return EntryPlan(func, addr, tuple(moved), bytes(code[off:pc]))


#: instructions followed outside a function, at most (a cold part is short)
_OUTSIDE_BUDGET = 500
_CHUNK = 512


def _follow_out(todo: set[int], body: tuple[int, int], lo: int, hi: int, read,
                starts: set[int]) -> None:
    """Follow the code a function jumps to outside its body -- its cold
    part, which a stripped binary does not name -- along its direct
    JMP/Jcc (not into other functions' entries, not through CALLs), and
    refuse a branch from there into [lo, hi).  Best effort: the walk stops
    at an undecodable byte, an unreadable address, or after a budget."""
    seen: set[int] = set()
    work = sorted(todo - starts)
    budget = _OUTSIDE_BUDGET
    while work and budget > 0:
        pc = work.pop()
        while budget > 0 and pc not in seen:
            try:
                buf = read(pc, _CHUNK)
            except (OSError, ValueError):
                break
            dec = iced_x86.Decoder(64, buf, ip=pc)
            stop = False
            for ins in dec:
                budget -= 1
                if ins.code == _INVALID or pc in seen or budget <= 0:
                    stop = True
                    break
                seen.add(pc)
                pc = ins.next_ip
                fc = ins.flow_control
                if fc in _BRANCHING and ins.op0_kind in _NEAR_KINDS and fc != _FC.CALL:
                    t = ins.near_branch_target
                    if lo <= t < hi:
                        raise RelocError("jump-into", f"the branch at {ins.ip:#x}, in code the "
                                                      f"function jumps to outside its body (a "
                                                      f"cold part), lands at {t:#x}, inside the "
                                                      "bytes the JMP replaces")
                    if not body[0] <= t < body[1] and t not in seen and t not in starts:
                        work.append(t)
                if fc in _ENDS:
                    stop = True
                    break
            if stop or dec.position == 0:
                break



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
