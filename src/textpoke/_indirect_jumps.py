# SPDX-License-Identifier: GPL-2.0-only
"""Which indirect jumps of a function can be proved not to land in a range
of its bytes: the one analysis behind :func:`textpoke._relocate.scan_function`
refusing fewer functions than the kernel's ``can_optimize`` (which refuses
every indirect jump).

Two kinds are proved (see :func:`check_indirect`): a tail call through a
function pointer loaded from memory on every path to the jump, and a jump
table whose size a ``cmp``/``ja`` or a zero-extended byte index bounds and
whose entries, read, all land elsewhere.  The searches run backwards over
the function's decoded instructions (fall-through and direct branches,
:class:`_Flow`), a bounded number of steps; anything they cannot show is a
reason to refuse.  Pure: iced-x86 instructions in, a sentence out.
"""

from __future__ import annotations

import bisect

import iced_x86

__all__ = ["check_indirect", "BRANCHING", "NEAR_KINDS", "ENDS"]

_FC = iced_x86.FlowControl
_NONE = iced_x86.Register.NONE
#: the operand kinds of a direct near branch's target
NEAR_KINDS = frozenset({iced_x86.OpKind.NEAR_BRANCH16, iced_x86.OpKind.NEAR_BRANCH32,
                        iced_x86.OpKind.NEAR_BRANCH64})
#: flow controls of an instruction with a direct target (with NEAR_KINDS)
BRANCHING = frozenset({_FC.UNCONDITIONAL_BRANCH, _FC.CONDITIONAL_BRANCH, _FC.CALL,
                       _FC.XBEGIN_XABORT_XEND})
#: flow controls after which the next instruction is not reached by falling through
ENDS = frozenset({_FC.UNCONDITIONAL_BRANCH, _FC.INDIRECT_BRANCH, _FC.RETURN,
                  _FC.INTERRUPT, _FC.EXCEPTION})
_NEAR_KINDS, _BRANCHING, _ENDS = NEAR_KINDS, BRANCHING, ENDS

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


def check_indirect(insns: list, k: int, targets: list[int], lo: int, hi: int,
                    body: tuple[int, int], read, memo: dict | None = None) -> str:
    """Why the indirect jump ``insns[k]`` may land in [lo, hi) ("" when it
    provably cannot).  Proved:

    * ``jmp *d(%reg)`` / ``jmp *d(%rip)``, or ``jmp *%reg`` whose register
      was loaded so on every path to it: a tail call through a function
      pointer (its target is a function's entry, which is not in the moved
      bytes after their first).  A label's address spilled to memory (a
      computed goto) would look the same; what takes such an address inside
      the moved bytes -- ``lea X(%rip)``, an immediate -- is refused by
      :func:`textpoke._relocate.scan_function`, and a label there would
      have to sit inside the
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
