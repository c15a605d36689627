# SPDX-License-Identifier: GPL-2.0-only
"""A real kernel's memory, ``_text`` .. ``_end``, as one flat buffer that
the boot passes rewrite in place, plus what they ask of the CPU.

The small image of this project goes through a machine and ``TextPoke``;
a real kernel has ~300,000 sites and the boot passes have to be fast, so
they work on this buffer directly -- the kernel itself does nothing else
at boot (``text_poke_early`` is a ``memcpy``).  Data the passes read
(``pv_ops``, ``static_call_key.func``, ``static_key.enabled``) comes from
the same layout: the image's own initial data, or, with ``data=``, a
snapshot of the kernel's memory taken at the moment patching starts (the
QEMU reference's "before" dump), which holds what the kernel changed at
run time before ``alternative_instructions()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar

from ..images._symbols import Symbols
from ..images._lines import LINE_612, LINE_BUNDLED, LINES, KernelLine
from ._code import FastInsn, decode_site
from ._records import KernelBootError

T = TypeVar("T")

__all__ = ["TextBuffer", "SymbolicText", "KernelText", "CpuCaps", "KernelBootError", "Change", "caps_of"]


@dataclass
class Change:
    """One site a pass wrote: table, address, old and new bytes."""
    table: str
    addr: int
    old: bytes
    new: bytes


class CpuCaps:
    """``boot_cpu_data.x86_capability`` of one kernel line: its feature
    words, then its bug words, as one bit set (bit ``word*32+bit``).  Names
    are the line's (:attr:`KernelLine.features`); :meth:`for_line` reads
    the same words, and replays the names set by name, under another line's
    numbering (the CLI builds the CPU before it knows the image's line)."""

    def __init__(self, words: Sequence[int] = (), line: KernelLine | None = None) -> None:
        self.line = line or LINE_612
        words = list(words)
        if len(words) > self.line.ncaps:
            raise KernelBootError(f"{len(words)} capability words; Linux {self.line.name} has "
                                  f"{self.line.ncaps} ({self.line.ncapints} feature, "
                                  f"{self.line.nbugints} bug)")
        self.bits = 0
        for i, w in enumerate(words):
            if not 0 <= w < 1 << 32:
                raise KernelBootError(f"capability word {i} ({w:#x}) is not a u32")
            self.bits |= w << (32 * i)
        self._words = words
        self._named: list[tuple[str, bool]] = []

    @classmethod
    def from_names(cls, names: Iterable[str], line: KernelLine | None = None) -> "CpuCaps":
        c = cls(line=line)
        for n in names:
            c.set(n)
        return c

    def for_line(self, line: KernelLine) -> "CpuCaps":
        if line is self.line:
            return self
        c = CpuCaps(self._words, line)
        for name, on in self._named:
            c.set(name, on)
        return c

    @staticmethod
    def _key(name: str) -> str:
        key = name.strip().lower()
        if key.startswith("x86_feature_"):
            key = key[len("x86_feature_"):]
        elif key.startswith("x86_bug_"):
            key = "bug_" + key[len("x86_bug_"):]
        return key

    def number(self, name: str | int) -> int:
        if isinstance(name, int):
            return name
        n = self.line.features.get(self._key(name))
        if n is None:
            raise KernelBootError(f"unknown feature {name!r} for Linux {self.line.name} "
                                  f"(see --cpu-features list)")
        return n

    def has(self, name: str | int) -> bool:
        """Whether the CPU has *name*; a feature this line does not define
        (but another does) is absent, a name no line knows is an error."""
        if isinstance(name, int):
            return self.has_bit(name)
        n = self.line.features.get(self._key(name))
        if n is None:
            if not any(self._key(name) in ln.features for ln in LINES):
                raise KernelBootError(f"unknown feature {name!r} (see --cpu-features list)")
            return False
        return bool(self.bits >> n & 1)

    def has_bit(self, n: int) -> bool:
        return bool(self.bits >> n & 1)

    def set(self, name: str | int, on: bool = True) -> None:
        n = self.number(name)
        if isinstance(name, str):
            self._named.append((name, on))
        if on:
            self.bits |= 1 << n
        else:
            self.bits &= ~(1 << n)

    def words(self) -> list[int]:
        return [(self.bits >> (32 * i)) & 0xFFFFFFFF for i in range(self.line.ncaps)]

    def names(self) -> list[str]:
        by_num: dict[int, str] = {}
        for k, v in self.line.features.items():
            by_num.setdefault(v, k)
        return [by_num.get(n, f"{n >> 5}*32+{n & 31}") for n in range(self.bits.bit_length())
                if self.bits >> n & 1]


def caps_of(features: Iterable[int], line: KernelLine = LINE_BUNDLED) -> CpuCaps:
    """The CPU whose features are the numbers *features* (the bundled
    image's numbering by default)."""
    c = CpuCaps(line=line)
    for n in features:
        c.bits |= 1 << n
    return c


class TextBuffer(Protocol):
    """What every boot pass works on: the text being patched, whoever holds
    it -- a real kernel's flat memory (:class:`KernelText`), the shadow of a
    machine's text that is committed with ``text_poke_early``
    (``_shadow.Shadow``), a module's staged text.  *line* is the kernel
    line whose rules apply (the bundled image has its own,
    ``LINE_BUNDLED``)."""

    line: KernelLine

    def read(self, addr: int, n: int) -> bytes: ...

    def peek(self, addr: int, n: int) -> bytes | bytearray:
        """Up to *n* bytes at *addr*, fewer at the end of the buffer; never
        raises (what a decoder looks at)."""

    def write(self, table: str, addr: int, data: bytes) -> bool:
        """``text_poke_early``; False when the bytes were already there."""

    def decode(self, addr: int) -> FastInsn | None: ...

    def describe(self, addr: int) -> str:
        """``symbol+0xoff`` as ``%pS`` prints it."""

    def sym(self, name: str) -> int:
        """A symbol's address; raises :class:`KernelBootError` when absent."""

    def opt(self, name: str) -> int | None: ...

    def data_u64(self, addr: int) -> int:
        """A u64 of data as the kernel sees it when patching runs."""


class SymbolicText:
    """The symbol half of :class:`TextBuffer` for a buffer whose *symbols*
    are a ``_shadow.Symbols`` (callable for ``symbol+0xoff``, ``get`` for an
    address): a machine's shadow, a running machine."""

    symbols: Any

    def describe(self, addr: int) -> str:
        return self.symbols(addr)

    def opt(self, name: str) -> int | None:
        return self.symbols.get(name)

    def sym(self, name: str) -> int:
        addr = self.symbols.get(name)
        if addr is None:
            raise KernelBootError(f"the image has no symbol {name!r}")
        return addr


@dataclass
class KernelText:
    """The kernel's memory from *base* (``_text``) on, rewritten in place.

    *symbols* are the image's (a :class:`~textpoke.images._symbols.Symbols`,
    or any name -> address mapping); *exec_ranges* the executable sections
    (name, start, end).  *data* is what data reads see (default: the
    buffer itself, i.e. the image's initial data)."""

    buf: bytearray
    base: int
    symbols: Mapping[str, int]
    exec_ranges: list[tuple[str, int, int]]
    data: bytes | bytearray | None = None
    record: bool = False
    changes: list[Change] = field(default_factory=list)
    _sorted: Symbols | None = None      # a plain mapping's symbolizer, made once
    line: KernelLine = LINE_612         # the kernel line: layouts, passes, rules

    # ------------------------------------------------------------- access
    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KernelBootError(f"the image has no symbol {name!r}") from None

    def opt(self, name: str) -> int | None:
        return self.symbols.get(name)

    def read(self, addr: int, n: int) -> bytes:
        o = addr - self.base
        if o < 0 or o + n > len(self.buf):
            raise KernelBootError(f"read [{addr:#x}, +{n}) outside _text.._end")
        return bytes(self.buf[o:o + n])

    def peek(self, addr: int, n: int) -> bytearray:
        o = addr - self.base
        return self.buf[o:o + n] if o >= 0 else bytearray()

    def decode(self, addr: int) -> FastInsn | None:
        return decode_site(self.buf, addr - self.base, addr)

    def data_u64(self, addr: int) -> int:
        src = self.buf if self.data is None else self.data
        o = addr - self.base
        if o < 0 or o + 8 > len(src):
            raise KernelBootError(f"data read at {addr:#x} outside _text.._end")
        return int.from_bytes(src[o:o + 8], "little")

    def data_s32(self, addr: int) -> int:
        src = self.buf if self.data is None else self.data
        o = addr - self.base
        return int.from_bytes(src[o:o + 4], "little", signed=True)

    def write(self, table: str, addr: int, data: bytes) -> bool:
        """``text_poke_early``; False when the bytes were already there."""
        o = addr - self.base
        n = len(data)
        old = self.buf[o:o + n]
        if old == data:
            return False
        if o < 0 or o + n > len(self.buf):
            raise KernelBootError(f"write [{addr:#x}, +{n}) outside _text.._end")
        if self.record:
            self.changes.append(Change(table, addr, bytes(old), bytes(data)))
        self.buf[o:o + n] = data
        return True

    def in_ranges(self, addr: int, ranges: Sequence[tuple[int, int]]) -> bool:
        return any(lo <= addr < hi for lo, hi in ranges)

    def synced(self, sites: Iterable[T], addr_of: Callable[[T], int],
               ranges: Sequence[tuple[int, int]]) -> Iterator[T]:
        """The *sites* whose bytes the snapshot's run-time state decides (a
        key's count, a static call's function): none without a snapshot
        (``data``), else those whose address (*addr_of*) is in *ranges*."""
        if self.data is None:
            return
        for s in sites:
            if self.in_ranges(addr_of(s), ranges):
                yield s

    # ------------------------------------------------------------ symbols
    def describe(self, addr: int) -> str:
        """*addr* named as the kernel's ``%pS`` names it, by the one
        symbolizer (a plain mapping is made into one, once, keeping the
        names inside this buffer)."""
        if not isinstance(self.symbols, Symbols):
            if self._sorted is None:
                lo, hi = self.base, self.base + len(self.buf)
                self._sorted = Symbols.from_mapping(self.symbols,
                                                    keep=lambda n, a: lo <= a < hi)
            return self._sorted.describe(addr, lo=self.base)
        return self.symbols.describe(addr, lo=self.base)
