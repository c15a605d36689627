# SPDX-License-Identifier: GPL-2.0-only
"""The text passes of ``alternative_instructions()``, by the names a
kernel line's :attr:`~textpoke.images._lines.KernelLine.passes` gives them,
over one text buffer: what the bundled image's boot
(``_boot.alternative_instructions``, on a machine's shadow) and a real
kernel's (``textpoke.kernel.boot_kernel``, on its flat memory) both run, in
their line's order.  The line says which passes there are (6.1:
``apply_paravirt`` first and no call-depth thunks; the bundled image: no
paravirt, call-depth thunks or ENDBR table); the SMP-lock pass is the
caller's, since on a machine it runs after the commit, at run time."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ._apply import alternatives
from ._callthunks import callthunks
from ._kparavirt import paravirt
from ._kpasses import BootOptions
from ._ktext import CpuCaps, TextBuffer
from ._records import DebugLog, PassLog
from ._thunks import ItsThunks, retpolines, returns, seal_endbr

__all__ = ["TEXT_PASSES", "TextPasses"]

#: pass name -> the table it walks
TEXT_PASSES = {
    "apply_paravirt": ".parainstructions",
    "apply_retpolines": ".retpoline_sites",
    "apply_returns": ".return_sites",
    "apply_alternatives": ".altinstructions",
    "callthunks": ".call_sites",
    "apply_seal_endbr": ".ibt_endbr_seal",
}


class TextPasses:
    """The text passes over *tb* for a CPU with *caps*: *tables* maps a
    table name to its entries (s32 site tables as addresses,
    ``.altinstructions`` as ``AltInstr``, ``.parainstructions`` as
    ``ParaSite``); a table absent from it is empty.  With *records*, each
    pass keeps one record per site (the bundled image and modules); a real
    kernel's only counts.  :meth:`run` runs one pass and returns its log;
    all logs stay in :attr:`logs` by table."""

    def __init__(self, tb: TextBuffer, tables: Mapping[str, Sequence[Any]], caps: CpuCaps,
                 opts: BootOptions | None = None, dbg: DebugLog | None = None, *,
                 records: bool = False) -> None:
        self.tb, self.tables, self.caps = tb, tables, caps
        self.opts = opts or BootOptions()
        self.dbg = dbg if dbg is not None else DebugLog(0)
        self.records = records
        self.its = ItsThunks(tb, self.opts.its_pages)
        self.logs: dict[str, PassLog] = {}
        self.thunks_made = 0

    def _log(self, table: str, entries: int) -> PassLog:
        log = PassLog(entries, self.tb.describe, self.dbg, [] if self.records else None)
        self.logs[table] = log
        return log

    def run(self, name: str) -> PassLog:
        table = TEXT_PASSES[name]
        items = self.tables.get(table) or ()
        tb, caps, opts = self.tb, self.caps, self.opts
        if name == "callthunks":
            alts = self.tables.get(".altinstructions") or ()
            log = self._log(table, len(items) + len(alts) if caps.has("call_depth") else
                            len(items))
            self.thunks_made = callthunks(tb, items, alts, caps, log)
            return log
        log = self._log(table, len(items))
        if name == "apply_paravirt":
            paravirt(tb, items, log)
        elif name == "apply_retpolines":
            retpolines(tb, items, caps, opts, self.its, log)
        elif name == "apply_returns":
            returns(tb, items, caps, opts, log)
        elif name == "apply_alternatives":
            alternatives(tb, items, caps, log)
        else:
            seal_endbr(tb, items, log)
        return log
