/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Refused by the module loader: a static-call site whose key is a kernel
 * symbol (client_recs) that is no static call's key.
 */
	.text
	.globl	mod_bad_call
	.type	mod_bad_call, @function
mod_bad_call:
1:	call	__SCT__sc_op
	ret
	.size	mod_bad_call, . - mod_bad_call

	.section .static_call_sites, "a"
	.balign	4
	.long	1b - .
	.long	client_recs - .
	.section .note.GNU-stack, "", @progbits
