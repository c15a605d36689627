# SPDX-License-Identifier: GPL-2.0-only
"""The target outlives its patcher: a SIGTRAP handler injected into the
target while INT3s of ours are in its text.

Why this design.  SIGKILL of the patcher (or the OOM killer) cannot be
caught; the kernel then detaches every thread and resumes it.  Any thread
that reaches an INT3 of ours after that -- a parked one, resumed at its
site, or any running one: on a busy target that is within microseconds --
takes a SIGTRAP nobody handles and the process dies.  The choices:

* a journal and a guardian process that re-seizes the target when the
  patcher dies: the guardian cannot seize before the kernel has detached
  the threads, and between the two a thread on a hot site is already dead;
  it also costs a process per command.  Only a repair *after* the fact.
* stop-machine writes only: no INT3 would be in the text while threads
  run, but the core's batch is the INT3 protocol (the INT3 is in the text
  between phases, when the threads are resumed), a stop of every thread per
  write costs ~1 ms per phase on 4 threads, and a SIGKILL between phases
  still leaves INT3s behind.
* **an INT3 handler living in the target** (this module), as the kernel's
  own is in the patched program.  While we trace the target its SIGTRAPs
  stop in the tracer first, which handles ours and suppresses them, so the
  handler never runs; the moment we are gone, it is there.  Cost: one page
  of code and the site table (8 bytes a site, pages touched only as used)
  mapped in the target while a batch is in flight, three injected system
  calls to install it (mmap, mprotect, rt_sigaction) and one or two to
  remove it, about 1-3 ms per command; the target's SIGTRAP action is ours
  meanwhile (``sigaction`` in the target would show it).

What the handler does (hand-written machine code, :data:`CODE`; the source
is in the comment below): for a SIGTRAP with ``si_code == SI_KERNEL`` (an
INT3) whose address (``rip - 1``) is in the table, it sets the interrupted
``rip`` back to the site and yields (``sched_yield``): the thread re-runs
the site, and waits there, trapping, until the site has been put back whole
-- by ``textpoke live recover`` (or a later patcher).  A thread parked at a
site when the patcher died does the same: its RIP is set back to the site
when it is parked (not when it is released).  A thread in a trap's stop
when the patcher died gets its SIGTRAP now if the stop was not reaped yet:
the patcher rewinds it *before* reaping the stop (a reaped stop has lost its
signal, and the thread would resume with none at site+1), and first writes
the site into the stop's siginfo (``si_addr``, 0 in an INT3's own): the
handler takes the site from there when it is set, so a thread whose rip is
already the site is left there, and one not rewound yet is rewound (see
``_Rewind._reap``).  Any other SIGTRAP goes to the
target's own handler (jumped to with the same arguments), or, if it had
none, the default action is restored and the signal raised again, so a
stray breakpoint kills the process exactly as it would have.

Limits: a thread waiting at a site spins (trap, yield, trap) until the site
is repaired; a child forked while a batch is in flight gets its copy of
the sites put back by the patcher at the fork event (:mod:`._fork`), but
one forked after the patcher died waits at the site forever (nobody
repairs its copy).

The action can be replaced while INT3s of ours stand in the text: by the
target (``signal(SIGTRAP, SIG_DFL)``, its own ``sigaction``) or by the
kernel (an INT3 hit by a thread with SIGTRAP blocked resets it to
SIG_DFL).  The patcher looks again before each phase of a batch
(``_Survival._guard_verify``: before the INT3s of a later batch it reads
the action with an injected ``rt_sigaction``, at most every 0.25 s -- the
read stops every thread; otherwise, and before the tails and the first
bytes, a look at /proc/PID/status's SigCgt, which costs no stop, says
whether SIGTRAP is caught at all) and installs the guard again, chaining
to what the target asked for last and giving that back at removal.  What
is left: a target that replaces the action *during* a phase, with the
patcher killed before the next look (within that phase: milliseconds to
about 0.2 s for 10,000 sites), dies at the next INT3; a handler of its
own (SigCgt still says "caught") installed after a batch's INT3s were
written is seen only at the next batch or at removal (then both stay:
its handler may chain to ours).  Catching every
``rt_sigaction`` as it happens would take stopping the target at system
calls (``PTRACE_SYSCALL``: two stops for every call of every thread) or a
seccomp filter, which cannot be removed from the target afterwards.
"""

from __future__ import annotations

import struct

__all__ = ["CODE", "CODE_SIZE", "RESTORER", "ACT_OFF", "TABLE_OFF", "MAX_SITES", "DATA_SIZE",
           "our_action", "table_bytes", "NEW_ACT_OFF", "CUR_OFF", "COUNT_OFF",
           "SIGTRAP", "SYS_rt_sigaction", "SOURCE"]

#   handler:                          ; rdi = sig, rsi = siginfo, rdx = ucontext
#       lea   data(%rip), %r11        ; data = handler + 4096
#       cmpl  $0x80, 8(%rsi)          ; si_code == SI_KERNEL: an INT3
#       jne   chain
#       mov   16(%rsi), %rax          ; si_addr: 0 for an INT3's SIGTRAP; the site when
#       test  %rax, %rax ; jnz 2f     ;   the patcher rewound the thread before reaping its stop
#       mov   168(%rdx), %rax         ; uc_mcontext.gregs[REG_RIP]
#       dec   %rax                    ; the INT3's address
#   2:  mov   32(%r11), %rcx          ; number of sites
#       lea   40(%r11), %r8           ; the sites
#   1:  test  %rcx, %rcx ; jz chain
#       cmp   (%r8), %rax ; je found
#       add   $8, %r8 ; dec %rcx ; jmp 1b
#   found:
#       mov   %rax, 168(%rdx)         ; resume at the site itself
#       mov   $24, %eax ; syscall     ; sched_yield: let the repair run
#       ret                           ; to the restorer: rt_sigreturn
#   chain:
#       mov   (%r11), %rax            ; the target's own action
#       cmp   $1, %rax ; jbe dfl      ; SIG_DFL or SIG_IGN
#       jmp   *%rax                   ; its handler, same arguments
#   dfl:                              ; put SIG_DFL back, raise SIGTRAP again
#       sub $40,%rsp; zero 32 bytes at (%rsp)
#       rt_sigaction(SIGTRAP, %rsp, NULL, 8); tgkill(getpid(), gettid(), SIGTRAP)
#       add $40,%rsp; ret
#   restorer (offset 0xc0):  mov $15, %eax ; syscall        ; rt_sigreturn
CODE = bytes.fromhex(
    "4c8d1df90f0000817e0880000000753d488b46104885c0750a488b82a800000048ffc8498b4b204d"
    "8d43284885c9741d493b0074094983c00848ffc9ebed488982a8000000b8180000000f05c3498b03"
    "4883f8017602ffe04883ec2831c048890424488944240848894424104889442418b80d000000bf05"
    "0000004889e631d241ba080000000f05b8ba0000000f054889442420b8270000000f054889c7488b"
    "742420ba05000000b8ea0000000f054883c428c366662e0f1f84000000000090b80f0000000f05f4")
#: the exact source of :data:`CODE` (GNU as; ``tests/test_live_survival.py``
#: assembles it when binutils are there and compares).  ``start+4096`` is
#: the data page; the assembler leaves that displacement to the linker, so
#: CODE holds it filled in (4096 - 7).
SOURCE = """	.text
	.globl start
start:
handler:
	lea	start+4096(%rip), %r11
	cmpl	$0x80, 8(%rsi)
	jne	chain
	mov	16(%rsi), %rax
	test	%rax, %rax
	jnz	2f
	mov	168(%rdx), %rax
	dec	%rax
2:	mov	32(%r11), %rcx
	lea	40(%r11), %r8
1:	test	%rcx, %rcx
	jz	chain
	cmp	(%r8), %rax
	je	found
	add	$8, %r8
	dec	%rcx
	jmp	1b
found:
	mov	%rax, 168(%rdx)
	mov	$24, %eax
	syscall
	ret
chain:
	mov	(%r11), %rax
	cmp	$1, %rax
	jbe	dfl
	jmp	*%rax
dfl:
	sub	$40, %rsp
	xor	%eax, %eax
	mov	%rax, (%rsp)
	mov	%rax, 8(%rsp)
	mov	%rax, 16(%rsp)
	mov	%rax, 24(%rsp)
	mov	$13, %eax
	mov	$5, %edi
	mov	%rsp, %rsi
	xor	%edx, %edx
	mov	$8, %r10d
	syscall
	mov	$186, %eax
	syscall
	mov	%rax, 32(%rsp)
	mov	$39, %eax
	syscall
	mov	%rax, %rdi
	mov	32(%rsp), %rsi
	mov	$5, %edx
	mov	$234, %eax
	syscall
	add	$40, %rsp
	ret
	.balign 16
restorer:
	mov	$15, %eax
	syscall
	hlt
"""
RESTORER = 0xC0
NEW_ACT_OFF = 0x100            # our struct sigaction, in the code page (read by the kernel)
CODE_SIZE = 4096
# the data page(s), right after the code
ACT_OFF = 0                    # the target's previous struct k_sigaction (handler, flags, restorer, mask)
COUNT_OFF = 32
TABLE_OFF = 40
MAX_SITES = 1 << 15
DATA_SIZE = -(-(TABLE_OFF + 8 * MAX_SITES) // 4096) * 4096 + 4096
CUR_OFF = DATA_SIZE - 32       # scratch for reading the action back at removal

SA_SIGINFO, SA_RESTORER, SA_RESTART = 0x4, 0x04000000, 0x10000000
SIGTRAP = 5
SYS_rt_sigaction = 13

assert len(CODE) == RESTORER + 8 and struct.unpack_from("<i", CODE, 3)[0] == CODE_SIZE - 7


def our_action(base: int) -> bytes:
    """The struct k_sigaction that installs the handler at *base*."""
    return struct.pack("<QQQQ", base, SA_SIGINFO | SA_RESTORER,
                       base + RESTORER, 0)


def table_bytes(sites) -> bytes:
    sites = sorted(sites)[:MAX_SITES]
    return struct.pack(f"<Q{len(sites)}Q", len(sites), *sites)
