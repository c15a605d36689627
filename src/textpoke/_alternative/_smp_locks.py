# SPDX-License-Identifier: GPL-2.0-only
"""SMP alternatives: the LOCK prefixes listed in ``.smp_locks``.

On a machine booted with one CPU present the prefixes become DS (same
length, no bus lock); they go back to LOCK when the machine goes SMP.  The
kernel keeps the ranges it may have to re-lock in a global list
(``smp_alt_modules``) with a ``uniproc_patched`` flag; here that state is
an object, :class:`SmpAlternatives`, that its owner keeps -- the boot
returns the one it filled in :attr:`BootResult.smp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .._core import TextPoke
from .._errors import MachineError
from ..images._tables import SmpLock
from ._ktext import TextBuffer
from ._livetext import LiveText
from ._records import DA_SMP, DebugLog, PassLog, SitePatch
from ._shadow import SymbolSource, Symbols, symbols_of

__all__ = ["SmpAlternatives", "SmpAltModule", "alternatives_smp_lock", "alternatives_smp_unlock",
           "alternatives_smp_module_add", "alternatives_smp_module_del",
           "alternatives_enable_smp", "alternatives_text_reserved", "lock_prefixes"]

LOCK_PREFIX = 0xF0
DS_PREFIX = 0x3E

#: ``.smp_locks`` entries as the table reader gives them, or bare addresses.
LockSites = Iterable["SmpLock | int"]


def _lock_addrs(locks: LockSites) -> tuple[int, ...]:
    """The LOCK-prefix addresses of *locks*, in table order."""
    out = []
    for lk in locks:
        if isinstance(lk, SmpLock):
            out.append(lk.addr)
        elif isinstance(lk, int):
            out.append(lk)
        else:
            raise TypeError(f"a .smp_locks entry must be an SmpLock or an address, "
                            f"not {type(lk).__name__}")
    return tuple(out)


def lock_prefixes(tb: TextBuffer, addrs: Sequence[int | None], text: tuple[int, int],
                  want: int, have: int, log: PassLog) -> None:
    """Turn prefix *have* into *want* at every listed address inside *text*
    (``alternatives_smp_lock``/``_unlock``), on any text buffer; a zero
    entry (None) or one outside *text* is skipped."""
    lo, hi = text
    dbg = log.dbg
    have_b, new = bytes([have]), bytes([want])
    for addr in addrs:
        if addr is None or not lo <= addr < hi:
            log.leave("smp-lock", addr or 0, b"", "skipped", "outside the text range", "")
            continue
        cur = bytes(tb.peek(addr, 1))
        if cur != have_b:
            if cur == new:
                log.leave("smp-lock", addr, cur, "unchanged", "")
            else:
                log.leave("smp-lock", addr, cur, "skipped",
                          f"prefix is {cur[0]:#04x}, not {have:#04x}" if cur else
                          "outside the text")
            continue
        log.done("smp-lock", addr, cur, new, tb.write(".smp_locks", addr, new))
        if dbg.mask & DA_SMP:
            dbg(DA_SMP, f"{tb.describe(addr)} ({addr:#x}): {have:02x} -> {want:02x}", addr)


def _lock_pass(core: TextPoke, addrs: tuple[int, ...], text: tuple[int, int], want: int,
               have: int, sym: Symbols, dbg: DebugLog | None) -> list[SitePatch]:
    """:func:`lock_prefixes` on the running machine, one record a site."""
    core.text_mutex.assert_held("alternatives_smp_lock/unlock")
    out: list[SitePatch] = []
    tb = LiveText(core, sym)
    lock_prefixes(tb, addrs, text, want, have, PassLog(len(addrs), tb.describe, dbg, out))
    if tb.written:
        # Whoever runs this code next -- the boot CPU, or a CPU coming
        # online -- must fetch the new prefix.
        core.smp_text_poke_sync_each_cpu()
    return out


def alternatives_smp_unlock(core: TextPoke, locks: LockSites, text: tuple[int, int], *,
                            image: SymbolSource | Mapping[str, int] | None = None,
                            ) -> tuple[SitePatch, ...]:
    """LOCK (F0) -> DS (3E) at every listed prefix inside *text*: a single
    CPU needs no bus lock, and DS is a no-op prefix of the same length.
    Needs ``text_mutex``."""
    return tuple(_lock_pass(core, _lock_addrs(locks), text, DS_PREFIX, LOCK_PREFIX,
                            symbols_of(image), None))


def alternatives_smp_lock(core: TextPoke, locks: LockSites, text: tuple[int, int], *,
                          image: SymbolSource | Mapping[str, int] | None = None,
                          ) -> tuple[SitePatch, ...]:
    """DS (3E) -> LOCK (F0): undo :func:`alternatives_smp_unlock`.  Needs
    ``text_mutex``."""
    return tuple(_lock_pass(core, _lock_addrs(locks), text, LOCK_PREFIX, DS_PREFIX,
                            symbols_of(image), None))


@dataclass(frozen=True)
class SmpAltModule:
    """One registered range (``struct smp_alt_module``)."""

    name: str
    locks: tuple[int, ...]           # LOCK-prefix addresses, in table order
    text: tuple[int, int]            # [start, end)


class SmpAlternatives:
    """The SMP-alternatives state of the text one :class:`TextPoke`
    patches: the registered ranges and whether the machine was patched for
    a single CPU.  Every operation takes the core's ``text_mutex``, except
    :meth:`text_reserved`, which needs it held (as in the kernel)."""

    def __init__(self, core: TextPoke, *, possible_cpus: int | None = None) -> None:
        self.core = core
        self.modules: list[SmpAltModule] = []
        self.uniproc_patched = False
        self.possible_cpus = len(core.machine.cpus) if possible_cpus is None else possible_cpus

    def module_add(self, name: str, locks: LockSites, text: tuple[int, int], *,
                   image: SymbolSource | Mapping[str, int] | None = None,
                   debug: DebugLog | None = None) -> tuple[SitePatch, ...]:
        """Register a text range's LOCK prefixes; unlock them now if the
        machine was patched for one CPU.  With a single possible CPU they
        are not remembered (there will never be a reason to lock them
        again)."""
        with self.core.text_mutex:
            if not self.uniproc_patched:
                return ()
            addrs = _lock_addrs(locks)
            if self.possible_cpus > 1:
                self.modules.append(SmpAltModule(name, addrs, text))
                if debug is not None:
                    debug(DA_SMP, f"locks {len(addrs)} entries, text {text[0]:#x} -> "
                                  f"{text[1]:#x}, name {name}")
            return tuple(_lock_pass(self.core, addrs, text, DS_PREFIX, LOCK_PREFIX,
                                    symbols_of(image), debug))

    def module_del(self, name: str) -> None:
        with self.core.text_mutex:
            self.modules = [m for m in self.modules if m.name != name]

    def enable_smp(self, *, image: SymbolSource | Mapping[str, int] | None = None,
                   ) -> tuple[SitePatch, ...]:
        """Going SMP: put the LOCK prefixes back in every registered range.
        Refused on a machine with one possible CPU (the kernel's BUG_ON)."""
        if self.possible_cpus == 1:
            raise MachineError("alternatives_enable_smp: this machine has a single possible CPU")
        sym = symbols_of(image)
        out: list[SitePatch] = []
        with self.core.text_mutex:
            if self.uniproc_patched:
                for m in self.modules:
                    out += _lock_pass(self.core, m.locks, m.text, LOCK_PREFIX, DS_PREFIX, sym, None)
                self.uniproc_patched = False
        return tuple(out)

    def text_reserved(self, start: int, end: int) -> bool:
        """Whether [start, end] -- *end inclusive*, the way kprobes asks
        (``(addr, addr)`` for one byte, ``(src, src + len - 1)`` for an
        optimised probe) -- holds a LOCK prefix the SMP switch may rewrite.
        Needs ``text_mutex``.

        The kernel's own test compares the prefix with *end* exclusively,
        so its one-byte query never finds one; jump_label and static_call
        answer the same question inclusively, and so do we."""
        self.core.text_mutex.assert_held("alternatives_text_reserved")
        if end < start:
            return False
        for m in self.modules:
            if m.text[0] > end or m.text[1] <= start:
                continue
            if any(start <= addr <= end for addr in m.locks):
                return True
        return False


def _state(smp: SmpAlternatives, what: str) -> SmpAlternatives:
    if not isinstance(smp, SmpAlternatives):
        raise TypeError(f"{what} takes the SmpAlternatives that owns the LOCK-prefix ranges "
                        f"(BootResult.smp after alternative_instructions), "
                        f"not {type(smp).__name__}")
    return smp


def alternatives_smp_module_add(smp: SmpAlternatives, name: str, locks: LockSites,
                                text: tuple[int, int], *,
                                image: SymbolSource | Mapping[str, int] | None = None,
                                ) -> tuple[SitePatch, ...]:
    """:meth:`SmpAlternatives.module_add` under the kernel's name."""
    return _state(smp, "alternatives_smp_module_add").module_add(name, locks, text, image=image)


def alternatives_smp_module_del(smp: SmpAlternatives, name: str) -> None:
    """:meth:`SmpAlternatives.module_del` under the kernel's name."""
    _state(smp, "alternatives_smp_module_del").module_del(name)


def alternatives_enable_smp(smp: SmpAlternatives, *,
                            image: SymbolSource | Mapping[str, int] | None = None,
                            ) -> tuple[SitePatch, ...]:
    """:meth:`SmpAlternatives.enable_smp` under the kernel's name."""
    return _state(smp, "alternatives_enable_smp").enable_smp(image=image)


def alternatives_text_reserved(smp: SmpAlternatives, start: int, end: int) -> bool:
    """:meth:`SmpAlternatives.text_reserved` under the kernel's name (*end*
    inclusive)."""
    return _state(smp, "alternatives_text_reserved").text_reserved(start, end)
