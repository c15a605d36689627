/* SPDX-License-Identifier: GPL-2.0-only
 *
 * The function tracer's trampoline, in the spirit of the kernel's
 * ftrace_caller.  A traced function's fentry NOP5 becomes
 * "call ftrace_caller"; on entry here
 *
 *     0(%rsp)  return address into the traced function (fentry site + 5)
 *     8(%rsp)  the traced function's own return address (its caller)
 *
 * The trampoline saves every register the C calling convention lets a
 * callee clobber (the six argument registers, %rax for varargs, %r10 and
 * %r11), calls the current tracer callback with (ip, parent_ip, op),
 * restores them and returns into the traced function, which then runs as
 * if the call had been a NOP.
 *
 * The code from ftrace_caller up to ftrace_caller_end is also the
 * template of the dynamic trampolines the host makes for a single tracer
 * (the kernel's create_trampoline): copied into execmem, the load at
 * ftrace_caller_op_ptr re-aimed at the ops pointer stored after the copy,
 * the CALL at ftrace_call aimed at that tracer's function, and a return
 * appended.  Keep the load a "movq disp32(%rip), %rdx" (48 8b 15).
 *
 * The callback is chosen by patching the CALL at ftrace_call (the host's
 * update_ftrace_func): ftrace_stub when nothing is registered, else a
 * callback from ftrace.c.  The stack stays 16-byte aligned at that call.
 */
#include "linkage.h"

#define MCOUNT_INSN_SIZE	5
#define FRAME			80	/* nine saved registers + 8 bytes of padding */

	.text
SYM_FUNC_START(ftrace_caller)
	subq	$FRAME, %rsp
	movq	%rax, 0(%rsp)
	movq	%rcx, 8(%rsp)
	movq	%rdx, 16(%rsp)
	movq	%rsi, 24(%rsp)
	movq	%rdi, 32(%rsp)
	movq	%r8, 40(%rsp)
	movq	%r9, 48(%rsp)
	movq	%r10, 56(%rsp)
	movq	%r11, 64(%rsp)
	movq	FRAME(%rsp), %rdi
	subq	$MCOUNT_INSN_SIZE, %rdi		/* ip: the fentry site */
	movq	FRAME+8(%rsp), %rsi		/* parent_ip */
SYM_INNER_LABEL(ftrace_caller_op_ptr)
	movq	function_trace_op(%rip), %rdx	/* op */
SYM_INNER_LABEL(ftrace_call)
	call	ftrace_stub
	movq	64(%rsp), %r11
	movq	56(%rsp), %r10
	movq	48(%rsp), %r9
	movq	40(%rsp), %r8
	movq	32(%rsp), %rdi
	movq	24(%rsp), %rsi
	movq	16(%rsp), %rdx
	movq	8(%rsp), %rcx
	movq	0(%rsp), %rax
	addq	$FRAME, %rsp
SYM_INNER_LABEL(ftrace_caller_end)
	RET
SYM_FUNC_END(ftrace_caller)

/* The callback when none is registered. */
SYM_FUNC_START(ftrace_stub)
	RET
SYM_FUNC_END(ftrace_stub)
