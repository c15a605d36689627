/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Refused by the module loader: a jump-label site whose entry names a
 * kernel symbol (client_recs) that is not a static key.
 */
	.text
	.globl	mod_bad_key
	.type	mod_bad_key, @function
mod_bad_key:
1:	.byte	0x0f, 0x1f, 0x44, 0x00, 0x00
	xorl	%eax, %eax
	ret
2:	movl	$1, %eax
	ret
	.size	mod_bad_key, . - mod_bad_key

	.section __jump_table, "aw"
	.balign	8
	.long	1b - .
	.long	2b - .
	.quad	client_recs - .
	.section .note.GNU-stack, "", @progbits
