/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Speculation thunks the compiler calls into, and the two helpers that
 * ALT_FLAG_DIRECT_CALL sites need.
 *
 * -mindirect-branch=thunk-extern turns "call *%reg" into
 * "call __x86_indirect_thunk_<reg>"; the thunks are laid out 32 bytes
 * apart in register-encoding order starting at __x86_indirect_thunk_array,
 * so a patcher can tell the register from the target address alone (the
 * rsp slot exists only to keep the spacing).  Each thunk is itself an
 * alternative site: a retpoline by default, a plain indirect jump without
 * X86_FEATURE_RETPOLINE, and an LFENCE-guarded jump with
 * X86_FEATURE_RETPOLINE_LFENCE.
 *
 * -mfunction-return=thunk-extern turns every "ret" into
 * "jmp __x86_return_thunk".
 */
#include "alternative.h"
#include "linkage.h"

#define RETPOLINE_THUNK_SIZE	32

/* Capture speculation in the pause loop; the architectural path
 * overwrites the return address with the real target and returns to it. */
.macro RETPOLINE_BODY reg
	call	.Lset_target_\@
.Lspec_trap_\@:
	pause
	lfence
	jmp	.Lspec_trap_\@
.Lset_target_\@:
	mov	%\reg, (%rsp)
	ret
.endm

.macro THUNK reg
	.p2align 5
	.globl __x86_indirect_thunk_\reg
	.type __x86_indirect_thunk_\reg, @function
__x86_indirect_thunk_\reg:
	ALTERNATIVE_2 "RETPOLINE_BODY \reg", "lfence; jmp *%\reg; int3", X86_FEATURE_RETPOLINE_LFENCE, "jmp *%\reg; int3", ALT_NOT(X86_FEATURE_RETPOLINE)
	.size __x86_indirect_thunk_\reg, . - __x86_indirect_thunk_\reg
.endm

	.section .text..__x86.indirect_thunk, "ax"
	.p2align 5
	.globl __x86_indirect_thunk_array
__x86_indirect_thunk_array:
	THUNK rax
	THUNK rcx
	THUNK rdx
	THUNK rbx
	THUNK rsp
	THUNK rbp
	THUNK rsi
	THUNK rdi
	THUNK r8
	THUNK r9
	THUNK r10
	THUNK r11
	THUNK r12
	THUNK r13
	THUNK r14
	THUNK r15
	.p2align 5, 0xcc
	.globl __x86_indirect_thunk_array_end
__x86_indirect_thunk_array_end:

/*
 * The return thunk.  Without a return-speculation mitigation it is just a
 * return; the boot patcher may rewrite every "jmp __x86_return_thunk" into
 * "ret; int3" padding and never come here.
 */
	.section .text..__x86.return_thunk, "ax"
	.p2align 6
	.globl __x86_return_thunk
	.type __x86_return_thunk, @function
__x86_return_thunk:
	ret
	int3
	.size __x86_return_thunk, . - __x86_return_thunk

	.text
/* The do-nothing target: an ALT_FLAG_DIRECT_CALL site whose pointer holds
 * nop_func becomes NOPs. */
SYM_FUNC_START(nop_func)
	RET
SYM_FUNC_END(nop_func)

/* The placeholder target of ALT_CALL_INSTR; reaching it is a bug. */
SYM_FUNC_START(BUG_func)
	ud2
	int3
SYM_FUNC_END(BUG_func)
