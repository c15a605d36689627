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

/*
 * ftrace_regs_caller: the same for ops that want every register
 * (FTRACE_OPS_FL_SAVE_REGS, kprobes on the fentry NOP): a whole struct
 * pt_regs on the stack (the kernel's layout, 21 words), flags saved by
 * pushfq first, and the callback gets it as its fourth argument.  A
 * callback may change regs->ip: the trampoline returns there.  The jnz
 * at ftrace_regs_caller_jmp stands for the kernel's direct-call test
 * (orig_ax set by a direct caller; never here): a dynamic trampoline made
 * from this template has it replaced by a two-byte NOP.
 */
#define R15		0
#define R14		8
#define R13		16
#define R12		24
#define RBP		32
#define RBX		40
#define R11		48
#define R10		56
#define R9		64
#define R8		72
#define RAX		80
#define RCX		88
#define RDX		96
#define RSI		104
#define RDI		112
#define ORIG_RAX	120
#define RIP		128
#define CS		136
#define EFLAGS		144
#define RSP		152
#define SS		160
#define PT_SIZE		168

SYM_FUNC_START(ftrace_regs_caller)
	pushfq
	subq	$PT_SIZE, %rsp
	movq	%r15, R15(%rsp)
	movq	%r14, R14(%rsp)
	movq	%r13, R13(%rsp)
	movq	%r12, R12(%rsp)
	movq	%rbp, RBP(%rsp)
	movq	%rbx, RBX(%rsp)
	movq	%r11, R11(%rsp)
	movq	%r10, R10(%rsp)
	movq	%r9, R9(%rsp)
	movq	%r8, R8(%rsp)
	movq	%rax, RAX(%rsp)
	movq	%rcx, RCX(%rsp)
	movq	%rdx, RDX(%rsp)
	movq	%rsi, RSI(%rsp)
	movq	%rdi, RDI(%rsp)
	movq	$0, ORIG_RAX(%rsp)
	movq	PT_SIZE+8(%rsp), %rdi		/* return address into the traced function */
	movq	%rdi, RIP(%rsp)
	subq	$MCOUNT_INSN_SIZE, %rdi		/* ip: the fentry site */
	movq	PT_SIZE+16(%rsp), %rsi		/* parent_ip */
	movq	PT_SIZE(%rsp), %rcx		/* the flags pushfq saved */
	movq	%rcx, EFLAGS(%rsp)
	movq	$0x10, CS(%rsp)
	movq	$0x18, SS(%rsp)
	leaq	PT_SIZE+16(%rsp), %rcx		/* the traced function's sp at its entry */
	movq	%rcx, RSP(%rsp)
SYM_INNER_LABEL(ftrace_regs_caller_op_ptr)
	movq	function_trace_op(%rip), %rdx	/* op */
	leaq	(%rsp), %rcx			/* regs */
SYM_INNER_LABEL(ftrace_regs_call)
	call	ftrace_stub
	movq	EFLAGS(%rsp), %rax
	movq	%rax, PT_SIZE(%rsp)
	movq	RIP(%rsp), %rax			/* the callback may have moved ip */
	movq	%rax, PT_SIZE+8(%rsp)
	movq	R15(%rsp), %r15
	movq	R14(%rsp), %r14
	movq	R13(%rsp), %r13
	movq	R12(%rsp), %r12
	movq	RBP(%rsp), %rbp
	movq	RBX(%rsp), %rbx
	movq	R11(%rsp), %r11
	movq	R10(%rsp), %r10
	movq	R9(%rsp), %r9
	movq	R8(%rsp), %r8
	movq	RCX(%rsp), %rcx
	movq	RDX(%rsp), %rdx
	movq	RSI(%rsp), %rsi
	movq	RDI(%rsp), %rdi
	movq	ORIG_RAX(%rsp), %rax
	testq	%rax, %rax
SYM_INNER_LABEL(ftrace_regs_caller_jmp)
	jnz	1f
	movq	RAX(%rsp), %rax
	addq	$PT_SIZE, %rsp
	popfq
SYM_INNER_LABEL(ftrace_regs_caller_end)
	RET
1:	ud2
SYM_FUNC_END(ftrace_regs_caller)

/*
 * kprobe_ftrace_handler(ip, parent_ip, op, regs): the callback of the
 * kprobes' ftrace_ops.  The handlers are host code: the INT3 is the call
 * into the host, which finds the probe at ip and runs its handlers on
 * regs, as the kernel's kprobe_ftrace_handler does.
 */
SYM_FUNC_START(kprobe_ftrace_handler)
	int3
	RET
SYM_FUNC_END(kprobe_ftrace_handler)

/* The callback when none is registered. */
SYM_FUNC_START(ftrace_stub)
	RET
SYM_FUNC_END(ftrace_stub)

/*
 * The function graph tracer (the host's textpoke._ftrace._graph).
 *
 * ftrace_graph_func(ip, parent_ip, op) is the callback of fgraph's ops
 * (graph_ops), called from ftrace_caller or a copy of it (its dynamic
 * trampoline) -- never from ftrace_regs_caller, whose frame differs.  It
 * hands the host the address of the traced function's return-address
 * slot (what the kernel's ftrace_graph_func takes from the saved stack
 * pointer): above this call's own return address, the trampoline's FRAME
 * and the return address into the traced function.  The INT3 is the call
 * into the host (function_graph_enter): it pushes the return address on
 * this CPU's return stack and puts return_to_handler in the slot.
 *
 * return_to_handler is where a hooked function returns: the slot it
 * popped is taken back for the real return address, the return values
 * are saved, and the INT3 is the host's ftrace_return_to_handler (which
 * pops the return stack, records the return and writes the real address
 * into the slot); then the registers come back and RET goes there.
 */
SYM_FUNC_START(ftrace_graph_func)
	leaq	FRAME+16(%rsp), %rcx		/* the traced function's return slot */
SYM_INNER_LABEL(ftrace_graph_func_trap)
	int3
	RET
SYM_FUNC_END(ftrace_graph_func)

SYM_FUNC_START(return_to_handler)
	subq	$8, %rsp			/* the slot the hooked RET popped */
	pushq	%rax
	pushq	%rdx
SYM_INNER_LABEL(return_to_handler_trap)
	int3
	popq	%rdx
	popq	%rax
	RET
SYM_FUNC_END(return_to_handler)
