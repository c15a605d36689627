# SPDX-License-Identifier: GPL-2.0-only
"""Guest functions for the kprobes self-tests, generated into execmem at
run time (hand-assembled x86-64; the bundled image is not changed).

* ``kprobe_target(v)``  = v / 3, with ``div dword [rip+div_factor]``
  (lib/test_kprobes.c's target, and a RIP-relative operand to copy out of
  line);
* ``kprobe_target2(v)`` = v / 3 + 1;
* ``kp_opt_target(x)``  = x + 1007: ``xor eax,eax; mov rax,[rip+K]`` (K =
  1000) ``; call kp_helper`` (adds 7) ``; lock inc qword [rip+counter];
  add rax,rdi; ret`` -- a RIP-relative load and a CALL among its first
  instructions, and a guest counter of its calls;
* ``kp_abs(x)``         = |x|, with a Jcc;
* ``kp_jump_in``, ``kp_indirect``, ``kp_int3_range``: functions an
  optimised probe must refuse (a jump into the range, an indirect jump,
  INT3 in the range).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["GuestFunctions", "build_guest_functions", "DIV_FACTOR", "OPT_K", "HELPER_ADD"]

DIV_FACTOR = 3
OPT_K = 1000
HELPER_ADD = 7
_DATA = 0x0500_0000
_DATA_SIZE = 0x1000


@dataclass
class GuestFunctions:
    base: int
    funcs: dict[str, tuple[int, int]]     # name -> (addr, size)
    counter: int                          # u64 in guest data: calls of kp_opt_target
    data: int

    def addr(self, name: str) -> int:
        return self.funcs[name][0]

    def opt_calls(self, machine) -> int:
        return int.from_bytes(machine.mem.read(self.counter, 8), "little")


def _rel32(frm_next: int, to: int) -> bytes:
    return struct.pack("<i", to - frm_next)


def build_guest_functions(kp, machine, *, data: int = _DATA) -> GuestFunctions:
    """Write the functions into *kp*'s execmem (text_poke_copy), make them
    probe-able by name, and map a data page for the counter (the machine's
    ``DATA`` capability)."""
    code_addr = kp.execmem.alloc(1024)
    data = machine.map_data(_DATA_SIZE, "kprobes-test", data)
    counter = data
    machine.mem.write(counter, bytes(8))
    out = bytearray()
    funcs: dict[str, tuple[int, int]] = {}

    def here() -> int:
        return code_addr + len(out)

    def align(n: int = 16) -> None:
        while len(out) % n:
            out.append(0xCC)

    # constants first, so that RIP-relative references go backwards
    div_at = here()
    out += struct.pack("<I", DIV_FACTOR)
    align()
    k_at = here()
    out += struct.pack("<Q", OPT_K)
    align()

    def div_fn(name: str, plus_one: bool) -> None:
        a = here()
        out.extend(b"\x89\xf8")                      # mov eax, edi
        out.extend(b"\x31\xd2")                      # xor edx, edx
        out.extend(b"\xf7\x35" + _rel32(here() + 6, div_at))   # div dword [rip+div_factor]
        if plus_one:
            out.extend(b"\x83\xc0\x01")              # add eax, 1
        out.extend(b"\xc3")
        funcs[name] = (a, here() - a)
        align()

    div_fn("kprobe_target", False)
    div_fn("kprobe_target2", True)

    helper = here()
    out.extend(b"\x48\x83\xc0" + bytes([HELPER_ADD]))   # add rax, 7
    out.extend(b"\xc3")
    funcs["kp_helper"] = (helper, here() - helper)
    align()

    a = here()
    out.extend(b"\x31\xc0")                                        # xor eax, eax
    out.extend(b"\x48\x8b\x05" + _rel32(here() + 7, k_at))         # mov rax, [rip+K]
    out.extend(b"\xe8" + _rel32(here() + 5, helper))               # call kp_helper
    out.extend(b"\xf0\x48\xff\x05" + _rel32(here() + 8, counter))  # lock inc qword [rip+counter]
    out.extend(b"\x48\x01\xf8")                                    # add rax, rdi
    out.extend(b"\xc3")
    funcs["kp_opt_target"] = (a, here() - a)
    align()

    a = here()
    out.extend(b"\x48\x85\xff")          # test rdi, rdi
    out.extend(b"\x78\x04")              # js neg
    out.extend(b"\x48\x89\xf8")          # mov rax, rdi
    out.extend(b"\xc3")
    out.extend(b"\x48\x89\xf8")          # neg: mov rax, rdi
    out.extend(b"\x48\xf7\xd8")          # neg rax
    out.extend(b"\xc3")
    funcs["kp_abs"] = (a, here() - a)
    align()

    a = here()
    out.extend(b"\x31\xc0")              # xor eax, eax
    out.extend(b"\xff\xc0")              # again: inc eax      (a + 2: inside [a+1, a+5))
    out.extend(b"\xff\xcf")              # dec edi
    out.extend(b"\x7f\xfa")              # jg again
    out.extend(b"\xc3")
    funcs["kp_jump_in"] = (a, here() - a)
    align()

    a = here()
    out.extend(b"\x48\x89\xf8")          # mov rax, rdi
    out.extend(b"\x48\x83\xc0\x02")      # add rax, 2
    out.extend(b"\xc3")
    out.extend(b"\xff\xe0")              # jmp rax (never reached; a jump table's shape)
    funcs["kp_indirect"] = (a, here() - a)
    align()

    a = here()
    out.extend(b"\x89\xf8")              # mov eax, edi
    out.extend(b"\xc3")
    out.extend(b"\xcc\xcc\xcc\xcc\xcc")  # padding inside the symbol's size
    funcs["kp_int3_range"] = (a, here() - a)
    align()

    if len(out) > 1024:  # pragma: no cover - a programming error
        raise AssertionError("guest functions overflow their chunk")
    kp.core.text_poke_copy(code_addr, bytes(out))
    kp.core.smp_text_poke_sync_each_cpu()      # no CPU may run what it fetched before
    for n, (fa, sz) in funcs.items():
        kp.add_function(n, fa, sz)
    return GuestFunctions(code_addr, funcs, counter, data)
