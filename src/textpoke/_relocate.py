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
  :func:`_check_indirect`: a tail call through a function pointer loaded
  just before, whose target is a function's entry, and a jump table whose
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

import bisect
from dataclasses import dataclass
from typing import Callable, Iterable

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
_IMM32 = frozenset({iced_x86.OpKind.IMMEDIATE32, iced_x86.OpKind.IMMEDIATE32TO64,
                    iced_x86.OpKind.IMMEDIATE64})
_BRANCHING = frozenset({_FC.UNCONDITIONAL_BRANCH, _FC.CONDITIONAL_BRANCH, _FC.CALL,
                        _FC.XBEGIN_XABORT_XEND})


def scan_function(code: bytes, func: int, lo: int, hi: int, *, what: str = "",
                  read: Callable[[int, int], bytes] | None = None,
                  leaving: set[int] | None = None) -> None:
    """Decode *code* (a function's body at *func*) and refuse (RelocError)
    a branch into [lo, hi), an undecodable byte, or an indirect jump that
    may land there (see :func:`_check_indirect`; *read* reads the data a
    jump table is in -- without it every table is refused).  *leaving*
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
                why = _check_indirect(insns, k, targets, lo, hi, (func, func + len(code)), read,
                                      memo)
                if why:
                    raise RelocError("indirect-jump", f"the indirect jump at {j.ip:#x}{where} "
                                                      f"may land inside the bytes the JMP "
                                                      f"replaces: {why}")


# --- indirect jumps: which can be proved not to land in the moved bytes --------
_INFO = iced_x86.InstructionInfoFactory()
_WRITES = frozenset({iced_x86.OpAccess.WRITE, iced_x86.OpAccess.READ_WRITE,
                     iced_x86.OpAccess.COND_WRITE, iced_x86.OpAccess.READ_COND_WRITE})
_full = iced_x86.RegisterExt.full_register
_MEM = iced_x86.OpKind.MEMORY
_REG = iced_x86.OpKind.REGISTER
_RIP = iced_x86.Register.RIP
_C = iced_x86.Code
_LOOKBACK = 12
#: a table longer than this is not believed
_TABLE_MAX = 4096


def _writes(ins, full: int) -> bool:
    return any(_full(u.register) == full and u.access in _WRITES
               for u in _INFO.info(ins).used_registers())


def _merges(targets: list[int], after: int, upto: int) -> bool:
    """A direct branch of the function lands in (after, upto]: another path
    joins there, so an instruction before it need not have run."""
    i = bisect.bisect_right(targets, after)
    return i < len(targets) and targets[i] <= upto


def _def_of(insns: list, k: int, full: int, targets: list[int]) -> int | None:
    """Index of the instruction before *k* that last wrote *full*, if it
    runs on every path to *k* (no branch target between); else None."""
    for m in range(k - 1, max(k - 1 - _LOOKBACK, -1), -1):
        if _merges(targets, insns[m].ip, insns[k].ip):
            return None
        if insns[m].flow_control not in (_FC.NEXT, _FC.CONDITIONAL_BRANCH):
            return None      # a call or jump between (a conditional one leaving is fine)
        if _writes(insns[m], full):
            return m
    return None


_ENDS = frozenset({_FC.UNCONDITIONAL_BRANCH, _FC.INDIRECT_BRANCH, _FC.RETURN,
                   _FC.INTERRUPT, _FC.EXCEPTION})
_STEPS = 400


class _Flow:
    """The predecessors of each instruction of a function (fall-through and
    direct branches), for the backward searches below."""

    def __init__(self, insns: list) -> None:
        self.insns = insns
        at = {i.ip: n for n, i in enumerate(insns)}
        self.srcs: dict[int, list[int]] = {}
        for n, i in enumerate(insns):
            if i.flow_control in _BRANCHING and i.op0_kind in _NEAR_KINDS:
                t = at.get(i.near_branch_target)
                if t is not None:
                    self.srcs.setdefault(t, []).append(n)

    def preds(self, k: int) -> list[int] | None:
        """None when *k* may be reached from outside (the entry, or after an
        instruction that ends a path with nothing jumping to it)."""
        out = list(self.srcs.get(k, ()))
        if k > 0 and self.insns[k - 1].flow_control not in _ENDS:
            out.append(k - 1)
        if k == 0:
            return None
        return out

    def defs(self, k: int, full: int, ok) -> bool:
        """Whether on EVERY path into instruction *k* the last write of
        *full* is an instruction for which ``ok(insn)`` holds, written with
        no call between (``ok`` may return "through" for a copy of the
        register into itself, whose own definition is searched on)."""
        seen: set[int] = set()
        todo = [k]
        steps = 0
        while todo:
            pos = todo.pop()
            ps = self.preds(pos)
            if ps is None:
                return False                   # from the caller or from nowhere known
            for p in ps:
                if p in seen:
                    continue
                seen.add(p)
                steps += 1
                if steps > _STEPS:
                    return False
                ins = self.insns[p]
                if ins.flow_control in (_FC.CALL, _FC.INDIRECT_CALL):
                    return False               # the callee may have changed it
                if _writes(ins, full):
                    v = ok(ins)
                    if v == "through":
                        todo.append(p)
                    elif not v:
                        return False
                    continue
                todo.append(p)
        return True


def _flow_of(insns: list, memo: dict | None) -> _Flow:
    if memo is None:
        return _Flow(insns)
    f = memo.get("flow")
    if f is None:
        f = memo["flow"] = _Flow(insns)
    return f


def _pointer_load(ins) -> bool:
    """``mov d(%reg),%r`` or ``mov d(%rip),%r``: a pointer read from memory."""
    return (ins.code == _C.MOV_R64_RM64 and ins.op1_kind == _MEM
            and ins.memory_index == _NONE)


def _byte_index(full: int):
    def ok(ins):
        if ins.code in (_C.MOVZX_R32_RM8, _C.MOVZX_R64_RM8):
            return True
        if ins.code in (_C.MOV_R32_RM32, _C.MOVSXD_R64_RM32) and ins.op1_kind == _REG \
                and _full(ins.op1_register) == full:
            return "through"
        return False
    return ok


def _bound(insns: list, k: int, full: int, targets: list[int]) -> int | None:
    """How many table entries the index register *full* can select at
    instruction *k*: a zero-extended byte (256), or a ``cmp $N`` on it
    followed by an unsigned ``ja``/``jae`` to elsewhere (N+1 / N)."""
    above = None
    for m in range(k - 1, max(k - 1 - _LOOKBACK, -1), -1):
        ins = insns[m]
        if _merges(targets, ins.ip, insns[k].ip):
            return None
        if ins.mnemonic in (iced_x86.Mnemonic.JA, iced_x86.Mnemonic.JAE):
            above = ins.mnemonic
            continue
        if ins.flow_control not in (_FC.NEXT, _FC.CONDITIONAL_BRANCH):
            return None
        if ins.mnemonic == iced_x86.Mnemonic.CMP and above is not None \
                and ins.op0_kind == _REG and _full(ins.op0_register) == full \
                and ins.op1_kind in (iced_x86.OpKind.IMMEDIATE8, iced_x86.OpKind.IMMEDIATE32,
                                     iced_x86.OpKind.IMMEDIATE8TO32, iced_x86.OpKind.IMMEDIATE8TO64,
                                     iced_x86.OpKind.IMMEDIATE32TO64):
            n = ins.immediate(1) + (1 if above == iced_x86.Mnemonic.JA else 0)
            return n if 0 < n <= _TABLE_MAX else None
        if _writes(ins, full):
            if ins.code in (_C.MOVZX_R32_RM8, _C.MOVZX_R64_RM8):
                return 256
            if ins.code in (_C.MOV_R32_RM32, _C.MOVSXD_R64_RM32) and ins.op1_kind == _REG \
                    and _full(ins.op1_register) == full:
                # mov %eax,%eax / movslq %eax,%rax: the same value, once the
                # bound found further back has proved it small and unsigned
                continue
            return None
    return None


def _check_indirect(insns: list, k: int, targets: list[int], lo: int, hi: int,
                    body: tuple[int, int], read, memo: dict | None = None) -> str:
    """Why the indirect jump ``insns[k]`` may land in [lo, hi) ("" when it
    provably cannot).  Proved:

    * ``jmp *d(%reg)`` / ``jmp *d(%rip)``, or ``jmp *%reg`` whose register
      was loaded so on every path to it: a tail call through a function
      pointer (its target is a function's entry, which is not in the moved
      bytes after their first).  A label's address spilled to memory (a
      computed goto) would look the same; what takes such an address inside
      the moved bytes -- ``lea X(%rip)``, an immediate -- is refused by
      :func:`scan_function`, and a label there would have to sit inside the
      prologue (run twice, it would unbalance the stack);
    * a jump table -- ``jmp *T(,%idx,8)`` or ``mov T(,%idx,8),%reg; jmp
      *%reg`` (absolute entries), or ``lea T(%rip),%b; movslq (%b,%idx,4),
      %reg; add %b,%reg; jmp *%reg`` (entries relative to T) -- whose size
      is bounded by a ``cmp $N, %idx; ja`` or a byte index, and whose
      entries, read, all land outside [lo, hi).

    Anything else (a register of unknown provenance, an unbounded table) is
    refused, as the kernel's ``can_optimize`` refuses every indirect jump."""
    j = insns[k]
    if j.op0_kind == _MEM:
        if j.memory_index == _NONE:
            return ""                                  # *d(%reg) / *d(%rip): a pointer
        if j.memory_base == _NONE and j.memory_index_scale == 8:
            return _table(insns, k, "abs", j.memory_displacement, _full(j.memory_index),
                          targets, lo, hi, body, read, memo)
        return "a memory operand of an unknown form"
    if j.op0_kind != _REG:
        return "an operand of an unknown form"
    reg = _full(j.op0_register)
    m = _def_of(insns, k, reg, targets)
    if m is None:
        # paths join before it: a tail call if every path loads a pointer
        if _flow_of(insns, memo).defs(k, reg, _pointer_load):
            return ""
        return f"{_name(reg)} is not loaded from memory on every path to it"
    d = insns[m]
    if d.code == _C.MOV_R64_RM64 and d.op1_kind == _MEM:
        if d.memory_index == _NONE:
            return ""                                  # loaded from d(%reg): a pointer
        if d.memory_base == _NONE and d.memory_index_scale == 8:
            return _table(insns, m, "abs", d.memory_displacement, _full(d.memory_index),
                          targets, lo, hi, body, read, memo)
        return "loaded from a table of an unknown form"
    if d.code in (_C.ADD_R64_RM64, _C.ADD_RM64_R64) and d.op0_kind == _REG \
            and d.op1_kind == _REG and _full(d.op0_register) == reg:
        base = _full(d.op1_register)
        m2 = _def_of(insns, m, reg, targets)
        if m2 is None:
            return "an ADD of unknown operands"
        e = insns[m2]
        if not (e.code == _C.MOVSXD_R64_RM32 and e.op1_kind == _MEM
                and _full(e.memory_base) == base and e.memory_index_scale == 4
                and e.memory_displacement == 0):
            return "an ADD of unknown operands"
        m3 = _def_of(insns, m2, base, targets)
        if m3 is None:
            return "a table base of unknown provenance"
        f = insns[m3]
        if not (f.code == _C.LEA_R64_M and f.memory_index == _NONE
                and f.memory_base in (_RIP, _NONE)):
            return "a table base of unknown provenance"
        return _table(insns, m2, "rel", f.memory_displacement if f.memory_base == _NONE
                      else f.ip_rel_memory_address, _full(e.memory_index), targets, lo, hi,
                      body, read, memo)
    return f"{_name(reg)} is computed, not loaded"


def _table(insns: list, k: int, kind: str, base: int, idx: int, targets: list[int],
           lo: int, hi: int, body: tuple[int, int], read, memo: dict | None = None) -> str:
    n = _bound(insns, k, idx, targets)
    if n is None and _flow_of(insns, memo).defs(k, idx, _byte_index(idx)):
        n = 256                           # on every path a zero-extended byte
    if n is None:
        return f"a jump table at {base:#x} of unknown size"
    if memo is None:
        return _entries(kind, base, n, lo, hi, read)
    key = (kind, base, n)
    if key not in memo:
        memo[key] = _entries(kind, base, n, lo, hi, read)
    return memo[key]


def _entries(kind: str, base: int, n: int, lo: int, hi: int, read) -> str:
    if read is None:
        return f"a jump table at {base:#x} that cannot be read here"
    size = 8 if kind == "abs" else 4
    try:
        raw = read(base, n * size)
    except (OSError, ValueError) as e:
        return f"the jump table at {base:#x} cannot be read ({e})"
    if len(raw) != n * size:
        return f"the jump table at {base:#x} cannot be read"
    for i in range(n):
        if kind == "abs":
            t = int.from_bytes(raw[8 * i:8 * i + 8], "little")
        else:
            t = base + int.from_bytes(raw[4 * i:4 * i + 4], "little", signed=True)
        if lo <= t < hi:
            return f"entry {i} of the jump table at {base:#x} is {t:#x}"
    return ""


def _name(reg: int) -> str:
    for k, v in vars(iced_x86.Register).items():
        if v == reg and k.isupper():
            return "%" + k.lower()
    return str(reg)


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
