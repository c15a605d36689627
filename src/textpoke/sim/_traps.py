# SPDX-License-Identifier: GPL-2.0-only
"""Traps and faults of the sim machine: the oops record, walking the trap
chain for a CPU that hit an INT3 (one step per scheduler turn), and call():
a guest function run to completion outside the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from unicorn import UcError

from .._core._emulate import PtRegs
from .._core._machine import Task, WaitUntil, drive
from .._core._signals import uninterruptible
from .._errors import MachineError
from ._ucfast import fast_cpu
from ._vcpu import _ACCESS, _GPRS, _REG_NAMES, DEAD, RUN, VCpu, _fault_kind, _read_gprs, _write_gprs

__all__ = ["Oops", "CODE_PROLOGUE", "CODE_EPILOGUE"]

_RIP, _RSP, _RFLAGS = _REG_NAMES["rip"], _REG_NAMES["rsp"], _REG_NAMES["rflags"]

#: Bytes of this CPU's view kept around RIP in an oops, as the kernel's
#: ``show_opcodes`` prints them: 42 before RIP, the byte at RIP, 21 after.
CODE_PROLOGUE, CODE_EPILOGUE = 42, 21


@dataclass(frozen=True, slots=True)
class Oops:
    """An unhandled trap or fault: the CPU stopped, as a kernel oops.

    ``addr`` is the faulting data address of a page fault (None otherwise)
    and ``access`` what was tried there (``"write"``, ``"read"``,
    ``"fetch"``, with ``"-unmapped"`` or ``"-prot"``).  ``code`` holds the
    bytes this CPU's view had around RIP -- what it executed -- starting at
    ``code_start``."""

    cpu: int
    kind: str
    rip: int
    bytes_at_rip: bytes
    regs: dict[str, int]
    step: int
    detail: str = ""
    addr: int | None = None
    access: str = ""
    code: bytes = b""
    code_start: int = 0

    def as_dict(self) -> dict:
        return {"cpu": self.cpu, "kind": self.kind, "rip": self.rip,
                "bytes": self.bytes_at_rip.hex(), "regs": self.regs, "step": self.step,
                "detail": self.detail, "addr": self.addr, "access": self.access,
                "code": self.code.hex(), "code_start": self.code_start}

    def __str__(self) -> str:
        at = f" (address {self.addr:#x})" if self.addr is not None else ""
        return (f"oops on cpu{self.cpu}: {self.kind} at {self.rip:#x}{at} "
                f"[{self.bytes_at_rip.hex(' ')}] {self.detail}".rstrip())


class _Traps:
    """SimMachine's trap half (a mixin)."""

    def _oops(self, c: VCpu, kind: str, detail: str = "", rip: int | None = None) -> None:
        if rip is None:
            rip = c.reg("rip")
        addr = access = None
        if c.fault is not None:
            acc, addr = c.fault
            access = _ACCESS.get(acc, str(acc))
            c.fault = None
        raw, code, code_start = b"", b"", rip
        for i, r in enumerate(self._text):
            if r.start <= rip < r.start + r.size:
                view = c.views[i]
                raw = bytes(view[rip - r.start: min(r.size, rip - r.start + 8)])
                code_start = max(r.start, rip - CODE_PROLOGUE)
                code_end = min(r.start + r.size, rip + CODE_EPILOGUE + 1)
                code = bytes(view[code_start - r.start: code_end - r.start])
                break
        o = Oops(c.id, kind, rip, raw, c.regs_dict(), self.steps, detail,
                 addr, access or "", code, code_start)
        self.oopses.append(o)
        c.state = DEAD
        for _due, ack in c.ipis:   # a stopped CPU fetches nothing more: count it as synced
            ack()
        c.ipis.clear()
        c.trap_task = None
        if self.trace is not None:
            self.trace.append(("oops", self.steps, c.id, kind, rip))


    def _run_trap_chain(self, regs: PtRegs) -> Task:
        # the chain is walked by the protocol's base (Machine.walk_trap_chain)
        return (yield from self.walk_trap_chain(regs))

    def _trap_step(self, c: VCpu) -> None:
        try:
            item = next(c.trap_task)
            if isinstance(item, WaitUntil):
                raise MachineError("a trap handler may not sleep")
            return
        except StopIteration as stop:
            handler = stop.value
        c.trap_task = None
        r = c.trap_regs
        if handler is None:
            if self.trace is not None:
                self.trace.append(("unhandled", self.steps, c.id, r.ip - 1))
            c.state = RUN
            c.set_reg("rip", r.ip - 1)
            self._oops(c, "int3", "unhandled INT3", rip=r.ip - 1)
            return
        # rip, rsp, rflags, then what the handler left in the GPRs: one call
        g = r.gprs
        ids, vals = [_RIP, _RSP, _RFLAGS], [r.ip, r.sp, r.flags]
        for n, reg in _GPRS:
            v = g.get(n)
            if v is not None:
                ids.append(reg)
                vals.append(v)
        fast_cpu(c).write_many(tuple(ids), vals)
        c.state = RUN
        if self.trace is not None:
            self.trace.append(("iret", self.steps, c.id, handler.name, r.ip))
        self._serialise(c)     # IRET serialises


    def call(self, addr: int, *args: int, cpu: int = 0, max_insns: int = 1_000_000) -> int:
        """Run the guest function at *addr* to completion on *cpu* and return
        %rax -- for boot-time use, outside the scheduler (nothing else runs).
        Arguments go in rdi, rsi, rdx, rcx, r8, r9.  INT3 traps go through
        the trap chain as usual; an unhandled trap raises MachineError."""
        c = self._vcpu(cpu)
        if c.state == DEAD:
            raise MachineError(f"cpu{cpu} is dead")
        saved = c.regs_dict()
        sentinel = self._ranges[0].end - 1   # INT3 padding: stopping there is enough
        sp = self._stack_top(cpu) - 256
        sp -= 8
        self.mem_write(sp, sentinel.to_bytes(8, "little"))
        for name, val in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            c.set_reg(name, val & ((1 << 64) - 1))
        c.set_reg("rsp", sp)
        rip = addr
        budget = max_insns
        try:
            while True:
                c.pending_intr = None
                try:
                    with uninterruptible(c.uc.emu_stop):
                        c.uc.emu_start(rip, sentinel, count=budget)
                except UcError as e:
                    where = ""
                    if c.fault is not None:
                        where = f" ({_ACCESS.get(c.fault[0], '?')} at {c.fault[1]:#x})"
                        c.fault = None
                    raise MachineError(f"{_fault_kind(e)}{where} at {c.reg('rip'):#x} while calling "
                                       f"{addr:#x}: {e}") from None
                rip = c.reg("rip")
                if rip == sentinel:
                    return c.reg("rax")
                if c.pending_intr is None:
                    raise MachineError(f"call to {addr:#x} did not return within {max_insns} instructions")
                if c.pending_intr != 3:
                    raise MachineError(f"trap {c.pending_intr} at {rip:#x} while calling {addr:#x}")
                regs = PtRegs(ip=rip, sp=c.reg("rsp"), flags=c.reg("rflags"), mem=self._mem, cpu=cpu,
                              gprs=_read_gprs(c.uc))
                handled = drive(self._run_trap_chain(regs))
                if handled is None:
                    raise MachineError(f"unhandled INT3 at {rip - 1:#x} while calling {addr:#x}")
                c.set_reg("rsp", regs.sp)
                c.set_reg("rflags", regs.flags)
                _write_gprs(c.uc, regs.gprs)
                rip = regs.ip
                self._serialise(c)
        finally:
            rax = c.reg("rax")
            for name, val in saved.items():
                c.set_reg(name, val)
            c.set_reg("rax", rax)
