# SPDX-License-Identifier: GPL-2.0-only
"""The run-time clients over a real kernel image, offline: no CPU runs it.

``boot_kernel`` patches a real image's ``_text.._end`` at boot as the
kernel does.  What happens after boot -- ftrace enabling functions, a
static key switched, a kprobe registered, a module loaded -- is the
clients' work, and they run on a :class:`~textpoke.Machine`.  An
:class:`OfflineMachine` is that machine for a booted image: its core text
is the booted memory itself (``_stext.._etext`` of the same buffer that
``boot --dump`` writes), its data is the kernel's data as boot left it,
its CPUs never run (a sync is counted and returns at once), and its
executable memory outside the core text is exactly the ranges it is given
-- the addresses the real kernel allocates at run time (an ftrace ops'
trampoline, kprobe instruction slots, a module's base), which only a run
of the real kernel can tell and which are therefore inputs here.

:func:`offline_kernel` boots the image and wraps it in a
:class:`~textpoke.kernel.Kernel` the same way the sim does: the clients
are the same objects, reading this image's own tables (``__mcount_loc``
-> ftrace records, ``__jump_table`` -> static keys, ``.static_call_sites``
-> static calls), its symbols (kallsyms, sized by the distance to the
next symbol, as ``kallsyms`` sizes them) and the config options they
follow (``PREEMPTION``, ``KPROBES_ON_FTRACE``, ``X86_KERNEL_IBT``) from
the image's config.

At run time the kernel has freed its init text: ftrace's records of init
functions are gone (``ftrace_free_init_mem``), jump-label entries in init
text are never written again, and nothing runs there.  So the machine's
core text is ``_stext.._etext`` only, and the ftrace records are the
``__mcount_loc`` entries inside it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .._core._machine import PAGE_SIZE, Capability, Machine, StillCpus, Task, TextRange
from .._core._textpoke import TextPoke
from .._errors import BadAddressError, MachineError
from .._ftrace._graph_tp import (CMDLINE_RECORD, tracepoint_probe_register,  # noqa: F401
                                 tracepoint_probe_unregister, tracepoint_probes,
                                 tracing_cmdline_record)
from ..images._tables import KernelTables, jump_table, mcount_sites, static_call_table
from ._kernel import Kernel

__all__ = ["OfflineMachine", "OfflineImage", "ExecRegion", "offline_kernel", "real_tables",
           "config_options", "CLIENT_CONFIG", "tracing_cmdline_record", "user_ptr_max_init",
           "tracepoint_probe_register", "tracepoint_probe_unregister", "tracepoint_probes"]

#: the kernel config options the clients follow, as read from an image's config
CLIENT_CONFIG = ("X86_KERNEL_IBT", "PREEMPTION", "KPROBES_ON_FTRACE")


def config_options(cfg: Mapping[str, str] | None) -> dict[str, bool]:
    """The clients' options (:data:`CLIENT_CONFIG`) from a kernel config as
    ``read_config`` returns it (``CONFIG_X`` -> value): set when ``=y``."""
    cfg = cfg or {}
    return {o: cfg.get("CONFIG_" + o) == "y" for o in CLIENT_CONFIG}


@dataclass(frozen=True, slots=True)
class ExecRegion:
    """Executable memory the real kernel allocated at run time, at *start*
    (``execmem_alloc``'s answer), of *size* bytes, for the client *owner*
    (``"ftrace"``, ``"kprobes"``, ``"modules"``)."""

    start: int
    size: int
    owner: str

    @property
    def end(self) -> int:
        return self.start + self.size


class _Data:
    """The kernel's data: the booted image's memory (``_text.._end``) and,
    elsewhere, zero-filled sparse pages (what ``map_data`` hands out).
    Reads of core text see the text as it is now."""

    def __init__(self, machine: "OfflineMachine", data: bytearray) -> None:
        self._m = machine
        self._data = data
        self._pages: dict[int, bytearray] = {}

    def _span(self, addr: int, size: int):
        m = self._m
        o = addr - m.base
        if 0 <= o and o + size <= len(self._data):
            if m.core.start <= addr and addr + size <= m.core.end:
                return m.buf, o
            return self._data, o
        return None, 0

    def read(self, addr: int, size: int) -> bytes:
        buf, o = self._span(addr, size)
        if buf is not None:
            return bytes(buf[o:o + size])
        out = bytearray()
        while size > 0:
            page = self._pages.get(addr & ~(PAGE_SIZE - 1))
            n = min(size, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            o = addr & (PAGE_SIZE - 1)
            out += page[o:o + n] if page is not None else bytes(n)
            addr += n
            size -= n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        buf, o = self._span(addr, len(data))
        if buf is self._m.buf:
            raise BadAddressError(f"data write at {addr:#x} into core text (read-only)")
        if buf is not None:
            buf[o:o + len(data)] = data
            return
        pos = 0
        while pos < len(data):
            a = addr + pos
            base = a & ~(PAGE_SIZE - 1)
            page = self._pages.setdefault(base, bytearray(PAGE_SIZE))
            o = a - base
            n = min(len(data) - pos, PAGE_SIZE - o)
            page[o:o + n] = data[pos:pos + n]
            pos += n


class OfflineMachine(StillCpus, Machine):
    """A booted real image's memory as a machine with *ncpus* CPUs that
    never run.  *buf* is ``_text.._end`` at *base* (written in place: the
    dump is *buf*); *core* is ``(_stext, _etext)``; *data* is what data
    reads see (default: a copy of *buf*); *regions* are the executable
    memory allocated at run time, zero-filled until written."""

    name = "offline"

    def __init__(self, buf: bytearray, base: int, core: tuple[int, int], *,
                 data: "bytes | bytearray | None" = None, regions: Iterable[ExecRegion] = (),
                 ncpus: int = 1, booted: "bytes | None" = None) -> None:
        super().__init__()
        #: the memory as boot left it, where *buf* starts from a later state
        #: (what non-core text reads: freed at run time, it holds poison)
        self.booted = booted
        if ncpus < 1:
            raise ValueError("need at least one CPU")
        self.buf = buf
        self.base = base
        self.core = TextRange(core[0], core[1], "text", True)
        if not (base <= core[0] < core[1] <= base + len(buf)):
            raise ValueError("core text lies outside the image's memory")
        self.regions: list[ExecRegion] = []
        self._rbufs: list[tuple[int, bytearray]] = []
        self._ranges = [self.core]
        for r in sorted(regions, key=lambda r: r.start):
            self.add_region(r)
        self._cpus = list(range(ncpus))
        self._mem = _Data(self, bytearray(data if data is not None else buf))
        self.writes = 0
        self.syncs = 0

    def add_region(self, r: ExecRegion) -> None:
        if r.size <= 0 or r.start % PAGE_SIZE or r.size % PAGE_SIZE:
            raise ValueError(f"{r.owner}: execmem at {r.start:#x} (+{r.size:#x}) is not whole "
                             "pages")
        for t in self._ranges:
            if r.start < t.end and t.start < r.end:
                raise ValueError(f"{r.owner}: execmem [{r.start:#x}, {r.end:#x}) overlaps "
                                 f"{t.name} [{t.start:#x}, {t.end:#x})")
        if self.base <= r.end and r.start < self.base + len(self.buf):
            raise ValueError(f"{r.owner}: execmem at {r.start:#x} lies inside the image")
        self.regions.append(r)
        # fresh pages: the kernel's run-time reference finds them zeroed
        # around what it writes (a trampoline's unused return-slot bytes)
        self._rbufs.append((r.start, bytearray(r.size)))
        self._ranges.append(TextRange(r.start, r.end, r.owner, False))

    @property
    def capabilities(self) -> frozenset:          # type: ignore[override]
        caps = {Capability.DATA, Capability.SUPERVISOR}     # the kernel's own bytes
        if self.regions:
            caps.add(Capability.EXECMEM)
        return frozenset(caps)

    def region(self, owner: str) -> ExecRegion | None:
        return next((r for r in self.regions if r.owner == owner), None)

    def _span(self, addr: int, size: int) -> tuple[bytearray, int]:
        if self.core.start <= addr and addr + size <= self.core.end:
            return self.buf, addr - self.base
        return self._span_in(self._rbufs, addr, size)

    _text_span = _span        # StillCpus' early writes go here

    def text_read(self, addr: int, size: int) -> bytes:
        # the image's other text (init, exit: freed at run time) can still
        # be read, as boot left it -- a client sizes a jump entry there
        # before leaving it alone -- but only text ranges are written
        o = addr - self.base
        if 0 <= o and o + size <= len(self.buf):
            if self.core.start <= addr and addr + size <= self.core.end:
                return bytes(self.buf[o:o + size])
            src = self.booted if self.booted is not None else self.buf
            return bytes(src[o:o + size])
        b, o = self._span(addr, size)
        return bytes(b[o:o + size])

    def text_poke_write(self, addr: int, data: bytes) -> Task:
        self._check_open()
        b, o = self._span(addr, len(data))
        b[o:o + len(data)] = data
        self.writes += 1
        return
        yield       # a task with nothing to wait for: no CPU runs here

    def map_data(self, size: int, name: str, addr: int | None = None) -> int:
        # data the clients map (module data, rings) lives in sparse pages
        # outside the image; a module's data goes where the caller says
        if addr is None:
            raise MachineError(f"offline: {name} needs an address (the real kernel's "
                               "allocation is an input)")
        return addr

    def region_bytes(self, r: ExecRegion) -> bytes:
        for start, b in self._rbufs:
            if start == r.start:
                return bytes(b)
        raise KeyError(r)


class OfflineImage:
    """What the clients read of an image (``symbols``, ``sizes``,
    ``sym()``) for a real kernel: its kallsyms, each text symbol sized up
    to the next address (kallsyms keeps no sizes)."""

    def __init__(self, image: Any) -> None:
        self.real = image
        self.path = image.path
        self.symbols = image.symbols
        self.version = getattr(image, "version", "")
        #: the kernel line (feature numbering, table layouts) a module follows
        self.line = getattr(image, "line", None)
        syms = image.symbols
        addrs, names = getattr(syms, "addrs", None), getattr(syms, "names", None)
        types = getattr(syms, "types", "")
        sizes: dict[str, int] = dict(getattr(syms, "sizes", {}) or {})
        if addrs and names and types:
            uniq = sorted(set(addrs))
            for a, n, t in zip(addrs, names, types):
                if t in "tTwW" and n not in sizes:
                    i = bisect.bisect_right(uniq, a)
                    if i < len(uniq):
                        sizes[n] = uniq[i] - a
        self.sizes = sizes

    def sym(self, name: str) -> int:
        return self.real.sym(name)

    def describe(self, addr: int) -> str:
        return self.real.describe(addr)


def real_tables(kt: Any, core: tuple[int, int]) -> KernelTables:
    """The run-time clients' tables from a booted image's memory: the
    fentry sites of core text (init text is freed), every jump entry and
    static-call site (the clients leave init ones alone themselves)."""
    from .._alternative._kboot import table_bounds

    def read(name: str, reader):
        b = table_bounds(kt, name)
        return reader(kt.buf, kt.base, *b) if b else []
    lo, hi = core
    mc = tuple(m for m in read("__mcount_loc", mcount_sites) if m.addr and lo <= m.addr < hi)
    # bit 1 of a built image's jump entry is objtool's "NOP this JMP" mark
    # (HAVE_JUMP_LABEL_HACK); jump_label_init makes it "in init memory"
    # (init_section_contains), which is what the clients read
    ib, ie = kt.opt("__init_begin"), kt.opt("__init_end")
    jt = tuple(e._replace(init=ib is not None and ie is not None and ib <= e.code < ie)
               for e in read("__jump_table", jump_table))
    return KernelTables(path=str(getattr(kt, "path", "")), text=core, replacement=(0, 0),
                        mcount_loc=mc, jump_table=jt,
                        static_call_sites=tuple(read(".static_call_sites", static_call_table)))


@dataclass
class OfflineKernel:
    """A booted real image on an :class:`OfflineMachine`, as a :class:`Kernel`."""

    kernel: Kernel
    machine: OfflineMachine
    kt: Any                         # the KernelText the boot patched (its buf is the machine's)
    boot: Any                       # what boot_kernel returned
    image: Any                      # the loaded RealKernelImage
    config: dict = field(default_factory=dict)

    def close(self) -> None:
        try:
            self.kernel.close()
        finally:
            self.machine.close()

    def __enter__(self) -> "OfflineKernel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def offline_kernel(image: Any, caps: Any, opts: Any = None, *, data: bytes | None = None,
                   early: Any = None, config: Mapping[str, str] | None = None,
                   regions: Iterable[ExecRegion] = (), ncpus: int | None = None,
                   progress: Any = None, data_size: int = 2 << 20,
                   before: "bytes | None" = None) -> OfflineKernel:
    """Boot *image* (a loaded real kernel) for *caps* as ``boot --image``
    does (``boot_kernel``: *opts*, *data* or *early*), then wrap the booted
    memory in an :class:`OfflineMachine` and a :class:`Kernel` whose
    clients follow *config* (a kernel config as ``read_config`` reads it).

    *before*, when given, is the kernel's own memory (``_text.._end``) at
    the moment the step starts -- a run-time reference's previous stop --:
    text and data then start from it rather than from the modelled boot
    (what the kernel changed on its own since boot -- static keys it
    flipped, tracepoints it enabled -- is not the clients' doing), as
    ``boot --data`` starts the boot passes from the kernel's data."""
    from .._alternative._kboot import kernel_text_of
    from .._alternative._kpasses import BootOptions
    from ._boot_real import boot_kernel
    opts = opts or BootOptions()
    kt = kernel_text_of(image, data=data)
    res = boot_kernel(kt, caps, opts, early=early, progress=progress)
    res.stats["runtime_ptr_USER_PTR_MAX"] = user_ptr_max_init(kt, caps, config).as_dict()
    core = (kt.sym("_stext"), kt.sym("_etext"))
    # the tables as boot read them: at run time __mcount_loc (init data)
    # is freed, and the rest does not change
    tables = real_tables(kt, core)
    booted = None
    if before is not None:
        booted = bytes(kt.buf)
        if len(before) != len(kt.buf):
            raise ValueError(f"the memory before the step is {len(before):,} bytes; the image's "
                             f"_text.._end is {len(kt.buf):,}")
        kt.buf[:] = before
        kt.data = before
    machine = OfflineMachine(kt.buf, kt.base, core, data=kt.data, regions=regions,
                             ncpus=ncpus or opts.ncpus or 1, booted=booted)
    cfg = config_options(config)
    try:
        tp = TextPoke(machine)
        img = OfflineImage(image)
        rethunk = opts.return_thunk if caps.has("rethunk") else False
        at = {r.owner: (r.start, r.end) for r in machine.regions}
        mod = machine.region("modules")
        if mod is not None and data_size:
            # module data after its text's region, in the module area
            at["module_data"] = (mod.end, mod.end + data_size)
        k = Kernel(tp, img, tables=tables, boot=_BootView(caps, res), rethunk=rethunk,
                   config=cfg, execmem=at)
        k._own_core = True
    except BaseException:
        machine.close()
        raise
    return OfflineKernel(k, machine, kt, res, image, cfg)


def user_ptr_max_init(kt: Any, caps: Any, config: Mapping[str, str] | None) -> Any:
    """What ``arch_cpu_finalize_init`` does right after
    ``alternative_instructions()`` (so after the boot passes, but before
    anything runs at run time): ``runtime_const_init(ptr, USER_PTR_MAX)``,
    USER_PTR_MAX being ``TASK_SIZE_MAX`` -- one page below 2^47, or 2^56
    with 5-level paging (a CPU with LA57 and a kernel built for it)."""
    from .._alternative._kpasses import TableStats
    from ..images._tables import s32_table
    st = TableStats()
    lo = kt.opt("__start_runtime_ptr_USER_PTR_MAX")
    hi = kt.opt("__stop_runtime_ptr_USER_PTR_MAX")
    if lo is None or hi is None:
        return st
    la57 = caps.has("la57") and (config or {}).get("CONFIG_X86_5LEVEL") == "y"
    val = (1 << (56 if la57 else 47)) - PAGE_SIZE
    for a in s32_table(kt.buf, kt.base, lo, hi, "runtime_ptr_USER_PTR_MAX"):
        st.entries += 1
        st.applied += 1
        st.changed += kt.write("runtime_ptr_USER_PTR_MAX", a, val.to_bytes(8, "little"))
    return st


class _BootView:
    """The boot result as the clients read it (``features``: the names of
    the CPU's features, e.g. ``call_depth``, ``rethunk``)."""

    def __init__(self, caps: Any, res: Any) -> None:
        self.caps = caps
        self.result = res
        self.smp = None
        #: the boot patched the SMP locks for one CPU (LOCK -> DS)
        self.uniproc = bool(getattr(res, "uniproc", False))

    @property
    def feature_numbers(self) -> tuple:
        """The CPU's features as bit numbers of the image's kernel line
        (what a module's .altinstructions test)."""
        bits = self.caps.bits
        return tuple(n for n in range(bits.bit_length()) if bits >> n & 1)

    @property
    def features(self) -> tuple:
        names = getattr(self.caps, "names", None)
        return tuple(names() if callable(names) else names or ())
