# SPDX-License-Identifier: GPL-2.0-only
"""textpoke: the Linux kernel's x86 text-patching machinery in Python.

The core (``TextPoke``) patches any :class:`Machine`; the sim backend
(:mod:`textpoke.sim`) is an emulated SMP x86-64 machine on Unicorn.

    >>> from textpoke import TextPoke
    >>> from textpoke.sim import boot_workload
    >>> w = boot_workload(ncpus=4); core = TextPoke(w.sim); w.start()
    >>> site = w.by_name["nop5_jmp32"]
    >>> with core.batch():
    ...     core.smp_text_poke_batch_add(site.addr, site.new)
"""

from ._alternative import (AlternativeError, BootResult, SelfTestError, alternative_instructions,
                           alternatives_enable_smp, alternatives_smp_lock,
                           alternatives_smp_unlock, apply_alternatives, apply_retpolines,
                           apply_returns, apply_seal_endbr)
from ._alternative._reloc import add_nop, optimize_nops, text_poke_apply_relocation
from ._core import (MUTATIONS, TEXT_POKE_ARRAY_MAX, SmpTextPokeLoc, TextMutex, TextPoke,
                    TextPokeArray, TextPokeStats)
from ._core._emulate import (PtRegs, int3_emulate_call, int3_emulate_jcc, int3_emulate_jmp,
                       int3_emulate_pop, int3_emulate_push, int3_emulate_ret, jcc_taken)
from ._errors import (BadAddressError, BadInstructionError, MachineError, OverlapError,
                      TextMutexError, TextPokeError, VerifyMismatchError)
from ._core._events import TextPokeEvent, TextPokeEventLog
from ._core._insn import (ASM_NOP_MAX, CALL_INSN_OPCODE, CALL_INSN_SIZE, INT3_INSN_OPCODE,
                    INT3_INSN_SIZE, JMP8_INSN_OPCODE, JMP8_INSN_SIZE, JMP32_INSN_OPCODE,
                    JMP32_INSN_SIZE, MAX_PATCH_LEN, RET_INSN_OPCODE, RET_INSN_SIZE,
                    TEXT_POKE_MAX_OPCODE_SIZE, Insn, insn_decode_kernel, is_jcc32, is_nop,
                    text_gen_insn, x86_nops)
from ._core._machine import Machine, TextRange, WaitUntil

__version__ = "0.1.0"

__all__ = [
    # core
    "TextPoke", "TextMutex", "SmpTextPokeLoc", "TextPokeArray", "TextPokeStats",
    "TEXT_POKE_ARRAY_MAX", "MUTATIONS",
    # emulation
    "PtRegs", "int3_emulate_push", "int3_emulate_pop", "int3_emulate_call",
    "int3_emulate_jmp", "int3_emulate_jcc", "int3_emulate_ret", "jcc_taken",
    # instructions
    "Insn", "insn_decode_kernel", "text_gen_insn", "is_jcc32", "is_nop", "x86_nops",
    "INT3_INSN_OPCODE", "INT3_INSN_SIZE", "CALL_INSN_OPCODE", "CALL_INSN_SIZE",
    "JMP32_INSN_OPCODE", "JMP32_INSN_SIZE", "JMP8_INSN_OPCODE", "JMP8_INSN_SIZE",
    "RET_INSN_OPCODE", "RET_INSN_SIZE", "TEXT_POKE_MAX_OPCODE_SIZE", "MAX_PATCH_LEN",
    "ASM_NOP_MAX",
    # boot-time patching
    "alternative_instructions", "apply_alternatives", "apply_retpolines", "apply_returns",
    "apply_seal_endbr", "alternatives_smp_lock", "alternatives_smp_unlock",
    "alternatives_enable_smp", "BootResult", "AlternativeError", "SelfTestError",
    "text_poke_apply_relocation", "optimize_nops", "add_nop",
    # events, machines, errors
    "TextPokeEvent", "TextPokeEventLog", "Machine", "TextRange", "WaitUntil",
    "TextPokeError", "BadInstructionError", "BadAddressError", "OverlapError",
    "TextMutexError", "VerifyMismatchError", "MachineError",
]
