# SPDX-License-Identifier: GPL-2.0-only
"""One vCPU of the sim machine: a Unicorn engine with its own view of text,
the memory regions it maps, register access, and freeing an engine at once
(not at the next cycle collection)."""

from __future__ import annotations

import ctypes
from typing import Any, Callable, TYPE_CHECKING

from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_MEM_INVALID, UC_MEM_FETCH_PROT,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT, UC_MEM_READ_UNMAPPED,
                     UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_PROT_EXEC,
                     UC_PROT_READ, UC_PROT_WRITE, Uc, UcError)
from unicorn import x86_const as X

from .._core._emulate import PtRegs
from .._core._machine import Task
from .._core._signals import uninterruptible
from .._errors import MachineError
from ._ucfast import FastCpu

if TYPE_CHECKING:
    from ._machine import SimMachine

__all__ = ["VCpu", "RUN", "TRAP", "IDLE", "DEAD", "OFFLINE"]

RUN, TRAP, IDLE, DEAD, OFFLINE = "run", "trap", "idle", "dead", "offline"

_REG_NAMES = {
    "rax": X.UC_X86_REG_RAX, "rbx": X.UC_X86_REG_RBX, "rcx": X.UC_X86_REG_RCX,
    "rdx": X.UC_X86_REG_RDX, "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI,
    "rbp": X.UC_X86_REG_RBP, "rsp": X.UC_X86_REG_RSP, "r8": X.UC_X86_REG_R8,
    "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
    "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14,
    "r15": X.UC_X86_REG_R15, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_EFLAGS,
}

_REG_IDS = tuple(_REG_NAMES.values())

_ACCESS = {
    UC_MEM_READ_UNMAPPED: "read-unmapped", UC_MEM_WRITE_UNMAPPED: "write-unmapped",
    UC_MEM_FETCH_UNMAPPED: "fetch-unmapped", UC_MEM_READ_PROT: "read-prot",
    UC_MEM_WRITE_PROT: "write-prot", UC_MEM_FETCH_PROT: "fetch-prot",
}


class _Region:
    __slots__ = ("start", "size", "buf", "mv", "name", "writable", "exec", "core")

    def __init__(self, start: int, size: int, name: str, writable: bool, exec_: bool, core: bool) -> None:
        self.start, self.size, self.name = start, size, name
        self.writable, self.exec, self.core = writable, exec_, core
        self.buf = (ctypes.c_ubyte * size)()
        self.mv = memoryview(self.buf).cast("B")   # cheap slices and stores

    def release(self) -> None:
        self.mv.release()
        self.buf = self.mv = None


#: Unicorn's translation buffer per vCPU.  Its default (1 GiB) is reserved
#: address space for every CPU: an 8-CPU machine took 8.4 GB of VmSize, so
#: `ulimit -v 4G` (or vm.overcommit_memory=2) could not build one.  The
#: workloads' text translates into a few MB; demo and verify ran as fast
#: with 32 MiB (when the buffer fills, Unicorn flushes it and retranslates).
TCG_BUFFER = 32 << 20


class VCpu:
    """One virtual CPU: a Unicorn instance with its own view of text."""

    def __init__(self, sim: "SimMachine", cpu_id: int) -> None:
        self.id = cpu_id
        self.uc: Uc | None = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_tcg_buffer_size(TCG_BUFFER)    # before anything else touches uc
        self.state = IDLE
        self.views: list[Any] = []
        self.stale: set[tuple[int, int]] = set()
        self.ipis: list[tuple[int, Callable[[], None]]] = []
        self.trap_task: Task | None = None
        self.trap_regs: PtRegs | None = None
        self.pending_intr: int | None = None
        self.fault: tuple[int, int] | None = None   # (access, address) of the last bad access
        self.instructions = 0
        self.slices = 0
        self.traps = 0
        self.ipis_taken = 0
        self.refreshes = 0
        #: a saved context the scheduler reuses (fast-forward's undo)
        self.ctx_buf: Any = None
        #: the scheduler's way into the engine, and the region a slice runs in
        #: (an interrupt delivered meanwhile stops the emulation)
        self.fast: FastCpu | None = FastCpu(self.uc)
        self.stop_region: uninterruptible | None = uninterruptible(self.uc.emu_stop)
        for r in sim._text:
            view = (ctypes.c_ubyte * r.size)()
            ctypes.memmove(view, r.buf, r.size)     # a new CPU comes up fully refilled
            self.views.append(view)
            self.uc.mem_map_ptr(r.start, r.size, UC_PROT_READ | UC_PROT_EXEC, view)
        for r in sim._data:
            self.map_data(r)
        # The binding's hook wrappers reference the Uc (and these bound
        # methods the VCpu): a cycle that release() breaks with hook_del.
        self._hooks = [self.uc.hook_add(UC_HOOK_INTR, self._on_intr),
                       self.uc.hook_add(UC_HOOK_MEM_INVALID, self._on_bad_access)]

    def map_data(self, r: _Region) -> None:
        prot = UC_PROT_READ | (UC_PROT_WRITE if r.writable else 0)
        self.uc.mem_map_ptr(r.start, r.size, prot, r.buf)

    def _on_intr(self, uc: Uc, intno: int, _user: object) -> None:
        self.pending_intr = intno
        uc.emu_stop()

    def _on_bad_access(self, uc: Uc, access: int, address: int, size: int, value: int,
                       _user: object) -> bool:
        self.fault = (access, address)
        return False       # not fixed up: Unicorn reports the fault

    def watch_exec(self, addrs: Any, fn: Callable[[int, int], None]) -> None:
        """Call ``fn(cpu, addr)`` whenever this CPU is about to execute an
        instruction that starts at one of *addrs* (a code hook per address,
        for traced runs; freed with the engine)."""
        uc = self._engine()
        for a in addrs:
            self._hooks.append(uc.hook_add(UC_HOOK_CODE,
                                           lambda _uc, addr, _size, _u: fn(self.id, addr),
                                           begin=a, end=a))

    def release(self) -> None:
        """Stop for good: drop the engine (at once, not at the next cycle
        collection), the view and anything in flight."""
        uc, self.uc = self.uc, None
        if uc is not None:
            _free_engine(uc, self._hooks)
            self._hooks = []
        del uc
        self.ctx_buf = None
        self.fast = self.stop_region = None        # the region holds the engine
        self.views = []
        self.stale = set()
        self.ipis = []
        task, self.trap_task, self.trap_regs = self.trap_task, None, None
        if task is not None:
            _close_quietly(task)
        self.state = OFFLINE

    def _engine(self) -> Uc:
        if self.uc is None:
            raise MachineError(f"cpu{self.id} is offline")
        return self.uc

    def reg(self, name: str) -> int:
        self._engine()
        return self.fast.read(_REG_NAMES[name])

    def set_reg(self, name: str, value: int) -> None:
        self._engine()
        self.fast.write(_REG_NAMES[name], value)

    def regs_dict(self) -> dict[str, int]:
        self._engine()
        return dict(zip(_REG_NAMES, self.fast.read_many(_REG_IDS)))


#: The general registers a trap handler sees in ``PtRegs.gprs`` (everything
#: but rip, rsp and rflags, which are ``ip``, ``sp`` and ``flags``); what the
#: handler leaves there is written back on IRET.
_GPRS = tuple((n, r) for n, r in _REG_NAMES.items() if n not in ("rip", "rsp", "rflags"))


def _read_gprs(uc: Uc) -> dict[str, int]:
    return {n: uc.reg_read(r) for n, r in _GPRS}


def _write_gprs(uc: Uc, gprs: dict[str, int]) -> None:
    for n, r in _GPRS:
        v = gprs.get(n)
        if v is not None:
            uc.reg_write(r, v & 0xFFFF_FFFF_FFFF_FFFF)


def _free_engine(uc: Uc, hooks: list[int]) -> None:
    """Free a Unicorn instance now rather than at the next cycle collection.

    Two cycles keep it alive: each hook's wrapper closes over the Uc, and
    the ctypes function pointer the binding keeps for it (made with
    ``ctypes.cast``) holds itself in its ``_objects``.  ``hook_del`` drops
    the binding's reference; clearing ``_objects`` breaks the second
    cycle; and the engine (the bulk of the memory: QEMU's translation
    buffers) is closed at once through the finalizer the binding registers
    for it, whatever still refers to the Python object."""
    callbacks = getattr(uc, "_callbacks", {})
    for h in hooks:
        fptr = callbacks.get(h)
        uc.hook_del(h)
        objs = getattr(fptr, "_objects", None)
        if isinstance(objs, dict):
            objs.clear()
    finalizer = getattr(uc, "_Uc__finalizer", None)   # unicorn >= 2.1's weakref.finalize
    if finalizer is not None:
        finalizer()


def _close_quietly(gen: Task) -> None:
    """Close a generator the machine holds as it goes away; its clean-up may
    well fail on a machine that is closing, and nobody is left to tell."""
    try:
        gen.close()
    except Exception:
        pass


def _fault_kind(e: UcError) -> str:
    s = str(e)
    if "INSN_INVALID" in s:
        return "#UD"
    if "WRITE_PROT" in s:
        return "#PF write to read-only text"
    if "FETCH" in s:
        return "#PF instruction fetch"
    if "UNMAPPED" in s or "PROT" in s:
        return "#PF"
    return "fault"
