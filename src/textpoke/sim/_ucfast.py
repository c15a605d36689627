# SPDX-License-Identifier: GPL-2.0-only
"""The scheduler's hot path into Unicorn, without the binding's per-call
work: reading RIP and starting a slice go straight to libunicorn through
the function pointers the binding already set up (its ``reg_read`` picks
a register class and allocates a buffer on every call, a third of a
verify schedule's time).  Same calls, same results; where the binding's
internals are not as expected, the binding's methods are used instead."""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, Callable

from unicorn import UcError
from unicorn import x86_const as X

try:
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:          # another binding layout: the slow path
    _uclib = None

__all__ = ["FastCpu", "fast_cpu", "read_gprs", "write_gprs"]

_RIP = X.UC_X86_REG_RIP
_OK = 0
_MASK = (1 << 64) - 1


class FastCpu:
    """Fast access to one vCPU's engine: ``rip()``, ``read(regid)``,
    ``write(regid, value)`` and ``run(begin, until, count)`` (raises
    UcError like ``emu_start``, and re-raises what a Python hook raised)."""

    __slots__ = ("rip", "run", "read", "write")

    def __init__(self, uc: Any) -> None:
        uch = getattr(uc, "_uch", None)
        if _uclib is None or uch is None or not hasattr(uc, "_hook_exception"):
            self.rip: Callable[[], int] = lambda: uc.reg_read(_RIP)
            self.run: Callable[[int, int, int], None] = \
                lambda begin, until, count: uc.emu_start(begin, until, count=count)
            self.read: Callable[[int], int] = uc.reg_read
            self.write: Callable[[int, int], None] = uc.reg_write
            return
        # Only a weak reference to the engine: closing the machine frees it
        # by refcount, whatever still holds this object.
        engine = weakref.ref(uc)
        buf = ctypes.c_uint64()
        ref = ctypes.byref(buf)
        wbuf = ctypes.c_uint64()
        wref = ctypes.byref(wbuf)
        reg_read = _uclib.uc_reg_read
        reg_write = _uclib.uc_reg_write
        emu_start = _uclib.uc_emu_start

        def read(regid: int) -> int:
            buf.value = 0           # a 32-bit register fills half: as the binding's fresh buffer
            status = reg_read(uch, regid, ref)
            if status != _OK:
                raise UcError(status)
            return buf.value

        def write(regid: int, value: int) -> None:
            wbuf.value = value & _MASK
            status = reg_write(uch, regid, wref)
            if status != _OK:
                raise UcError(status)

        def rip() -> int:
            reg_read(uch, _RIP, ref)
            return buf.value

        def run(begin: int, until: int, count: int) -> None:
            u = engine()
            if u is None:
                raise UcError(5)      # UC_ERR_HANDLE: the engine is gone
            u._hook_exception = None
            status = emu_start(uch, begin, until, 0, count)
            if status != _OK:
                raise UcError(status)
            if u._hook_exception is not None:
                raise u._hook_exception

        self.rip, self.run, self.read, self.write = rip, run, read, write


def fast_cpu(c: Any) -> FastCpu:
    """The FastCpu of vCPU *c* (made on first use, kept on the vCPU)."""
    f = c.__dict__.get("_fast")
    if f is None or c.uc is None or f[0]() is not c.uc:
        f = c._fast = (weakref.ref(c.uc), FastCpu(c.uc))
    return f[1]


def read_gprs(c: Any, gprs: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """The named registers of vCPU *c* (``_vcpu._GPRS``), as ``_read_gprs``."""
    read = fast_cpu(c).read
    return {n: read(r) for n, r in gprs}


def write_gprs(c: Any, gprs: tuple[tuple[str, int], ...], values: dict[str, int]) -> None:
    """Write back what a trap handler left in *values*, as ``_write_gprs``."""
    write = fast_cpu(c).write
    for n, r in gprs:
        v = values.get(n)
        if v is not None:
            write(r, v)
