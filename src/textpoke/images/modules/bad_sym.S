/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Refused by the module loader: a call to a symbol the kernel does not
 * have ("Unknown symbol").
 */
	.text
	.globl	mod_bad_sym
	.type	mod_bad_sym, @function
mod_bad_sym:
	call	no_such_kernel_function
	ret
	.size	mod_bad_sym, . - mod_bad_sym
	.section .note.GNU-stack, "", @progbits
