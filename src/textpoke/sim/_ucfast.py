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
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TB_REMOVE_CACHE
from unicorn import x86_const as X

try:
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:          # another binding layout: the slow path
    _uclib = None

__all__ = ["FastCpu", "fast_cpu", "read_gprs", "write_gprs"]

_RIP = X.UC_X86_REG_RIP
_OK = 0
_MASK = (1 << 64) - 1


def _raw_lib() -> Any:
    """libunicorn's functions once more, without ctypes prototypes: a call
    whose arguments are ready-made ctypes objects then skips the per-call
    conversion through ``argtypes`` (half the cost of a short slice)."""
    if _uclib is None:
        return None
    try:
        lib = ctypes.CDLL(_uclib._name)
        for f in ("uc_emu_start", "uc_reg_read", "uc_reg_write", "uc_reg_read_batch",
                  "uc_reg_write_batch", "uc_ctl"):
            getattr(lib, f).restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


_RAW = _raw_lib()


class FastCpu:
    """Fast access to one vCPU's engine: ``rip()``, ``read(regid)``,
    ``write(regid, value)``, ``run(begin, until, count)`` and
    ``run_here(until, count)`` (from where RIP is; both raise UcError like
    ``emu_start``, and re-raise what a Python hook raised), and
    ``read_many(regids)``/``write_many(regids, values)`` (one call each),
    and ``remove_cache(begin, end)`` (``ctl_remove_cache``)."""

    __slots__ = ("rip", "run", "run_here", "read", "write", "read_many", "write_many",
                 "remove_cache")

    def __init__(self, uc: Any) -> None:
        uch = getattr(uc, "_uch", None)
        if _RAW is None or uch is None or not hasattr(uc, "_hook_exception"):
            self.rip: Callable[[], int] = lambda: uc.reg_read(_RIP)
            self.run: Callable[[int, int, int], None] = \
                lambda begin, until, count: uc.emu_start(begin, until, count=count)
            self.run_here: Callable[[int, int], None] = \
                lambda until, count: uc.emu_start(uc.reg_read(_RIP), until, count=count)
            self.read: Callable[[int], int] = uc.reg_read
            self.write: Callable[[int, int], None] = uc.reg_write
            self.read_many = lambda regids: [uc.reg_read(r) for r in regids]

            def write_many_slow(regids: Any, values: Any) -> None:
                for r, v in zip(regids, values):
                    uc.reg_write(r, v)
            self.write_many = write_many_slow
            self.remove_cache = uc.ctl_remove_cache
            return
        # Only a weak reference to the engine: closing the machine frees it
        # by refcount, whatever still holds this object.
        engine = weakref.ref(uc)
        h = ctypes.c_void_p(uch.value if isinstance(uch, ctypes.c_void_p) else uch)
        buf = ctypes.c_uint64()
        ref = ctypes.byref(buf)
        wbuf = ctypes.c_uint64()
        wref = ctypes.byref(wbuf)
        begin_b, until_b, zero, count_b = (ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64(0),
                                           ctypes.c_size_t())
        rip_id = ctypes.c_int(_RIP)
        reg_read, reg_write, emu_start = _RAW.uc_reg_read, _RAW.uc_reg_write, _RAW.uc_emu_start
        read_batch, write_batch = _RAW.uc_reg_read_batch, _RAW.uc_reg_write_batch
        batches: dict[tuple[int, ...], tuple[Any, Any, Any, int]] = {}

        def read(regid: int) -> int:
            buf.value = 0           # a 32-bit register fills half: as the binding's fresh buffer
            status = reg_read(h, regid, ref)
            if status != _OK:
                raise UcError(status)
            return buf.value

        def write(regid: int, value: int) -> None:
            wbuf.value = value & _MASK
            status = reg_write(h, regid, wref)
            if status != _OK:
                raise UcError(status)

        def rip() -> int:
            reg_read(h, rip_id, ref)
            return buf.value

        def _start(begin: Any) -> None:
            u = engine()
            if u is None:
                raise UcError(5)      # UC_ERR_HANDLE: the engine is gone
            u._hook_exception = None
            status = emu_start(h, begin, until_b, zero, count_b)
            if status != _OK:
                raise UcError(status)
            if u._hook_exception is not None:
                raise u._hook_exception

        def run(begin: int, until: int, count: int) -> None:
            begin_b.value = begin
            until_b.value = until
            count_b.value = count
            _start(begin_b)

        def run_here(until: int, count: int) -> None:
            reg_read(h, rip_id, ref)
            until_b.value = until
            count_b.value = count
            _start(buf)

        def _batch(regids: tuple[int, ...]) -> tuple[Any, Any, Any, int]:
            b = batches.get(regids)
            if b is None:
                n = len(regids)
                vals = (ctypes.c_uint64 * n)()
                ptrs = (ctypes.c_void_p * n)(*(ctypes.addressof(vals) + 8 * i for i in range(n)))
                b = batches[regids] = ((ctypes.c_int * n)(*regids), ptrs, vals, n)
            return b

        def read_many(regids: tuple[int, ...]) -> list[int]:
            ids, ptrs, vals, n = _batch(regids)
            ctypes.memset(vals, 0, 8 * n)     # 32-bit registers fill half
            status = read_batch(h, ids, ptrs, n)
            if status != _OK:
                raise UcError(status)
            return vals[:]

        def write_many(regids: tuple[int, ...], values: Any) -> None:
            ids, ptrs, vals, n = _batch(regids)
            for i, v in enumerate(values):
                vals[i] = v & _MASK
            status = write_batch(h, ids, ptrs, n)
            if status != _OK:
                raise UcError(status)

        ctl = _RAW.uc_ctl
        # as the binding encodes it: write, two arguments
        rm_code = ctypes.c_int((UC_CTL_IO_WRITE << 30) | (2 << 26) | UC_CTL_TB_REMOVE_CACHE)
        lo_b, hi_b = ctypes.c_uint64(), ctypes.c_uint64()

        def remove_cache(begin: int, end: int) -> None:
            lo_b.value = begin
            hi_b.value = end
            status = ctl(h, rm_code, lo_b, hi_b)
            if status != _OK:
                raise UcError(status)

        self.remove_cache = remove_cache
        self.rip, self.run, self.run_here, self.read, self.write = rip, run, run_here, read, write
        self.read_many, self.write_many = read_many, write_many


def fast_cpu(c: Any) -> FastCpu:
    """The FastCpu of vCPU *c* (made on first use, kept on the vCPU)."""
    f = getattr(c, "fast", None)
    if f is not None and c.uc is not None:
        return f
    f = c.__dict__.get("_fast")
    if f is None or c.uc is None or f[0]() is not c.uc:
        f = c._fast = (weakref.ref(c.uc), FastCpu(c.uc))
    return f[1]


def read_gprs(c: Any, gprs: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """The named registers of vCPU *c* (``_vcpu._GPRS``), as ``_read_gprs``."""
    values = fast_cpu(c).read_many(tuple(r for _n, r in gprs))
    return {n: v for (n, _r), v in zip(gprs, values)}


def write_gprs(c: Any, gprs: tuple[tuple[str, int], ...], values: dict[str, int]) -> None:
    """Write back what a trap handler left in *values*, as ``_write_gprs``."""
    pairs = [(r, values[n]) for n, r in gprs if values.get(n) is not None]
    fast_cpu(c).write_many(tuple(r for r, _v in pairs), [v for _r, v in pairs])


def changed_span(old: bytes, new: Any) -> tuple[int, int]:
    """``(lo, hi)``: the smallest range of offsets outside which *old* and
    *new* (byte strings of one length) agree, ``(0, 0)`` when they are
    equal -- the bytes whose translations a rewrite must drop."""
    x = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    if not x:
        return 0, 0
    return ((x & -x).bit_length() - 1) >> 3, (x.bit_length() + 7) >> 3
