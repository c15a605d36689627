/* SPDX-License-Identifier: GPL-2.0-only
 *
 * The return trampoline of kretprobes (the kernel's rethook, x86:
 * arch/x86/kernel/rethook.c).  A probed function's return address is
 * swapped for arch_rethook_trampoline at its entry; its RET comes here.
 * The trampoline pushes a fake return address (its own, for unwinders:
 * the callback replaces it with the real one), then a struct pt_regs --
 * ss, sp (sp - 16 until the callback fixes it), flags, room for cs, ip and
 * orig_ax, and the general registers -- and calls
 * arch_rethook_trampoline_callback(regs).  That callback is host code: its
 * INT3 is the call into the host, which runs the return handlers of the
 * current task's pending instances for this frame, puts the real return
 * address in the fake slot and copies flags into the ss slot, so that
 * after the registers come back one "popfq; ret" resumes the caller.
 */
#include "linkage.h"

	.text
	.globl	arch_rethook_trampoline
	.type	arch_rethook_trampoline, @function
arch_rethook_trampoline:
	pushq	$arch_rethook_trampoline
	pushq	$0x18				/* ss: __KERNEL_DS */
	pushq	%rsp				/* sp, fixed up by the callback */
	pushfq
	subq	$24, %rsp			/* cs, ip, orig_ax */
	pushq	%rdi
	pushq	%rsi
	pushq	%rdx
	pushq	%rcx
	pushq	%rax
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%rbx
	pushq	%rbp
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi
	call	arch_rethook_trampoline_callback
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbp
	popq	%rbx
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rax
	popq	%rcx
	popq	%rdx
	popq	%rsi
	popq	%rdi
	addq	$24, %rsp			/* orig_ax, ip, cs */
	addq	$16, %rsp			/* flags, sp: the flags are in the ss slot now */
	popfq
	RET					/* to the real return address */
	.size	arch_rethook_trampoline, . - arch_rethook_trampoline

	.globl	arch_rethook_trampoline_callback
	.type	arch_rethook_trampoline_callback, @function
arch_rethook_trampoline_callback:
	int3
	RET
	.size	arch_rethook_trampoline_callback, . - arch_rethook_trampoline_callback
