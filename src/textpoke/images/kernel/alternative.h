/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Alternatives and SMP-lock records in the kernel's table formats.
 *
 *   .altinstructions        struct alt_instr, 14 bytes, packed:
 *                           s32 instr - ., s32 repl - ., u32 ft_flags
 *                           (cpuid in the low 16 bits, ALT_FLAG_* above),
 *                           u8 instrlen (original + padding), u8 replacementlen
 *   .altinstr_replacement   the replacement bytes
 *   .smp_locks              s32 (lock prefix - .) per LOCK_PREFIX
 *
 * Nesting: ALTERNATIVE(ALTERNATIVE(old, a, f1), b, f2) is how ALTERNATIVE_2
 * is built.  Both entries start at the same address, in table order; the
 * outer one may pad further than the inner one, so instrlen can differ
 * between them (the patcher takes the largest for the whole group).  This
 * works with local numeric labels because the outer macro's "start" label
 * sits at the same address as the inner one's, and every forward reference
 * finds the next definition in source order.
 */
#ifndef _TEXTPOKE_ALTERNATIVE_H
#define _TEXTPOKE_ALTERNATIVE_H

#include "cpufeatures.h"

#define ALT_FLAGS_SHIFT		16
#define ALT_FLAG_NOT		(1 << 0)
#define ALT_FLAG_DIRECT_CALL	(1 << 1)
#define ALT_NOT(feature)	((ALT_FLAG_NOT << ALT_FLAGS_SHIFT) | (feature))
#define ALT_DIRECT_CALL(feature) ((ALT_FLAG_DIRECT_CALL << ALT_FLAGS_SHIFT) | (feature))
#define ALT_CALL_ALWAYS		ALT_DIRECT_CALL(X86_FEATURE_ALWAYS)

#define __tp_str1(x...)		#x
#define __stringify(x...)	__tp_str1(x)

/*
 * Labels: 8810 site start, 8811 end of the original, 8812 end of the
 * padding, 8813/8814 replacement start/end.  The padding is single-byte
 * NOPs (0x90) so that the patcher's optimize_nops has work to do.
 */
#ifndef __ASSEMBLER__

#define __ALT_RLEN	"(8814f-8813f)"
#define __ALT_OLEN	"(8811b-8810b)"

#define ALTERNATIVE(oldinstr, newinstr, ft_flags)				\
	"8810:\n\t" oldinstr "\n"						\
	"8811:\n\t"								\
	".skip -((" __ALT_RLEN "-" __ALT_OLEN ") > 0) * "			\
		"(" __ALT_RLEN "-" __ALT_OLEN "), 0x90\n"			\
	"8812:\n"								\
	".pushsection .altinstructions, \"a\"\n"				\
	"\t.long 8810b - .\n"							\
	"\t.long 8813f - .\n"							\
	"\t.4byte " __stringify(ft_flags) "\n"					\
	"\t.byte 8812b - 8810b\n"						\
	"\t.byte " __ALT_RLEN "\n"						\
	".popsection\n"								\
	".pushsection .altinstr_replacement, \"ax\"\n"				\
	"8813:\n\t" newinstr "\n"						\
	"8814:\n"								\
	".popsection\n"

#define ALTERNATIVE_2(oldinstr, newinstr1, ft_flags1, newinstr2, ft_flags2)	\
	ALTERNATIVE(ALTERNATIVE(oldinstr, newinstr1, ft_flags1),		\
		    newinstr2, ft_flags2)

#define ALTERNATIVE_3(oldinstr, newinstr1, ft_flags1, newinstr2, ft_flags2,	\
		      newinstr3, ft_flags3)					\
	ALTERNATIVE(ALTERNATIVE_2(oldinstr, newinstr1, ft_flags1,		\
				  newinstr2, ft_flags2),			\
		    newinstr3, ft_flags3)

/* @newinstr_yes with the feature, @newinstr_no without it. */
#define ALTERNATIVE_TERNARY(oldinstr, ft_flags, newinstr_yes, newinstr_no)	\
	ALTERNATIVE_2(oldinstr, newinstr_no, X86_FEATURE_ALWAYS,		\
		      newinstr_yes, ft_flags)

/* The replacement of an ALT_FLAG_DIRECT_CALL site: rewritten at patch time
 * into a direct call to whatever the indirect call's pointer holds. */
#define ALT_CALL_INSTR		"call BUG_func"

#define alternative(oldinstr, newinstr, ft_flags)				\
	asm volatile(ALTERNATIVE(oldinstr, newinstr, ft_flags) ::: "memory")

#define alternative_io(oldinstr, newinstr, ft_flags, output, input...)	\
	asm volatile(ALTERNATIVE(oldinstr, newinstr, ft_flags)		\
		     : output : input)

/* Calls inside inline asm: everything the ABI lets a callee clobber. */
#define ALT_CALL_CLOBBERS	"rcx", "rdx", "rsi", "rdi", "r8", "r9",	\
				"r10", "r11", "memory", "cc"

#define alternative_call(oldfunc, newfunc, ft_flags, output, input...)	\
	asm volatile(ALTERNATIVE("call %c[old]", "call %c[new]", ft_flags)	\
		     : output : [old] "i" (oldfunc), [new] "i" (newfunc), ## input \
		     : ALT_CALL_CLOBBERS)

#define LOCK_PREFIX_HERE							\
	".pushsection .smp_locks, \"a\"\n"					\
	"\t.balign 4\n"								\
	"\t.long 8820f - .\n"							\
	".popsection\n"								\
	"8820:"

#define LOCK_PREFIX	LOCK_PREFIX_HERE "\n\tlock "

#else /* __ASSEMBLER__ */

#define __ALTERNATIVE(oldinst, newinst, ft_flags)				\
8810:	;									\
	oldinst ;								\
8811:	;									\
	.skip -(((8814f-8813f)-(8811b-8810b)) > 0) *				\
		((8814f-8813f)-(8811b-8810b)), 0x90 ;				\
8812:	;									\
	.pushsection .altinstructions, "a" ;					\
	.long 8810b - . ;							\
	.long 8813f - . ;							\
	.4byte ft_flags ;							\
	.byte 8812b - 8810b ;							\
	.byte 8814f - 8813f ;							\
	.popsection ;								\
	.pushsection .altinstr_replacement, "ax" ;				\
8813:	;									\
	newinst ;								\
8814:	;									\
	.popsection ;

.macro ALTERNATIVE oldinstr, newinstr, ft_flags
	__ALTERNATIVE(\oldinstr, \newinstr, \ft_flags)
.endm

.macro ALTERNATIVE_2 oldinstr, newinstr1, ft_flags1, newinstr2, ft_flags2
	__ALTERNATIVE(__ALTERNATIVE(\oldinstr, \newinstr1, \ft_flags1),
		      \newinstr2, \ft_flags2)
.endm

.macro ALTERNATIVE_3 oldinstr, newinstr1, ft_flags1, newinstr2, ft_flags2, newinstr3, ft_flags3
	__ALTERNATIVE(__ALTERNATIVE(__ALTERNATIVE(\oldinstr, \newinstr1, \ft_flags1),
				    \newinstr2, \ft_flags2),
		      \newinstr3, \ft_flags3)
.endm

.macro ALT_CALL_INSTR
	call BUG_func
.endm

.macro LOCK_PREFIX
8820:	lock
	.pushsection .smp_locks, "a"
	.balign 4
	.long 8820b - .
	.popsection
.endm

#endif /* __ASSEMBLER__ */

#endif
