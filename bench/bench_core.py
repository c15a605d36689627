# SPDX-License-Identifier: GPL-2.0-only
"""The core's own cost per site, on textpoke.testing.MemoryMachine (a
machine that only stores bytes: no CPU runs, nothing is emulated).

    python bench/bench_core.py [--sites N] [--repeat R] [--quick] [--json] [--clock cpu]

Two 10,000-site batches through ``with TextPoke.batch():`` +
``smp_text_poke_batch_add``, each run flipping every site between its two
forms (old -> new, then new -> old, ...):

* nop5:  NOP5 <-> JMP32 sites, back to back;
* mixed: NOP2 <-> JMP8, NOP5 <-> JMP32, CALL retarget, RET;INT3x4 <-> JMP32,
  Jcc.d32 retarget, in turn.

Figures: host microseconds per site for the whole batch (the target is
<= 15 us/site), and the same work split into its two steps: the add step
alone (``smp_text_poke_batch_add`` of one array's worth of sites, which
never flushes) and the finish step alone (``smp_text_poke_batch_finish``
of that array: the INT3 protocol), summed over the ceil(N/256) arrays a
10,000-site batch is applied as.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from textpoke import (CALL_INSN_OPCODE, JMP8_INSN_OPCODE, JMP32_INSN_OPCODE,  # noqa: E402
                      RET_INSN_OPCODE, TEXT_POKE_ARRAY_MAX, TextPoke, text_gen_insn, x86_nops)
from textpoke.testing import MemoryMachine                             # noqa: E402

import _stats                                                          # noqa: E402

TEXT = 0x100_0000
UNIT = 2 + 5 + 5 + 5 + 6        # one site of each kind, back to back


def nop5_sites(n: int) -> tuple[bytes, list[tuple[int, bytes, bytes]]]:
    """Text and (addr, old, new) for n NOP5 <-> JMP32 sites."""
    text = x86_nops[5] * n + bytes([RET_INSN_OPCODE])
    sites = []
    for i in range(n):
        a = TEXT + 5 * i
        sites.append((a, x86_nops[5], text_gen_insn(JMP32_INSN_OPCODE, a, a + 5)))
    return text, sites


def mixed_sites(n: int) -> tuple[bytes, list[tuple[int, bytes, bytes]]]:
    """n sites cycling through the five kinds; two out-of-line functions
    (old, new: each a RET) after them serve as CALL/JMP/Jcc targets."""
    units = -(-n // 5)
    fn_old = TEXT + units * UNIT + 16
    fn_new = fn_old + 16
    text = bytearray()
    sites = []
    for u in range(units):
        base = TEXT + u * UNIT
        nxt = base + UNIT
        a = base
        forms = []
        forms.append((a, x86_nops[2], text_gen_insn(JMP8_INSN_OPCODE, a, nxt)))
        a += 2
        forms.append((a, x86_nops[5], text_gen_insn(JMP32_INSN_OPCODE, a, fn_new)))
        a += 5
        forms.append((a, text_gen_insn(CALL_INSN_OPCODE, a, fn_old),
                      text_gen_insn(CALL_INSN_OPCODE, a, fn_new)))
        a += 5
        forms.append((a, bytes([RET_INSN_OPCODE]) + b"\xcc" * 4,
                      text_gen_insn(JMP32_INSN_OPCODE, a, fn_new)))
        a += 5
        forms.append((a, b"\x0f\x84" + (fn_old - (a + 6)).to_bytes(4, "little", signed=True),
                      b"\x0f\x84" + (fn_new - (a + 6)).to_bytes(4, "little", signed=True)))
        for f in forms:
            text += f[1]
        sites += forms
    sites = sites[:n]
    text += b"\xcc" * (fn_old - TEXT - len(text))
    text += bytes([RET_INSN_OPCODE]) + b"\xcc" * 15 + bytes([RET_INSN_OPCODE])
    return bytes(text), sites


class Flipper:
    """One MemoryMachine + TextPoke; every run writes the other form."""

    def __init__(self, text: bytes, sites: list[tuple[int, bytes, bytes]]) -> None:
        self.m = MemoryMachine({TEXT: text}, ncpus=4)
        self.core = TextPoke(self.m)
        self.forms = ([(a, new) for a, _old, new in sites], [(a, old) for a, old, _new in sites])
        self.state = 0
        self.n = len(sites)
        self.syncs: list[int] = []

    def _next(self) -> list[tuple[int, bytes]]:
        todo = self.forms[self.state]
        self.state ^= 1
        return todo

    def check(self) -> None:
        """Every site holds the form last written."""
        for a, data in self.forms[self.state ^ 1]:
            if self.m.text_read(a, len(data)) != data:
                raise AssertionError(f"site {a:#x} reads {self.m.text_read(a, len(data)).hex()}, "
                                     f"expected {data.hex()}")

    def whole(self) -> float:
        """Seconds per site for the batch through core.batch()."""
        todo = self._next()
        core = self.core
        add = core.smp_text_poke_batch_add
        s0 = self.m.syncs
        t = _stats.now()
        with core.batch():
            for a, data in todo:
                add(a, data)
        dt = _stats.now() - t
        self.syncs.append(self.m.syncs - s0)
        return dt / self.n

    def split(self) -> tuple[float, float]:
        """(add, finish) seconds per site: the same sites applied one
        array (TEXT_POKE_ARRAY_MAX entries) at a time, each step timed."""
        todo = self._next()
        core = self.core
        add = core.smp_text_poke_batch_add
        t_add = t_fin = 0.0
        for i in range(0, len(todo), TEXT_POKE_ARRAY_MAX):
            chunk = todo[i:i + TEXT_POKE_ARRAY_MAX]
            with core.text_mutex:
                t0 = _stats.now()
                for a, data in chunk:
                    add(a, data)
                t1 = _stats.now()
                core.smp_text_poke_batch_finish()
                t2 = _stats.now()
            t_add += t1 - t0
            t_fin += t2 - t1
        return t_add / self.n, t_fin / self.n


def bench_core(n: int, repeat: int) -> dict:
    out = {}
    for kind, make in (("nop5", nop5_sites), ("mixed", mixed_sites)):
        f = Flipper(*make(n))
        last_split: dict = {}

        def split(f=f, last=last_split) -> float:
            a, fin = f.split()
            last.setdefault("add", []).append(a)
            last.setdefault("finish", []).append(fin)
            return a + fin

        series = _stats.interleaved({"batch": f.whole, "split_total": split}, repeat,
                                    units={"batch": "s/site", "split_total": "s/site"})
        f.check()
        add = _stats.Series("add", "s/site", last_split["add"][1:], last_split["add"][:1])
        fin = _stats.Series("finish", "s/site", last_split["finish"][1:], last_split["finish"][:1])
        out[kind] = {"sites": f.n, "batch": series["batch"], "add": add, "finish": fin,
                     "split_total": series["split_total"],
                     "syncs_per_batch": sorted(set(f.syncs)),
                     "events_logged": f.core.events.counts}
    return out


def to_json(res: dict) -> dict:
    return {k: {kk: (vv.as_dict() if isinstance(vv, _stats.Series) else vv) for kk, vv in v.items()}
            for k, v in res.items()}


def report(res: dict) -> str:
    us = 1e-6
    n = next(iter(res.values()))["sites"]
    lines = [f"== the core's own cost on MemoryMachine, {n:,}-site batch, us/site "
             "(target <= 15)"]
    rows = []
    for kind, label in (("nop5", "NOP5<->JMP32"), ("mixed", "mixed 5 kinds")):
        r = res[kind]
        rows.append([label, _stats.fmt_range(r["batch"], 1, us),
                     _stats.fmt_range(r["add"], 1, us), _stats.fmt_range(r["finish"], 1, us),
                     f"{1 / r['batch'].median:,.0f}", ",".join(map(str, r["syncs_per_batch"]))])
    lines.append(_stats.table(["sites", "whole batch", "add step alone", "finish step alone",
                               "sites/s (median)", "syncs"], rows))
    lines.append(f"  add/finish: the same sites applied {TEXT_POKE_ARRAY_MAX} at a time, "
                 "each step timed on its own; runs interleaved with the whole batch")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    n = args.sites or (2_000 if args.quick else 10_000)
    return bench_core(n, args.repeat)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sites", type=int, default=None, help="sites per batch (default 10,000; "
                    "--quick: 2,000)")


def main(argv: list[str] | None = None) -> int:
    return _stats.script_main(argv, __doc__, "core_cost", run, report, to_json, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
