# SPDX-License-Identifier: GPL-2.0-only
"""text_poke_apply_relocation / optimize_nops / add_nop.

Unit tests pin each rule to concrete bytes; the property test relocates
random blocks of relative code by random distances and *runs* the original
and the copy in Unicorn, checking both reach the same absolute places and
compute the same values -- or that the relocation was refused exactly when
some displacement could not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import iced_x86 as I
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc, UcError
from unicorn import x86_const as X

from textpoke import add_nop, optimize_nops, text_poke_apply_relocation
from textpoke import BadInstructionError
from textpoke import (CALL_INSN_OPCODE, JMP8_INSN_OPCODE, JMP32_INSN_OPCODE,
                      insn_decode_kernel, text_gen_insn, x86_nops)

_ENC = I.Encoder(64)


def enc(ins: "I.Instruction", rip: int) -> bytes:
    _ENC.encode(ins, rip)
    return bytes(_ENC.take_buffer())


def jcc(cc: str, addr: int, dest: int, wide: bool) -> bytes:
    code = getattr(I.Code, f"J{cc}_REL32_64" if wide else f"J{cc}_REL8_64")
    return enc(I.Instruction.create_branch(code, dest), addr)


def lea_rip(reg: int, addr: int, dest: int) -> bytes:
    return enc(I.Instruction.create_reg_mem(I.Code.LEA_R64_M, reg, I.MemoryOperand(I.Register.RIP, displ=dest)), addr)


def targets(buf: bytes, base: int) -> list[int | None]:
    """Absolute branch / RIP-relative targets of every instruction of *buf* at *base*."""
    out, off = [], 0
    while off < len(buf):
        insn = insn_decode_kernel(buf[off:], base + off)
        if insn.branch_target is not None:
            out.append(insn.branch_target)
        elif insn.mnemonic in ("loop", "loope", "loopne", "jrcxz", "jecxz"):
            out.append(insn.end + (insn.immediate_value ^ 0x80) - 0x80)
        elif insn.rip_relative:
            out.append(insn.end + insn.displacement_value)
        off += insn.length
    return out


INT3 = b"\xcc"

# --------------------------------------------------------------------------
# add_nop
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(0, 12))
def test_add_nop_short_is_one_kernel_nop(n):
    buf = bytearray(b"\xaa" * 16)
    add_nop(buf, 2, n)
    assert buf[2:2 + n] == x86_nops[n]
    assert buf[:2] == b"\xaa\xaa" and buf[2 + n:] == b"\xaa" * (14 - n)


@pytest.mark.parametrize("n", [12, 40, 127])
def test_add_nop_long_jumps_over_int3(n):
    buf = bytearray(n)
    add_nop(buf, 0, n)
    assert buf[:2] == bytes([JMP8_INSN_OPCODE, n - 2])
    assert buf[2:] == INT3 * (n - 2)
    assert insn_decode_kernel(buf, 0x1000).branch_target == 0x1000 + n


def test_add_nop_beyond_rel8_uses_jmp32():
    buf = bytearray(200)
    add_nop(buf, 0, 200)
    assert buf[:5] == text_gen_insn(JMP32_INSN_OPCODE, 0, 200)
    assert buf[5:] == INT3 * 195


def test_add_nop_outside_buffer_refused():
    buf = bytearray(4)
    with pytest.raises(BadInstructionError):
        add_nop(buf, 2, 3)
    assert buf == bytearray(4)


# --------------------------------------------------------------------------
# optimize_nops
# --------------------------------------------------------------------------


def test_nop_run_merged_into_longest_nop():
    ret = b"\xc3"
    buf = bytearray(x86_nops[1] * 3 + x86_nops[2] + ret)
    optimize_nops(0, buf, len(buf))
    assert buf == x86_nops[5] + ret


def test_pause_is_not_a_nop():
    pause = b"\xf3\x90"
    buf = bytearray(x86_nops[1] + x86_nops[1] + pause + x86_nops[1] + x86_nops[1] + b"\xc3")
    optimize_nops(0, buf, len(buf))
    assert buf == x86_nops[2] + pause + x86_nops[2] + b"\xc3"


def test_rex_b_90_is_xchg_not_nop():
    xchg = enc(I.Instruction.create_reg_reg(I.Code.XCHG_R32_EAX, I.Register.R8D, I.Register.EAX), 0)
    assert xchg == b"\x41\x90"
    buf = bytearray(x86_nops[1] + xchg + x86_nops[1] + x86_nops[1] + b"\xc3")
    optimize_nops(0, buf, len(buf))
    assert buf == x86_nops[1] + xchg + x86_nops[2] + b"\xc3"


def test_nop_run_to_end_is_merged_but_lone_trailing_nop_kept():
    buf = bytearray(b"\xc3" + x86_nops[1] * 4)
    optimize_nops(0, buf, len(buf))
    assert buf == b"\xc3" + x86_nops[4]
    # A single NOP that ends the range is treated as already optimal.
    buf = bytearray(b"\xc3" + x86_nops[3])
    optimize_nops(0, buf, len(buf))
    assert buf == b"\xc3" + x86_nops[3]


def test_long_nop_run_becomes_jmp8_over_int3():
    buf = bytearray(x86_nops[8] * 3 + b"\xc3")
    optimize_nops(0, buf, len(buf))
    assert buf == bytes([JMP8_INSN_OPCODE, 22]) + INT3 * 22 + b"\xc3"


def test_optimize_nops_respects_length_and_is_idempotent():
    buf = bytearray(x86_nops[1] * 6)
    optimize_nops(0, buf, 4)
    assert buf == x86_nops[4] + x86_nops[1] * 2
    again = bytearray(buf)
    optimize_nops(0, again, 4)
    assert again == buf


def test_optimize_nops_stops_quietly_on_undecodable_bytes():
    # 06 (push es) is invalid in 64-bit mode.
    buf = bytearray(b"\x06" + x86_nops[1] * 3)
    optimize_nops(0, buf, len(buf))
    assert buf == b"\x06" + x86_nops[1] * 3


# --------------------------------------------------------------------------
# relocation
# --------------------------------------------------------------------------

REPL = 0x20_0000
INSTR = 0x10_0000


def test_call_outside_block_keeps_absolute_target():
    block = text_gen_insn(CALL_INSN_OPCODE, REPL, 0x30_0000)
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, 5, REPL, 5)
    assert buf[0] == CALL_INSN_OPCODE
    assert targets(bytes(buf), INSTR) == [0x30_0000]
    assert buf == text_gen_insn(CALL_INSN_OPCODE, INSTR, 0x30_0000)


def test_jcc32_and_rip_relative_outside_block():
    block = jcc("NE", REPL, 0x30_0000, True) + lea_rip(I.Register.RAX, REPL + 6, 0x40_1234)
    # cmp qword [rip+x], 5: the displacement is followed by an immediate, so
    # the target is measured from the very end of the instruction.
    cmp = enc(I.Instruction.create_mem_i32(I.Code.CMP_RM64_IMM8, I.MemoryOperand(I.Register.RIP, displ=0x50_0000), 5),
              REPL + len(block))
    block += cmp
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, len(block), REPL, len(block))
    assert targets(bytes(buf), INSTR) == [0x30_0000, 0x40_1234, 0x50_0000]
    assert buf[-1] == 5


def test_targets_inside_block_are_left_alone():
    # je +1 over a ret, lea of the block's own ret, a jmp to the very end of
    # the block (the kernel counts the end as inside).
    ret = b"\xc3"
    je = jcc("E", REPL, REPL + 3, False)
    lea = lea_rip(I.Register.RCX, REPL + 3, REPL + 2)
    jmp_end = jcc("NE", REPL + 10, REPL + 16, True)
    block = je + ret + lea + jmp_end
    assert len(block) == 16
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, len(block), REPL, len(block))
    assert buf == block
    assert targets(bytes(buf), INSTR) == [INSTR + 3, INSTR + 2, INSTR + 16]


def test_jmp32_shrinks_to_jmp8_plus_int3():
    # Assembled far away, but the target is 0x40 past the destination site.
    block = text_gen_insn(JMP32_INSN_OPCODE, REPL, INSTR + 0x40)
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, 5, REPL, 5)
    assert buf == bytes([0xEB, 0x3E]) + INT3 * 3
    assert targets(bytes(buf[:2]), INSTR) == [INSTR + 0x40]


def test_internal_jmp32_shrinks_too():
    block = text_gen_insn(JMP32_INSN_OPCODE, REPL, REPL + 6) + b"\xc3"
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, 6, REPL, 6)
    assert buf == bytes([0xEB, 0x04]) + INT3 * 3 + b"\xc3"


def test_prefixed_jmp32_shrink_keeps_target():
    block = b"\x2e" + text_gen_insn(JMP32_INSN_OPCODE, REPL + 1, INSTR + 0x20)
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, 6, REPL, 6)
    assert buf[:2] == bytes([0xEB, 0x1E]) and buf[2:] == INT3 * 4
    assert targets(bytes(buf[:2]), INSTR) == [INSTR + 0x20]


def test_far_jmp32_is_not_shrunk():
    block = text_gen_insn(JMP32_INSN_OPCODE, REPL, 0x90_0000)
    buf = bytearray(block)
    text_poke_apply_relocation(buf, INSTR, 5, REPL, 5)
    assert buf[0] == JMP32_INSN_OPCODE and targets(bytes(buf), INSTR) == [0x90_0000]


def test_rel8_overflow_refused_and_buf_untouched():
    block = jcc("E", REPL, REPL - 0x10, False) + b"\xc3"
    buf = bytearray(block + b"\x90" * 4)
    before = bytes(buf)
    with pytest.raises(BadInstructionError, match="does not fit 1 byte"):
        text_poke_apply_relocation(buf, INSTR, len(buf), REPL, len(block))
    assert buf == before


def test_rel32_overflow_refused_and_buf_untouched():
    far_instr = REPL + (1 << 31) + 0x1000
    block = x86_nops[1] * 2 + text_gen_insn(CALL_INSN_OPCODE, REPL + 2, REPL - 0x100)
    buf = bytearray(block)
    with pytest.raises(BadInstructionError, match="does not fit 4 byte"):
        text_poke_apply_relocation(buf, far_instr, len(block), REPL, len(block))
    assert buf == block  # not even the NOPs were merged


def test_rip_relative_overflow_refused():
    block = lea_rip(I.Register.RAX, REPL, REPL + 0x7000_0000)
    buf = bytearray(block)
    with pytest.raises(BadInstructionError, match="RIP-relative"):
        text_poke_apply_relocation(buf, REPL - 0x2000_0000, 7, REPL, 7)
    assert buf == block


def test_padding_nops_are_merged_after_relocation():
    call = text_gen_insn(CALL_INSN_OPCODE, REPL, 0x30_0000)
    buf = bytearray(call + x86_nops[1] * 5)
    text_poke_apply_relocation(buf, INSTR, 10, REPL, 5)
    assert buf == text_gen_insn(CALL_INSN_OPCODE, INSTR, 0x30_0000) + x86_nops[5]


def test_bytes_beyond_instrlen_untouched():
    buf = bytearray(x86_nops[1] * 3 + b"\xc3" + b"\xab" * 8)
    text_poke_apply_relocation(buf, INSTR, 4, REPL, 1)
    assert buf == x86_nops[3] + b"\xc3" + b"\xab" * 8


def test_replacement_longer_than_site_refused():
    buf = bytearray(x86_nops[1] * 6)
    with pytest.raises(BadInstructionError, match="does not fit"):
        text_poke_apply_relocation(buf, INSTR, 5, REPL, 6)
    assert buf == x86_nops[1] * 6


def test_short_buffer_refused():
    with pytest.raises(BadInstructionError):
        text_poke_apply_relocation(bytearray(3), INSTR, 5, REPL, 3)


def test_truncated_instruction_refused_and_buf_untouched():
    call = text_gen_insn(CALL_INSN_OPCODE, REPL, 0x30_0000)
    buf = bytearray(call)
    with pytest.raises(BadInstructionError, match="cannot decode"):
        text_poke_apply_relocation(buf, INSTR, 5, REPL, 4)  # block ends mid-CALL
    assert buf == call


def test_loop_is_relocated_like_jcc8():
    loop = enc(I.Instruction.create_branch(I.Code.LOOP_REL8_64_RCX, REPL + 0x40), REPL)
    buf = bytearray(loop)
    text_poke_apply_relocation(buf, REPL + 0x10, 2, REPL, 2)
    assert targets(bytes(buf), REPL + 0x10) == [REPL + 0x40]
    with pytest.raises(BadInstructionError):
        text_poke_apply_relocation(bytearray(loop), REPL + 0x1000, 2, REPL, 2)


# --------------------------------------------------------------------------
# Property: relocated code, executed, behaves like the original
# --------------------------------------------------------------------------

R_BASE = 0x1_0000_0000
FAR_BASE = R_BASE + 0x1000_0000      # far landing pads, rel32 reach only
NPADS = 16
STACK_TOP = 0x6000_0000_0000
STOP = 0x5000_0000_0000
PAGE = 0x1000
CCS = ["O", "NO", "B", "AE", "E", "NE", "BE", "A", "S", "NS", "P", "NP", "L", "GE", "LE", "G"]
REGS = [I.Register.RAX, I.Register.RCX, I.Register.RDX, I.Register.RSI, I.Register.RDI,
        I.Register.RBP, I.Register.R8, I.Register.R9, I.Register.R10, I.Register.R11,
        I.Register.R12, I.Register.R13]
UC_GPRS = [X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX,
           X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_RBP, X.UC_X86_REG_RSP,
           X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
           X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15]
RELATIVE = ("jcc8", "jcc32", "jmp8", "jmp32", "call")


def near_pads(repl: int) -> list[int]:
    """Landing pads right before the block, inside rel8 reach of its head."""
    return [repl - 0x40 + 4 * k for k in range(NPADS)]


def far_pads() -> list[int]:
    return [FAR_BASE + 16 * k for k in range(NPADS)]


@dataclass
class Item:
    kind: str
    tag: str        # where a branch goes: "near", "far" or "internal"
    pick: int       # which pad / which later boundary
    cc: str
    reg: int
    imm: int
    data: int       # lea: offset of the data target from repl


@dataclass
class Rel:
    """A relative reference in the generated block, for the oracle."""
    kind: str
    off: int        # offset of the instruction in the block
    end: int        # offset of its end
    size: int       # displacement field size
    target: int     # absolute target
    outside: bool


_item = st.builds(
    Item,
    kind=st.sampled_from(RELATIVE + ("call", "call", "lea", "lea", "nop", "flags", "pause")),
    tag=st.sampled_from(["near", "far", "internal"]),
    pick=st.integers(0, 1000),
    cc=st.sampled_from(CCS),
    reg=st.sampled_from(REGS),
    imm=st.integers(-128, 127),
    data=st.one_of(st.integers(0x1000, (1 << 31) - (1 << 16)),
                   st.integers(-(1 << 31) + (1 << 16), -0x1000)),
)


def _encode_item(it: Item, addr: int, dest: int) -> bytes:
    if it.kind in ("jcc8", "jcc32"):
        return jcc(it.cc, addr, dest, it.kind == "jcc32")
    if it.kind == "jmp8":
        return text_gen_insn(JMP8_INSN_OPCODE, addr, dest)
    if it.kind == "jmp32":
        return text_gen_insn(JMP32_INSN_OPCODE, addr, dest)
    if it.kind == "call":
        return text_gen_insn(CALL_INSN_OPCODE, addr, dest)
    if it.kind == "lea":
        # lea reg,[rip+x]; fold the address into rbx so no result is lost.
        code = lea_rip(it.reg, addr, dest)
        code += enc(I.Instruction.create_reg_reg(I.Code.XOR_RM64_R64, I.Register.RBX, it.reg), 0)
        return code + enc(I.Instruction.create_reg_u32(I.Code.ROL_RM64_IMM8, I.Register.RBX, 13), 0)
    if it.kind == "nop":
        return x86_nops[1 + it.pick % 11]
    if it.kind == "pause":
        return enc(I.Instruction.create(I.Code.PAUSE), 0)
    return enc(I.Instruction.create_reg_i32(I.Code.CMP_RM64_IMM8, it.reg, it.imm), 0)


def build_block(items: list[Item], repl: int) -> tuple[bytes, list[Rel]]:
    """Lay out *items* at *repl*, resolving each branch to a pad or to a later
    instruction boundary that a rel8/rel32 field can reach."""
    # Pass 1: sizes (every kind has a fixed size; encode against a dummy target).
    sizes = []
    for it in items:
        dummy = repl + 0x1000 if it.kind == "lea" else repl
        sizes.append(len(_encode_item(it, repl, dummy)))
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    n = len(items)
    # A branch may land on the end of the block or on a boundary that does
    # not sit inside a NOP run (optimize_nops would rewrite such a run).
    landable = [k for k in range(1, n + 1) if k == n or items[k - 1].kind != "nop"]

    code, rels = bytearray(), []
    for i, it in enumerate(items):
        addr = repl + offs[i]
        end = addr + sizes[i]
        dest, outside = None, True
        if it.kind in RELATIVE:
            short = it.kind in ("jcc8", "jmp8")
            reach = (lambda t: -128 <= t - end <= 127) if short else (lambda t: True)
            if it.tag == "far" and not short:
                dest = far_pads()[it.pick % NPADS]
            elif it.tag in ("near", "far"):
                ok = [p for p in near_pads(repl) if reach(p)]
                if ok:
                    dest = ok[it.pick % len(ok)]
            if dest is None and it.kind != "call":
                ok = [repl + offs[k] for k in landable if k > i and reach(repl + offs[k])]
                dest, outside = (ok[it.pick % len(ok)] if ok else end), False
            if dest is None:
                dest = far_pads()[it.pick % NPADS]
        elif it.kind == "lea":
            dest = repl + it.data
        b = _encode_item(it, addr, dest if dest is not None else end)
        assert len(b) == sizes[i]
        if dest is not None:
            field = 1 if it.kind in ("jcc8", "jmp8") else 4
            rel_end = offs[i] + (7 if it.kind == "lea" else sizes[i])
            rels.append(Rel(it.kind, offs[i], rel_end, field, dest, outside))
        code += b
    return bytes(code), rels


def run(code: bytes, base: int, repl: int, regs0: list[int]) -> tuple:
    """Run *code* placed at *base* as a function; return what it touched
    outside itself (pads, end of block) and its final registers."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    pages = set()
    for start, size in [(repl - 0x40, 0x40), (FAR_BASE, 16 * NPADS), (base, len(code) + 1),
                        (STACK_TOP - PAGE, PAGE), (STOP, 1)]:
        pages.update(range(start // PAGE, (start + size - 1) // PAGE + 1))
    for p in sorted(pages):
        uc.mem_map(p * PAGE, PAGE)
    for pad in near_pads(repl):
        uc.mem_write(pad, b"\xc3" + INT3 * 3)
    for pad in far_pads():
        uc.mem_write(pad, b"\xc3" + INT3 * 15)
    uc.mem_write(base, code + b"\xc3")

    trace = []
    pad_index = {a: ("near", k) for k, a in enumerate(near_pads(repl))}
    pad_index.update({a: ("far", k) for k, a in enumerate(far_pads())})

    def hook(_uc, addr, _size, _user):
        if addr in pad_index:
            trace.append(pad_index[addr])
        elif addr == base + len(code):
            trace.append(("end",))
        elif not base <= addr < base + len(code):
            trace.append(("stray", addr))

    uc.hook_add(UC_HOOK_CODE, hook)
    for r, v in zip(UC_GPRS, regs0):
        uc.reg_write(r, v)
    uc.reg_write(X.UC_X86_REG_RSP, STACK_TOP - 64)
    uc.mem_write(STACK_TOP - 64, STOP.to_bytes(8, "little"))
    try:
        uc.emu_start(base, STOP, count=10_000)
        outcome = "ok" if uc.reg_read(X.UC_X86_REG_RIP) == STOP else "ran-out"
    except UcError as e:
        outcome = f"fault: {e}"
    regs = [uc.reg_read(r) for r in UC_GPRS] + [uc.reg_read(X.UC_X86_REG_EFLAGS)]
    return outcome, trace, regs


def _fits(v: int, size: int) -> bool:
    return -(1 << (8 * size - 1)) <= v < (1 << (8 * size - 1))


_delta = st.one_of(
    st.just(0),
    st.integers(1, 160),                                   # overlapping, rel8 sometimes still fits
    st.integers(0x100, 1 << 27).flatmap(lambda d: st.sampled_from([d, -d])),
    st.integers(-256, 256).map(lambda d: 0x9000_0000 + d),     # far pads cross +/-2 GiB here
    st.integers(-256, 256).map(lambda d: -0x7000_0000 + d),
    st.integers(-(1 << 32) + (1 << 20), 1 << 33),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_item, min_size=1, max_size=12), r_off=st.integers(0, 63), delta=_delta,
       regs0=st.lists(st.integers(0, (1 << 64) - 1), min_size=16, max_size=16))
def test_relocated_block_behaves_like_original(items, r_off, delta, regs0):
    repl = R_BASE + 0x80 + r_off
    instr = repl + delta
    code, rels = build_block(items, repl)
    # The copy must not overwrite the landing pads.
    assume(not (instr < repl and instr + len(code) + 1 > repl - 0x40))
    assume(not (instr < FAR_BASE + 16 * NPADS and instr + len(code) + 1 > FAR_BASE))

    buf = bytearray(code)
    must_fail = any(r.outside and not _fits(r.target - (instr + r.end), r.size) for r in rels)
    event("refused" if must_fail else "relocated")
    if must_fail:
        with pytest.raises(BadInstructionError):
            text_poke_apply_relocation(buf, instr, len(code), repl, len(code))
        assert buf == code
        return
    text_poke_apply_relocation(buf, instr, len(code), repl, len(code))
    assert len(buf) == len(code)

    # Every JMP32 became JMP8 + INT3 exactly when its new target fits rel8.
    for r in rels:
        if r.kind == "jmp32":
            disp = r.target - (instr + r.end) if r.outside else r.target - (repl + r.end)
            if _fits(disp + 3, 1):
                event("jmp32 shrunk")
                assert buf[r.off] == JMP8_INSN_OPCODE and buf[r.off + 2:r.end] == INT3 * 3
            else:
                assert buf[r.off] == JMP32_INSN_OPCODE

    want = run(code, repl, repl, regs0)
    assert want[0] == "ok", want
    event(f"places reached outside the block: {min(len(want[1]), 4)}")
    got = run(bytes(buf), instr, repl, regs0)
    assert got == want
