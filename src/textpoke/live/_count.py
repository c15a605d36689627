# SPDX-License-Identifier: GPL-2.0-only
"""Counting function calls in a running process: the function profiler, live.

:func:`live_count` (``textpoke live count``):

1. resolves the fentry sites of the functions matching a glob
   (:mod:`._fentry`: NOP5, five NOP1s, ``call *__fentry__@GOTPCREL``; the
   others are listed as skipped, with the bytes found), and plans the entry
   of every other matching function (:mod:`._entry`: the instructions a
   5-byte JMP covers, moved to a trampoline; a function that cannot be
   moved is listed as skipped with the reason);
2. attaches (:class:`LiveMachine`), maps a region near each module's code
   in a stopped thread (:mod:`._inject`) and writes one stub per function::

       lock incq counter_i(%rip)     f0 48 ff 05 rel32
       ret                           c3          (padded with INT3 to 16 bytes)

   The CALL at the fentry point pushes a return address into the function,
   so the stub's RET resumes the function at its second instruction with
   every register as the caller left it (a CALL there is exactly what
   ``-mfentry`` code is built to take; ``lock inc`` changes only status
   flags, which no ABI preserves across a call).  Counters are 64 bytes
   apart (one cache line each: threads counting different functions do not
   share a line), in a data page separate from the code (a write into a
   line of code being run would cost every thread a machine clear).
   An ordinary entry's stub (64 bytes) is the same increment, then the
   moved instructions re-encoded for their new address, then ``jmp`` back
   to the first instruction not moved; its site becomes ``jmp stub_i``;
3. switches every site NOP5 -> ``call stub_i`` in ONE batch of the core
   (``smp_text_poke_batch_add`` for each, then finish: INT3 protocol or
   stop-machine, as the machine's strategy says), and detaches -- the
   target runs free while counting: a hit costs a CALL, a locked increment
   and a RET, nanoseconds, no trap;
4. after the window, attaches again, switches every site back to its
   original bytes in one batch, stops every thread and checks that none is
   inside a stub (rip, and the top of each stack), reads the counters,
   unmaps the region (or keeps it mapped, saying why, if the check does not
   pass: a leak of a few pages beats killing the target), and detaches;
5. reads every site back and returns the counts sorted like bcc's
   ``funccount`` (most calls first).

Exactness: a call that enters while a site is being switched is counted or
not depending on which instruction the INT3 handler emulates; calls made
entirely inside the window are all counted.
"""

from __future__ import annotations

import contextlib
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from .._core._insn import CALL_INSN_OPCODE, text_gen_insn
from ._entry import reasons_text
from ._fentry import PATCHABLE, QUIESCENT, FentrySite, fentry_sites, read_process
from ._inject import InjectError
from ._region import Region
from ._switch import switch_sites  # re-exported: recover and the benches use it from here
from ._symbols import Symbols, SymbolError, read_maps

__all__ = ["CountResult", "live_count", "stub_code", "STUB_SIZE", "COUNTER_STRIDE",
           "switch_sites", "Arming"]

STUB_SIZE = 16
#: an ordinary entry's stub: the increment, the moved instructions, the JMP back
ENTRY_STUB_SIZE = 64
COUNTER_STRIDE = 64


def stub_code(stub_addr: int, counter_addr: int) -> bytes:
    """``lock incq counter(%rip); ret``, INT3-padded to STUB_SIZE."""
    rel = counter_addr - (stub_addr + 8)
    return b"\xf0\x48\xff\x05" + struct.pack("<i", rel) + b"\xc3" + b"\xcc" * (STUB_SIZE - 9)


@dataclass
class CountResult:
    pattern: str
    duration: float
    strategy: str
    counts: list[tuple[str, int]]            # (function, calls), most first
    sites: int                                # sites counted
    skipped: list[dict] = field(default_factory=list)   # sites not patched, and why
    restored: bool = False                    # every site reads its original bytes again
    freed: bool = False                       # the stub region was unmapped
    kept_mapped: list[str] = field(default_factory=list)  # why not
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    alive: bool = True
    int3_left: int = 0                        # sites (fentry or entry) whose first byte is INT3

    def as_dict(self) -> dict:
        return {"pattern": self.pattern, "duration": self.duration, "strategy": self.strategy,
                "sites": self.sites, "total": sum(n for _, n in self.counts),
                "counts": [{"function": f, "count": n} for f, n in self.counts],
                "skipped": self.skipped, "restored": self.restored, "freed": self.freed,
                "kept_mapped": self.kept_mapped, "timings": self.timings,
                "stats": self.stats, "alive": self.alive, "int3_left": self.int3_left}


def _stub_size(s) -> int:
    return ENTRY_STUB_SIZE if s.kind == "entry" else STUB_SIZE


class _Group:
    """The sites of one module and the region of stubs they call (regions
    are mapped per module: a module's code reaches its stubs in rel32)."""

    def __init__(self, sites: list) -> None:
        self.sites = sites
        self.offsets: list[int] = []
        off = 0
        for s in sites:
            self.offsets.append(off)
            off += _stub_size(s)
        self.code_size = off
        self.region: Region | None = None


class Arming:
    """The stubs and sites of one counting session; the steps of
    :func:`live_count`, usable one by one (the benchmark times them)."""

    def __init__(self, pid: int, pattern: str, *, strategy: str = "int3",
                 progress: Callable[[int, int], None] | None = None,
                 entries: bool = True) -> None:
        self.pid, self.pattern, self.strategy, self.progress = pid, pattern, strategy, progress
        self.syms = Symbols(pid)
        found = fentry_sites(self.syms, pattern)
        fent = [s for s in found if s.kind in PATCHABLE]
        self.skipped = [dict(s.as_dict(), why=_why_not(s)) for s in found
                        if s.kind not in PATCHABLE]
        ents: list = []
        self.refused: list = []
        if entries:
            from ._entry import entry_sites
            try:
                funcs = self.syms.functions(pattern)
            except SymbolError:
                funcs = []
            covered = {s.func_addr for s in found}
            ents, refused = entry_sites(self.syms, pattern,
                                        functions=[f for f in funcs if f.addr not in covered])
            self.refused = refused
            self.skipped += [dict(r.as_dict(), kind=r.reason) for r in refused]
        self.sites: list = sorted(fent + ents, key=lambda s: s.addr)
        if not self.sites:
            raise SymbolError(_why_none(self.syms, pattern, pid, found, self.refused))
        self.groups: list[_Group] = []
        by_mod: dict[str, list] = {}
        for s in self.sites:
            by_mod.setdefault(s.module, []).append(s)
        for mod in sorted(by_mod, key=lambda k: by_mod[k][0].addr):
            self.groups.append(_Group(by_mod[mod]))
        self.timings: dict[str, float] = {}
        self.stats: dict = {}
        self.dropped: set[int] = set()     # entries whose trampoline could not be made

    @property
    def region(self) -> Region | None:
        """The first group's region (one module: the only one)."""
        return self.groups[0].region if self.groups else None

    # --- the two sessions -------------------------------------------------
    def arm(self) -> None:
        """Attach, map and fill the stubs, switch every site to its CALL
        (fentry) or JMP (entry) in one batch, detach."""
        from ._machine import LiveMachine
        t0 = time.perf_counter()
        with LiveMachine(self.pid, strategy=self.strategy) as m:
            t1 = time.perf_counter()
            writes_of: dict[int, bytes] = {}
            for g in self.groups:
                self._fill(m, g, writes_of)
            t2 = time.perf_counter()
            batch = [(s.addr, writes_of[s.addr]) for s in self.sites if s.kind not in QUIESCENT
                     and s.addr in writes_of]
            entries = [s for s in self.sites if s.kind == "entry" and s.addr in writes_of]
            self.stats["arm"] = switch_sites(m, batch, self.progress, entries=entries)
            quiet = [(s.addr, writes_of[s.addr]) for s in self.sites if s.kind in QUIESCENT]
            if quiet:                  # not one instruction: with every thread stopped
                m.write_stopped(quiet)
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        self.timings.update(arm_attach=t1 - t0, arm_map=t2 - t1, arm_batch=t3 - t2,
                            arm_detach=t4 - t3, arm_total=t4 - t0)

    def _fill(self, m, g: _Group, writes_of: dict[int, bytes]) -> None:
        """Map *g*'s region near its module, write the stubs (a site whose
        moved instructions cannot reach from there is dropped, said why),
        journal the region with its sites."""
        from .._relocate import RelocError, trampoline
        from .._core._insn import JMP32_INSN_OPCODE
        n = len(g.sites)
        try:
            mod = self.syms.module(g.sites[0].module)
        except SymbolError:
            mod = None
        lo, hi = g.sites[0].addr, g.sites[-1].addr
        if mod is not None and any(s.kind == "entry" for s in g.sites):
            # moved RIP-relative operands reach the module's data too
            lo = min(lo, min(x.start for x in mod.mappings))
            hi = max(hi, max(x.end for x in mod.mappings))
        g.region = r = _map_region(m, g.code_size, n * COUNTER_STRIDE, (lo, hi))
        code = bytearray()
        keep = []
        for i, (s, off) in enumerate(zip(g.sites, g.offsets)):
            stub, ctr = r.base + off, r.data + i * COUNTER_STRIDE
            if s.kind == "entry":
                try:
                    body = trampoline(s.plan, stub, head=stub_code(stub, ctr)[:8])
                except RelocError as e:
                    self.dropped.add(s.addr)
                    self.skipped.append({"function": s.function, "addr": f"{s.addr:#x}",
                                         "module": s.module, "kind": e.reason, "why": str(e)})
                    body = b""
                else:
                    assert len(body) <= ENTRY_STUB_SIZE, len(body)
                    new = text_gen_insn(JMP32_INSN_OPCODE, s.addr, stub)
                    writes_of[s.addr] = new
                    keep.append(s)
                code += body.ljust(ENTRY_STUB_SIZE, b"\xcc")
            else:
                code += stub_code(stub, ctr)
                writes_of[s.addr] = (text_gen_insn(CALL_INSN_OPCODE, s.addr, stub)
                                     + b"\x90" * (len(s.found) - 5))
                keep.append(s)
        # written down before any site calls into it: a dead patcher's
        # region is found and freed by 'live recover'
        m.journal.drop_region(r.base, flush=False)      # named before the mmap
        m.journal.add_region("count", r.base, r.code_size, r.data_size,
                             [(s.addr, s.found, writes_of[s.addr]) for s in keep])
        r.write(r.base, bytes(code))

    def disarm(self) -> tuple[list[int], list[str]]:
        """Attach, switch every site back in one batch, stop the threads,
        read the counters and unmap each region if no thread can be inside
        it; detach.  Returns (counters, reasons a region stays mapped)."""
        from ._machine import LiveMachine
        t0 = time.perf_counter()
        counters: dict[int, list[int]] = {}
        why: dict[int, list[str]] = {}
        groups = [g for g in self.groups if g.region is not None]
        with LiveMachine(self.pid, strategy=self.strategy) as m:
            t1 = time.perf_counter()
            # every site still switched on (all of them, unless arming failed half-way)
            writes = [(s.addr, s.found) for s in self.sites
                      if m.text_read(s.addr, len(s.found)) != s.found]
            quiet = [w for w in writes if classify_kind(w[1]) in QUIESCENT]
            batch = [w for w in writes if classify_kind(w[1]) not in QUIESCENT]
            self.stats["disarm"] = switch_sites(m, batch, self.progress) if batch else {}
            if quiet:
                m.write_stopped(quiet)
            t2 = time.perf_counter()
            for gi, g in enumerate(groups):
                counters[gi], why[gi] = _read_and_free(m, g.region, len(g.sites), attempts=10)
                if not why[gi]:
                    m.journal.drop_region(g.region.base)
            t3 = time.perf_counter()
        for _session in range(3):
            if not any(why.values()):
                break
            # Threads of a -pg program were seen to stay, attempt after
            # attempt, at the entry of their SIGPROF handler (delivered while
            # they were in a stub: its frame holds a stub address) for as long
            # as they were traced, and to run on at once when detached.  So:
            # let them run untraced for a moment, then look again.
            time.sleep(0.01)
            with LiveMachine(self.pid, strategy=self.strategy) as m:
                for gi, g in enumerate(groups):
                    if why[gi]:
                        counters[gi], why[gi] = _read_and_free(m, g.region, len(g.sites),
                                                               attempts=10)
                        if not why[gi]:
                            m.journal.drop_region(g.region.base)
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        self.timings.update(disarm_attach=t1 - t0, disarm_batch=t2 - t1, disarm_free=t3 - t2,
                            disarm_detach=t4 - t3, disarm_total=t4 - t0)
        flat: list[int] = []
        got = {id(g): counters[gi] for gi, g in enumerate(groups)}
        for g in self.groups:
            flat += got.get(id(g)) or [0] * len(g.sites)
        return flat, [w for gi in sorted(why) for w in why[gi]]

    def ordered_sites(self) -> list:
        """The sites in the order of the counters :meth:`disarm` returns."""
        return [s for g in self.groups for s in g.sites]

    def int3_left(self) -> int:
        """How many sites hold an INT3 in their first byte (0 after any
        finished or rolled-back batch)."""
        read = read_process(self.pid)
        try:
            return sum(1 for s in self.sites if read(s.addr, 1) == b"\xcc")
        except OSError:
            return 0
        finally:
            read.close()  # type: ignore[attr-defined]

    def restored(self) -> bool:
        """Read every site back: True when each holds its original bytes."""
        read = read_process(self.pid)
        try:
            for s in self.sites:
                if read(s.addr, len(s.found)) != s.found:
                    return False
            return True
        finally:
            read.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        for g in self.groups:
            if g.region is not None:
                g.region.close()
        self.syms.close()


def live_count(pid: int, pattern: str, duration: float = 1.0, *, strategy: str = "int3",
               window: Callable[[], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> CountResult:
    """Count the calls of every function matching *pattern* in process
    *pid* for *duration* seconds (or while *window()* runs, called once
    every site is switched on and the process is detached)."""
    a = Arming(pid, pattern, strategy=strategy, progress=progress)
    try:
        try:
            a.arm()
        except BaseException:
            # the core finished or rolled back the batch: switch back whatever
            # is on and free the stubs before the error goes on
            if any(g.region is not None for g in a.groups):
                with contextlib.suppress(Exception):
                    a.disarm()
            raise
        t0 = time.perf_counter()
        try:
            if window is not None:
                window()
            else:
                time.sleep(duration)
        finally:
            elapsed = time.perf_counter() - t0
            counters, why = a.disarm()
        counts: dict[str, int] = {}
        for s, c in zip(a.ordered_sites(), counters):
            if s.addr in a.dropped:
                continue
            counts[s.function] = counts.get(s.function, 0) + c
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        timings = dict(a.timings, window=elapsed)
        restored = a.restored()
        return CountResult(pattern, elapsed, strategy, ordered, len(a.sites) - len(a.dropped),
                           a.skipped,
                           restored=restored, freed=not why, kept_mapped=why,
                           timings=timings, stats=a.stats, alive=_alive(pid),
                           int3_left=0 if restored else a.int3_left())
    finally:
        a.close()


def _why_not(s: FentrySite) -> str:
    return {"int3": "a stray INT3 (a breakpoint, or a patcher killed mid-batch): run "
                    "'textpoke live sites --check' and 'textpoke live recover'",
            "5xnop1": "five one-byte NOPs (-fpatchable-function-entry): switched with every "
                      "thread stopped",
            "call": "already a CALL (another tool, or a count that was killed)",
            "jmp": "a JMP: patched by something else",
            "other": "no fentry form here (not a NOP5, five NOP1s or call *__fentry__@GOTPCREL): "
                     "ordinary function entries are not patched by this version"
            }.get(s.kind, "not a NOP5")


def _why_no_site(syms: Symbols, pattern: str, pid: int) -> str:
    """Why *pattern* has no fentry site (``live toggle`` switches fentry
    sites only): no such function, or functions without an fentry form."""
    try:
        funcs = syms.functions(pattern)
    except SymbolError as e:
        return str(e)
    if not funcs:
        return f"no function matching {pattern!r} in process {pid}"
    mods = sorted({f.module.short for f in funcs})
    return (f"{len(funcs)} function(s) match {pattern!r} (in {', '.join(mods[:3])}"
            f"{' ...' if len(mods) > 3 else ''}) but none has an fentry site (built without "
            "-pg -mfentry or -fpatchable-function-entry); 'live toggle' switches fentry sites "
            "only -- 'live count' patches ordinary entries through a trampoline")


def _why_none(syms: Symbols, pattern: str, pid: int, found: list, refused: list) -> str:
    """Why nothing matching *pattern* can be counted: no such function, or
    every fentry site and every entry refused (counted by reason)."""
    try:
        funcs = syms.functions(pattern)
    except SymbolError as e:
        return str(e)
    if not funcs and not found:
        return f"no function matching {pattern!r} in process {pid}"
    parts = []
    if found:
        kinds = sorted({s.kind for s in found})
        parts.append(f"{len(found)} fentry site(s) not switchable ({', '.join(kinds)}: "
                     f"{_why_not(found[0])})")
    if refused:
        what = reasons_text(refused)
        first = refused[0]
        parts.append(f"{len(refused)} entr{'y' if len(refused) == 1 else 'ies'} refused "
                     f"({what}; e.g. {first.function}: {first.why})")
    return f"nothing matching {pattern!r} can be counted: " + "; ".join(parts)


def classify_kind(found: bytes) -> str:
    from ._fentry import classify
    return classify(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# --- what needs the live machine's stopped threads ------------------------------
def _map_region(m, code_size: int, data_size: int, near: tuple[int, int]) -> Region:
    """mmap the region in one of the threads held by ``m.stopped()``: the
    first that takes it (a thread that cannot run the syscall is skipped).
    The journal names the region before the mmap is run."""
    errors = []
    maps = read_maps(m.pid)

    def before(base: int, code: int, data: int) -> None:
        if m.journal is not None:
            m.journal.add_region("count", base, code, data, [])

    with m.stopped() as tids:
        for tid in sorted(tids, key=lambda t: t != m.pid):    # the main thread first
            try:
                return Region.map(m.pid, tid, code_size, data_size, near=near, maps=maps,
                                   before=before)
            except (InjectError, OSError) as e:
                errors.append(f"thread {tid}: {e}")
                if m.journal is not None:        # never mapped: not a leftover
                    m.journal.data["regions"] = [r for r in m.journal.data["regions"]
                                                 if r["sites"]]
                    m.journal.flush()
                if isinstance(e, InjectError) and "failed:" in str(e):
                    break                      # the kernel said no: another thread won't help
    raise InjectError("could not map the counting stubs: " + "; ".join(errors))


def _read_and_free(m, r: Region, n: int, attempts: int = 50) -> tuple[list[int], list[str]]:
    """With every thread stopped: check that none can be inside the stubs,
    read the counters (final: no thread can count any more) and unmap.  A
    thread caught inside a stub (two instructions long) is let run and the
    check made again, up to *attempts* times; then the region stays mapped
    (never unmapped under a thread)."""
    why: list[str] = []
    counters: list[int] = []
    for attempt in range(attempts):
        with m.stopped() as tids:
            # a thread stopped inside a stub (lock inc; ret) is stepped out
            # of it first; a signal it had pending is delivered when it is
            # let go, outside the stub -- otherwise the signal frame would
            # hold a stub address (a -pg program's SIGPROF did, every time)
            m.step_out_of_range(r.base, r.base + r.code_size)
            threads = [(tid, m.get_regs(tid)) for tid in tids]
            why = r.in_use(threads)
            raw = r.read(r.data, n * COUNTER_STRIDE)
            counters = [struct.unpack_from("<Q", raw, i * COUNTER_STRIDE)[0] for i in range(n)]
            if not why:
                errs = []
                for tid in sorted(tids, key=lambda t: t != m.pid):
                    try:
                        r.unmap(tid)
                        return counters, []
                    except (InjectError, OSError) as e:
                        errs.append(f"munmap in thread {tid} failed: {e}")
                return counters, errs
        time.sleep(0.0005 * (attempt + 1))     # the threads run on, out of the stub
    return counters, why
