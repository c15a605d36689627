# SPDX-License-Identifier: GPL-2.0-only
"""The kprobes' records: a probe, a kretprobe and its instances, the
statistics, the refusal, and the per-address site state they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .._core._emulate import PtRegs
from .._core._insn import Insn
from .._errors import TextPokeError
from ._insn import Emulation
from ._opt import Detour

__all__ = ["Kprobe", "Kretprobe", "KretprobeInstance", "KprobeError", "KprobeStats",
           "PreHandler", "PostHandler"]

_TRAMP_SIZE = 16

PreHandler = Callable[["Kprobe", PtRegs], Any]
PostHandler = Callable[["Kprobe", PtRegs, int], Any]


class KprobeError(TextPokeError, ValueError):
    """A probe refused; the text is unchanged.  ``reason`` is one of
    ``symbol``, ``boundary``, ``int3``, ``reserved``, ``fentry``,
    ``unsupported``, ``busy``, ``entry``, ``optimize``, ``blacklist``."""

    def __init__(self, msg: str, *, reason: str, addr: int = 0) -> None:
        super().__init__(msg)
        self.reason, self.addr = reason, addr


@dataclass(eq=False)
class Kprobe:
    symbol: str
    offset: int
    addr: int
    pre_handler: PreHandler | None = None
    post_handler: PostHandler | None = None
    nhit: int = 0
    registered: bool = False

    @property
    def name(self) -> str:
        return f"{self.symbol}+{self.offset:#x}"


@dataclass(eq=False)
class Kretprobe:
    kp: Kprobe
    handler: Callable[["KretprobeInstance", PtRegs], Any] | None
    entry_handler: Callable[["KretprobeInstance", PtRegs], Any] | None
    maxactive: int
    nmissed: int = 0
    nhit: int = 0
    registered: bool = False


@dataclass(eq=False)
class KretprobeInstance:
    rp: Kretprobe
    ret_addr: int
    slot: int                   # stack address holding the (swapped) return address
    cpu: int
    data: dict = field(default_factory=dict)


@dataclass
class KprobeStats:
    hits: int = 0               # INT3 hits at probe sites
    emulated: int = 0
    single_stepped: int = 0     # slot runs ending in the second INT3
    boosted: int = 0            # slot runs ending in a JMP back
    detour_hits: int = 0        # handler calls from a detour buffer
    ret_hits: int = 0           # trampoline traps
    optimized: int = 0
    unoptimized: int = 0
    quiesce_waits: int = 0
    ftrace_hits: int = 0        # kprobe_ftrace_handler calls for one of our probes


@dataclass(eq=False)
class _Site:
    addr: int
    insn: Insn
    orig: bytes                 # the original first byte
    func: tuple[str, int, int]  # name, start, size
    emulate: Emulation | None
    probes: list[Kprobe] = field(default_factory=list)
    slot: int | None = None
    boosted: bool = False
    detour: Detour | None = None
    displaced: bytes = b""      # original bytes under the JMP32 (its length: detour.length)
    optimized: bool = False
    redirect: bool = False      # INT3 hits go to the detour (while optimising)
    ftrace: str = ""            # KPROBES_ON_FTRACE: the ftrace_ops it is on (no INT3)
