# SPDX-License-Identifier: GPL-2.0-only
"""The bundled kernel's function-tracer runtime, moved into a process.

``live trace`` runs the very guest code the sim runs -- ``ftrace_caller``
(the trampoline a traced site calls), its callbacks ``function_trace_call``,
``function_profile_call`` and ``ftrace_ops_list_func`` (per-CPU rings found
through ``%gs:0``, the profiler's binary search), ``ftrace_stub`` -- and no
copy of it: the bytes are taken from ``kernel.elf`` and relocated to where
the process has room.

The image is linked at fixed low addresses, but it keeps its relocations
(``.rela.text``, ``ld --emit-relocs``), so moving is exact: two pieces of
``.text`` (``function_trace_call`` up to ``ftrace_work_loop``, and
``ftrace_caller`` to the end of ``ftrace_stub``) are copied into executable
memory of the process, the data they use (the trace clock, the profiler's
table, the list function's ops bits, ``function_trace_op``, the ops
objects, the per-CPU records ``ftrace_percpu``) is laid out afresh in its
data memory, and every relocation that lands in a copied piece is applied
again for the new addresses (``R_X86_64_PC32``/``PLT32``: S + A - P).
A ``jmp __x86_return_thunk`` becomes ``ret; int3 x4``, what the boot's
``apply_returns`` writes on a CPU without the return-thunk mitigation.

The trace clock: the image's rings are stamped by the ``counter`` clock (a
``lock xadd`` on ``trace_clock_counter``, inlined where an event is
written), which orders events but says nothing of time.  With
``clock="tsc"`` each of those instructions is replaced, in the copy, by a
CALL to a small hand-assembled stub of ours after the pieces that puts the
TSC (``rdtsc``) in the register the ``xadd`` would have loaded, saving
whatever else it touches -- the kernel's ``local`` / ``x86-tsc`` clocks read
the same counter.  Each site is checked first: a locked ``xadd`` of a
64-bit register into ``trace_clock_counter(%rip)``, whose flags nothing
reads before they are written again (the stub's ``shl``/``or`` leave other
flags than the ``xadd``), in code built ``-mno-red-zone`` (the CALL's push
lands below %rsp).  The sim keeps the counter clock.
Before anything is written, each piece is decoded and every branch or
RIP-relative operand that leaves its piece must have been relocated
(otherwise the build changed under us: refused).

What comes out is a :class:`ProcessFtraceImage`: the runtime's symbols at
their new addresses, as :class:`textpoke.kernel.Kernel` and the
:class:`~textpoke._ftrace.Ftrace` client read them from an image, with
``ftrace_percpu`` sized for as many rings as the process is given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..images import load_bundled
from ..images._elf import ElfFile
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import KernelTables, McountLoc
from .._core._insn import x86_nops

__all__ = ["Runtime", "ProcessFtraceImage", "runtime_layout", "RuntimeError_", "REC_SIZE",
           "CLOCKS", "clock_stub", "GS_READS", "gs_stub", "SINK_MISSED", "GS_STUB"]

REC_SIZE = 128                    # struct ftrace_cpu
_R_PC32, _R_PLT32 = 2, 4
#: [first symbol, end symbol) of each piece of .text copied; None: the
#: piece ends with that symbol's own end
_PIECES = (("function_trace_call", "ftrace_work_loop"), ("ftrace_caller", None))
_PIECE_END_SYM = "ftrace_stub"
#: the data the pieces use: name -> size (ftrace_percpu is sized per process)
_DATA = {"trace_clock_counter": 8, "ftrace_prof_ips": 8, "ftrace_prof_n": 8,
         "ftrace_list_ops": 8, "function_trace_op": 8, "ftrace_list_end": 32,
         "global_ops": 32, "ftrace_profile_ops": 32, "kprobe_ftrace_ops": 32,
         "kprobe_ipmodify_ops": 32}
#: the list function's ops bits at start (images/kernel/ftrace.c)
_LIST_TRACE_PROFILE = 3
#: the trace clock the pieces read (inlined ``lock xadd`` sites)
_CLOCK_SYM = "trace_clock_counter"
#: room for one clock stub (the longest: push push rdtsc shl or mov pop pop ret = 21)
_STUB = 32
CLOCKS = ("counter", "tsc")


class RuntimeError_(ValueError):
    """The bundled runtime cannot be moved (an image built otherwise)."""


@dataclass
class Runtime:
    """The relocated runtime: *code* for ``code_at``, *data* for ``data_at``."""

    code_at: int
    code: bytes
    data_at: int
    data: bytes
    symbols: dict[str, int]
    sizes: dict[str, int]


def runtime_layout(nrec: int, clock: str = "counter", *, nprof: int = 0,
                   gs: str = "rdgsbase") -> tuple[int, int]:
    """(code size, data size) of the runtime with *nrec* per-CPU records
    (*nprof* profiled functions, *gs* as :func:`build_runtime`)."""
    img = load_bundled(KERNEL_IMAGE)
    code = sum(hi - lo for lo, hi in _piece_ranges(img))
    if clock == "tsc":
        code += _STUB * len({reg for _ip, _n, reg in _clock_sites(img)})
    if gs != "unchecked":
        code += _GS_STUB * len(_gs_regs(img))
    return _align(code, 64), _data_size(nrec) + _sink_size(nprof)


def _gs_regs(img) -> list[int]:
    """The registers of the per-CPU loads (a stub each)."""
    return sorted({reg for _ip, _n, reg in _gs_sites(img)})


def _clock_sites(img) -> list[tuple[int, int, int]]:
    """The trace clock's sites in the pieces: (address, length, register
    number) of each ``lock xadd %reg, trace_clock_counter(%rip)``; refused
    (:class:`RuntimeError_`) if one is anything else or its flags are read."""
    import iced_x86 as I
    text = img.section(".text")
    want = img.sym(_CLOCK_SYM)
    out = []
    for lo, hi in _piece_ranges(img):
        insns = list(I.Decoder(64, text.data[lo - text.addr:hi - text.addr], ip=lo))
        for k, ins in enumerate(insns):
            if not (ins.is_ip_rel_memory_operand and ins.ip_rel_memory_address == want):
                continue
            reg = ins.op1_register - I.Register.RAX if ins.op_count == 2 else -1
            if not (ins.code == I.Code.XADD_RM64_R64 and ins.has_lock_prefix
                    and 0 <= reg < 16 and reg != 4 and ins.len >= 5):
                raise RuntimeError_(f"the trace clock at {ins.ip:#x} is {ins}, not a locked "
                                    "xadd of a 64-bit register: the image changed")
            _flags_dead(insns, k, "trace clock")
            out.append((ins.ip, ins.len, reg))
    return out


def _flags_dead(insns, k: int, what: str) -> None:
    """The arithmetic flags after *insns[k]* are written before anything
    reads them or leaves the straight line (a CALL to a stub of ours put
    there clobbers them); else :class:`RuntimeError_`."""
    import iced_x86 as I
    live = (I.RflagsBits.OF | I.RflagsBits.SF | I.RflagsBits.ZF | I.RflagsBits.AF
            | I.RflagsBits.CF | I.RflagsBits.PF)
    for nxt in insns[k + 1:]:
        if nxt.rflags_read & live or nxt.flow_control != I.FlowControl.NEXT:
            raise RuntimeError_(f"the {what}'s flags at {insns[k].ip:#x} are read "
                                f"({nxt}): the image changed")
        live &= ~nxt.rflags_modified
        if not live:
            return
    raise RuntimeError_(f"the {what}'s flags at {insns[k].ip:#x} live to the piece's end")


def _gs_sites(img) -> list[tuple[int, int, int]]:
    """The per-CPU loads in the pieces: (address, length, register number)
    of each ``mov %gs:0,%reg`` (``this_ftrace_cpu()``); refused
    (:class:`RuntimeError_`) if a GS access is anything else or its flags
    are read after."""
    import iced_x86 as I
    text = img.section(".text")
    out = []
    for lo, hi in _piece_ranges(img):
        insns = list(I.Decoder(64, text.data[lo - text.addr:hi - text.addr], ip=lo))
        for k, ins in enumerate(insns):
            if ins.memory_segment != I.Register.GS and ins.segment_prefix != I.Register.GS:
                continue
            reg = ins.op0_register - I.Register.RAX if ins.op_count == 2 else -1
            if not (ins.code == I.Code.MOV_R64_RM64 and ins.op1_kind == I.OpKind.MEMORY
                    and ins.memory_base == I.Register.NONE and ins.memory_index == I.Register.NONE
                    and ins.memory_displacement == 0 and 0 <= reg < 16 and reg != 4
                    and ins.len >= 5):
                raise RuntimeError_(f"a GS access at {ins.ip:#x} is {ins}, not mov %gs:0 to a "
                                    "64-bit register: the image changed")
            _flags_dead(insns, k, "per-CPU load")
            out.append((ins.ip, ins.len, reg))
    return out


#: where a thread's GS base is read (None: the runtime as first written,
#: ``mov %gs:0`` followed unchecked -- the bench's baseline and the test
#: that shows what the check closes, never what ``live trace`` injects)
GS_READS = ("rdgsbase", "syscall", "unchecked")
#: room for one per-CPU load's check (the longest, syscall, is 78 bytes)
GS_STUB = _GS_STUB = 96
#: the sink: a record (REC_SIZE) whose ``self`` is not in the checked span,
#: then the count of missed calls, one ring entry, the profiler's counts
_SINK_MISSED, _SINK_ENTRY, _SINK_PROF = REC_SIZE, REC_SIZE + 32, REC_SIZE + 64
SINK_MISSED = _SINK_MISSED


def _sink_size(nprof: int) -> int:
    return _align(_SINK_PROF + 8 * nprof, 64)


def gs_stub(reg: int, read: str, lo: int, hi: int, sink: int, *, count: bool = True) -> bytes:
    """The per-CPU load ``mov %gs:0,%reg`` made safe: the GS base read
    (RDGSBASE, or ``arch_prctl`` without it) and checked by
    :mod:`._gscheck` (among the records ``[lo, hi)``, a record its own
    address); a base not ours gives *sink* instead, after a ``lock inc``
    of its missed-calls count (not with *count* False: a second load in
    the same call, the profiler's return hook's).  Every register but *reg* kept (flags not:
    each site's are dead, :func:`_gs_sites`)::

        push %S; READ %reg; CHECK (jne 1f)
        pop %S; ret
     1: movabs $SINK,%reg; lock incq MISSED(%reg); pop %S; ret
    """
    from ._gscheck import gs_range_check, movabs, pop, push, rdgsbase, read_gs_syscall
    s = 1 if reg != 1 else 0                         # %rcx, or %rax
    back = pop(s) + b"\xc3"
    code = push(s) + (rdgsbase(reg) if read == "rdgsbase" else read_gs_syscall(reg))
    code += gs_range_check(reg, s, lo, hi, miss=len(back)) + back
    inc = b"\xf0" + bytes((0x48 | reg >> 3, 0xFF, 0x80 | reg & 7))
    inc += (b"\x24" if reg & 7 == 4 else b"") + struct.pack("<i", _SINK_MISSED)
    code += movabs(sink, reg) + (inc if count else b"") + back
    assert len(code) <= _GS_STUB
    return code


def clock_stub(reg: int) -> bytes:
    """``rdtsc`` into 64-bit register *reg* (0 rax .. 15 r15), every other
    register kept: ``push``, ``rdtsc; shl $32,%rdx; or %rdx,%rax``, ``mov``,
    ``pop``, ``ret`` (hand-assembled)."""
    tsc = b"\x0f\x31\x48\xc1\xe2\x20"
    if reg == 0:                                   # rax: keep rdx
        return b"\x52" + tsc + b"\x48\x09\xd0" + b"\x5a\xc3"
    if reg == 2:                                   # rdx: keep rax; or %rax,%rdx
        return b"\x50" + tsc + b"\x48\x09\xc2" + b"\x58\xc3"
    mov = bytes((0x48 | reg >> 3, 0x89, 0xC0 | reg & 7))        # mov %rax,%reg
    return b"\x50\x52" + tsc + b"\x48\x09\xd0" + mov + b"\x5a\x58\xc3"


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _data_size(nrec: int) -> int:
    return _align(sum(_align(v, 64) for v in _DATA.values()), 4096) + nrec * REC_SIZE


def _piece_ranges(img) -> list[tuple[int, int]]:
    out = []
    for first, end in _PIECES:
        lo = img.sym(first)
        hi = img.sym(end) if end else img.sym(_PIECE_END_SYM) + img.sizes[_PIECE_END_SYM]
        if not lo < hi:
            raise RuntimeError_(f"{img.path}: the runtime piece {first} is empty")
        out.append((lo, hi))
    return out


def build_runtime(code_at: int, data_at: int, nrec: int, clock: str = "counter", *,
                  nprof: int = 0, gs: str = "rdgsbase") -> Runtime:
    """The runtime relocated to run at *code_at* with its data at *data_at*
    (*nrec* per-CPU records); *clock* ``"tsc"``: the rings stamped with the
    TSC instead of the counter.  *gs*: how each per-CPU load reads the
    thread's GS base before following it -- ``"rdgsbase"`` (FSGSBASE in
    user mode), ``"syscall"`` (``arch_prctl``, without it), both checked
    (:func:`gs_stub`: a base not among the records is a missed call,
    counted in ``trace_gs_sink``), or ``"unchecked"`` (as first written; a
    baseline only); *nprof*: the profiled functions (the sink's counts)."""
    if clock not in CLOCKS:
        raise ValueError(f"trace clock {clock!r}: one of {', '.join(CLOCKS)}")
    if gs not in GS_READS:
        raise ValueError(f"GS read {gs!r}: one of {', '.join(GS_READS)}")
    img = load_bundled(KERNEL_IMAGE)
    text = img.section(".text")
    pieces = _piece_ranges(img)
    # where each piece goes
    moved: list[tuple[int, int, int]] = []        # (old lo, old hi, new lo)
    at = code_at
    for lo, hi in pieces:
        moved.append((lo, hi, at))
        at += hi - lo

    def new_text(old: int) -> int | None:
        for lo, hi, nlo in moved:
            if lo <= old < hi or old == hi:
                return nlo + old - lo
        return None

    data_new: dict[str, int] = {}
    off = 0
    for name, size in _DATA.items():
        data_new[name] = data_at + off
        off += _align(size, 64)
    off = _align(off, 4096)
    data_new["ftrace_percpu"] = data_at + off
    code = bytearray()
    for lo, hi in pieces:
        code += text.data[lo - text.addr:hi - text.addr]
    # the relocations of .text that land in a piece, applied for the new place
    elf = ElfFile(img.raw, img.path)
    rela = elf.section(".rela.text")
    if rela is None:
        raise RuntimeError_(f"{img.path}: no .rela.text (the image must be linked "
                            "with --emit-relocs)")
    symtab = elf.symbol_table(elf.sections[rela.link])
    done: set[int] = set()
    for r_off, typ, si, addend in elf.relocations(rela):
        p_new = new_text(r_off)
        if p_new is None or not any(lo <= r_off < hi for lo, hi in pieces):
            continue
        name = symtab[si][0]
        if typ not in (_R_PC32, _R_PLT32):
            raise RuntimeError_(f"relocation type {typ} at {r_off:#x} ({name}): only PC32/PLT32 "
                                "are moved")
        o = p_new - code_at
        if name == "__x86_return_thunk":
            if code[o - 1] != 0xE9:
                raise RuntimeError_(f"a reference to __x86_return_thunk at {r_off:#x} that is "
                                    "not a jmp")
            code[o - 1:o + 4] = b"\xc3\xcc\xcc\xcc\xcc"      # apply_returns: ret; int3
            done.add(r_off)
            continue
        if name == "kprobe_ftrace_handler":
            # the kprobes' ops is never registered here: its handler (an
            # INT3 into the host on the sim) becomes the stub
            name = "ftrace_stub"
        if name in data_new:
            s = data_new[name]
        else:
            s = new_text(img.sym(name)) if name in img.symbols else None
            if s is None:
                raise RuntimeError_(f"the runtime refers to {name!r} at {r_off:#x}, which is "
                                    "not moved with it")
        v = s + addend - p_new
        if not -(1 << 31) <= v < (1 << 31):
            raise RuntimeError_(f"{name} out of rel32 reach of {p_new:#x}")
        code[o:o + 4] = struct.pack("<i", v)
        done.add(r_off)
    if clock == "tsc":
        # each clock site: CALL its register's stub (after the pieces), NOPs
        stubs: dict[int, int] = {}
        for ip, n, reg in _clock_sites(img):
            if reg not in stubs:
                stubs[reg] = code_at + len(code)
                code += clock_stub(reg).ljust(_STUB, b"\xcc")
            at = new_text(ip)
            o = at - code_at
            code[o:o + n] = b"\xe8" + struct.pack("<i", stubs[reg] - (at + 5)) + x86_nops[n - 5]
            done.add(ip + 1)             # the CALL leaves its piece: on purpose
        symbols_extra = {f"trace_clock_tsc_{r}": a for r, a in stubs.items()}
    else:
        symbols_extra = {}
    percpu = data_new["ftrace_percpu"]
    sink = data_at + _data_size(nrec)
    if gs != "unchecked":
        # each per-CPU load: CALL its register's checked read, NOPs
        gstubs: dict[int, int] = {}
        for reg in _gs_regs(img):
            gstubs[reg] = code_at + len(code)
            code += gs_stub(reg, gs, percpu, percpu + nrec * REC_SIZE, sink).ljust(_GS_STUB, b"\xcc")
        for ip, n, reg in _gs_sites(img):
            at = new_text(ip)
            o = at - code_at
            code[o:o + n] = b"\xe8" + struct.pack("<i", gstubs[reg] - (at + 5)) + x86_nops[n - 5]
            done.add(ip + 1)             # the CALL leaves its piece: on purpose
        symbols_extra.update({f"trace_gs_check_{r}": a for r, a in gstubs.items()})
    _check_pieces(bytes(code), code_at, moved, done)
    symbols: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, addr in img.symbols.items():
        if name.startswith("ftrace_regs_") or name in ("ftrace_work_loop",):
            continue       # regs caller not offered to the client (no SAVE_REGS ops here)
        if any(lo <= addr < hi for lo, hi in pieces) or (name == "ftrace_caller_end"):
            n = new_text(addr)
            if n is not None:
                symbols[name] = n
                sizes[name] = img.sizes.get(name, 0)
    symbols.update(data_new)
    symbols.update(symbols_extra)
    sizes.update(_DATA)
    sizes.update({k: _GS_STUB if k.startswith("trace_gs_check_") else _STUB for k in symbols_extra})
    sizes["ftrace_percpu"] = nrec * REC_SIZE
    symbols["trace_gs_sink"], sizes["trace_gs_sink"] = sink, _sink_size(nprof)
    data = bytearray(_data_size(nrec) + _sink_size(nprof))
    # the sink: its own address (outside the checked span), a one-entry
    # ring that overwrites, the profiler's counts, an empty return stack
    # (limit 0: no return of a missed call is hooked)
    for f, v in ((0, sink), (24, sink + _SINK_ENTRY), (32, 0), (80, 1),
                 (72, sink + _SINK_PROF), (120, sink + _SINK_PROF)):
        struct.pack_into("<Q", data, sink - data_at + f, v)
    struct.pack_into("<Q", data, data_new["ftrace_list_ops"] - data_at, _LIST_TRACE_PROFILE)
    struct.pack_into("<Q", data, data_new["function_trace_op"] - data_at,
                     data_new["ftrace_list_end"])
    return Runtime(code_at, bytes(code), data_at, bytes(data), symbols, sizes)


def _check_pieces(code: bytes, code_at: int, moved, relocated: set[int]) -> None:
    """Every branch and RIP-relative operand that leaves its piece was
    relocated (its displacement lies at a relocated offset)."""
    import iced_x86
    reloc_new = set()
    for lo, hi, nlo in moved:
        reloc_new |= {nlo + r - lo for r in relocated if lo <= r < hi}
    for lo, hi, nlo in moved:
        n = hi - lo
        buf = code[nlo - code_at:nlo - code_at + n]
        dec = iced_x86.Decoder(64, buf, ip=nlo)
        for ins in dec:
            if ins.code == iced_x86.Code.INVALID:
                continue
            tgt = None
            if ins.is_ip_rel_memory_operand:
                tgt = ins.ip_rel_memory_address
            elif ins.op_count and ins.op0_kind in (iced_x86.OpKind.NEAR_BRANCH64,):
                tgt = ins.near_branch_target
            if tgt is None or nlo <= tgt <= nlo + n:
                continue
            if not any(ins.ip <= a < ins.ip + ins.len for a in reloc_new):
                raise RuntimeError_(f"the runtime's instruction at {ins.ip:#x} ({ins}) reaches "
                                    f"{tgt:#x}, outside its piece, without a relocation")


@dataclass
class ProcessFtraceImage:
    """What :class:`~textpoke.kernel.Kernel` and the ftrace client read of an
    image, for a process: the runtime's symbols, one sized symbol per traced
    function at its fentry site (``records``: site address -> name), and
    the sites as ``__mcount_loc``."""

    path: str
    runtime: Runtime
    records: dict[int, str]
    record_sizes: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.symbols = dict(self.runtime.symbols)
        self.sizes = dict(self.runtime.sizes)
        taken = set(self.symbols)
        self.names: dict[int, str] = {}
        for addr, name in sorted(self.records.items()):
            key = name
            if key in taken:            # a second static function of that name
                key = f"{name}@{addr:#x}"
            taken.add(key)
            self.symbols[key] = addr
            self.sizes[key] = max(1, self.record_sizes.get(addr, 5))
            self.names[addr] = name

    def sym(self, name: str) -> int:
        return self.symbols[name]

    def tables(self, text: tuple[int, int]) -> KernelTables:
        return KernelTables(path=self.path, text=text, replacement=(0, 0),
                            mcount_loc=tuple(McountLoc(a) for a in sorted(self.records)))
