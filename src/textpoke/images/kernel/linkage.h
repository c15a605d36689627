/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Assembly conventions of the image: global function markers and the
 * return through __x86_return_thunk that -mfunction-return=thunk-extern
 * gives C code, so that hand-written functions return the same way.
 */
#ifndef _TEXTPOKE_LINKAGE_H
#define _TEXTPOKE_LINKAGE_H

#ifdef __ASSEMBLER__

#define SYM_FUNC_START(name)		\
	.globl name ;			\
	.type name, @function ;		\
	.p2align 4 ;			\
name:

#define SYM_FUNC_END(name)		\
	.size name, . - name

/* A label inside a function that tests and the patcher look up by name. */
#define SYM_INNER_LABEL(name)		\
	.globl name ;			\
name:

/* Every return goes through the return thunk; objtool-lite lists them. */
#define RET	jmp __x86_return_thunk

#endif /* __ASSEMBLER__ */

#endif
