# SPDX-License-Identifier: GPL-2.0-only
"""Dynamic ftrace at run time: :class:`Ftrace`.

One record (``struct dyn_ftrace``) per ``__mcount_loc`` entry: the fentry
site of one function, a NOP5 when the function is not traced and
``call ftrace_caller`` when it is.  :meth:`Ftrace.ftrace_modify_all_code`
is the update, in the kernel's order:

1. when the callback changes (a tracer starts, stops or is swapped), the
   CALL at ``ftrace_call`` inside the trampoline -- and the one at
   ``ftrace_regs_call`` when the image has ``ftrace_regs_caller`` -- is
   first pointed at ``ftrace_ops_list_func``, the function that checks
   every ops' filter itself, so no site calls a callback meant for other
   functions while the sites change (``update_ftrace_func``, one
   ``smp_text_poke_single`` per CALL);
2. the records whose state changes -- only those: a record with nothing
   to change is neither read nor checked -- are compared with what their
   state says the site holds (NOP5, or the CALL to the trampoline); one
   mismatch refuses the update with :class:`FtraceBugError`
   (``ftrace_bug``: the site as ``symbol+0xoff``, the bytes found and
   expected) and nothing is written, as x86's ``ftrace_replace_code``
   verifies every record before it queues any.  ``ftrace_bug`` then kills
   ftrace (``ftrace_kill``): every later update is refused with
   :class:`FtraceDisabledError`, as the kernel's ``ftrace_disabled``;
3. the changing records are queued with ``smp_text_poke_batch_add`` and
   the batch is finished (one batch per 256 sites, at most three sync
   broadcasts each);
4. when the callback changed and its final function is not the list
   function, every CPU is synced (``ftrace_sync_ipi``) and then the CALLs
   are pointed at the final function (``ftrace_stub`` when tracing stops).

Dynamic trampolines (``FTRACE_FL_TRAMP``).  Each tracer is an ftrace_ops:
``function`` (the kernel's ``global_ops``) and ``profile``
(``ftrace_profile_ops``); ``function+profile`` is both registered.  When an
ops is registered it gets a trampoline of its own in execmem
(``arch_ftrace_update_trampoline``, made in :mod:`._tramp`: a copy of
``ftrace_caller`` calling that ops' function straight).  A record traced
by exactly one ops that has a trampoline calls that trampoline, not
``ftrace_caller``; with a second ops on it the record goes back to
``ftrace_caller`` (and its list function) -- a record whose call target
changes is verified against its old CALL and rewritten
(``FTRACE_UPDATE_MODIFY_CALL``).  The two ops are static in the kernel, so
their trampolines are made once and kept; registering the ops again only
re-aims the CALL inside it when it differs (``text_poke_bp``).  Without
execmem (a machine without ``EXECMEM``) no trampoline can be made and the
sites call ``ftrace_caller``, as when the kernel's allocation fails.

Other ops (:meth:`Ftrace.register_ftrace_ops`: kprobes on the fentry NOP,
``kprobe_ftrace_ops`` and ``kprobe_ipmodify_ops``) trace their own set of
addresses (``ftrace_set_filter_ip``) and may want every register
(``FTRACE_OPS_FL_SAVE_REGS``): a record one of those is on calls
``ftrace_regs_caller`` (``FTRACE_FL_REGS``) unless that ops alone is on it
and has its trampoline -- made from ``ftrace_regs_caller`` .. ``_end``,
its ``jnz`` at ``ftrace_regs_caller_jmp`` turned into a two-byte NOP.
With two or more ops registered ``ftrace_call``/``ftrace_regs_call`` go to
the list function; the guest's ``ftrace_list_ops`` tells it which ops are
registered (written only when that changes: it needs the ``DATA``
capability).

Which functions are traced follows ``set_ftrace_filter`` and
``set_ftrace_notrace``: globs (``*``, ``?``, ``[...]``) matched against the
function's symbol; an empty filter means every function; notrace wins.

The check and the writes happen under ``text_mutex``, so no other patcher
can change a site in between.  Rules learnt from ``kernel/trace/ftrace.c``
and ``arch/x86/kernel/ftrace.c`` (Linux 6.12); the code is our own.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

import struct

from .._core._insn import CALL_INSN_OPCODE, text_gen_insn, x86_nops
from .._errors import BadInstructionError, TextPokeError
from ..images._symbols import SymbolMap
from ._tramp import RET_SIZE, FtraceTrampoline, _Trampolines

__all__ = ["Ftrace", "DynFtrace", "FtraceBugError", "FtraceDisabledError", "FtraceUpdate", "FtraceOps",
           "FtraceTrampoline", "MCOUNT_INSN_SIZE", "LIST_FUNC", "FTRACE_OPS", "RET_SIZE",
           "FTRACE_CALLBACKS", "parse_globs"]

MCOUNT_INSN_SIZE = 5
_NOP5 = x86_nops[5]
#: what ftrace_call may call: the name of the tracer -> the guest function
FTRACE_CALLBACKS = {"function": "function_trace_call", "profile": "function_profile_call",
                    "function+profile": "ftrace_ops_list_func", "none": "ftrace_stub",
                    # fgraph's manager ops (graph_ops): see _graph.py
                    "function_graph": "ftrace_graph_func"}
#: the callback that is the kernel's ftrace_ops_list_func
LIST_FUNC = "function+profile"
#: the ftrace_ops registered for each callback setting
FTRACE_OPS = {"function": ("function",), "profile": ("profile",),
              "function+profile": ("function", "profile"), "none": (),
              "function_graph": ("function_graph",)}
#: each ops' object in the image (what its trampoline passes as ``op``)
FTRACE_OPS_OBJECTS = {"function": "global_ops", "profile": "ftrace_profile_ops",
                      "function_graph": "graph_ops"}
# the guest's ftrace_list_ops bits (images/kernel/ftrace.c)
_LIST_TRACE, _LIST_PROFILE, _LIST_OTHER = 1, 2, 4


class FtraceBugError(BadInstructionError):
    """A site does not hold what its record says (``ftrace_bug``); the
    whole update was refused and nothing written."""

    def __init__(self, msg: str, *, addr: int = 0, site: str = "", found: bytes = b"",
                 expected: bytes = b"") -> None:
        super().__init__(msg)
        self.addr, self.site, self.found, self.expected = addr, site, found, expected


class FtraceDisabledError(TextPokeError, RuntimeError):
    """ftrace was killed by an earlier ``ftrace_bug`` (the kernel's
    ``ftrace_disabled``): no site or callback is changed any more."""


class FtraceFilterError(TextPokeError, ValueError):
    """A filter glob that matches no traceable function (the kernel's
    write to set_ftrace_filter fails with -EINVAL)."""


@dataclass(slots=True)
class DynFtrace:
    """One fentry site."""

    ip: int
    name: str                   # the function it belongs to
    enabled: bool = False       # the site holds the CALL
    #: where that CALL goes: ftrace_caller, ftrace_regs_caller, or an
    #: ops' own trampoline (FTRACE_FL_TRAMP_EN); 0 while disabled
    addr: int = 0
    #: the ops tracing it (the kernel's reference count is their number)
    ops: tuple = ()


@dataclass(slots=True)
class FtraceOps:
    """An ops other than the tracers: its callback, the addresses it
    traces, whether it wants every register."""

    name: str
    func: int
    ips: frozenset
    save_regs: bool = True
    obj: str = ""               # its ftrace_ops object in the image (what ``op`` points at)


@dataclass(slots=True)
class FtraceUpdate:
    """What one :meth:`Ftrace.ftrace_modify_all_code` did."""

    checked: int = 0            # records verified (those whose state changes)
    enabled: int = 0
    disabled: int = 0
    modified: int = 0           # enabled records whose call target changed
    batches: int = 0            # of the sites' update (the callback's not counted)
    syncs: int = 0
    func_updates: int = 0       # ftrace_call switched (one smp_text_poke_single each)

    def as_dict(self) -> dict:
        return {"checked": self.checked, "enabled": self.enabled, "disabled": self.disabled,
                "modified": self.modified, "batches": self.batches, "syncs": self.syncs, "func_updates": self.func_updates}


def parse_globs(spec: "str | Iterable[str] | None") -> list[str]:
    """``"a* b,c"`` -> ``["a*", "b", "c"]`` (whitespace or commas)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [spec]
    out = []
    for s in spec:
        out += [g for g in s.replace(",", " ").split() if g]
    return out


def _match(name: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


@dataclass
class Ftrace(_Trampolines):
    """Dynamic ftrace over one image's fentry sites on one :class:`TextPoke`.

    *locs* are the ``__mcount_loc`` addresses; *symbols* (and *sizes*)
    name them; *trampoline* is ``ftrace_caller``, *call_site* the CALL
    inside it (``ftrace_call``), *callbacks* the guest functions it may
    call (name -> address)."""

    core: object
    locs: Iterable[int]
    symbols: dict
    trampoline: int
    call_site: int
    callbacks: dict
    sizes: dict = field(default_factory=dict)
    #: the CALL in ftrace_regs_caller (None: the image has no regs caller)
    regs_call_site: int | None = None
    #: where the ops' dynamic trampolines go (None: no trampolines)
    execmem: object = None
    #: the boot's x86_return_thunk: False (plain returns), True
    #: (__x86_return_thunk), or a symbol name or address
    rethunk: "bool | str | int" = False

    def __post_init__(self) -> None:
        self.machine = self.core.machine
        self.symmap = SymbolMap(self.symbols, self.sizes)
        funcs = sorted((a, n) for n, a in self.symbols.items() if self.sizes.get(n))
        self.records: list[DynFtrace] = []
        for ip in sorted(set(self.locs)):
            self.records.append(DynFtrace(ip, self._func_of(ip, funcs)))
        self.by_ip = {r.ip: r for r in self.records}
        self.by_name = {r.name: r for r in self.records}
        self.filter: list[str] = []
        self.notrace: list[str] = []
        self.func = "none"
        self.updates: list[FtraceUpdate] = []
        #: ftrace_kill() was called (after an ftrace_bug)
        self.disabled = False
        self.bug: FtraceBugError | None = None
        #: ops name -> its dynamic trampoline (made at its first registration)
        self.trampolines: dict[str, FtraceTrampoline] = {}
        #: why an ops has no trampoline (its allocation or template failed)
        self.tramp_errors: dict[str, str] = {}
        #: registered ops other than the tracers, by name
        self.extra_ops: dict[str, FtraceOps] = {}
        #: the ip set the tracer ops trace (what ``enable`` last gave)
        self.tracer_ips: frozenset = frozenset()
        self.regs_caller: int | None = self.symbols.get("ftrace_regs_caller")
        self._known_funcs = set(self.callbacks.values())
        #: what the guest's ftrace_list_ops holds (its initial value)
        self._list_bits = _LIST_TRACE | _LIST_PROFILE
        thunk = self.rethunk
        if thunk is True:
            thunk = "__x86_return_thunk"
        if isinstance(thunk, str):
            if thunk not in self.symbols:
                raise ValueError(f"no return thunk {thunk!r} in this image")
            thunk = self.symbols[thunk]
        self.return_thunk: int | None = int(thunk) if thunk else None

    @classmethod
    def from_image(cls, core, image, tables, *, execmem=None,
                   rethunk: "bool | str | int" = False) -> "Ftrace":
        # a build without a tracer (Debian's has no FUNCTION_PROFILER) has
        # no callback for it: that tracer is refused, the others work
        cbs = {k: image.sym(v) for k, v in FTRACE_CALLBACKS.items()
               if k in ("function", "none", LIST_FUNC) or v in image.symbols}
        return cls(core, [m.addr for m in tables.mcount_loc], dict(image.symbols),
                   image.sym("ftrace_caller"), image.sym("ftrace_call"), cbs, dict(image.sizes),
                   regs_call_site=image.symbols.get("ftrace_regs_call"), execmem=execmem,
                   rethunk=rethunk)

    def _func_of(self, ip: int, funcs: list[tuple[int, str]]) -> str:
        import bisect
        i = bisect.bisect_right(funcs, (ip, "\U0010ffff")) - 1
        # a few sized symbols may nest (labels inside a function); looking
        # further back only finds functions that ended long ago (and made
        # this quadratic on a real image, whose kallsyms repeats names)
        for j in range(i, max(i - 16, -1), -1):
            a, n = funcs[j]
            if a <= ip < a + self.sizes[n]:
                return n
        # no sized symbol covers it (a second static function of one name):
        # the nearest name below, as available_filter_functions shows it
        return self.name(ip)

    # ------------------------------------------------------------ naming
    def describe(self, addr: int) -> str:
        return self.symmap.describe(addr)

    def name(self, addr: int) -> str:
        """``%ps``: the symbol without offset."""
        return self.symmap.describe(addr).split("+", 1)[0].split(" ", 1)[0]

    # ------------------------------------------------------------ site bytes
    def call_insn(self, ip: int, addr: int | None = None) -> bytes:
        """The CALL at *ip* to *addr* (default: ``ftrace_caller``)."""
        return text_gen_insn(CALL_INSN_OPCODE, ip, self.trampoline if addr is None else addr)

    def expected(self, rec: DynFtrace) -> bytes:
        return self.call_insn(rec.ip, rec.addr or None) if rec.enabled else _NOP5

    def site_state(self, rec: DynFtrace) -> str | None:
        """"nop", "call" (to ftrace_caller or one of the trampolines), or
        None for anything else."""
        cur = self.machine.text_read(rec.ip, MCOUNT_INSN_SIZE)
        if cur == _NOP5:
            return "nop"
        targets = [self.trampoline] + [t.addr for t in self.trampolines.values()]
        if self.regs_caller is not None:
            targets.append(self.regs_caller)
        if any(cur == self.call_insn(rec.ip, a) for a in targets):
            return "call"
        return None

    # ------------------------------------------------------------ ops and call targets
    def _ops_info(self, ops: str, extra: "dict[str, FtraceOps] | None" = None
                  ) -> tuple[int, bool, str]:
        """(function, save_regs, ops object symbol) of *ops*.  The function
        is ``ftrace_ops_get_func``'s: the callbacks here handle recursion
        themselves, so the ops' own function."""
        o = (self.extra_ops if extra is None else extra).get(ops)
        if o is not None:
            return o.func, o.save_regs, o.obj
        return self.callbacks[ops], False, FTRACE_OPS_OBJECTS.get(ops, "")

    def _ops_func(self, ops: str) -> int:
        return self._ops_info(ops)[0]

    def site_target(self, func: str) -> int:
        """Where an enabled record calls when *func*'s ops (alone) trace
        it: the one ops' trampoline (``FTRACE_FL_TRAMP``), else
        ``ftrace_caller``."""
        return self._rec_target(FTRACE_OPS[func] or ("none",), self.extra_ops)

    def _rec_target(self, ops: tuple, extra: "dict[str, FtraceOps]") -> int:
        """``ftrace_get_addr_new`` for a record the ops *ops* trace."""
        if len(ops) == 1 and ops[0] in self.trampolines:
            return self.trampolines[ops[0]].addr
        if self.regs_caller is not None and any(o in extra and extra[o].save_regs
                                                for o in ops):
            return self.regs_caller
        return self.trampoline

    def _call_func(self, func: str, extra: "dict[str, FtraceOps]") -> int:
        """``update_ftrace_function``: what ftrace_call calls with the
        tracer *func* and the ops *extra* registered -- ftrace_stub for
        none, the one ops' function, else the list function."""
        ops = list(FTRACE_OPS[func]) + list(extra)
        if not ops:
            return self.callbacks["none"]
        if len(ops) == 1:
            return self._ops_info(ops[0], extra)[0]
        return self.callbacks[LIST_FUNC]

    def _list_bits_for(self, func: str, extra: "dict[str, FtraceOps]") -> int:
        """The guest's list function as it was built (both tracers) while
        only tracers are registered -- they share their records, so it runs
        only for records both trace --; with other ops, exactly the ops
        registered."""
        if not extra:
            return _LIST_TRACE | _LIST_PROFILE
        ops = FTRACE_OPS[func]
        return ((_LIST_TRACE if "function" in ops else 0) |
                (_LIST_PROFILE if "profile" in ops else 0) | (_LIST_OTHER if extra else 0))

    def _set_list_bits(self, bits: int) -> None:
        a = self.symbols.get("ftrace_list_ops")
        if a is None or bits == self._list_bits:
            return
        from .._core._machine import Capability
        self.machine.require(Capability.DATA, "ftrace's list of ops (ftrace_list_ops)")
        self.machine.mem.write(a, struct.pack("<Q", bits))
        self._list_bits = bits

    # ------------------------------------------------------------ other ops
    def register_ftrace_ops(self, name: str, func: int, ips: Iterable[int] = (), *,
                            save_regs: bool = True, obj: str = "") -> FtraceUpdate:
        """Register the ops *name* calling *func* (a guest function) on the
        records *ips* (``register_ftrace_function`` after
        ``ftrace_set_filter_ip``), and update the sites."""
        if name in self.extra_ops or name in FTRACE_OPS:
            raise ValueError(f"ftrace ops {name!r} is already registered")
        extra = dict(self.extra_ops)
        extra[name] = FtraceOps(name, int(func), self._check_ips(ips), save_regs, obj)
        return self.ftrace_modify_all_code(self.tracer_ips, None, extra=extra)

    def unregister_ftrace_ops(self, name: str) -> FtraceUpdate:
        if name not in self.extra_ops:
            raise ValueError(f"ftrace ops {name!r} is not registered")
        extra = {k: v for k, v in self.extra_ops.items() if k != name}
        return self.ftrace_modify_all_code(self.tracer_ips, None, extra=extra)

    def ftrace_set_filter_ips(self, name: str, ips: Iterable[int]) -> FtraceUpdate:
        """Change the records a registered ops traces (and the sites)."""
        if name not in self.extra_ops:
            raise ValueError(f"ftrace ops {name!r} is not registered")
        extra = dict(self.extra_ops)
        o = extra[name]
        extra[name] = FtraceOps(o.name, o.func, self._check_ips(ips), o.save_regs, o.obj)
        return self.ftrace_modify_all_code(self.tracer_ips, None, extra=extra)

    def _check_ips(self, ips: Iterable[int]) -> frozenset:
        out = frozenset(int(a) for a in ips)
        unknown = out - self.by_ip.keys()
        if unknown:
            raise FtraceFilterError(
                f"not an fentry site: {', '.join(hex(a) for a in sorted(unknown))}")
        return out

    # ------------------------------------------------------------ filters
    def set_ftrace_filter(self, globs, *, append: bool = False) -> int:
        """Set (or add to) the filter; return how many functions it selects.
        A glob matching no function is refused and nothing changes."""
        g = parse_globs(globs)
        self._check_globs(g)
        self.filter = (self.filter + g) if append else g
        return len(self.selected())

    def set_ftrace_notrace(self, globs, *, append: bool = False) -> int:
        g = parse_globs(globs)
        self._check_globs(g)
        self.notrace = (self.notrace + g) if append else g
        return len(self.selected())

    def _check_globs(self, globs: list[str]) -> None:
        for gl in globs:
            if not any(fnmatch.fnmatchcase(r.name, gl) for r in self.records):
                raise FtraceFilterError(f"ftrace filter {gl!r} matches no traceable function")

    def selected(self) -> list[DynFtrace]:
        return [r for r in self.records
                if (not self.filter or _match(r.name, self.filter))
                and not _match(r.name, self.notrace)]

    @property
    def enabled_records(self) -> list[DynFtrace]:
        return [r for r in self.records if r.enabled]

    # ------------------------------------------------------------ the callback
    @property
    def call_sites(self) -> list[int]:
        """``ftrace_call`` and, when the image has it, ``ftrace_regs_call``."""
        return [self.call_site] + ([self.regs_call_site] if self.regs_call_site else [])

    def _check_enabled(self) -> None:
        if self.disabled:
            raise FtraceDisabledError(
                "ftrace is disabled after an earlier ftrace_bug (ftrace_kill): "
                f"{self.bug}" if self.bug else "ftrace is disabled (ftrace_kill)")

    def ftrace_kill(self) -> None:
        """Stop every later update (the sites stay as they are)."""
        self.disabled = True

    def update_ftrace_func(self, func: str) -> bool:
        """Point ``ftrace_call`` (and ``ftrace_regs_call``) at the callback
        *func* (a key of :data:`FTRACE_CALLBACKS`); return whether any
        CALL changed.  Only what goes through ``ftrace_caller`` follows:
        records on an ops' own trampoline do not (switch tracers with
        :meth:`start`)."""
        self._check_enabled()
        if func not in self.callbacks:
            raise ValueError(f"unknown ftrace callback {func!r} ({', '.join(self.callbacks)})")
        with self.core.text_mutex:
            self._check_call_site()
            changed = self._set_calls(self.callbacks[func])
        self.func = func
        return changed

    def _set_calls(self, dest: int) -> bool:
        changed = False
        for site in self.call_sites:
            new = text_gen_insn(CALL_INSN_OPCODE, site, dest)
            if self.machine.text_read(site, MCOUNT_INSN_SIZE) != new:
                self.core.smp_text_poke_single(site, new)
                changed = True
        return changed

    def _check_call_site(self) -> None:
        for site in self.call_sites:
            cur = self.machine.text_read(site, MCOUNT_INSN_SIZE)
            # a known callback, or its call-depth accounting thunk in the
            # padding before it (the boot's callthunks pass re-aims
            # ftrace_call's CALL there; the kernel's updates write plain CALLs)
            dest = site + 5 + int.from_bytes(cur[1:5], "little", signed=True)
            if cur[0] != CALL_INSN_OPCODE or not any(0 <= a - dest <= 16
                                                     for a in self._known_funcs):
                raise FtraceBugError(
                    f"ftrace_bug: {self.describe(site)} holds {cur.hex(' ')}, not a call to a "
                    "known callback; nothing written",
                    addr=site, site=self.describe(site), found=cur)

    # ------------------------------------------------------------ the update
    def ftrace_modify_all_code(self, enable: Iterable[DynFtrace | int] | None,
                               func: str | None = None, *,
                               extra: "dict[str, FtraceOps] | None" = None) -> FtraceUpdate:
        """Make exactly the records in *enable* (records or addresses;
        None: none) traced by the tracer *func* (None: unchanged), the
        other ops being *extra* (None: unchanged), and every record call
        what its ops need.  The changing records are checked first (and the
        callback CALLs when the callback changes); on one mismatch nothing
        is written and ftrace is killed."""
        self._check_enabled()
        want = set()
        for r in enable or ():
            want.add(r.ip if isinstance(r, DynFtrace) else int(r))
        unknown = want - self.by_ip.keys()
        if unknown:
            raise FtraceBugError(f"not an fentry site: {', '.join(hex(a) for a in sorted(unknown))}")
        st = FtraceUpdate()
        final = self.func if func is None else func
        if final not in self.callbacks:
            raise ValueError(f"unknown ftrace callback {final!r} ({', '.join(self.callbacks)})")
        new_extra = self.extra_ops if extra is None else extra
        with self.core.text_mutex:
            # __register_ftrace_function: each newly registered ops gets
            # (or re-aims) its trampoline before any record changes
            old_ops = set(FTRACE_OPS[self.func]) | set(self.extra_ops)
            for ops in list(FTRACE_OPS[final]) + list(new_extra):
                if ops not in old_ops:
                    self.update_trampoline(ops, new_extra)
            tracer = FTRACE_OPS[final] or ("none",)
            plan = []
            for r in self.records:
                ops = (tracer if r.ip in want else ()) + tuple(
                    n for n, o in new_extra.items() if r.ip in o.ips)
                on = bool(ops)
                target = self._rec_target(ops, new_extra) if on else 0
                if on == r.enabled and (not on or r.addr == target):
                    r.ops = ops
                    continue                # nothing to change: not looked at
                expect = self.expected(r)
                cur = self.machine.text_read(r.ip, MCOUNT_INSN_SIZE)
                st.checked += 1
                if cur != expect:
                    where = self.describe(r.ip)
                    err = FtraceBugError(
                        f"ftrace_bug: {where} [{r.ip:#x}] holds {cur.hex(' ')}, expected "
                        f"{expect.hex(' ')} ({'enabled' if r.enabled else 'disabled'}); "
                        f"update to {'enabled' if on else 'disabled'} refused, nothing written; "
                        "ftrace is now disabled",
                        addr=r.ip, site=where, found=cur, expected=expect)
                    self.bug = err
                    self.ftrace_kill()
                    raise err
                plan.append((r, self.call_insn(r.ip, target) if on else _NOP5, on, target, ops))
            old_call = self._call_func(self.func, self.extra_ops)
            new_call = self._call_func(final, new_extra)
            update = new_call != old_call
            if update:
                self._known_funcs.update(o.func for o in new_extra.values())
                self._check_call_site()
            # the list function's view of the registered ops (ftrace_ops_list)
            self._set_list_bits(self._list_bits_for(final, new_extra))
            if update:
                # 1. the list function while the sites change
                st.func_updates += self._set_calls(self.callbacks[LIST_FUNC])
            s0, b0 = self.core.stats.syncs, self.core.stats.batches
            if plan:
                with self.core.batch():
                    for r, new, *_ in plan:
                        self.core.smp_text_poke_batch_add(r.ip, new)
            st.syncs = self.core.stats.syncs - s0
            st.batches = self.core.stats.batches - b0
            for r, _new, on, target, ops in plan:
                if on and r.enabled:
                    st.modified += 1
                elif on:
                    st.enabled += 1
                else:
                    st.disabled += 1
                r.enabled, r.addr, r.ops = on, target, ops
            if update and new_call != self.callbacks[LIST_FUNC]:
                # every CPU past the old callback, then the final one
                self.core.smp_text_poke_sync_each_cpu()
                st.func_updates += self._set_calls(new_call)
            self.func = final
            self.extra_ops = dict(new_extra)
            self.tracer_ips = frozenset(want)
        self.updates.append(st)
        return st

    # ------------------------------------------------------------ tracers
    def start(self, func: str = "function") -> FtraceUpdate:
        """Register the callback *func* and enable every selected function
        (``register_ftrace_function`` + ``FTRACE_UPDATE_CALLS``)."""
        if func == "none":
            raise ValueError("start('none'): use stop()")
        return self.ftrace_modify_all_code(self.selected(), func)

    def stop(self) -> FtraceUpdate:
        """Disable every site, then park the callback on ftrace_stub."""
        return self.ftrace_modify_all_code(None, "none")

    def refresh(self) -> FtraceUpdate:
        """Apply a changed filter to a running tracer."""
        return self.ftrace_modify_all_code(self.selected() if self.func != "none" else None)
