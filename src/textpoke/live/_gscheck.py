# SPDX-License-Identifier: GPL-2.0-only
"""The one check injected code makes before it follows a thread's GS base.

``live probe``'s recorder and ``live trace``'s runtime find a thread's
ring through its GS base (the machine's ``PERCPU``: x86-64 user code leaves
%gs to whoever wants it).  A program may set a thread's GS base itself
after we gave it one (``arch_prctl(ARCH_SET_GS)``, or a thread it makes
then, which inherits it); following that base would take the program's
memory for a ring header and write into it (or fault).  So the base is
first read without being followed -- RDGSBASE where the kernel enabled it
in user mode (AT_HWCAP2 bit 1, :func:`._probe_opt.fsgsbase`), else
``arch_prctl(ARCH_GET_GS)`` (:func:`read_gs_syscall`) -- and followed only
when it lies among our ring headers ``[lo, hi)`` (two instructions with
immediates written in at generation) and the header's first word is its
own address.  What a caller does with a base that is not ours is its own
(the probe: the spare ring with ``gettid``; the trace: a sink record and
a counter of missed calls).

Hand-assembled here for any 64-bit register pair, so both users emit the
very same instructions (no kernel code; encodings from the SDM).
"""

from __future__ import annotations

import struct

__all__ = ["rdgsbase", "gs_range_check", "read_gs_syscall", "push", "pop", "movabs"]

_M64 = (1 << 64) - 1
_RSP, _RBP = 4, 5


def _rex(w: int, r: int = 0, b: int = 0) -> bytes:
    return bytes((0x40 | w << 3 | (r >> 3) << 2 | (b >> 3),))


def rdgsbase(reg: int) -> bytes:
    """``rdgsbase %reg`` (64-bit)."""
    return b"\xf3" + _rex(1, 0, reg) + b"\x0f\xae" + bytes((0xC8 | reg & 7,))


def movabs(imm: int, reg: int) -> bytes:
    """``movabs $imm,%reg``."""
    return _rex(1, 0, reg) + bytes((0xB8 | reg & 7,)) + struct.pack("<Q", imm & _M64)


def push(reg: int) -> bytes:
    return (b"\x41" if reg >= 8 else b"") + bytes((0x50 | reg & 7,))


def pop(reg: int) -> bytes:
    return (b"\x41" if reg >= 8 else b"") + bytes((0x58 | reg & 7,))


def _cmp_self(reg: int) -> bytes:
    """``cmp %reg,(%reg)``: the header's first word is its own address."""
    rm = reg & 7
    if rm == _RSP:                              # rsp/r12: a SIB byte
        return _rex(1, reg, reg) + b"\x39" + bytes((rm << 3 | 4, 0x24))
    if rm == _RBP:                              # rbp/r13: mod 01, disp8 0
        return _rex(1, reg, reg) + b"\x39" + bytes((0x40 | rm << 3 | rm, 0))
    return _rex(1, reg, reg) + b"\x39" + bytes((rm << 3 | rm,))


def gs_range_check(reg: int, scratch: int, lo: int, hi: int, *, miss: int,
                   hit: int | None = None) -> bytes:
    """The check of a GS base already in *reg* (clobbering *scratch* and
    the flags)::

        movabs $-LO,%scratch; add %reg,%scratch    # base - lo
        cmp $SPAN,%scratch; jae MISS               # not among [lo, hi)
        cmp %reg,(%reg)                            # a header's self-pointer
        jne MISS          (hit None: a base of ours falls through)
        je  HIT           (else: a base not ours falls through)

    *miss* and *hit* are byte offsets from the end of the emitted code
    (>= 0, rel8).  ``lo = hi = 0`` gives the shape with zero immediates
    (a listing, a size); the caller checks a real span (under 2 GiB)."""
    if reg == scratch or not (0 <= reg < 16 and 0 <= scratch < 16) or _RSP in (reg, scratch):
        raise ValueError(f"registers {reg}, {scratch}: two distinct, neither %rsp")
    span = hi - lo
    if not 0 <= span < 1 << 31:
        raise ValueError(f"ring headers {lo:#x}-{hi:#x}: a span under 2 GiB")
    head = (movabs(-lo, scratch) + _rex(1, reg, scratch) + b"\x01" + bytes((0xC0 | (reg & 7) << 3 | scratch & 7,))
            + _rex(1, 0, scratch) + b"\x81" + bytes((0xF8 | scratch & 7,)) + struct.pack("<I", span))
    cmp = _cmp_self(reg)
    last = 0x75 if hit is None else 0x74           # jne MISS / je HIT
    far = miss if hit is None else hit
    jae_rel = len(cmp) + 2 + miss                 # from the end of the jae to MISS
    if not (0 <= far < 128 and 0 <= jae_rel < 128):
        raise ValueError("a check's targets out of rel8 reach")
    return head + bytes((0x73, jae_rel)) + cmp + bytes((last, far))


#: the registers ``arch_prctl`` touches (number, return, clobbered, arguments)
_SYSCALL_REGS = (0, 1, 7, 6, 11)                  # rax, rcx, rdi, rsi, r11
_ARCH_PRCTL, _ARCH_GET_GS = 158, 0x1004


def read_gs_syscall(reg: int) -> bytes:
    """The GS base into *reg* without RDGSBASE: ``arch_prctl(ARCH_GET_GS,
    &slot)`` on a stack slot first zeroed (a failed call -- a seccomp
    filter, say -- leaves 0, which no check takes for ours); every
    register but *reg* kept (flags not).  A system call per read: what a
    CPU or kernel without FSGSBASE in user mode costs."""
    saved = [r for r in _SYSCALL_REGS if r != reg]
    code = b"".join(push(r) for r in saved)
    code += b"\x6a\x00"                            # push $0: the slot
    code += b"\xb8" + struct.pack("<I", _ARCH_PRCTL)          # mov $158,%eax
    code += b"\xbf" + struct.pack("<I", _ARCH_GET_GS)         # mov $ARCH_GET_GS,%edi
    code += b"\x48\x89\xe6\x0f\x05"                # mov %rsp,%rsi; syscall
    code += pop(reg)
    code += b"".join(pop(r) for r in reversed(saved))
    return code
