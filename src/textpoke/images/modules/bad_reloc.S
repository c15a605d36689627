/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Refused by the module loader: a GOT-relative load of a kernel symbol
 * (R_X86_64_REX_GOTPCRELX), a relocation type the x86-64 loader does not
 * handle.  Nothing may be written when it is refused.
 */
	.text
	.globl	mod_bad_reloc
	.type	mod_bad_reloc, @function
mod_bad_reloc:
	movq	jl_key_false@GOTPCREL(%rip), %rax
	movl	(%rax), %eax
	ret
	.size	mod_bad_reloc, . - mod_bad_reloc
	.section .note.GNU-stack, "", @progbits
