# SPDX-License-Identifier: GPL-2.0-only
"""int3_emulate_*: checked against a real CPU model (Unicorn)."""

from hypothesis import given
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from textpoke.lowlevel import (PtRegs, int3_emulate_call, int3_emulate_jcc, int3_emulate_jmp,
                      int3_emulate_pop, int3_emulate_push, int3_emulate_ret, jcc_taken)

FLAG_BITS = (0, 2, 6, 7, 11)   # CF PF ZF SF OF


class Mem:
    def __init__(self):
        self.d = {}

    def read(self, addr, n):
        return bytes(self.d.get(addr + i, 0) for i in range(n))

    def write(self, addr, data):
        for i, b in enumerate(data):
            self.d[addr + i] = b


def _flags(bits):
    return 0x2 | sum(1 << b for b, on in zip(FLAG_BITS, bits) if on)


_uc = Uc(UC_ARCH_X86, UC_MODE_64)
_uc.mem_map(0x1000, 0x1000, UC_PROT_ALL)


def _cpu_takes_jcc(cc, flags):
    """Execute Jcc.d8 +0x10 on Unicorn with the given RFLAGS."""
    _uc.mem_write(0x1000, bytes([0x70 | cc, 0x10]))
    _uc.ctl_remove_cache(0x1000, 0x1010)
    _uc.reg_write(X.UC_X86_REG_EFLAGS, flags)
    _uc.emu_start(0x1000, 0, count=1)
    return _uc.reg_read(X.UC_X86_REG_RIP) == 0x1012


@given(st.integers(0, 15), st.tuples(*[st.booleans()] * 5))
def test_jcc_condition_matches_the_cpu(cc, bits):
    flags = _flags(bits)
    assert jcc_taken(flags, cc) == _cpu_takes_jcc(cc, flags)


@given(st.integers(0, 15), st.tuples(*[st.booleans()] * 5), st.integers(-(1 << 31), (1 << 31) - 1))
def test_int3_emulate_jcc(cc, bits, disp):
    regs = PtRegs(ip=0x5001, sp=0x8000, flags=_flags(bits), mem=Mem())
    int3_emulate_jcc(regs, cc, 0x5006, disp)
    assert regs.ip == ((0x5006 + disp) & ((1 << 64) - 1) if jcc_taken(regs.flags, cc) else 0x5006)


@given(st.integers(0, (1 << 64) - 1))
def test_push_pop_round_trip(val):
    regs = PtRegs(ip=0, sp=0x8000, flags=2, mem=Mem())
    int3_emulate_push(regs, val)
    assert regs.sp == 0x7FF8
    assert int3_emulate_pop(regs) == val and regs.sp == 0x8000


def test_call_pushes_the_address_after_the_site_then_ret_returns_there():
    mem = Mem()
    site = 0x4000
    regs = PtRegs(ip=site + 1, sp=0x8000, flags=2, mem=mem)   # trap ip: after the INT3
    int3_emulate_call(regs, 0x6000)
    assert regs.ip == 0x6000 and regs.sp == 0x7FF8
    assert int.from_bytes(mem.read(0x7FF8, 8), "little") == site + 5
    int3_emulate_ret(regs)
    assert regs.ip == site + 5 and regs.sp == 0x8000


def test_jmp():
    regs = PtRegs(ip=1, sp=0, flags=2, mem=Mem())
    int3_emulate_jmp(regs, 0x1234)
    assert regs.ip == 0x1234
