# SPDX-License-Identifier: GPL-2.0-only
"""The boot self-tests: ``int3_selftest`` before anything is patched and
``alt_reloc_selftest`` after.  Both run guest code, so they need a machine
that declares :attr:`Capability.CALL` (and SCRATCH for the INT3 test's
out-parameter); on any other machine they are skipped with the reason."""

from __future__ import annotations

from typing import Mapping

from .._core import TextPoke
from .._core._emulate import PtRegs, int3_emulate_call
from .._core._insn import INT3_INSN_SIZE
from .._core._machine import Capability, Task, TrapPriority
from .._errors import MachineError, NotSupportedError
from ._records import SelfTest
from ._shadow import SymbolSource, symbols_of

__all__ = ["int3_selftest", "alt_reloc_selftest"]

_INT3_VAL_SIZE = 4                   # the C test's "unsigned int val"


def _unsupported(core: TextPoke, name: str, *caps: Capability) -> SelfTest | None:
    """A not-run record when the machine lacks one of *caps*, else None."""
    try:
        for cap in caps:
            core.machine.require(cap, name)
    except NotSupportedError as e:
        return SelfTest(name, None, str(e))
    return None


def int3_selftest(core: TextPoke, image: SymbolSource | Mapping[str, int] | None) -> SelfTest:
    """Run the image's ``int3_selftest(&val)``: its INT3 at
    ``int3_selftest_ip`` must act as ``call int3_magic`` (which stores 1)
    once a trap handler emulates the CALL -- the same emulation the SMP
    batch relies on while a site is in flux.  The handler sits on the chain
    as a die notifier does in the kernel, after the text-poke and kprobes
    handlers, for the duration of the call only."""
    name = "int3_selftest"
    sym = symbols_of(image)
    fn, ip, magic = sym.get("int3_selftest"), sym.get("int3_selftest_ip"), sym.get("int3_magic")
    if fn is None or ip is None or magic is None:
        return SelfTest(name, None, "the image has no int3_selftest/int3_selftest_ip/int3_magic")
    skipped = _unsupported(core, name, Capability.CALL, Capability.SCRATCH)
    if skipped is not None:
        return skipped
    machine = core.machine
    val = machine.scratch(_INT3_VAL_SIZE)
    hits = []

    def int3_exception_notify(regs: PtRegs) -> Task:
        if regs.user_mode or regs.ip - INT3_INSN_SIZE != ip:
            return False
        hits.append(regs.cpu)
        int3_emulate_call(regs, magic)
        return True
        yield  # a trap handler is a generator (it never needs to wait)

    machine.mem.write(val, bytes(_INT3_VAL_SIZE))
    with machine.register_trap_handler(int3_exception_notify, priority=TrapPriority.NOTIFIER,
                                       name="int3_exception_notify"):
        try:
            machine.call(fn, val)
        except MachineError as e:
            return SelfTest(name, False, f"INT3 at {ip:#x} was not emulated: {e}")
    got = int.from_bytes(machine.mem.read(val, _INT3_VAL_SIZE), "little")
    ok = got == 1 and len(hits) == 1
    return SelfTest(name, ok, f"INT3 at {ip:#x} emulated as call {sym(magic)}: val = {got}"
                    + ("" if ok else f" (expected 1, handler hits {len(hits)})"), got)


_RELOC_RESULTS = {0: "the replacement was not patched in",
                  1: "LEA and CALL reached their targets",
                  2: "the LEA computed a wrong address"}


def alt_reloc_selftest(core: TextPoke, image: SymbolSource | Mapping[str, int] | None) -> SelfTest:
    """Run the image's ``alt_reloc_selftest()`` after patching: 1 means the
    replacement's RIP-relative LEA and its CALL both still reached their
    targets from the site; 2 a wrong address; 0 an unpatched site."""
    name = "alt_reloc_selftest"
    fn = symbols_of(image).get("alt_reloc_selftest")
    if fn is None:
        return SelfTest(name, None, "the image has no alt_reloc_selftest")
    skipped = _unsupported(core, name, Capability.CALL)
    if skipped is not None:
        return skipped
    try:
        got = core.machine.call(fn) & 0xFFFFFFFF
    except MachineError as e:
        return SelfTest(name, False, f"alt_reloc_selftest crashed: {e}")
    return SelfTest(name, got == 1,
                    f"returned {got}: {_RELOC_RESULTS.get(got, 'unexpected result')}", got)
