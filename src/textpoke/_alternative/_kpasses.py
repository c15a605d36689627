# SPDX-License-Identifier: GPL-2.0-only
"""What the boot passes share besides code: the options the CPU's
capability words do not say (:class:`BootOptions`), the names of the
features they test, and the constants of the thunk and ENDBR rules.  The
opcodes and :class:`TableStats` are re-exported for the clients' init
passes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._code import CALL, INT3, JMP8, JMP32, LFENCE, NOP1, RET
from ._records import TableStats

__all__ = ["BootOptions", "TableStats", "CALL", "INT3", "JMP8", "JMP32", "RET", "NOP1",
           "LFENCE", "TRAMP_UD", "RETPOLINE_THUNK_SIZE", "ITS_THUNK_SIZE", "ENDBR64",
           "ENDBR_POISON", "F_RETPOLINE", "F_RETPOLINE_LFENCE", "F_RETHUNK", "F_CALL_DEPTH",
           "F_INDIRECT_THUNK_ITS"]

TRAMP_UD = b"\x0f\xb9\xcc"
RETPOLINE_THUNK_SIZE = 32
ITS_THUNK_SIZE = 64
ENDBR64 = 0xFA1E0FF3
ENDBR_POISON = 0x001F0F66

# features the passes test, by name: each kernel line numbers them its own way
# (CpuCaps.has reads the line's table; a feature the line lacks is absent)
F_RETPOLINE = "retpoline"
F_RETPOLINE_LFENCE = "retpoline_lfence"
F_RETHUNK = "rethunk"
F_CALL_DEPTH = "call_depth"
F_INDIRECT_THUNK_ITS = "indirect_thunk_its"


@dataclass
class BootOptions:
    """What the capability words do not say.

    *return_thunk*: the value of ``x86_return_thunk`` (a symbol name or an
    address); *its_page*: the address of the first page the ITS thunk
    allocator hands out (``execmem``), when the CPU uses dynamic ITS
    thunks -- None uses the static ``__x86_indirect_its_thunk_array`` (what
    the kernel does when the allocation fails)."""

    return_thunk: str | int = "__x86_return_thunk"
    its_pages: list[int] = field(default_factory=list)
    ncpus: int = 1
    noreplace_smp: bool = False
    setup_max_cpus: int | None = None
