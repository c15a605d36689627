/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Static calls, x86 style: a 5-byte trampoline per call (JMP to the
 * current function, or "ret; int3; nop; nop; nop" when NULL) followed by
 * the signature bytes 0f b9 cc, in .static_call.text; a key
 * (struct static_call_key) per call; and call sites that call or tail-jump
 * to the trampoline.  objtool-lite finds those sites from the relocations
 * and lists them in .static_call_sites:
 *
 *   struct static_call_site { s32 addr - .; s32 (key + flags) - .; }
 *
 * flags: bit 0 = tail call (JMP), bit 1 = site in init text (never here).
 * The trampoline of call NAME is __SCT__NAME, its key __SCK__NAME.
 */
#ifndef _TEXTPOKE_STATIC_CALL_H
#define _TEXTPOKE_STATIC_CALL_H

#include "types.h"
#include "alternative.h"

struct static_call_key {
	void *func;
	unsigned long type;	/* 1: no site list attached yet */
};

#define STATIC_CALL_KEY(name)		__SCK__##name
#define STATIC_CALL_TRAMP(name)		__SCT__##name
#define STATIC_CALL_TRAMP_STR(name)	__stringify(STATIC_CALL_TRAMP(name))

#define __STATIC_CALL_TRAMP(name, insns)					\
	asm(".pushsection .static_call.text, \"ax\"\n"				\
	    ".balign 4\n"							\
	    ".globl " STATIC_CALL_TRAMP_STR(name) "\n"				\
	    STATIC_CALL_TRAMP_STR(name) ":\n\t"					\
	    insns "\n\t"							\
	    ".byte 0x0f, 0xb9, 0xcc\n"						\
	    ".type " STATIC_CALL_TRAMP_STR(name) ", @function\n"		\
	    ".size " STATIC_CALL_TRAMP_STR(name) ", . - "			\
		STATIC_CALL_TRAMP_STR(name) "\n"				\
	    ".popsection\n")

#define STATIC_CALL_TRAMP_JMP(name, func)					\
	__STATIC_CALL_TRAMP(name, ".byte 0xe9; .long " #func " - (. + 4)")
#define STATIC_CALL_TRAMP_NULL(name)						\
	__STATIC_CALL_TRAMP(name, "ret; int3; nop; nop; nop")

#define DECLARE_STATIC_CALL(name, func)						\
	extern struct static_call_key STATIC_CALL_KEY(name);			\
	extern typeof(func) STATIC_CALL_TRAMP(name)

#define DEFINE_STATIC_CALL(name, _func)						\
	DECLARE_STATIC_CALL(name, _func);					\
	struct static_call_key STATIC_CALL_KEY(name) = {			\
		.func = _func, .type = 1 };					\
	STATIC_CALL_TRAMP_JMP(name, _func)

#define DEFINE_STATIC_CALL_NULL(name, _func)					\
	DECLARE_STATIC_CALL(name, _func);					\
	struct static_call_key STATIC_CALL_KEY(name) = {			\
		.func = NULL, .type = 1 };					\
	STATIC_CALL_TRAMP_NULL(name)

long __static_call_return0(void);

#define DEFINE_STATIC_CALL_RET0(name, _func)					\
	DECLARE_STATIC_CALL(name, _func);					\
	struct static_call_key STATIC_CALL_KEY(name) = {			\
		.func = __static_call_return0, .type = 1 };			\
	STATIC_CALL_TRAMP_JMP(name, __static_call_return0)

#define static_call(name)	((typeof(&STATIC_CALL_TRAMP(name)))&STATIC_CALL_TRAMP(name))

#endif
