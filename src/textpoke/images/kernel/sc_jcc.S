/* SPDX-License-Identifier: GPL-2.0-only
 *
 * A conditional tail call through a static call, which GCC never emits:
 * sc_jcc_op(x) returns cond(x) for an even x (the Jcc.d32 jumps to the
 * function; 0 when the call is NULL) and -1 for an odd one.  The site starts out as static_call_init
 * would leave it -- aimed at the initial function of sc_cond, sc_double -- and
 * is listed by hand in .static_call_sites with the tail-call flag.  A
 * Jcc tail call to NULL goes to __static_call_return ("ret; int3").
 */
#include "linkage.h"

	.text
SYM_FUNC_START(sc_jcc_op)
	xor	%eax, %eax
	test	$1, %dil
SYM_INNER_LABEL(sc_jcc_site)
	.byte	0x0f, 0x84		/* jz.d32 */
	.long	sc_double - (. + 4)
	mov	$-1, %eax
	RET
SYM_FUNC_END(sc_jcc_op)

SYM_FUNC_START(__static_call_return)
	ret
	int3
SYM_FUNC_END(__static_call_return)

	.pushsection .static_call_sites, "a"
	.balign 4
	.long	sc_jcc_site - .
	.long	__SCK__sc_cond + 1 - .
	.popsection
