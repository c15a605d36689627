# SPDX-License-Identifier: GPL-2.0-only
"""``live trace --profile``: the return hook that times functions (the
kernel's profiler takes its times from fgraph's return hook) and the undoing
of the return addresses it hooked."""

from __future__ import annotations

import struct

from .._errors import TextPokeError

__all__ = ["PROFILE_CODE", "SHADOW_N", "unhook_returns", "NOP4"]


# --- the profiler's time: a return hook (the kernel's profiler uses fgraph) ----
#: ``live_profile_call`` and ``live_return_handler``, position-independent,
#: hand-written (GNU as, then the bytes; no code of the kernel's):
#:
#:   live_profile_call:                  # (ip, parent_ip, op), from ftrace_caller
#:     push %rdi; push %rsi; sub $8,%rsp
#:     call *T_FPC(%rip)                 # function_profile_call: the hit
#:     add $8,%rsp; pop %rsi; pop %rdi
#:     lea 96(%rsp),%r9                  # the traced function's return address
#:     cmp %rsi,(%r9); jne 9f            #   (only in ftrace_caller's frame)
#:     mov %gs:0,%r8                     # this thread's ftrace_cpu
#:     mov 96(%r8),%rcx; cmp 104(%r8),%rcx; jae 9f   # its return stack full
#:     (binary search of ip in *T_IPS[0..*T_N) -> %rax; jne 9f if absent)
#:     mov %rsi,0(%rcx); mov %r9,8(%rcx); mov %rax,16(%rcx)
#:     rdtsc; shl $32,%rdx; or %rdx,%rax; mov %rax,24(%rcx)
#:     add $32,%rcx; mov %rcx,96(%r8)    # pushed
#:     lea live_return_handler(%rip),%rax; mov %rax,(%r9)   # hooked
#:   9: ret
#:   live_return_handler:                # the hooked function returned here
#:     push %rax (room for the return); push %rax,%rdx,%rcx,%r8,%r9
#:     mov %gs:0,%r8; mov 96(%r8),%rcx; lea 40(%rsp),%r9    # the slot it came from
#:   4: sub $32,%rcx; cmp 112(%r8),%rcx; jb 8f  # the entry of that slot (deeper
#:     cmp %r9,8(%rcx); jne 4b           #   ones were left by a longjmp)
#:     mov %rcx,96(%r8)                  # popped
#:     rdtsc; ...; sub 24(%rcx),%rax     # cycles in the function
#:     mov 16(%rcx),%rdx; mov 120(%r8),%r9; add %rax,(%r9,%rdx,8)
#:     mov 0(%rcx),%rax; mov %rax,40(%rsp)                  # the real return
#:     pop %r9,%r8,%rcx,%rdx,%rax; ret
#:   8: ud2
#:   T_FPC, T_IPS, T_N: .quad (the host fills them)
#:
#: Per thread, in the pad words of its ftrace_cpu: 96 the return stack's
#: top, 104 its limit, 112 its base, 120 the per-function cycle table.
PROFILE_CODE = bytes.fromhex(
    "57564883ec08ff15040100004883c4085e5f4c8d4c24604939310f8582000000654c8b04250000"
    "0000498b4860493b4868736f4c8b15de0000004d8b124c8b1ddc0000004d8b1b31c04c39d87318"
    "4a8d141848d1ea49393cd27306488d4201ebe84989d3ebe34c8b1db3000000493b03733049393c"
    "c2752a4889314c894908488941100f3148c1e2204809d0488941184883c12049894860488d0511"
    "000000498901c3cc66662e0f1f840000000000905050525141504151654c8b042500000000498b"
    "48604c8d4c24284883e920493b487072334c39490875f0498948600f3148c1e2204809d0482b41"
    "18488b51104d8b4878490104d1488b01488944242841594158595a58c30f0b0f1f800000000000"
    "0000000000000000000000000000000000000000000000")
_P_HANDLER, _P_FPC, _P_IPS, _P_N = 0xB0, 0x110, 0x118, 0x120
#: live_profile_call's ``mov %gs:0,%r8`` (9 bytes: the CALL of the checked
#: load and a NOP4 replace it, see LiveTrace.arm)
_P_GS = 0x20
NOP4 = b"\x0f\x1f\x40\x00"
assert PROFILE_CODE[_P_GS:_P_GS + 9] == bytes.fromhex("654c8b042500000000")
#: return-stack entries per thread (32 bytes each): deeper calls are counted, not timed
SHADOW_N = 512
_F_SP, _F_LIMIT, _F_BASE, _F_TIMES = 96, 104, 112, 120


def unhook_returns(mem, info: dict) -> int:
    """With every thread stopped and none inside the tracer's code: put
    back every return address the profiler hooked and still stands on a
    stack, and empty the return stacks.  *info*: ``handler``, ``percpu``,
    ``nrec``.  Returns how many were put back."""
    handler, percpu, nrec = info["handler"], info["percpu"], info["nrec"]
    n = 0

    def rd(a: int) -> int:
        return struct.unpack("<Q", mem.read(a, 8))[0]

    for i in range(nrec):
        rec = percpu + i * 128
        top, base = rd(rec + _F_SP), rd(rec + _F_BASE)
        if not base or top <= base:
            continue
        raw = mem.read(base, top - base)
        for ret, slot, _idx, _t in struct.iter_unpack("<QQQQ", raw):
            try:
                if rd(slot) == handler:
                    mem.write(slot, struct.pack("<Q", ret))
                    n += 1
            except (OSError, TextPokeError):
                continue            # a stack that went away with its thread
        mem.write(rec + _F_SP, struct.pack("<Q", base))
    return n
