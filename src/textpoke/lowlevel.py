# SPDX-License-Identifier: GPL-2.0-only
"""Low-level names: the batch's data structures, the protocol's steps, the
task plumbing and the emulation helpers.

The façade (:mod:`textpoke`) is what a client or a tool needs; this module
is for tests, verification tools and backends -- the kernel's
``struct smp_text_poke_loc`` and friends, as they are.
"""

from ._core._emulate import (DataMemory, PtRegs, int3_emulate_call, int3_emulate_jcc, int3_emulate_jmp,
                             int3_emulate_pop, int3_emulate_push, int3_emulate_ret, jcc_taken)
from ._core._events import DEFAULT_CAPACITY, PHASES
from ._core._insn import Insn, is_jcc32, is_nop
from ._core._machine import CpuListener, Task, TrapHandler, WaitUntil, drive
from ._core._signals import deliver_interrupt, uninterruptible
from ._core._types import (MUTATIONS, SMP_TEXT_POKE_LOC_SIZE, Protocol, SmpTextPokeLoc,
                           TextPokeArray, TextPokeStats)

__all__ = [
    # the batch
    "SmpTextPokeLoc", "TextPokeArray", "TextPokeStats", "SMP_TEXT_POKE_LOC_SIZE",
    "Protocol", "MUTATIONS",
    # tasks and the machine side
    "Task", "WaitUntil", "drive", "TrapHandler", "CpuListener", "DataMemory",
    # emulation
    "PtRegs", "int3_emulate_push", "int3_emulate_pop", "int3_emulate_call", "int3_emulate_jmp",
    "int3_emulate_jcc", "int3_emulate_ret", "jcc_taken",
    # decoding
    "Insn", "is_jcc32", "is_nop",
    # events
    "PHASES", "DEFAULT_CAPACITY",
    # signals
    "deliver_interrupt", "uninterruptible",
]
