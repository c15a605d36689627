# SPDX-License-Identifier: GPL-2.0-only
"""The bundled workload (``workload.S``) as data, shared by the demos of
every backend: its patch sites (read from ``.textpoke_sites``), what each
variant slot of a site's per-CPU record means, and the record a demo
reports (:class:`DemoResult`: the sim demo and the live demo print the
same report).  Nothing here knows a machine: ``sim/`` and ``live/`` both
import it, neither imports the other."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .._core._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, JMP8_INSN_OPCODE, JMP32_INSN_OPCODE,
                           text_gen_insn)
from ._elf import ElfImage, ImageError

__all__ = ["Site", "read_sites", "KIND_NAMES", "VARIANTS", "variant_name", "DemoResult",
           "flip_sites"]

KIND_NAMES = {1: "nop2-jmp8", 2: "nop5-jmp32", 3: "call", 4: "ret-jmp32", 5: "jcc32", 6: "nop5-int3"}
#: what the variant slots mean (see workload.S)
VARIANTS = {0: "none", 1: "old", 2: "new", 3: "not-taken", 4: "wrong-direction",
            5: "garbage", 6: "garbage", 7: "garbage"}
_ENTRY = struct.Struct("<QQBB6x")


@dataclass(frozen=True, slots=True)
class Site:
    index: int
    name: str
    addr: int
    length: int
    kind: str
    old: bytes
    new: bytes

    @property
    def allowed(self) -> frozenset[int]:
        """Variant slots that are correct behaviour at this site."""
        return frozenset({1, 2, 3}) if self.kind == "jcc32" else frozenset({1, 2})


def variant_name(i: int) -> str:
    """The name of a workload variant slot: old, new, not-taken, ...;
    the garbage slots carry their number (garbage-5)."""
    name = VARIANTS[i]
    if sum(1 for v in VARIANTS.values() if v == name) > 1:
        return f"{name}-{i}"
    return name


def _new_bytes(kind: int, addr: int, length: int, target: int, old: bytes) -> bytes:
    if kind == 1:
        return text_gen_insn(JMP8_INSN_OPCODE, addr, target)
    if kind in (2, 4):
        return text_gen_insn(JMP32_INSN_OPCODE, addr, target)
    if kind == 3:
        return text_gen_insn(CALL_INSN_OPCODE, addr, target)
    if kind == 5:
        return old[:2] + (target - (addr + 6)).to_bytes(4, "little", signed=True)
    if kind == 6:
        return bytes([INT3_INSN_OPCODE])
    raise ImageError(f"unknown site kind {kind}")


def flip_sites(core, sites: list[Site], flipped: dict[str, bool]) -> None:
    """One toggle of the demo: a batch of *core* writes every site's other
    form (its new bytes, or its old ones where *flipped*); only once the
    batch is committed do the sites read flipped."""
    with core.batch():
        for s in sites:
            core.smp_text_poke_batch_add(s.addr, s.old if flipped[s.name] else s.new)
    for s in sites:
        flipped[s.name] = not flipped[s.name]


def read_sites(image: ElfImage) -> list[Site]:
    """The workload's patch sites, from its ``.textpoke_sites`` table."""
    sec = image.section(".textpoke_sites")
    text = image.section(".text")
    if len(sec.data) % _ENTRY.size:
        raise ImageError(f"{image.path}: .textpoke_sites size {len(sec.data)} is not a multiple "
                         f"of {_ENTRY.size}")
    sites = []
    for i in range(len(sec.data) // _ENTRY.size):
        addr, target, kind, length = _ENTRY.unpack_from(sec.data, i * _ENTRY.size)
        if not (text.addr <= addr and addr + length <= text.end):
            raise ImageError(f"{image.path}: site {i} at {addr:#x} is outside .text")
        if kind not in KIND_NAMES:
            raise ImageError(f"{image.path}: site {i} has unknown kind {kind}")
        old = text.data[addr - text.addr: addr - text.addr + length]
        new = _new_bytes(kind, addr, length, target, old)
        name = (image.name_at(addr) or f"site{i}").removeprefix("site_")
        sites.append(Site(i, name, addr, length, KIND_NAMES[kind], old, new))
    return sites


@dataclass(slots=True)
class DemoResult:
    """What a demo run saw, on any machine (the CLI prints and dumps it)."""

    cpus: int
    toggles: int
    seed: int
    sites: list[dict]
    instructions: list[int]
    iterations: list[int]
    int3_hits: int
    int3_emulated: int
    syncs: int
    batches: int
    pokes: int
    writes: int
    oopses: list[dict]
    misbehaviours: int
    final_ok: bool | None       # None: not checked (interrupted)
    elapsed: float
    steps: int
    ipis: int
    line_refills: int
    boot: dict | None = None
    events: list[dict] = field(default_factory=list)
    #: toggles (batches) completed; less than *toggles* when interrupted
    toggles_done: int = 0
    interrupted: bool = False
    #: sites whose first byte reads an INT3 of ours, read back at the end
    int3_left: int = 0

    line_size: int = 64
    with_boot: bool = True

    def as_dict(self) -> dict:
        d = {"params": {"cpus": self.cpus, "toggles": self.toggles, "seed": self.seed,
                        "line_size": self.line_size, "boot": self.with_boot}}
        d.update((k, getattr(self, k)) for k in self.__slots__ if k != "events")
        d["oopses_detail"] = d.pop("oopses")
        d["oopses"] = len(self.oopses)
        return d
