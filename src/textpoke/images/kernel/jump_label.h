/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Static keys with asm-goto jump labels, in the kernel's x86-64 format:
 *
 *   __jump_table   struct jump_entry, 16 bytes, 8-aligned:
 *                  s32 code - ., s32 target - ., s64 (key + flags) - .
 *
 * Bit 0 of the key field is the branch polarity (set when the code was
 * emitted for "likely"), bit 1 is the kernel's "init section" mark (never
 * set here).  A site is a 5-byte NOP when its initial state is "fall
 * through", or a JMP (2 or 5 bytes, the assembler's choice) when it starts
 * out jumping.
 */
#ifndef _TEXTPOKE_JUMP_LABEL_H
#define _TEXTPOKE_JUMP_LABEL_H

#include "types.h"

struct static_key {
	int enabled;
	int pad;
	unsigned long type;	/* bit 0: initially true */
};

struct static_key_true  { struct static_key key; };
struct static_key_false { struct static_key key; };

#define STATIC_KEY_INIT_TRUE	{ .enabled = 1, .type = 1 }
#define STATIC_KEY_INIT_FALSE	{ .enabled = 0, .type = 0 }

#define DEFINE_STATIC_KEY_TRUE(name)	\
	struct static_key_true name = { .key = STATIC_KEY_INIT_TRUE }
#define DEFINE_STATIC_KEY_FALSE(name)	\
	struct static_key_false name = { .key = STATIC_KEY_INIT_FALSE }

#define __JUMP_TABLE_ENTRY(key, branch)				\
	".pushsection __jump_table, \"aw\"\n\t"			\
	".balign 8\n\t"						\
	".long 1b - .\n\t"					\
	".long %l[l_yes] - .\n\t"				\
	".quad %c" key " + %c" branch " - .\n\t"		\
	".popsection\n\t"

static __always_inline bool arch_static_branch(struct static_key *key, bool branch)
{
	asm goto("1: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n\t"
		 __JUMP_TABLE_ENTRY("0", "1")
		 : : "i" (key), "i" (branch) : : l_yes);
	return false;
l_yes:
	return true;
}

static __always_inline bool arch_static_branch_jump(struct static_key *key, bool branch)
{
	asm goto("1: jmp %l[l_yes]\n\t"
		 __JUMP_TABLE_ENTRY("0", "1")
		 : : "i" (key), "i" (branch) : : l_yes);
	return false;
l_yes:
	return true;
}

/* The old interface on a bare struct static_key: both emit a NOP, since
 * a key declared with STATIC_KEY_INIT_TRUE is read with static_key_true. */
static __always_inline bool static_key_false(struct static_key *key)
{
	return arch_static_branch(key, false);
}

static __always_inline bool static_key_true(struct static_key *key)
{
	return !arch_static_branch(key, true);
}

#define __key_is(x, T)	__builtin_types_compatible_p(typeof(*(x)), T)

/* The code emitted matches the key's initial value, as in the kernel:
 * likely+true and unlikely+false are NOPs, the other two are jumps. */
#define static_branch_likely(x)						\
({									\
	bool __b;							\
	if (__key_is(x, struct static_key_true))			\
		__b = !arch_static_branch(&(x)->key, true);		\
	else								\
		__b = !arch_static_branch_jump(&(x)->key, true);	\
	__builtin_expect(__b, 1);					\
})

#define static_branch_unlikely(x)					\
({									\
	bool __b;							\
	if (__key_is(x, struct static_key_true))			\
		__b = arch_static_branch_jump(&(x)->key, false);	\
	else								\
		__b = arch_static_branch(&(x)->key, false);		\
	__builtin_expect(__b, 0);					\
})

#endif
