# SPDX-License-Identifier: GPL-2.0-only
"""Every write checked before anything is written, the way the kernel
checks its own (``text_poke_bp`` insists on one whole instruction; kprobes
refuse an address that is not an instruction boundary).

:func:`check_poke` refuses, with the reason (a :class:`WriteRefused`, one
line; the CLI exits 2 and writes nothing):

* an address that is not an instruction boundary -- a number gets the
  same check as ``symbol+off``: the function that contains it is decoded
  from its start (from the file, as built);
* an address outside any function (no symbol covers it: no boundary can be
  proved), unless ``force``;
* replaced bytes that are not ONE whole instruction of exactly the new
  length -- the INT3 protocol replaces one instruction: a thread may stand
  at the second of two, and would run the middle of the new one.  The
  documented patterns are this rule's cases: NOP5 <-> CALL/JMP rel32 (5
  bytes), the PIE fentry ``call *__fentry__@GOTPCREL(%rip)`` (6 bytes,
  ``ff 15``) <-> a 6-byte NOP or CALL/JMP padded, ENDBR64 (4 bytes) ...;
* new bytes that are not whole instructions of that length;
* an INT3 among the new instructions (a lone ``cc`` above all: the
  target dies of SIGTRAP at the next hit), unless ``force``; INT3 padding
  after a RET or JMP (never reached) is allowed;
* a CALL or JMP whose target is not executable code of the process (a
  file-backed executable mapping, or injected anonymous executable memory:
  a stub).
"""

from __future__ import annotations

from typing import Callable

from .._core._insn import insn_decode_kernel
from .._errors import BadInstructionError, TextPokeError
from ._symbols import SymbolError, Symbols, check_boundary

__all__ = ["WriteRefused", "check_poke", "check_branch_target", "decode_whole"]


class WriteRefused(TextPokeError, ValueError):
    """A write that would break the target: nothing was written."""

    plain = True        # the CLI prints the reason alone (see SymbolError)


def decode_whole(code: bytes, addr: int) -> list:
    """Decode *code* at *addr* as whole instructions covering it exactly;
    WriteRefused if an instruction runs past its end or does not decode."""
    out, pc = [], 0
    while pc < len(code):
        try:
            insn = insn_decode_kernel(code[pc:pc + 15], addr + pc)
        except BadInstructionError as e:
            raise WriteRefused(f"{code.hex(' ')} at {addr:#x}: +{pc} does not decode ({e})") from None
        if pc + insn.length > len(code):
            raise WriteRefused(f"{code.hex(' ')} at {addr:#x}: the instruction at +{pc} "
                               f"('{insn.text}') is {insn.length} bytes, longer than what is left")
        out.append(insn)
        pc += insn.length
    return out


def _exec_maps(pid: int):
    from ._symbols import read_maps
    return [m for m in read_maps(pid) if m.executable and m.path not in ("[vsyscall]", "[vvar]")]


def check_branch_target(pid: int, target: int, what: str = "target") -> None:
    """WriteRefused unless *target* lies in executable code of *pid*."""
    for m in _exec_maps(pid):
        if m.start <= target < m.end:
            return
    raise WriteRefused(f"the {what} {target:#x} is not executable code of process {pid} "
                       "(not in an executable mapping: data, a .bss variable, or nothing)")


def check_poke(syms: Symbols, read: Callable[[int, int], bytes], addr: int, new: bytes, *,
               force: bool = False) -> str:
    """Check that writing *new* at *addr* of the process is sound (see the
    module doc); returns a short description of what is replaced."""
    pid = syms.pid
    mod = syms.module_at(addr)
    fn = mod.function_at(addr) if mod is not None else None
    if fn is None:
        if not force:
            raise WriteRefused(f"no function symbol covers {addr:#x}: it cannot be proved to be "
                               "an instruction boundary (--force to write anyway)")
    else:
        try:
            check_boundary(fn, addr - fn.addr)
        except SymbolError as e:
            raise WriteRefused(str(e)) from None
    # the new bytes: whole instructions, no INT3 among them
    new_insns = decode_whole(bytes(new), addr)
    # INT3 padding after a RET or JMP is never reached (the batch's own form)
    reached = []
    for i in new_insns:
        reached.append(i)
        if i.flow in ("ret", "jmp"):
            break
    if any(i.flow == "int3" for i in reached) and not force:
        lone = len(new) == 1
        raise WriteRefused(("a lone INT3 (cc)" if lone else "an INT3 among the new instructions")
                           + f" at {addr:#x}: the process dies of SIGTRAP when a thread reaches "
                             "it (--force to write it anyway, e.g. for a debugger)")
    # what they replace: ONE whole instruction of exactly that length
    old = read(addr, len(new))
    try:
        first = insn_decode_kernel(read(addr, 15), addr)
    except BadInstructionError as e:
        raise WriteRefused(f"the bytes at {addr:#x} do not decode ({e})") from None
    if first.flow == "int3" and not force:
        raise WriteRefused(f"{addr:#x} holds an INT3 now (a breakpoint, or a patcher killed "
                           "mid-batch: see 'textpoke live sites --check' and 'live recover')")
    if first.length != len(new) and not force:
        try:
            olds = decode_whole(old, addr)
            what = f"{len(olds)} instructions" if len(olds) > 1 else f"'{olds[0].text}'"
        except WriteRefused:
            what = f"'{first.text}' ({first.length} bytes) and part of the next"
        raise WriteRefused(
            f"{len(new)} new bytes at {addr:#x} would replace {what}; the INT3 protocol "
            f"replaces one whole instruction, here '{first.text}' ({first.length} bytes): a "
            "thread may stand between two instructions (--force to write anyway)")
    for i in new_insns:
        if i.flow in ("call", "jmp", "jcc") and i.branch_target is not None:
            check_branch_target(pid, i.branch_target, f"{i.mnemonic} target")
    return first.text
