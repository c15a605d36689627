# SPDX-License-Identifier: GPL-2.0-only
"""Two more patch sites for ``verify``, whose old and new instructions
differ in every displacement byte and straddle a fetch line: a CALL
retarget and a Jcc.d32 retarget.

The bundled workload's ``call`` and ``jcc32`` sites change one displacement
byte, which one store writes atomically: writing straight over them is
never caught.  Here, any mix of old and new displacement bytes -- what a
CPU fetches when one of the site's lines is refilled and the other is not,
or when it looks between two byte stores -- sends it into INT3 filler or
unmapped memory, where it oopses.

The code is built here, byte by byte, in the module (execmem) region,
before any CPU runs, and the workload loop reaches it through its optional
``sled_fn`` call; nothing of the bundled image changes, so the other
scenarios' schedules stay exactly what they were.  The two line boundaries
are page boundaries, so the sites straddle a line for every line size from
2 to 4096 bytes.
"""

from __future__ import annotations

import functools
import struct

from ._workload import MODULE_BASE, MODULE_SIZE, Site, Workload

__all__ = ["TEETH_SITES", "install_teeth", "teeth_code"]

#: (name, kind, site index in the per-CPU record)
TEETH_SITES = (("xline_call", "call", 8), ("xline_jcc32w", "jcc32", 9))

_B1 = MODULE_BASE + 0x8_0000          # the CALL straddles this boundary: E8 d0 | d1 d2 d3
_B2 = MODULE_BASE + 0x8_1000          # the Jcc straddles this one: 0F 84 d0 | d1 d2 d3
S_CALL = _B1 - 2
S_JCC = _B2 - 3
ENTRY = S_CALL - 2                     # xor eax, eax; then the CALL site
# Targets: old forward, new backward, so that all four displacement bytes differ.
C_OLD = S_CALL + 5 + 0x0001_2345
C_NEW = S_CALL + 5 - 0x0004_5678
J_OLD = S_JCC + 6 + 0x0002_3456
J_NEW = S_JCC + 6 - 0x0005_6789


def _rel32(frm_end: int, to: int) -> bytes:
    return struct.pack("<i", to - frm_end)


def _record(n: int) -> bytes:
    # and eax, 7; inc qword ptr [rbx + 64 + n*64 + rax*8]
    return b"\x83\xe0\x07" + b"\x48\xff\x84\xc3" + struct.pack("<i", 64 + n * 64)


_TEST_R12B_1 = b"\x41\xf6\xc4\x01"     # test r12b, 1


def _mov_eax(v: int) -> bytes:
    return b"\xb8" + struct.pack("<I", v)


@functools.cache
def teeth_code() -> tuple[tuple[int, bytes], ...]:
    """(address, bytes) pieces of the teeth function and its targets."""
    pieces = []
    # entry: xor eax, eax; call C_OLD; RECORD 8; jmp P2
    p2 = S_JCC - 6
    code = b"\x31\xc0" + b"\xe8" + _rel32(S_CALL + 5, C_OLD) + _record(8)
    jmp_at = ENTRY + len(code)
    code += b"\xe9" + _rel32(jmp_at + 5, p2)
    pieces.append((ENTRY, code))
    # P2: xor eax, eax; test r12b, 1; jz.d32 J_OLD; mov eax, 3; test r12b, 1; jnz join;
    #     mov eax, 4; join: RECORD 9; ret
    code = b"\x31\xc0" + _TEST_R12B_1 + b"\x0f\x84" + _rel32(S_JCC + 6, J_OLD)
    code += _mov_eax(3) + _TEST_R12B_1 + b"\x75\x05" + _mov_eax(4) + _record(9) + b"\xc3"
    join = p2 + len(code) - len(_record(9)) - 1
    pieces.append((p2, code))
    pieces.append((C_OLD, _mov_eax(1) + b"\xc3"))
    pieces.append((C_NEW, _mov_eax(2) + b"\xc3"))
    for at, v in ((J_OLD, 1), (J_NEW, 2)):
        # mov eax, v; test r12b, 1; jz +5; mov eax, 4 (taken on an odd
        # iteration: the wrong direction); jmp join
        body = _mov_eax(v) + _TEST_R12B_1 + b"\x74\x05" + _mov_eax(4)
        pieces.append((at, body + b"\xe9" + _rel32(at + len(body) + 5, join)))
    for at, b in pieces:
        assert MODULE_BASE <= at and at + len(b) <= MODULE_BASE + MODULE_SIZE
    return tuple(pieces)


def _sites() -> list[tuple[str, str, int, int, bytes, bytes]]:
    call_old = b"\xe8" + _rel32(S_CALL + 5, C_OLD)
    call_new = b"\xe8" + _rel32(S_CALL + 5, C_NEW)
    jcc_old = b"\x0f\x84" + _rel32(S_JCC + 6, J_OLD)
    jcc_new = b"\x0f\x84" + _rel32(S_JCC + 6, J_NEW)
    return [("xline_call", "call", 8, S_CALL, call_old, call_new),
            ("xline_jcc32w", "jcc32", 9, S_JCC, jcc_old, jcc_new)]


def install_teeth(w: Workload) -> list[Site]:
    """Write the teeth function into *w*'s module region (before its CPUs
    start), point the loop's ``sled_fn`` at it, and add its two sites to
    ``w.sites``/``w.by_name``."""
    sim = w.sim
    for at, b in teeth_code():
        sim.text_write_early(at, b)
    sim.mem_write(w.image.sym("sled_fn"), ENTRY.to_bytes(8, "little"))
    added = []
    for name, kind, index, addr, old, new in _sites():
        s = Site(index, name, addr, len(old), kind, old, new)
        w.sites.append(s)
        w.by_name[name] = s
        added.append(s)
    return added
