# SPDX-License-Identifier: GPL-2.0-only
"""Static keys at run time: :class:`StaticKeys`.

A static key is a reference count in guest data (``struct static_key``,
``enabled`` first) and the list of ``__jump_table`` entries that test it.
A site jumps when ``enabled != branch`` (the entry's polarity bit: a site
compiled for "likely" has it set, so the same key state writes the
opposite instruction there).  Every site is one instruction: a 2-byte
``NOP2``/``JMP8`` or a 5-byte ``NOP5``/``JMP32``, chosen by what the
compiler and assembler left at the site.

Updating a key queues every entry of the key with the SMP batch
(``arch_jump_label_transform_queue`` is :meth:`StaticKeys.transform_queue`,
``arch_jump_label_transform_apply`` is :meth:`StaticKeys.transform_apply`,
which finishes the batch), so one key costs ceil(n/256) batches of at most
three sync broadcasts each.  Before anything is queued, every entry's
current bytes are compared with the instruction the entry must hold in the
key's old state; one mismatch refuses the whole update with
:class:`JumpLabelError`, naming the site (``symbol+0xoff``) and both byte
strings, and nothing is written.  (The kernel checks entry by entry and
BUG()s at the first mismatch.)

Reference counts as ``kernel/jump_label.c`` keeps them:
``static_key_enable``/``disable`` set the count to 1/0 (a key counted
above 1 is left alone by ``enable``; ``disable`` of a key counted other
than 1 does nothing), ``static_branch_inc``/``dec`` count, patching only
on the 0 <-> 1 transitions.  A ``dec`` of a key already at 0 is the
kernel's WARN and nothing else: a :class:`StaticKeyWarning`, recorded in
:attr:`StaticKeys.warnings`, and no change.  The count is mirrored into
the guest's key in the kernel's order: on the 0 -> 1 path the guest reads
-1 ("enabling in progress", which ``static_key_count`` reports as 1) while
the sites are written and 1 once they are all written; on 1 -> 0 it reads
0 before the first site is written.

Which entries an update writes (``jump_label_can_update``): after boot
(:attr:`StaticKeys.booting` false, the default -- a :class:`StaticKeys`
is made over a booted kernel) entries marked as init text are left alone,
and so is an entry outside the machine's text (the kernel's built-in
``__exit`` code, which is in no text range at run time); one that is not
marked init is warned about, as the kernel does.

Modules add their entries with :meth:`StaticKeys.add_module_entries` (the
sites are put in the key's current state by the module loader before the
module text goes live) and remove them with
:meth:`StaticKeys.remove_module_entries`; a key flipped in between switches
the module's sites too.

Rules learnt from ``kernel/jump_label.c`` and ``arch/x86/kernel/jump_label.c``
(Linux 6.12); the code is our own.
"""

from __future__ import annotations

import struct
import warnings as _warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .._core._insn import JMP8_INSN_OPCODE, JMP32_INSN_OPCODE, text_gen_insn, x86_nops
from .._errors import BadInstructionError, TextPokeError
from ..images._symbols import SymbolMap
from ..images._tables import JumpEntry, read_tables

__all__ = ["StaticKeys", "StaticKey", "JumpLabelError", "StaticKeyError", "StaticKeyWarning",
           "UnknownKeyError",
           "JUMP_LABEL_NOP", "JUMP_LABEL_JMP"]

JUMP_LABEL_NOP = 0
JUMP_LABEL_JMP = 1
_NOP2, _NOP5 = x86_nops[2], x86_nops[5]


class JumpLabelError(BadInstructionError):
    """A jump-label site does not hold what its key's state says it must
    ("unexpected op"), or is not a 2- or 5-byte NOP/JMP.  Nothing was written."""

    def __init__(self, msg: str, *, addr: int = 0, site: str = "", found: bytes = b"",
                 expected: bytes = b"") -> None:
        super().__init__(msg)
        self.addr, self.site, self.found, self.expected = addr, site, found, expected


class StaticKeyError(TextPokeError, ValueError):
    """A reference-count operation the key's state does not allow."""


class StaticKeyWarning(UserWarning):
    """What the kernel WARNs about and then carries on from (a ``dec`` of
    a key at 0, a site it cannot patch)."""


class UnknownKeyError(TextPokeError, LookupError):
    """No static key of that name (or address)."""

    def __str__(self) -> str:       # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class _Site:
    entry: JumpEntry
    size: int
    owner: str          # "" for the image, else the module's name


@dataclass(slots=True, eq=False)
class StaticKey:
    name: str
    addr: int
    enabled: int                    # the reference count
    initial: bool                   # the key's type bit: declared true
    sites: list[_Site] = field(default_factory=list)

    @property
    def entries(self) -> list[JumpEntry]:
        return [s.entry for s in self.sites]

    def as_dict(self) -> dict:
        return {"name": self.name, "addr": self.addr, "enabled": self.enabled,
                "state": self.enabled > 0, "initial": self.initial, "entries": len(self.sites),
                "modules": sorted({s.owner for s in self.sites if s.owner})}


class StaticKeys:
    """The static keys of one kernel image on one :class:`TextPoke`.

    *entries* is the image's ``__jump_table`` (``read_tables(image).jump_table``);
    *symbols* (name -> address, optionally with *sizes*) names the keys and
    the sites.  Keys are the symbols that entries point at."""

    def __init__(self, core, entries: Iterable[JumpEntry], symbols: Mapping[str, int],
                 sizes: Mapping[str, int] | None = None) -> None:
        self.core = core
        self.machine = core.machine
        self.symbols = SymbolMap(symbols, sizes)
        self.keys: dict[str, StaticKey] = {}
        self._by_addr: dict[int, StaticKey] = {}
        self._names = {}
        for n, a in symbols.items():
            self._names.setdefault(a, []).append(n)
        self.updates = 0            # jump_label_update calls that wrote something
        #: system_state < SYSTEM_RUNNING: init-text entries may be written
        self.booting = False
        #: the kernel's WARNs, in order (each also a StaticKeyWarning)
        self.warnings: list[str] = []
        self.entries_patched = 0
        #: keys a module defines (its own data), by module
        self._module_keys: dict[str, list[StaticKey]] = {}
        for e in entries:
            self._key_at(e.key).sites.append(_Site(e, self._entry_size(e.code), ""))

    @classmethod
    def from_image(cls, core, image, tables=None) -> "StaticKeys":
        if tables is None:
            tables = read_tables(image)
        return cls(core, tables.jump_table, image.symbols, image.sizes)

    # ----------------------------------------------------------- lookup
    def _key_at(self, addr: int, *, create: bool = True) -> StaticKey:
        k = self._by_addr.get(addr)
        if k is None:
            if not create:
                raise UnknownKeyError(f"no static key at {addr:#x}")
            names = sorted(self._names.get(addr, []))
            name = names[0] if names else f"key@{addr:#x}"
            enabled, type_ = self._read_key(addr)
            k = StaticKey(name, addr, enabled, bool(type_ & 1))
            self.keys[name] = k
            self._by_addr[addr] = k
        return k

    def _read_key(self, addr: int) -> tuple[int, int]:
        try:
            raw = self.machine.mem.read(addr, 16)
        except Exception:
            return 0, 0
        enabled, _pad, type_ = struct.unpack("<iiQ", raw)
        return max(enabled, 0), type_

    def key(self, key: "str | int | StaticKey") -> StaticKey:
        """A key by name, address or itself; :class:`UnknownKeyError` if none."""
        if isinstance(key, StaticKey):
            return key
        if isinstance(key, int):
            return self._key_at(key, create=False)
        k = self.keys.get(key)
        if k is None:
            near = sorted(n for n in self.keys if key.lower() in n.lower())[:5]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UnknownKeyError(f"unknown static key {key!r}{hint}")
        return k

    def describe(self, addr: int) -> str:
        return self.symbols.describe(addr)

    # ----------------------------------------------------------- state
    def static_key_count(self, key) -> int:
        return self.key(key).enabled

    def static_key_enabled(self, key) -> bool:
        return self.key(key).enabled > 0

    def static_key_enable(self, key) -> None:
        k = self.key(key)
        if k.enabled > 0:
            if k.enabled != 1:      # a counted key enabled as a plain one: the kernel warns
                self._warn(f"static_key_enable({k.name}): the count is {k.enabled}, not 1; "
                           "left alone")
            return
        self._set(k, 1)

    def static_key_disable(self, key) -> None:
        k = self.key(key)
        if k.enabled != 1:
            if k.enabled != 0:
                self._warn(f"static_key_disable({k.name}): the count is {k.enabled}, not 1; "
                           "left alone")
            return
        self._set(k, 0)

    def static_branch_inc(self, key) -> None:
        k = self.key(key)
        if k.enabled > 0:
            k.enabled += 1
            self._mirror(k)
            return
        self._set(k, 1)

    def static_branch_dec(self, key) -> None:
        k = self.key(key)
        if k.enabled <= 0:
            # an unbalanced dec: the kernel warns and leaves the key alone
            self._warn(f"static_branch_dec({k.name}): the count is already 0; nothing done")
            return
        if k.enabled > 1:
            k.enabled -= 1
            self._mirror(k)
            return
        self._set(k, 0)

    # the kernel's other names for the same operations
    static_key_slow_inc = static_branch_inc
    static_key_slow_dec = static_branch_dec
    static_branch_enable = static_key_enable
    static_branch_disable = static_key_disable

    def _set(self, k: StaticKey, count: int) -> None:
        """0 -> 1 or 1 -> 0 with the sites.  What the guest reads in the key
        while the sites change is the kernel's: -1 (counted as enabled) on
        the way up, published as 1 only after the last site is written;
        0 on the way down, before the first site is written."""
        old = k.enabled
        k.enabled = count
        try:
            self._mirror(k, -1 if count > 0 else 0)
            self.jump_label_update(k, was=old > 0)
        except BaseException:
            k.enabled = old
            self._mirror(k)
            raise
        self._mirror(k)

    def _mirror(self, k: StaticKey, value: int | None = None) -> None:
        try:
            self.machine.mem.write(k.addr, struct.pack("<i", k.enabled if value is None
                                                       else value))
        except Exception:
            pass        # keys outside the machine's data (a bare MemoryMachine)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        _warnings.warn(msg, StaticKeyWarning, stacklevel=3)

    def can_update(self, s: _Site) -> bool:
        """``jump_label_can_update``: init-text entries only while booting;
        nothing outside the machine's text (built-in ``__exit`` code)."""
        e = s.entry
        if e.init and not self.booting:
            return False
        if not self.machine.is_text(e.code, s.size):
            if not e.init:
                self._warn(f"can't patch jump_label at {self.describe(e.code)} [{e.code:#x}]")
            return False
        return True

    # ----------------------------------------------------------- code
    def _entry_size(self, addr: int) -> int:
        """``arch_jump_entry_size``: 2 or 5, from the instruction at the site."""
        b = self.machine.text_read(addr, 5)
        if b[:2] == _NOP2 or b[0] == JMP8_INSN_OPCODE:
            return 2
        if b == _NOP5 or b[0] == JMP32_INSN_OPCODE:
            return 5
        raise JumpLabelError(f"jump label at {self.describe(addr)} [{addr:#x}]: {b.hex(' ')} is "
                             "neither a 2- nor a 5-byte NOP/JMP", addr=addr,
                             site=self.describe(addr), found=b)

    def jump_label_type(self, e: JumpEntry, enabled: bool | None = None) -> int:
        """JMP when the key's state and the entry's polarity differ."""
        if enabled is None:
            enabled = self.key(e.key).enabled > 0
        return JUMP_LABEL_JMP if enabled != e.branch else JUMP_LABEL_NOP

    def code(self, e: JumpEntry, size: int, type_: int) -> bytes:
        """The instruction an entry holds for *type_* (NOP or JMP)."""
        if type_ == JUMP_LABEL_NOP:
            return x86_nops[size]
        if size == 2:
            rel = e.target - (e.code + 2)
            if not -128 <= rel <= 127:
                raise JumpLabelError(f"jump label at {self.describe(e.code)}: JMP8 cannot reach "
                                     f"{e.target:#x}", addr=e.code, site=self.describe(e.code))
            return text_gen_insn(JMP8_INSN_OPCODE, e.code, e.target)
        return text_gen_insn(JMP32_INSN_OPCODE, e.code, e.target)

    def _patch(self, s: _Site, type_: int) -> tuple[bytes, bytes]:
        """``__jump_label_patch``: (code to write, what must be there now)."""
        new = self.code(s.entry, s.size, type_)
        expect = self.code(s.entry, s.size, JUMP_LABEL_JMP - type_)
        return new, expect

    def _check(self, s: _Site, new: bytes, expect: bytes) -> None:
        cur = self.machine.text_read(s.entry.code, s.size)
        if cur != expect:
            where = self.describe(s.entry.code)
            raise JumpLabelError(
                f"jump_label: unexpected op at {where} [{s.entry.code:#x}] "
                f"(found {cur.hex(' ')} != expected {expect.hex(' ')}; would write "
                f"{new.hex(' ')}) size {s.size}; nothing written",
                addr=s.entry.code, site=where, found=cur, expected=expect)

    # ----------------------------------------------------------- update
    def transform_queue(self, s: _Site, type_: int) -> None:
        """``arch_jump_label_transform_queue``: check and queue one entry
        (text_mutex held by the caller)."""
        new, expect = self._patch(s, type_)
        self._check(s, new, expect)
        self.core.smp_text_poke_batch_add(s.entry.code, new)

    def transform_apply(self) -> None:
        """``arch_jump_label_transform_apply``: finish the batch."""
        self.core.smp_text_poke_batch_finish()

    def jump_label_update(self, key, *, was: bool | None = None) -> int:
        """Put every entry of *key* in the form its current count asks for;
        return the number of entries written.  All entries are checked
        first: one unexpected site refuses the update with nothing written."""
        k = self.key(key)
        enabled = k.enabled > 0
        if was is not None and was == enabled:
            return 0
        plan = []
        for s in k.sites:
            if not self.can_update(s):
                continue
            type_ = self.jump_label_type(s.entry, enabled)
            new, expect = self._patch(s, type_)
            self._check(s, new, expect)
            plan.append((s, new))
        if not plan:
            return 0
        with self.core.batch():
            for s, new in plan:
                self.core.smp_text_poke_batch_add(s.entry.code, new)
        self.updates += 1
        self.entries_patched += len(plan)
        return len(plan)

    def site_state(self, e: JumpEntry) -> int | None:
        """JUMP_LABEL_JMP/NOP as the text reads now, None if neither."""
        s = next((x for x in self.key(e.key).sites if x.entry == e), None)
        size = s.size if s else self._entry_size(e.code)
        cur = self.machine.text_read(e.code, size)
        for t in (JUMP_LABEL_NOP, JUMP_LABEL_JMP):
            if cur == self.code(e, size, t):
                return t
        return None

    # ----------------------------------------------------------- modules
    def module_code(self, e: JumpEntry, text: bytes | bytearray, base: int,
                    enabled: bool | None = None) -> tuple[int, bytes]:
        """For the module loader: (size, code) an entry of a module whose text
        is *text* (not yet live, at *base*) must hold for its key's state
        (*enabled*: the state of a key the module defines itself)."""
        k = self.key(e.key) if enabled is None else StaticKey(f"key@{e.key:#x}", e.key,
                                                              int(enabled), False)
        off = e.code - base
        b = bytes(text[off:off + 5])
        if b[:2] == _NOP2 or b[:1] == bytes([JMP8_INSN_OPCODE]):
            size = 2
        elif b == _NOP5 or b[:1] == bytes([JMP32_INSN_OPCODE]):
            size = 5
        else:
            raise JumpLabelError(f"module jump label at {e.code:#x} ({k.name}): {b.hex(' ')} is "
                                 "neither a 2- nor a 5-byte NOP/JMP", addr=e.code, found=b)
        return size, self.code(e, size, self.jump_label_type(e, k.enabled > 0))

    def add_module_entries(self, owner: str, entries: Iterable[JumpEntry],
                           symbols: Mapping[str, int] | None = None,
                           sizes: Mapping[str, int] | None = None,
                           own_keys: Iterable[int] = ()) -> None:
        """Register a module's entries (its text must already hold each
        entry in its key's current state).  Every key must be known, or
        be one of *own_keys*: keys in the module's own data (already
        written), made here and dropped with the module."""
        entries = list(entries)
        own = set(own_keys)
        for e in entries:
            if e.key not in own:
                self.key(e.key)     # UnknownKeyError before anything changes
        if symbols:
            self.symbols.add(owner, symbols, sizes or {})
        mine = self._module_keys.setdefault(owner, [])
        for a in sorted(own - set(self._by_addr)):
            names = sorted(n for n, v in (symbols or {}).items() if v == a)
            self._names.setdefault(a, [f"{owner}:{n}" for n in names])
            mine.append(self._key_at(a))
        for e in entries:
            self._key_at(e.key).sites.append(_Site(e, self._entry_size(e.code), owner))

    def remove_module_entries(self, owner: str) -> int:
        for k in self._module_keys.pop(owner, []):
            self.keys.pop(k.name, None)
            self._by_addr.pop(k.addr, None)
            self._names.pop(k.addr, None)
        n = 0
        for k in self.keys.values():
            before = len(k.sites)
            k.sites = [s for s in k.sites if s.owner != owner]
            n += before - len(k.sites)
        self.symbols.remove(owner)
        return n

    def as_list(self) -> list[dict]:
        return [k.as_dict() for k in sorted(self.keys.values(), key=lambda k: k.name)]
