# SPDX-License-Identifier: GPL-2.0-only
"""Old names of the real kernel's table readers.

The tables are read by one module, :mod:`textpoke.images._tables` (the
bundled image, a real kernel and modules alike); this one only re-exports
its names for callers not yet switched to it.  It decodes nothing.
"""

from ._tables import (ALT_FLAG_DIRECT_CALL, ALT_FLAG_NOT, ALT_INSTR_SIZE,  # noqa: F401
                      JUMP_ENTRY_SIZE, STATIC_CALL_SITE_SIZE, JumpEntry, ParaSite,
                      StaticCallSite, TableError, alt_instr_table, jump_table, mcount_table,
                      paravirt_table, s32_count, s32_table, static_call_table)
from ._tables import AltInstr as RealAltInstr  # noqa: F401

__all__ = ["TableError", "RealAltInstr", "JumpEntry", "StaticCallSite", "s32_table",
           "alt_instr_table", "paravirt_table", "ParaSite", "jump_table", "s32_count",
           "static_call_table", "mcount_table",
           "ALT_INSTR_SIZE", "JUMP_ENTRY_SIZE", "STATIC_CALL_SITE_SIZE"]
