/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Alternative sites written in assembly, one per "probe" function.
 *
 * Probe convention (shared with alt_sites.c and used by the tests): a
 * function named alt_probe_* holds exactly one alternative site (which may
 * be nested, i.e. several consecutive table entries at one address) and
 * returns 1 when the original instructions ran, or 1 + i when the i-th
 * table entry of that site (counting from 1, in table order) was patched
 * in.  Since later entries of a nested site overwrite earlier ones, a
 * correct patcher makes the probe return 1 + (index of the last entry
 * whose condition holds), or 1 when none holds.
 *
 * The alt_call_* functions are ALT_FLAG_DIRECT_CALL sites (paravirt style):
 * their result is the same before and after patching; only their bytes
 * show the indirect call turned into a direct one.
 */
#include "alternative.h"
#include "linkage.h"

/* A probe whose site is "mov $1, %eax" versus "mov $2, %eax". */
.macro SIMPLE_PROBE name, ft_flags
SYM_FUNC_START(alt_probe_\name)
	ALTERNATIVE "mov $1, %eax", "mov $2, %eax", \ft_flags
	RET
SYM_FUNC_END(alt_probe_\name)
.endm

	.text

/* ---- one feature each: present or absent depending on the feature set */
	SIMPLE_PROBE always,		X86_FEATURE_ALWAYS
	SIMPLE_PROBE xmm2,		X86_FEATURE_XMM2
	SIMPLE_PROBE rdtscp,		X86_FEATURE_RDTSCP
	SIMPLE_PROBE up,		X86_FEATURE_UP
	SIMPLE_PROBE lfence_rdtsc,	X86_FEATURE_LFENCE_RDTSC
	SIMPLE_PROBE popcnt,		X86_FEATURE_POPCNT
	SIMPLE_PROBE hypervisor,	X86_FEATURE_HYPERVISOR
	SIMPLE_PROBE retpoline,		X86_FEATURE_RETPOLINE
	SIMPLE_PROBE xenpv,		X86_FEATURE_XENPV
	SIMPLE_PROBE avx2,		X86_FEATURE_AVX2
	SIMPLE_PROBE bmi2,		X86_FEATURE_BMI2
	SIMPLE_PROBE erms,		X86_FEATURE_ERMS
	SIMPLE_PROBE smap,		X86_FEATURE_SMAP
	SIMPLE_PROBE clflushopt,	X86_FEATURE_CLFLUSHOPT
	SIMPLE_PROBE rethunk,		X86_FEATURE_RETHUNK
	SIMPLE_PROBE fsrm,		X86_FEATURE_FSRM

/* ---- ALT_FLAG_NOT: patched when the feature is missing */
	SIMPLE_PROBE not_always,	ALT_NOT(X86_FEATURE_ALWAYS)
	SIMPLE_PROBE not_xenpv,		ALT_NOT(X86_FEATURE_XENPV)
	SIMPLE_PROBE not_smap,		ALT_NOT(X86_FEATURE_SMAP)
	SIMPLE_PROBE not_erms,		ALT_NOT(X86_FEATURE_ERMS)
	SIMPLE_PROBE not_hypervisor,	ALT_NOT(X86_FEATURE_HYPERVISOR)

/* ---- lengths: a replacement longer than the original gets 0x90 padding,
 * a shorter one leaves a NOP tail after patching */
SYM_FUNC_START(alt_probe_longer)
	ALTERNATIVE "push $1; pop %rax", "xor %eax, %eax; inc %eax; inc %eax; add $0, %ecx", X86_FEATURE_AVX2
	RET
SYM_FUNC_END(alt_probe_longer)

SYM_FUNC_START(alt_probe_shorter)
	ALTERNATIVE "mov $1, %eax; mov %eax, %eax; movl $1, %eax", "push $2; pop %rax", X86_FEATURE_POPCNT
	RET
SYM_FUNC_END(alt_probe_shorter)

/* ---- nested sites (ALTERNATIVE_2/3 are nested ALTERNATIVEs) */

/* inner replacement the longest: the outer entry adds no padding */
SYM_FUNC_START(alt_probe_nested2)
	ALTERNATIVE_2 "mov $1, %eax", "xor %eax, %eax; inc %eax; inc %eax; nop", X86_FEATURE_ERMS, "push $3; pop %rax", X86_FEATURE_FSRM
	RET
SYM_FUNC_END(alt_probe_nested2)

/* outer replacement longer than the padded inner: instrlen differs
 * between the two entries of the group */
SYM_FUNC_START(alt_probe_nested2_grow)
	ALTERNATIVE_2 "push $1; pop %rax", "mov $2, %eax", X86_FEATURE_XMM2, "mov $3, %eax; lea 0(%rax, %rax), %ecx; mov %eax, %eax", ALT_NOT(X86_FEATURE_XENPV)
	RET
SYM_FUNC_END(alt_probe_nested2_grow)

SYM_FUNC_START(alt_probe_nested3)
	ALTERNATIVE_3 "mov $1, %eax", "push $2; pop %rax", X86_FEATURE_AVX2, "mov $3, %eax; nop", X86_FEATURE_BMI2, "xor %eax, %eax; mov $4, %al; nop; nop; nop; nop", X86_FEATURE_POPCNT
	RET
SYM_FUNC_END(alt_probe_nested3)

/* ALTERNATIVE_TERNARY(old, SMAP, yes, no) spelled out: entry 1 (ALWAYS)
 * is the "no" replacement, entry 2 (SMAP) the "yes" one */
SYM_FUNC_START(alt_probe_ternary)
	ALTERNATIVE_2 "mov $1, %eax", "mov $2, %eax", X86_FEATURE_ALWAYS, "mov $3, %eax", X86_FEATURE_SMAP
	RET
SYM_FUNC_END(alt_probe_ternary)

/* ---- branches in replacements */

/* A JMP to a label outside the replacement: assembled as JMP32 (the label
 * is in another section), relocated by (repl - instr) at patch time, after
 * which it fits in 8 bits and the patcher shrinks it to JMP8. */
SYM_FUNC_START(alt_probe_jmp_shrink)
	mov	$2, %eax
	ALTERNATIVE "", "jmp 1f", X86_FEATURE_ALWAYS
	mov	$1, %eax
1:	RET
SYM_FUNC_END(alt_probe_jmp_shrink)

SYM_FUNC_START(alt_probe_jmp_shrink_xenpv)
	mov	$2, %eax
	ALTERNATIVE "", "jmp 1f", X86_FEATURE_XENPV
	mov	$1, %eax
1:	RET
SYM_FUNC_END(alt_probe_jmp_shrink_xenpv)

/* A conditional jump out of the replacement (Jcc.d32 relocated). */
SYM_FUNC_START(alt_probe_jcc_out)
	mov	$2, %eax
	ALTERNATIVE "", "test %eax, %eax; jnz 1f", X86_FEATURE_ALWAYS
	mov	$1, %eax
1:	RET
SYM_FUNC_END(alt_probe_jcc_out)

/* A jump inside the replacement: its target moves with it, so it must
 * not be relocated. */
SYM_FUNC_START(alt_probe_jmp_internal)
	ALTERNATIVE "mov $1, %eax", "xor %eax, %eax; jmp 2f; mov $7, %eax; 2: add $2, %eax", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_jmp_internal)

/* ---- CALL and RIP-relative operands in replacements */
SYM_FUNC_START(alt_probe_call_rip)
	mov	$1, %eax
	ALTERNATIVE "", "lea probe_two(%rip), %rdi; call probe_load", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_call_rip)

SYM_FUNC_START(alt_probe_call_rip_xenpv)
	mov	$1, %eax
	ALTERNATIVE "", "lea probe_two(%rip), %rdi; call probe_load", X86_FEATURE_XENPV
	RET
SYM_FUNC_END(alt_probe_call_rip_xenpv)

SYM_FUNC_START(alt_probe_rip_load)
	ALTERNATIVE "mov $1, %eax", "mov probe_two(%rip), %eax", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_rip_load)

SYM_FUNC_START(alt_probe_call)
	ALTERNATIVE "call probe_ret1", "call probe_ret2", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_call)

SYM_FUNC_START(alt_probe_call_not_up)
	ALTERNATIVE "call probe_ret1", "call probe_ret2", ALT_NOT(X86_FEATURE_UP)
	RET
SYM_FUNC_END(alt_probe_call_not_up)

/* ---- NOP runs longer than ASM_NOP_MAX (11) */

/* 15 bytes of original replaced by nothing: 15 bytes of NOPs */
SYM_FUNC_START(alt_probe_nops_15)
	mov	$2, %eax
	ALTERNATIVE "mov $1, %eax; mov $1, %ecx; mov $1, %edx", "", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_nops_15)

/* an empty original padded with 15 single-byte NOPs */
SYM_FUNC_START(alt_probe_pad_15)
	mov	$1, %eax
	ALTERNATIVE "", "mov $2, %eax; mov $2, %ecx; mov $2, %edx", X86_FEATURE_XENPV
	RET
SYM_FUNC_END(alt_probe_pad_15)

SYM_FUNC_START(alt_probe_pad_15_present)
	mov	$1, %eax
	ALTERNATIVE "", "mov $2, %eax; mov $2, %ecx; mov $2, %edx", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_pad_15_present)

/* a 40-byte NOP run when the short replacement goes in */
SYM_FUNC_START(alt_probe_nops_40)
	ALTERNATIVE "mov $1, %eax; mov $1, %ecx; mov $1, %edx; mov $1, %esi; mov $1, %edi; mov $1, %r8d; mov $1, %r9d; mov $1, %r10d", "mov $2, %eax", X86_FEATURE_ALWAYS
	RET
SYM_FUNC_END(alt_probe_nops_40)

/* PAUSE (f3 90) in an original that stays: it is not a NOP */
SYM_FUNC_START(alt_probe_pause)
	ALTERNATIVE "mov $1, %eax; pause; nop; nop", "mov $2, %eax", X86_FEATURE_XENPV
	RET
SYM_FUNC_END(alt_probe_pause)

/* ---- ALT_FLAG_DIRECT_CALL: "call *ptr(%rip)" becomes "call <*ptr>" */
SYM_FUNC_START(alt_call_native)
	ALTERNATIVE "call *pv_probe_ops(%rip)", "ALT_CALL_INSTR", ALT_CALL_ALWAYS
	RET
SYM_FUNC_END(alt_call_native)

/* the pointer holds nop_func: the call disappears */
SYM_FUNC_START(alt_call_nop)
	mov	$2, %eax
	ALTERNATIVE "call *pv_probe_ops+8(%rip)", "ALT_CALL_INSTR", ALT_CALL_ALWAYS
	RET
SYM_FUNC_END(alt_call_nop)

/* the pointer is NULL: the site becomes "call BUG_func".  Never called. */
SYM_FUNC_START(alt_call_null)
	ALTERNATIVE "call *pv_probe_ops+16(%rip)", "ALT_CALL_INSTR", ALT_CALL_ALWAYS
	RET
SYM_FUNC_END(alt_call_null)

/* paravirt-style nest: a direct call everywhere, an inline replacement
 * when not a Xen PV guest.  Returns 2 through the call (indirect or
 * direct alike) and 3 with the inline replacement. */
SYM_FUNC_START(alt_call_nested)
	ALTERNATIVE_2 "call *pv_probe_ops+24(%rip)", "ALT_CALL_INSTR", ALT_CALL_ALWAYS, "mov $3, %eax", ALT_NOT(X86_FEATURE_XENPV)
	RET
SYM_FUNC_END(alt_call_nested)

/* ---- helpers */
SYM_FUNC_START(probe_load)
	movl	(%rdi), %eax
	RET
SYM_FUNC_END(probe_load)

SYM_FUNC_START(probe_ret1)
	mov	$1, %eax
	RET
SYM_FUNC_END(probe_ret1)

SYM_FUNC_START(probe_ret2)
	mov	$2, %eax
	RET
SYM_FUNC_END(probe_ret2)

/* what the pv pointers point to */
SYM_FUNC_START(pv_native_two)
	mov	$2, %eax
	RET
SYM_FUNC_END(pv_native_two)

/* an indirect call from assembly through a REX-prefixed thunk register */
SYM_FUNC_START(asm_call_indirect)
	mov	%rdi, %r11
	call	__x86_indirect_thunk_r11
	add	$1, %eax
	RET
SYM_FUNC_END(asm_call_indirect)

/* byte copy with the string-op calling convention (rdi, rsi, rcx) */
SYM_FUNC_START(memcpy_orig)
	test	%rcx, %rcx
	jz	2f
1:	movb	(%rsi), %al
	movb	%al, (%rdi)
	inc	%rsi
	inc	%rdi
	dec	%rcx
	jnz	1b
2:	RET
SYM_FUNC_END(memcpy_orig)

/* an atomic increment of the u32 at rdi */
SYM_FUNC_START(asm_atomic_inc)
	LOCK_PREFIX
	incl	(%rdi)
	RET
SYM_FUNC_END(asm_atomic_inc)

	.section .rodata
	.p2align 2
	.globl probe_two
probe_two:
	.long 2

	.data
	.p2align 3
	.globl pv_probe_ops
pv_probe_ops:
	.quad pv_native_two	/* +0  */
	.quad nop_func		/* +8  */
	.quad 0			/* +16 */
	.quad pv_native_two	/* +24 */
