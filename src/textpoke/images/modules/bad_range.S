/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Refused by the module loader: a sign-extended 32-bit absolute address
 * (R_X86_64_32S) of a kernel symbol plus an offset that puts it beyond
 * 2 GiB -- the value does not fit the field.
 */
	.text
	.globl	mod_bad_range
	.type	mod_bad_range, @function
mod_bad_range:
	movq	$(jl_key_false + 0x7ff00000), %rax
	ret
	.size	mod_bad_range, . - mod_bad_range
	.section .note.GNU-stack, "", @progbits
