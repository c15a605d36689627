# SPDX-License-Identifier: GPL-2.0-only
"""What every boot pass works with: a shadow copy of text on which sites
are rewritten before anything reaches the machine, symbol names for
records, the CPU feature set, and the ``debug-alternative`` log."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Protocol, Sequence, TypeVar

from .._core import TextPoke
from .._errors import BadAddressError, TextPokeError
from ..images._lines import LINE_BUNDLED, KernelLine
from ._code import FastInsn, decode_site
from ._ktext import SymbolicText
from ..images._symbols import Symbols as KernelSymbols
from ..images._tables import X86_FEATURES, feature_name, feature_set   # tables own the numbering
from ._records import DebugLog, KernelBootError

__all__ = ["SymbolSource", "Symbols", "symbols_of", "features_of", "has_feature", "Shadow",
           "DebugLog", "run_pass"]


class SymbolSource(Protocol):
    """What names addresses: an :class:`~textpoke.images.ElfImage`, or
    anything with the same two tables."""

    symbols: Mapping[str, int]
    sizes: Mapping[str, int]


class Symbols:
    """Address -> "function+0xoff" for records and debug lines: the one
    symbolizer (:class:`~textpoke.images._symbols.Symbols`) over an
    image's tables, the enclosing function first, else the nearest label."""

    def __init__(self, symbols: Mapping[str, int], sizes: Mapping[str, int]) -> None:
        self.by_name = dict(symbols)
        self._table = KernelSymbols.from_mapping(
            symbols, sizes, keep=lambda n, a: not n.startswith((".", "__start", "__stop")))

    def get(self, name: str) -> int | None:
        return self.by_name.get(name)

    def __call__(self, addr: int) -> str:
        return self._table.describe(addr, function=True)


def symbols_of(image: SymbolSource | Mapping[str, int] | None) -> Symbols:
    """Symbols from an image, from a bare ``{name: addr}`` mapping, or none."""
    if image is None:
        return Symbols({}, {})
    if isinstance(image, Mapping):
        return Symbols(image, {})
    return Symbols(image.symbols, image.sizes)


def features_of(features: Iterable[str | int]) -> tuple[frozenset[int], tuple[str, ...]]:
    """Feature numbers (``always`` included) and their sorted names."""
    nums = feature_set(features)
    return nums, tuple(sorted(feature_name(n) for n in nums))


def has_feature(nums: frozenset[int], name: str) -> bool:
    return X86_FEATURES[name] in nums


class Shadow(SymbolicText):
    """A copy-on-first-touch image of text on which a boot pass works: the
    :class:`~._ktext.TextBuffer` of a machine (the bundled image booting, a
    module being loaded).

    Reads see earlier writes of the same pass (a nested alternative reads
    what the previous entry left); nothing reaches the machine until
    :meth:`commit`, so a refused site leaves the text exactly as it was.
    *symbols* name addresses and give the passes their thunks; *line* is
    the rule set (the bundled image's).
    """

    line: KernelLine = LINE_BUNDLED
    symbols: Symbols = Symbols({}, {})

    def __init__(self, core: TextPoke, symbols: Symbols | None = None,
                 line: KernelLine = LINE_BUNDLED) -> None:
        self.core = core
        self.machine = core.machine
        self._ranges: list[tuple[int, int, bytearray | None]] = [
            (r.start, r.end, None) for r in self.machine.text_ranges]
        self.writes: list[tuple[int, bytes, bytes]] = []
        if symbols is not None:
            self.symbols = symbols
        self.line = line

    def _buf(self, addr: int, size: int) -> tuple[bytearray, int]:
        for i, (start, end, buf) in enumerate(self._ranges):
            if start <= addr and addr + size <= end:
                if buf is None:
                    buf = bytearray(self.machine.text_read(start, end - start))
                    self._ranges[i] = (start, end, buf)
                return buf, addr - start
        raise BadAddressError(f"[{addr:#x}, +{size}) is not inside mapped text")

    def read(self, addr: int, size: int) -> bytes:
        buf, off = self._buf(addr, size)
        return bytes(buf[off:off + size])

    def write(self, table: str, addr: int, data: bytes) -> bool:
        """Stage a write (for *table*); False (and nothing staged) when it
        changes nothing."""
        buf, off = self._buf(addr, len(data))
        old = bytes(buf[off:off + len(data)])
        if old == data:
            return False
        buf[off:off + len(data)] = data
        self.writes.append((addr, old, bytes(data)))
        return True

    def peek(self, addr: int, n: int) -> bytes:
        """Up to *n* bytes at *addr*, fewer at the end of its text range."""
        for start, end, _buf in self._ranges:
            if start <= addr < end:
                buf, off = self._buf(addr, 1)
                return bytes(buf[off:off + min(n, end - addr)])
        return b""

    def decode(self, addr: int) -> FastInsn | None:
        """The instruction at *addr* as the shadow holds it, None when it
        does not decode."""
        data = self.peek(addr, 15)
        return decode_site(data, 0, addr) if data else None

    def data_u64(self, addr: int) -> int:
        try:
            return int.from_bytes(self.machine.mem.read(addr, 8), "little")
        except TextPokeError as e:
            raise KernelBootError(f"cannot read data at {addr:#x}: {e}") from None

    def commit(self) -> int:
        """Write every staged change with text_poke_early, in order; undo the
        ones already written if any write fails."""
        done: list[tuple[int, bytes, bytes]] = []
        try:
            for addr, old, new in self.writes:
                self.core.text_poke_early(addr, new)
                done.append((addr, old, new))
        except BaseException:
            for addr, old, _new in reversed(done):
                self.machine.text_write_early(addr, old)
            raise
        n = len(self.writes)
        self.writes = []
        return n


_Item = TypeVar("_Item")
_Record = TypeVar("_Record")
#: A boot pass: rewrite the sites of one table on a shadow of text.
BootPass = Callable[[Shadow, Sequence[_Item], frozenset[int], Symbols, DebugLog], list[_Record]]


def run_pass(core: TextPoke, boot_pass: BootPass, items: Iterable[_Item],
             features: Iterable[str | int], image: SymbolSource | Mapping[str, int] | None,
             debug_mask: int = 0) -> tuple[_Record, ...]:
    """Run one boot pass on its own shadow and commit it: what the public
    ``apply_*`` functions do outside ``alternative_instructions``."""
    feats, _names = features_of(features)
    shadow = Shadow(core)
    out = boot_pass(shadow, list(items), feats, symbols_of(image), DebugLog(debug_mask))
    shadow.commit()
    return tuple(out)
