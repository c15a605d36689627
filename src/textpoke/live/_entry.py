# SPDX-License-Identifier: GPL-2.0-only
"""Ordinary function entries of a running process: any function of any
x86-64 ELF, not only those the compiler gave an fentry NOP.

For each function symbol (``.symtab`` or, in a stripped binary such as
Debian's ``/usr/bin/python3`` or ``libc.so.6``, ``.dynsym``), the entry is
planned by :mod:`textpoke._relocate` from the file's bytes: the whole
instructions covering a 5-byte JMP (after an ENDBR64) are moved to a
trampoline, or the function is refused with a reason code.  The bytes the
JMP would replace are then read from the live process and must still be the
file's: an INT3 there is someone's breakpoint (or a dead patcher's), a JMP
is a patch already in place (a ``live count`` killed with SIGKILL: see
``live sites --check`` and ``live recover``).

Switching an entry (``live count``): the site becomes ``jmp stub``, the
stub counts and runs the trampoline (the moved instructions, then a JMP
back).  The write is the core's INT3 batch, with one addition the moved
instructions need (see :func:`quiescent_tails`): between the INT3 phase and
the tail phase, every thread is stopped, any thread whose RIP is strictly
inside the replaced bytes is single-stepped out (the INT3 keeps new ones
from entering), and no thread's stack may hold an address strictly inside
them (a signal frame of a thread interrupted there; no CALL is ever moved,
so no return address can be) -- the kernel's optprobes wait for the same
quiescence with ``synchronize_rcu_tasks``.  A thread found with such a
stack word is waited for (the handler returns) a few times, then the batch
is refused and rolled back.  Switching back needs no such wait: the JMP is
one instruction, and while the INT3 stands a thread that reaches it is sent
to the trampoline (the old JMP, emulated).  The trampolines are freed with
the stubs, once no thread's RIP or stack points into them.
"""

from __future__ import annotations

import bisect
import struct
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from .._errors import BadAddressError
from .._relocate import JMP_SIZE, REASONS, EntryPlan, RelocError, plan_entry
from ._symbols import Module, Symbol, Symbols

__all__ = ["EntrySite", "EntryState", "Refusal", "entry_sites", "ENTRY_REASONS", "quiescent_tails",
           "toggle_sites", "toggle_slot_code", "read_toggle_header", "threads_in_region",
           "reason_counts", "refused_by_reason", "reasons_text"]

#: the relocator's reasons, and what the live text adds
ENTRY_REASONS = dict(REASONS, **{
    "not-file": "its bytes are not file-backed code of the module",
    "int3": "an INT3 where the JMP goes (a breakpoint, or a patcher killed mid-batch)",
    "patched": "the text differs from the file (already patched: a JMP or CALL of a "
               "killed 'live count'? see 'live sites --check')",
    "fentry": "it has an fentry site (patched there instead)",
    "ifunc": "an IFUNC symbol: its address is the resolver, run once when the program "
             "loads; the calls go to the implementation it picked, which has its own name",
})


@dataclass(slots=True)
class EntrySite:
    """A function entry that can take a JMP (see the module doc)."""

    addr: int              # where the JMP goes (after ENDBR64)
    function: str
    func_addr: int
    module: str
    found: bytes           # the 5 bytes the JMP replaces, as read live
    plan: EntryPlan
    source: str = "entry"
    kind: str = "entry"

    @property
    def patchable(self) -> bool:
        return True

    @property
    def stray_int3(self) -> bool:
        return False

    def as_dict(self) -> dict:
        return {"addr": f"{self.addr:#x}", "function": self.function, "module": self.module,
                "source": self.source, "bytes": self.found.hex(" "), "kind": self.kind,
                "moved": self.plan.length, "endbr": self.plan.endbr}


@dataclass(slots=True)
class Refusal:
    """A function whose entry cannot be moved, and why."""

    function: str
    addr: int
    module: str
    reason: str            # a key of ENTRY_REASONS
    why: str               # the sentence (addresses, instruction)

    def as_dict(self) -> dict:
        return {"function": self.function, "addr": f"{self.addr:#x}", "module": self.module,
                "reason": self.reason, "why": self.why}


def _functions(syms: Symbols, pattern: str | None) -> list[Symbol]:
    if pattern:
        return syms.functions(pattern)
    out: dict[int, Symbol] = {}
    for mod in syms.modules():
        for s in mod.functions_sorted():
            out.setdefault(s.addr, s)
    return [out[a] for a in sorted(out)]


def entry_sites(syms: Symbols, pattern: str | None = None, *,
                skip: Iterable[int] = (),
                read: Callable[[int, int], bytes] | None = None,
                functions: Sequence[Symbol] | None = None
                ) -> tuple[list[EntrySite], list[Refusal]]:
    """The entries of the functions matching *pattern* (a glob, ``lib:glob``;
    None: every function) that can take a JMP, and the refusals.  *skip*:
    function addresses handled otherwise (fentry sites).  *read* reads live
    memory (default: /proc/PID/mem)."""
    funcs = list(functions) if functions is not None else _functions(syms, pattern)
    name_of = _namer(pattern)
    skip = set(skip)
    own = read is None
    fd = -1
    if own:
        fd = os.open(f"/proc/{syms.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        read = lambda a, n: os.pread(fd, n, a)  # noqa: E731
    sites: list[EntrySite] = []
    refused: list[Refusal] = []
    starts: dict[int, list[int]] = {}
    try:
        for s in funcs:
            mod: Module = s.module
            if s.addr in skip:
                refused.append(Refusal(s.name, s.addr, mod.short, "fentry",
                                       ENTRY_REASONS["fentry"]))
                continue
            got = _planned(s, starts, read, refused)
            if got is None:
                continue
            plan, live = got
            if live != plan.orig:
                refused.append(_differs(s, plan, live))
                continue
            sites.append(EntrySite(plan.addr, name_of(s), s.addr, mod.short, live[:JMP_SIZE],
                                   plan))
        return sites, refused
    finally:
        if fd >= 0:
            os.close(fd)


def _namer(pattern: str | None) -> Callable[[Symbol], str]:
    """The name to show for a function with aliases (libc's malloc is also
    __libc_malloc and __malloc): of those matching *pattern*, the public one
    (no leading underscore), then the shortest."""
    import fnmatch
    import re
    glob = pattern.split(":", 1)[1] if pattern and ":" in pattern else pattern
    rx = re.compile(fnmatch.translate(glob)) if glob else None

    def name_of(s: Symbol) -> str:
        names = [n for n in s.module.names_at(s.addr) if rx is None or rx.match(n)]
        return min(names, key=lambda n: (n.startswith("_"), len(n), n)) if names else s.name
    return name_of


def _planned(s: Symbol, starts: dict, read: Callable[[int, int], bytes],
             refused: list[Refusal]) -> tuple[EntryPlan, bytes] | None:
    """The entry plan of function *s* and the bytes its planned range holds
    in the live process; None, with the refusal appended to *refused*, for
    an IFUNC, an entry the relocator refuses or bytes that cannot be read."""
    mod: Module = s.module
    if getattr(s, "ifunc", False):
        refused.append(Refusal(s.name, s.addr, mod.short, "ifunc", ENTRY_REASONS["ifunc"]))
        return None
    try:
        plan = _plan(s, mod, starts, read)
    except RelocError as e:
        refused.append(Refusal(s.name, s.addr, mod.short, e.reason, str(e)))
        return None
    try:
        live = read(plan.addr, plan.length)
    except OSError as e:
        refused.append(Refusal(s.name, s.addr, mod.short, "not-file",
                               f"cannot read {plan.addr:#x}: {e.strerror}"))
        return None
    return plan, live


def _differs(s: Symbol, plan: EntryPlan, live: bytes) -> Refusal:
    """The refusal of an entry whose live bytes are not the file's (and
    not a state of ours): an INT3 at the site, or some other patch."""
    reason = "int3" if live[:1] == b"\xcc" else "patched"
    return Refusal(s.name, s.addr, s.module.short, reason,
                   f"{ENTRY_REASONS[reason]}: reads {live.hex(' ')}, the "
                   f"file has {plan.orig.hex(' ')}")


def _plan(s: Symbol, mod: Module, starts: dict[int, list[int]],
          read: Callable[[int, int], bytes]) -> EntryPlan:
    if not s.size:
        raise RelocError("no-size", REASONS["no-size"])
    try:
        code = mod.file_bytes_at(s.addr, s.size)
    except BadAddressError as e:
        raise RelocError("not-file", str(e)) from None
    st = starts.get(id(mod))
    if st is None:
        st = starts[id(mod)] = [f.addr for f in mod.functions_sorted()]
    i = bisect.bisect_right(st, s.addr)
    others = st[i:i + 8]
    extra = []
    for suffix in (".cold",):       # GCC's split-off unlikely part may branch back
        c = mod.lookup(s.name + suffix)
        if c is not None and c.size and c.addr != s.addr:
            with contextlib.suppress(BadAddressError):
                extra.append((mod.file_bytes_at(c.addr, c.size), c.addr, c.name))
    # jump tables are read from the live process (relocated, as the code sees them)
    return plan_entry(code, s.addr, others=[o for o in others if o < s.addr + 24],
                      extra=extra, read=read, starts=_start_set(mod, st, starts),
                      code_read=lambda a, n: _file_code(mod, a, n))


def _file_code(mod: Module, addr: int, n: int) -> bytes:
    """The module file's bytes at *addr* (the code as built: what control
    flow is read from), shortened at the end of its segment."""
    for size in (n, 64, 16):
        try:
            return mod.file_bytes_at(addr, size)
        except BadAddressError:
            continue
    raise ValueError(f"{addr:#x} is not in {mod.short}'s file")


def _start_set(mod: Module, st: list[int], cache: dict) -> set[int]:
    key = ("set", id(mod))
    v = cache.get(key)
    if v is None:
        v = cache[key] = set(st)
    return v


def refused_by_reason(refused: Iterable[Refusal]) -> dict[str, int]:
    """{reason: functions}, the most common reason first."""
    d: dict[str, int] = {}
    for r in refused:
        d[r.reason] = d.get(r.reason, 0) + 1
    return dict(sorted(d.items(), key=lambda kv: -kv[1]))


def reasons_text(refused: Iterable[Refusal]) -> str:
    """``reason n, reason n``, the most common first (for a refusal line)."""
    return ", ".join(f"{k} {n}" for k, n in refused_by_reason(refused).items())


def reason_counts(refused: Iterable[Refusal]) -> dict[str, dict[str, int]]:
    """{module: {reason: functions}}."""
    out: dict[str, dict[str, int]] = {}
    for r in refused:
        d = out.setdefault(r.module, {})
        d[r.reason] = d.get(r.reason, 0) + 1
    return out


# --- the write: quiescence between the INT3 and the tail ----------------------
@contextlib.contextmanager
def quiescent_tails(m, sites: Sequence[EntrySite]) -> Iterator[None]:
    """While active, a tail write of the core's batch at one of *sites*
    (the JMP's bytes after its first, replacing moved instructions) waits
    first, through the machine's ``quiesce`` (``Capability.QUIESCE``), until
    no thread has its RIP strictly inside the replaced bytes and none has a
    stack word pointing inside them (a signal frame; no CALL is moved, so no
    return address can).  The INT3s stand by then (the batch's first phase,
    synced): no thread can enter after the look, so the tails may be
    written once it passes.  A thread that stays (``QuiesceTimeout``) makes
    the batch fail, and the core rolls it back.  Writes that put the
    original bytes back need none of this and go through unchanged."""
    orig_tail = {s.addr + 1: s.plan.orig[1:JMP_SIZE] for s in sites}
    moved = {s.addr + 1: (s.addr + 1, s.addr + s.plan.length) for s in sites}
    plain = m.text_poke_write_many

    def write_many(writes):
        ranges = [moved[a] for a, d in writes
                  if a in orig_tail and bytes(d) != orig_tail[a][:len(d)]]
        if ranges:
            yield from m.quiesce(ranges, "the instructions moved out of function entries")
        yield from plain(writes)

    m.text_poke_write_many = write_many
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del m.text_poke_write_many


# --- live toggle on ordinary entries ------------------------------------------
# ``live toggle`` leaves its change in place when it exits, so an entry
# switched to ``call:FUNC`` keeps a trampoline that outlives the command:
# ``call FUNC``, the moved instructions, ``jmp`` back.  Nothing on disk
# says where it is -- the process itself does: the trampolines of one
# command and module share a region whose data page starts with a header
# (:data:`TOGGLE_MAGIC`, the region's base and code size, then one
# (site, FUNC) pair per slot).  A later toggle follows the site's JMP to its
# slot, checks the header and the slot's code (regenerated from the entry's
# plan: it must be byte for byte what we would write), and frees the region
# once no slot of it is jumped to any more and no thread is in it or has a
# return address into it (the CALL in a slot pushes one: FUNC may be
# running or asleep) -- the whole stack of every thread is read, from its
# RSP to the top of its mapping, not only the top that a count stub needs.
TOGGLE_MAGIC = b"textpoke-toggle1"
TOGGLE_SLOT = 64
_HEAD = struct.Struct("<16sQQQQ")         # magic, base, code size, data size, slots
_PAIR = struct.Struct("<QQ")              # site, FUNC


@dataclass(slots=True)
class EntryState:
    """What an entry holds now: its original bytes (``orig``), a JMP to a
    function (``jmp``, *to*), or a JMP to a toggle trampoline calling *to*
    (``call``; *slot* its address, *region* the region's base)."""

    kind: str
    to: int = 0
    slot: int = 0
    region: int = 0


def toggle_sites(syms: Symbols, functions: Sequence[Symbol], pattern: str | None
                 ) -> tuple[list[EntrySite], list[EntryState], list[Refusal]]:
    """The entries of *functions* for ``live toggle``: as :func:`entry_sites`,
    but an entry switched by an earlier toggle (a JMP at the site, the rest
    of the moved bytes as the file has them) is a site too, with its state;
    a JMP of anyone else (into memory that is not a function's code or a
    toggle trampoline of ours) is refused."""
    fd = os.open(f"/proc/{syms.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    read = lambda a, n: os.pread(fd, n, a)  # noqa: E731
    try:
        maps = None
        sites: list[EntrySite] = []
        states: list[EntryState] = []
        refused: list[Refusal] = []
        name_of = _namer(pattern)
        starts: dict = {}
        for s in functions:
            got = _planned(s, starts, read, refused)
            if got is None:
                continue
            plan, live = got
            state = None
            if live == plan.orig:
                state = EntryState("orig")
            elif live[:1] == b"\xe9" and live[JMP_SIZE:] == plan.orig[JMP_SIZE:]:
                if maps is None:
                    from ._process import read_maps
                    maps = read_maps(syms.pid)
                to = (plan.addr + JMP_SIZE + struct.unpack_from("<i", live, 1)[0]) & (2**64 - 1)
                state = _jmp_state(syms, maps, read, plan, to)
            if state is None:
                refused.append(_differs(s, plan, live))
                continue
            sites.append(EntrySite(plan.addr, name_of(s), s.addr, s.module.short,
                                   live[:JMP_SIZE], plan))
            states.append(state)
        return sites, states, refused
    finally:
        os.close(fd)


def _jmp_state(syms: Symbols, maps, read, plan: EntryPlan, to: int) -> EntryState | None:
    """The state of an entry that JMPs to *to*: a function's code (a toggle
    ``jmp:FUNC``), a slot of a toggle region whose header names this site
    and whose code is what we write, or None (someone else's JMP)."""
    m = next((m for m in maps if m.start <= to < m.end), None)
    if m is None or not m.executable:
        return None
    if m.path and not m.path.startswith("["):
        return EntryState("jmp", to)                 # into a module's code
    r = read_toggle_header(read, m.end)
    if r is None:
        return None
    i, off = divmod(to - r.base, TOGGLE_SLOT)
    if not (0 <= to - r.base < r.code_size) or off or i >= len(r.pairs) or r.pairs[i][0] != plan.addr:
        return None
    func = r.pairs[i][1]
    try:
        want = toggle_slot_code(plan, to, func)
        if read(to, len(want)) != want:
            return None
    except (RelocError, OSError):
        return None
    return EntryState("call", func, to, r.base)


@dataclass(slots=True)
class ToggleRegion:
    """A region of toggle trampolines, as its header says."""

    base: int
    code_size: int
    data_size: int
    pairs: list[tuple[int, int]]          # (site, FUNC) per slot

    @property
    def data(self) -> int:
        return self.base + self.code_size

    def slot(self, i: int) -> int:
        return self.base + i * TOGGLE_SLOT


def read_toggle_header(read, data: int) -> ToggleRegion | None:
    """The toggle region whose data starts at *data*, or None if no header
    of ours is there."""
    try:
        magic, base, code_size, data_size, n = _HEAD.unpack(read(data, _HEAD.size))
        if (magic != TOGGLE_MAGIC or base + code_size != data or n > code_size // TOGGLE_SLOT
                or toggle_data_size(n) > data_size):
            return None
        raw = read(data + _HEAD.size, n * _PAIR.size)
    except (OSError, struct.error):
        return None
    return ToggleRegion(base, code_size, data_size,
                        [_PAIR.unpack_from(raw, i * _PAIR.size) for i in range(n)])


def toggle_header(r: ToggleRegion) -> bytes:
    return _HEAD.pack(TOGGLE_MAGIC, r.base, r.code_size, r.data_size, len(r.pairs)) + b"".join(
        _PAIR.pack(a, f) for a, f in r.pairs)


def toggle_data_size(n: int) -> int:
    return _HEAD.size + n * _PAIR.size


def toggle_slot_code(plan: EntryPlan, slot: int, func: int) -> bytes:
    """``call *FUNC(%rip)`` (through a pointer after the code: FUNC may be
    in any module, beyond rel32 reach of the slot), the moved instructions,
    ``jmp`` back, the pointer; RelocError if the moved instructions cannot
    reach from *slot* or do not fit."""
    from .._relocate import trampoline
    n = len(trampoline(plan, slot, head=b"\xff\x15\0\0\0\0"))
    ptr = -(-n // 8) * 8
    head = b"\xff\x15" + struct.pack("<i", ptr - 6)
    body = trampoline(plan, slot, head=head)
    body = body.ljust(ptr, b"\xcc") + struct.pack("<Q", func)
    if len(body) > TOGGLE_SLOT:
        raise RelocError("reach", f"the trampoline of {plan.addr:#x} is {len(body)} bytes, "
                                  f"over its {TOGGLE_SLOT}-byte slot")
    return body


def threads_in_region(m, tids: Sequence[int], lo: int, hi: int) -> list[str]:
    """Why some stopped thread may still be in [lo, hi): its RIP there, or
    any word of its whole stack (RSP to the top of the stack's mapping)
    pointing there -- a return address pushed by a slot's
    CALL may lie under any depth of FUNC's frames."""
    from ._process import read_maps
    maps = read_maps(m.pid)
    why = []
    for tid in tids:
        r = m.get_regs(tid)
        if lo <= r.rip < hi:
            why.append(f"thread {tid} runs at {r.rip:#x}")
            continue
        st = next((x for x in maps if x.start <= r.rsp < x.end), None)
        if st is None:
            why.append(f"thread {tid}: no mapping holds its stack pointer {r.rsp:#x}")
            continue
        a = r.rsp & ~7          # the red zone below holds no return address
        try:
            buf = m.mem.read(a, st.end - a)
        except Exception:
            why.append(f"thread {tid}: its stack at {r.rsp:#x} cannot be read")
            continue
        for i, w in enumerate(struct.unpack_from(f"<{len(buf) // 8}Q", buf)):
            if lo <= w < hi:
                why.append(f"thread {tid}: stack word at {a + 8 * i:#x} = {w:#x} points into "
                           "it (the return address of a call from it: the callee still "
                           "running, or a stale copy)")
                break
    return why
