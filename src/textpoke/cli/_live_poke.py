# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke live poke``: one instruction at ADDR with the INT3 batch protocol."""

from __future__ import annotations

import argparse

from . import _contract
from . import _output as out
from ._live_common import machine, symbols
from ._signals import exit_status, reporting, Terminated

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from .._core import TextPoke
    from ..live._checks import check_poke
    from ..live._fentry import read_process
    with symbols(args.pid) as syms:
        addr = syms.resolve(args.addr)
        name = syms.symbolize(addr)
        read = read_process(args.pid)
        try:
            # refused (one line, exit 2) before anything is attached or written
            check_poke(syms, read, addr, args.bytes, force=args.force)
        finally:
            read.close()  # type: ignore[attr-defined]
    interrupted: BaseException | None = None
    old = new = b""
    with machine(args) as m:
        old = m.text_read(addr, len(args.bytes))
        core = TextPoke(m)
        try:
            with core.text_mutex:
                core.smp_text_poke_single(addr, args.bytes, emulate=args.emulate)
        except (KeyboardInterrupt, Terminated) as e:
            interrupted = e
        finally:
            left, why = _contract.int3_left_of(core)
            core.close()
            new = m.text_read(addr, len(args.bytes))
    reporting()
    doc = {"pid": args.pid, "addr": f"{addr:#x}", "name": name, "old": old.hex(" "),
           "new": new.hex(" "), "written": new == args.bytes, "strategy": args.strategy,
           "interrupted": interrupted is not None, "int3_left": left}
    if why:
        doc["int3_left_reason"] = why
    if args.json:
        out.emit_json(doc)
    else:
        out.print_plain(f"{name} ({addr:#x}): {doc['old']} -> {doc['new']}")
    if interrupted is not None:
        return exit_status(interrupted)
    return 0 if doc["written"] else 1
