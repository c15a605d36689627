# SPDX-License-Identifier: GPL-2.0-only
"""A booted kernel as one object: image, tables, symbols, core, boot result,
and the clients created on demand.

Before this object each harness assembled its own "booted kernel" (the
static-key demo, the ftrace workload, the kprobe command, the module
loader's self-test), each choosing how the clients share execmem and which
reservations kprobes must respect.  :class:`Kernel` makes that choice once:

* ``kernel.keys`` -- :class:`StaticKeys` over the image's ``__jump_table``;
* ``kernel.calls`` -- :class:`StaticCalls` over its static-call sites;
* ``kernel.ftrace`` -- :class:`Ftrace` over ``__mcount_loc``;
* ``kernel.kprobes`` -- :class:`Kprobes`, refusing text reserved by the
  alternatives of this boot, by ``keys`` and by ``calls``;
* ``kernel.modules`` -- :class:`ModuleLoader` linking against the image,
  with this boot's CPU features and ``keys``/``calls``;
* ``kernel.bpf`` -- :class:`BpfJit`.

Each is created the first time it is asked for, the same way over any
machine: what a client needs beyond the machine protocol it asks of the
machine as a :class:`~textpoke.Capability` (``EXECMEM`` for kprobes,
modules and the JIT; ``DATA`` for module data), so a machine without one
refuses that client alone, with :class:`~textpoke.NotSupportedError`.

Execmem (the machine's first non-core text range) is split once: kprobes'
slots, detours and trampoline take the top :data:`KPROBES_EXECMEM` bytes;
modules and BPF programs share the rest through :attr:`Kernel.execmem`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterable

from .._alternative import DEFAULT_FEATURES, alternative_instructions
from .._bpf import BpfJit
from .._core._machine import Capability, Machine
from .._core._textpoke import TextPoke
from .._errors import MachineClosedError, NotSupportedError
from .._execmem import ExecMem
from .._ftrace import Ftrace
from .._jump_label import StaticKeys
from .._kprobes import Kprobes
from .._kprobes._core import KPROBES_EXECMEM
from .._module import ModuleLoader
from .._static_call import StaticCalls
from ..images import load_bundled
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import read_tables

__all__ = ["Kernel", "KPROBES_EXECMEM", "BUNDLED_CONFIG"]

#: The kernel config options the clients follow, as the bundled image has
#: them.  The bundled image is a small test kernel, not a distribution
#: build: it is IBT-capable like Debian's 6.12 (JIT hooks may sit after an
#: ENDBR) but is taken as a non-preemptible build (CONFIG_PREEMPT_NONE), so
#: kprobes may boost -- Debian's CONFIG_PREEMPTION=y never does; pass
#: ``config={"PREEMPTION": True}`` to model that.  Likewise it is taken as a
#: build without KPROBES_ON_FTRACE (a probe on the fentry NOP refused, a bare
#: symbol probing after it); ``config={"KPROBES_ON_FTRACE": True}`` (Debian's)
#: makes such probes ftrace_ops.
BUNDLED_CONFIG: dict[str, bool] = {"X86_KERNEL_IBT": True, "PREEMPTION": False,
                                   "KPROBES_ON_FTRACE": False}


_CLIENTS = ("keys", "calls", "ftrace", "kprobes", "modules", "bpf")


class Kernel:
    """*image* (an :class:`~textpoke.images.ElfImage` with the bundled
    image's tables) booted on *core*'s machine.

    ``Kernel(core, image, boot=...)`` wraps a boot already done;
    :meth:`start` runs the boot-time patching first.  A context manager;
    :meth:`close` closes the clients it created (kprobes restore their
    text) and, when :meth:`start` made the core, the core."""

    def __init__(self, core: TextPoke, image: Any, *, tables: Any = None, boot: Any = None,
                 rethunk: "bool | str | int" = False,
                 config: "dict[str, bool] | None" = None,
                 execmem: "dict[str, tuple[int, int]] | None" = None) -> None:
        self.core = core
        #: executable memory given per client ("ftrace", "kprobes",
        #: "modules": [start, end)) instead of the split of the machine's
        #: first execmem range -- the addresses a real kernel allocated
        self.execmem_at = dict(execmem or {})
        #: CONFIG_ options (without the prefix) the clients follow
        self.config = dict(BUNDLED_CONFIG, **(config or {}))
        self.machine: Machine = core.machine
        self.image = image
        self.tables = tables if tables is not None else read_tables(image)
        #: what :func:`alternative_instructions` returned (None: not booted here)
        self.boot = boot
        self.rethunk = rethunk
        self._own_core = False
        self._closed = False

    @classmethod
    def start(cls, target: "Machine | TextPoke", image: Any = None, *,
              features: Iterable[str | int] | None = None, tables: Any = None,
              rethunk: "bool | str | int" = False, config: "dict[str, bool] | None" = None,
              **boot_kw: Any) -> "Kernel":
        """Boot *image* (default: the bundled kernel) on *target* -- a
        machine (a :class:`TextPoke` is made for it, and closed with the
        kernel) or a core -- with :func:`alternative_instructions` for
        *features* (default: the image's default set)."""
        own = not isinstance(target, TextPoke)
        core = TextPoke(target) if own else target
        try:
            image = image if image is not None else load_bundled(KERNEL_IMAGE)
            tables = tables if tables is not None else read_tables(image)
            boot = alternative_instructions(core, image, tables,
                                            DEFAULT_FEATURES if features is None else features,
                                            **boot_kw)
            k = cls(core, image, tables=tables, boot=boot, rethunk=rethunk, config=config)
        except BaseException:
            if own:
                core.close()
            raise
        k._own_core = own
        return k

    # ------------------------------------------------------------ the image
    @property
    def symbols(self) -> dict[str, int]:
        return self.image.symbols

    def sym(self, name: str) -> int:
        return self.image.sym(name)

    @property
    def features(self) -> tuple:
        return tuple(self.boot.features) if self.boot is not None else ()

    # ------------------------------------------------------------ clients
    @cached_property
    def execmem(self) -> ExecMem:
        """The execmem that modules and BPF programs share (everything of
        the first non-core text range below kprobes' share)."""
        if "modules" in self.execmem_at:
            return self._given_execmem("modules")
        rng = self._execmem_range()
        return ExecMem(self.core, start=rng.start, end=rng.end - KPROBES_EXECMEM)

    def _given_execmem(self, owner: str) -> ExecMem:
        start, end = self.execmem_at[owner]
        return ExecMem(self.core, start=start, end=end)

    def _execmem_range(self):
        self.machine.require(Capability.EXECMEM, "kernel clients")
        # the machine lends it (the sim's module text; live maps a region)
        rng = self.machine.execmem_range(4 * KPROBES_EXECMEM, "kernel")
        if rng.end - rng.start <= KPROBES_EXECMEM:
            raise NotSupportedError(f"{self.machine.name}: no execmem range larger than "
                                    f"{KPROBES_EXECMEM} bytes")
        return rng

    @cached_property
    def keys(self) -> StaticKeys:
        self._check_open()
        return StaticKeys.from_image(self.core, self.image, self.tables)

    @cached_property
    def calls(self) -> StaticCalls:
        self._check_open()
        return StaticCalls.from_image(self.core, self.image, self.tables,
                                      rethunk=self.return_thunk,
                                      call_depth="call_depth" in self.features)

    @property
    def return_thunk(self) -> "bool | str | int":
        """The boot's ``x86_return_thunk`` for the clients: what the
        constructor was given, else ``__x86_return_thunk`` (True) when this
        boot's CPU has X86_FEATURE_RETHUNK, else False."""
        if self.rethunk:
            return self.rethunk
        return "rethunk" in self.features

    @cached_property
    def ftrace(self) -> Ftrace:
        self._check_open()
        # the ops' dynamic trampolines share execmem with modules and BPF
        # (none on a machine without EXECMEM: the sites call ftrace_caller)
        try:
            execmem = (self._given_execmem("ftrace") if "ftrace" in self.execmem_at
                       else self.execmem if not self.execmem_at else None)
        except NotSupportedError:
            execmem = None
        return Ftrace.from_image(self.core, self.image, self.tables, execmem=execmem,
                                 rethunk=self.return_thunk)

    @cached_property
    def kprobes(self) -> Kprobes:
        self._check_open()
        if "kprobes" in self.execmem_at:
            kp_mem = self._given_execmem("kprobes")
        else:
            rng = self._execmem_range()
            kp_mem = ExecMem(self.core, start=rng.end - KPROBES_EXECMEM, end=rng.end)
        kp = Kprobes(self.core, self.image, tables=self.tables,
                       smp=getattr(self.boot, "smp", None), keys=self.keys, calls=self.calls,
                       preemption=self.config["PREEMPTION"],
                       ftrace=self.ftrace if self.config["KPROBES_ON_FTRACE"] else None,
                       # a CLAC only where the CPUs can run it (SUPERVISOR: not
                       # the sim's Unicorn, not a live process's user mode),
                       # whatever the boot's feature list claims
                       execmem=kp_mem,
                       smap="smap" in self.features
                       and self.machine.has(Capability.SUPERVISOR),
                       # an IBT (or retpoline) build has no jump tables
                       jump_tables=not self.config["X86_KERNEL_IBT"])
        if "optprobes" in self.execmem_at:       # the optinsn slots' page, given
            kp.opt_execmem = self._given_execmem("optprobes")
        return kp

    @cached_property
    def modules(self) -> ModuleLoader:
        self._check_open()
        # module data where it was given (a real kernel's module area)
        data = self.execmem_at.get("module_data")
        extra = {"data_base": data[0], "data_size": data[1] - data[0]} if data else {}
        # a real kernel's boot gives its features as its line's numbers
        feats = getattr(self.boot, "feature_numbers", None) or self.features
        ml = ModuleLoader(self.core, self.image, self.keys, self.calls,
                          features=feats, execmem=self.execmem,
                          ibt=self.config["X86_KERNEL_IBT"], **extra)
        # a uniprocessor boot patched LOCK to DS: modules get the same
        ml.uniproc = bool(getattr(self.boot, "uniproc", False))
        if isinstance(self.rethunk, (str, int)) and not isinstance(self.rethunk, bool):
            ml.return_thunk = self.rethunk      # the boot's x86_return_thunk
        return ml

    @cached_property
    def bpf(self) -> BpfJit:
        self._check_open()
        return BpfJit(self.core, execmem=self.execmem, ibt=self.config["X86_KERNEL_IBT"])

    @property
    def clients(self) -> dict[str, Any]:
        """The clients created so far, by attribute name."""
        return {n: self.__dict__[n] for n in _CLIENTS if n in self.__dict__}

    # ------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise MachineClosedError("this kernel is closed")

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the clients that hold state on the machine (kprobes), then
        the core if :meth:`start` made it.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            kp = self.__dict__.get("kprobes")
            if kp is not None:
                kp.close()
        finally:
            if self._own_core:
                self.core.close()

    def __repr__(self) -> str:
        made = ", ".join(self.clients) or "no clients yet"
        return f"<Kernel on the {self.machine.name} machine: {made}>"
