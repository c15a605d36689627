/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Call-depth tracking's accounting thunk template, as the kernel's
 * skl_call_thunk_template (arch/x86/kernel/callthunks.c): with
 * X86_FEATURE_CALL_DEPTH, a direct call is pointed at a copy of these
 * bytes placed in the NOP padding just before its destination, which then
 * falls through into the function.  The kernel's template shifts a per-CPU
 * depth counter; here the counter is one global (this image has no
 * per-CPU area of its own) -- what matters to the patcher is that it is
 * one RIP-relative instruction the copy must be relocated for.
 *
 * Functions whose padding may take a thunk are marked CALL_PADDED (16
 * one-byte NOPs before the entry, as CONFIG_FUNCTION_PADDING_BYTES gives
 * the kernel's functions).
 */
#include "linkage.h"

	.text
	.globl	skl_call_thunk_template
	.type	skl_call_thunk_template, @function
skl_call_thunk_template:
	sarq	$5, __x86_call_depth(%rip)
	.globl	skl_call_thunk_tail
skl_call_thunk_tail:
	.size	skl_call_thunk_template, skl_call_thunk_tail - skl_call_thunk_template

	.data
	.p2align 3
	.globl	__x86_call_depth
__x86_call_depth:
	.quad	0
