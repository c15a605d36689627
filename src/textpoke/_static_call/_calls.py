# SPDX-License-Identifier: GPL-2.0-only
"""Static calls at run time: :class:`StaticCalls`.

A static call NAME has a key ``__SCK__NAME`` (``struct static_call_key``,
the current function first) and a trampoline ``__SCT__NAME`` -- a 5-byte
JMP to the function (``ret; int3...`` when NULL) followed by the signature
``0f b9 cc``.  Inline sites listed in ``.static_call_sites`` call or
tail-jump to the trampoline until they are rewritten to reach the function
directly.

``static_call_update(name, func)`` stores the function in the key, then
rewrites the trampoline and every site, each with ``smp_text_poke_single``
(``text_poke_bp``):

=======  ==============================  ===================================
kind     function                        NULL
=======  ==============================  ===================================
CALL     ``call func`` (``2e 2e 2e 31    ``NOP5``
         c0`` for __static_call_return0,
         emulated as the CALL)
tail     ``jmp func``                    ``ret; int3 x4`` (or ``jmp
                                         x86_return_thunk`` where the CPU
                                         wants the return thunk there)
Jcc.d32  ``jcc func`` (6 bytes)          ``jcc __static_call_return`` (or
                                         ``jcc x86_return_thunk`` with
                                         rethunk)
=======  ==============================  ===================================

``x86_return_thunk`` is the boot's choice of return thunk (*rethunk*:
False for none, True for ``__x86_return_thunk``, or the thunk the boot
chose by name or address).  When that choice is ``its_return_thunk``
(ITS), a NULL tail site takes the thunk only in the lower half of its
64-byte line (address bit 5 clear) and a plain ``ret`` otherwise, as
``cpu_wants_rethunk_at`` decides; the Jcc form always takes the thunk.

An update to the function the key already holds does nothing at all (no
validation, no write), as ``__static_call_update`` returns early -- once
the call's sites are known to follow its key.  In the kernel that is true
from ``static_call_init`` on; the bundled image's boot has no such pass
(its sites call the trampolines until they are first updated), so a call
counts as initialised after its first update, or when every site and the
trampoline are found holding the key's function already.

Call-depth tracking (*call_depth*: the boot ran
``callthunks_patch_builtin_calls`` for ``X86_FEATURE_CALL_DEPTH``): a CALL
site is aimed not at the function but at its accounting thunk
(``callthunks_translate_call_dest``) -- the image's
``skl_call_thunk_template`` relocated into the padding just before the
function, written there (``text_poke_copy_locked``: nothing runs those
bytes yet) when the padding still holds one-byte NOPs; a function in the
skip list (``SKIP_DESTS``), outside core text, or whose padding holds
something else is called directly.  Tail sites and the trampoline jump to
the function itself, as in the kernel.

The trampoline is a tail site.  Before anything is written the
trampoline's signature is checked and every site validated (a CALL site
must hold CALL, NOP5 or the 5-byte xor; a tail site JMP, RET or Jcc.d32);
a failure raises :class:`StaticCallError` with the bytes found and the
bytes that would have been written, and nothing is written (the kernel
BUG()s).  A site already holding the new bytes is not touched.

Rules learnt from ``kernel/static_call_inline.c`` and
``arch/x86/kernel/static_call.c`` (Linux 6.12); the code is our own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .._core._insn import (CALL_INSN_OPCODE, INT3_INSN_OPCODE, JMP32_INSN_OPCODE, RET_INSN_OPCODE,
                           text_gen_insn, x86_nops)
from .._errors import BadInstructionError, TextPokeError
from .._alternative._callthunks import CallThunks
from .._alternative._livetext import LiveText
from .._alternative._shadow import Symbols
from .._alternative._thunks import return_thunk_at
from ..images._symbols import SymbolMap
from ..images._tables import StaticCallSite, read_tables

__all__ = ["StaticCalls", "StaticCall", "StaticCallError", "UnknownCallError",
           "TRAMP_UD", "XOR5RAX", "RETINSN"]

TRAMP_UD = b"\x0f\xb9\xcc"
XOR5RAX = b"\x2e\x2e\x2e\x31\xc0"
RETINSN = bytes([RET_INSN_OPCODE]) + bytes([INT3_INSN_OPCODE]) * 4
_NOP5 = x86_nops[5]
CALL, NOP, JMP, RET, JCC = range(5)
_KIND = {CALL: "call", NOP: "nop", JMP: "jmp", RET: "ret", JCC: "jcc"}


class StaticCallError(BadInstructionError):
    """A trampoline without its signature, or a site whose bytes are none
    of the static-call forms.  Nothing was written."""

    def __init__(self, msg: str, *, addr: int = 0, site: str = "", found: bytes = b"",
                 new: bytes = b"") -> None:
        super().__init__(msg)
        self.addr, self.site, self.found, self.new = addr, site, found, new


class UnknownCallError(TextPokeError, LookupError):
    """No static call (or function) of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _is_jcc(b: bytes) -> int:
    return b[1] if b[0] == 0x0F and b[1] & 0xF0 == 0x80 else 0


@dataclass(frozen=True, slots=True)
class _Site:
    site: StaticCallSite
    owner: str


@dataclass(slots=True, eq=False)
class StaticCall:
    name: str
    key: int
    tramp: int
    func: int
    sites: list[_Site] = field(default_factory=list)
    synced: bool = False            # the sites follow the key (static_call_init done)

    def as_dict(self, describe=None) -> dict:
        f = describe(self.func) if (describe and self.func) else (hex(self.func) if self.func else None)
        return {"name": self.name, "key": self.key, "tramp": self.tramp, "func": f,
                "sites": len(self.sites), "tail_sites": sum(s.site.tail for s in self.sites),
                "modules": sorted({s.owner for s in self.sites if s.owner})}


class StaticCalls:
    """The static calls of one kernel image on one :class:`TextPoke`.

    *sites* is the image's ``.static_call_sites``; *symbols* names the
    keys (``__SCK__x``), trampolines (``__SCT__x``) and functions.
    *rethunk*: the boot's ``x86_return_thunk`` when the CPU has
    X86_FEATURE_RETHUNK -- True for ``__x86_return_thunk``, a symbol
    name or an address for another (``its_return_thunk``,
    ``srso_return_thunk``...); False when the CPU wants plain returns."""

    def __init__(self, core, sites: Iterable[StaticCallSite], symbols: Mapping[str, int],
                 sizes: Mapping[str, int] | None = None, *,
                 rethunk: "bool | str | int" = False, call_depth: bool = False,
                 line=None) -> None:
        self.core = core
        #: the kernel's thunks_initialized: CALL sites go to accounting thunks
        self.thunks_initialized = bool(call_depth) and all(
            n in symbols for n in ("skl_call_thunk_template", "skl_call_thunk_tail"))
        self._line = line
        self._thunks: CallThunks | None = None
        #: thunks this object wrote into function padding (address -> function)
        self.thunks_made: dict[int, int] = {}
        self.machine = core.machine
        self.symbols = dict(symbols)
        self.symmap = SymbolMap(symbols, sizes)
        self._sizes = dict(sizes or {})
        self.rethunk = bool(rethunk)
        #: the address of the boot's x86_return_thunk (None: no rethunk)
        self.return_thunk: int | None = None
        if rethunk is True:
            rethunk = "__x86_return_thunk"
        if isinstance(rethunk, str):
            a = self.symbols.get(rethunk)
            if a is None:
                raise UnknownCallError(f"no return thunk {rethunk!r} in this image")
            self.return_thunk = a
        elif rethunk:
            self.return_thunk = int(rethunk)
        self.calls: dict[str, StaticCall] = {}
        self._by_key: dict[int, StaticCall] = {}
        #: static calls a module defines (key in its data), by module
        self._module_calls: dict[str, list[StaticCall]] = {}
        self.updates = 0
        self.pokes = 0
        for name, tramp in symbols.items():
            if not name.startswith("__SCT__"):
                continue
            call = name[len("__SCT__"):]
            key = symbols.get("__SCK__" + call)
            if key is None:
                continue
            c = StaticCall(call, key, tramp, self._read_func(key))
            self.calls[call] = c
            self._by_key[key] = c
        for s in sites:
            c = self._by_key.get(s.key)
            if c is None:
                raise UnknownCallError(f"static-call site at {self.describe(s.addr)} uses a key at "
                                       f"{s.key:#x} that has no trampoline")
            c.sites.append(_Site(s, ""))

    @classmethod
    def from_image(cls, core, image, tables=None, **kw) -> "StaticCalls":
        if tables is None:
            tables = read_tables(image)
        return cls(core, tables.static_call_sites, image.symbols, image.sizes, **kw)

    def _read_func(self, key: int) -> int:
        try:
            return struct.unpack("<Q", self.machine.mem.read(key, 8))[0]
        except Exception:
            return 0

    def describe(self, addr: int) -> str:
        return self.symmap.describe(addr)

    def call(self, name: "str | StaticCall") -> StaticCall:
        if isinstance(name, StaticCall):
            return name
        c = self.calls.get(name.removeprefix("__SCT__").removeprefix("__SCK__"))
        if c is None:
            raise UnknownCallError(f"unknown static call {name!r} (known: "
                                   f"{', '.join(sorted(self.calls))})")
        return c

    def resolve(self, func: "str | int | None") -> int:
        """A function by name or address; None, 0, "NULL" mean NULL."""
        if func is None or func == 0 or func in ("NULL", "null", "none"):
            return 0
        if isinstance(func, int):
            return func
        if func.startswith("0x"):
            return int(func, 16)
        a = self.symbols.get(func)
        if a is None:
            raise UnknownCallError(f"unknown function {func!r}")
        return a

    def static_call_query(self, name) -> int:
        return self.call(name).func

    # ----------------------------------------------------------- call depth
    def _callthunks(self) -> CallThunks:
        """The boot's call-thunk model over the running text (built once)."""
        if self._thunks is None:
            text = LiveText(self.core, Symbols(self.symbols, self._sizes),
                            *(() if self._line is None else (self._line,)))
            self._thunks = CallThunks(text)
        return self._thunks

    def callthunks_translate_call_dest(self, dest: int, *, make: bool = True) -> int:
        """Where a CALL to *dest* goes: its accounting thunk with call-depth
        tracking, else *dest*.  With *make* false nothing is written (a
        thunk not there yet means *dest*)."""
        if not self.thunks_initialized or not dest:
            return dest
        th = self._callthunks()
        if th.skip_addr(dest) or not th.in_core(dest):
            return dest
        want_size = th.size
        pad = dest - want_size
        want = th.code_at(pad)
        cur = self.machine.text_read(pad, want_size)
        if cur == want:
            return pad
        if cur != b"\x90" * want_size or not make:
            return dest                  # "Invalid padding area": call the function
        with self.core.text_mutex:
            self.core.text_poke_copy_locked(pad, want, core_ok=True)
        self.thunks_made[pad] = dest
        return pad

    # ----------------------------------------------------------- transform
    def _return_thunk(self) -> int | None:
        """``cpu_wants_rethunk``: the thunk, or None."""
        return self.return_thunk

    def _return_thunk_at(self, addr: int) -> int | None:
        """``cpu_wants_rethunk_at`` for a return written at *addr*."""
        return return_thunk_at(self.return_thunk, self.symbols.get("its_return_thunk"), addr)

    def transform(self, addr: int, type_: int, func: int, cur: bytes, *, make: bool = True
                  ) -> tuple[bytes, bytes | None]:
        """``__static_call_transform``: (code, emulate) for the site at *addr*
        whose current bytes are *cur* (*make*: a call-depth thunk may be
        written into the function's padding)."""
        emulate = None
        op = _is_jcc(cur) if type_ in (JMP, RET) else 0
        if op:
            dest = func
            if not func:
                dest = self._return_thunk() or self.symbols["__static_call_return"]
            return bytes([0x0F, op]) + struct.pack("<i", dest - (addr + 6)), None
        if type_ == CALL:
            func = self.callthunks_translate_call_dest(func, make=make)
            code = text_gen_insn(CALL_INSN_OPCODE, addr, func)
            if func and func == self.symbols.get("__static_call_return0"):
                emulate, code = code, XOR5RAX
            return code, emulate
        if type_ == NOP:
            return _NOP5, None
        if type_ == JMP:
            return text_gen_insn(JMP32_INSN_OPCODE, addr, func), None
        thunk = self._return_thunk_at(addr)
        if thunk:
            return text_gen_insn(JMP32_INSN_OPCODE, addr, thunk), None
        return RETINSN, None

    @staticmethod
    def _sc_insn(null: bool, tail: bool) -> int:
        return 2 * tail + null

    def _validate(self, addr: int, tail: bool, tramp: bool, new_hint: bytes) -> bytes:
        cur = self.machine.text_read(addr, 8 if tramp else 6)
        if tramp and cur[5:8] != TRAMP_UD:
            raise StaticCallError(
                f"static_call: trampoline signature fail at {self.describe(addr)} [{addr:#x}]: "
                f"found {cur[5:8].hex(' ')} after the jump, expected {TRAMP_UD.hex(' ')}; "
                "nothing written", addr=addr, site=self.describe(addr), found=cur[5:8], new=TRAMP_UD)
        if tail:
            ok = cur[0] in (JMP32_INSN_OPCODE, RET_INSN_OPCODE) or _is_jcc(cur)
        else:
            ok = cur[0] == CALL_INSN_OPCODE or cur[:5] in (_NOP5, XOR5RAX)
        if not ok:
            n = 6 if _is_jcc(cur) else 5
            raise StaticCallError(
                f"static_call: unexpected insn at {self.describe(addr)} [{addr:#x}]: found "
                f"{cur[:n].hex(' ')}, would write {new_hint.hex(' ')} ("
                f"{'tail' if tail else 'call'} site); nothing written",
                addr=addr, site=self.describe(addr), found=cur[:n], new=new_hint)
        return cur

    def _plan(self, c: StaticCall, func: int) -> list[tuple[int, bytes, bytes | None]]:
        # every site validated before anything (a call-depth thunk too) is written
        todo = []
        hint, _ = self.transform(c.tramp, self._sc_insn(not func, True), func, b"\xe9\0",
                                 make=False)
        todo.append((c.tramp, self._sc_insn(not func, True),
                     self._validate(c.tramp, True, True, hint)))
        for s in c.sites:
            addr, tail = s.site.addr, s.site.tail
            t = self._sc_insn(not func, tail)
            hint, _ = self.transform(addr, t, func, b"\x90\x90", make=False)
            todo.append((addr, t, self._validate(addr, tail, False, hint)))
        return [(addr, *self.transform(addr, t, func, cur)) for addr, t, cur in todo]

    def static_call_update(self, name, func: "str | int | None") -> int:
        """Point *name* at *func* (NULL: None); return the pokes made."""
        c = self.call(name)
        f = self.resolve(func)
        if f == c.func and (c.synced or self._in_sync(c)):
            c.synced = True
            return 0        # the kernel returns before touching anything
        with self.core.text_mutex:      # a call-depth thunk may be written while planning
            plan = self._plan(c, f)
        old = c.func
        c.func = f
        try:
            self.machine.mem.write(c.key, struct.pack("<Q", f))
        except Exception:
            pass
        n = 0
        try:
            with self.core.text_mutex:
                for addr, code, emulate in plan:
                    if self.machine.text_read(addr, len(code)) == code:
                        continue
                    self.core.smp_text_poke_single(addr, code, emulate=emulate)
                    n += 1
        except BaseException:
            c.func = old if n == 0 else c.func
            raise
        c.synced = True
        self.updates += 1
        self.pokes += n
        return n

    def _in_sync(self, c: StaticCall) -> bool:
        """Every site and the trampoline already hold what the key's
        function asks for (read only, nothing validated)."""
        for addr, tail in [(c.tramp, True)] + [(s.site.addr, s.site.tail) for s in c.sites]:
            cur = self.machine.text_read(addr, 6)
            code, _ = self.transform(addr, self._sc_insn(not c.func, tail), c.func, cur,
                                     make=False)
            if cur[:len(code)] != code:
                return False
        return True

    # ----------------------------------------------------------- modules
    def module_code(self, s: StaticCallSite, text: bytes | bytearray, base: int,
                    call: StaticCall | None = None) -> bytes:
        """For the module loader: what a module site must hold for its
        call's current function (*text* is the module text, at *base*;
        *call*: a static call the module defines itself)."""
        c = call or self._by_key.get(s.key)
        if c is None:
            raise UnknownCallError(f"module static-call site at {s.addr:#x} uses an unknown key "
                                   f"{s.key:#x}")
        off = s.addr - base
        cur = bytes(text[off:off + 6])
        t = self._sc_insn(not c.func, s.tail)
        code, _ = self.transform(s.addr, t, c.func, cur)
        ok = (cur[0] in (JMP32_INSN_OPCODE, RET_INSN_OPCODE) or _is_jcc(cur)) if s.tail else \
            (cur[0] == CALL_INSN_OPCODE or cur[:5] in (_NOP5, XOR5RAX))
        if not ok:
            raise StaticCallError(f"static_call: unexpected insn in module at {s.addr:#x}: found "
                                  f"{cur[:5].hex(' ')}, would write {code.hex(' ')}",
                                  addr=s.addr, found=cur[:5], new=code)
        return code

    def call_of_key(self, key: int) -> StaticCall:
        c = self._by_key.get(key)
        if c is None:
            raise UnknownCallError(f"no static call has its key at {key:#x}")
        return c

    def add_module_sites(self, owner: str, sites: Iterable[StaticCallSite],
                         symbols: Mapping[str, int] | None = None,
                         sizes: Mapping[str, int] | None = None,
                         own_calls: Iterable[StaticCall] = ()) -> None:
        """Register a module's sites; *own_calls* are static calls whose key
        is in the module (made here, dropped with the module)."""
        sites = list(sites)
        own = {c.key: c for c in own_calls}
        for s in sites:
            if s.key not in own:
                self.call_of_key(s.key)
        if symbols:
            self.symmap.add(owner, symbols, sizes or {})
        for c in own.values():
            self.calls[c.name] = self._by_key[c.key] = c
            self._module_calls.setdefault(owner, []).append(c)
        for s in sites:
            self._by_key[s.key].sites.append(_Site(s, owner))

    def remove_module_sites(self, owner: str) -> int:
        for c in self._module_calls.pop(owner, []):
            self.calls.pop(c.name, None)
            self._by_key.pop(c.key, None)
        n = 0
        for c in self.calls.values():
            before = len(c.sites)
            c.sites = [s for s in c.sites if s.owner != owner]
            n += before - len(c.sites)
        self.symmap.remove(owner)
        return n

    def as_list(self) -> list[dict]:
        return [c.as_dict(self.describe) for c in sorted(self.calls.values(), key=lambda c: c.name)]
