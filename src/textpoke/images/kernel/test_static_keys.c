// SPDX-License-Identifier: GPL-2.0-only
/*
 * The keys and probe functions of the static-keys self-test, laid out as
 * the kernel's lib/test_static_keys.c and its "base" companion arrange
 * them: old-style keys read with static_key_true/false, new-style keys
 * read with static_branch_likely/unlikely, and "inverted" base keys that
 * the test flips once before it starts.  Each tk_* probe returns 1 when
 * its branch is taken and 0 when it is not; the host test compares that
 * with the key's state after every enable/disable/inc/dec.
 */
#include "types.h"
#include "jump_label.h"

struct static_key tk_old_true_key = STATIC_KEY_INIT_TRUE;
struct static_key tk_old_false_key = STATIC_KEY_INIT_FALSE;
DEFINE_STATIC_KEY_TRUE(tk_true_key);
DEFINE_STATIC_KEY_FALSE(tk_false_key);

struct static_key tk_base_old_true_key = STATIC_KEY_INIT_TRUE;
struct static_key tk_base_inv_old_true_key = STATIC_KEY_INIT_TRUE;
struct static_key tk_base_old_false_key = STATIC_KEY_INIT_FALSE;
struct static_key tk_base_inv_old_false_key = STATIC_KEY_INIT_FALSE;
DEFINE_STATIC_KEY_TRUE(tk_base_true_key);
DEFINE_STATIC_KEY_TRUE(tk_base_inv_true_key);
DEFINE_STATIC_KEY_FALSE(tk_base_false_key);
DEFINE_STATIC_KEY_FALSE(tk_base_inv_false_key);

#define TK_OLD(key, how)					\
noinline __used int key##_##how(long unused)			\
{								\
	return how(&key) ? 1 : 0;				\
}
#define TK_NEW(key, how)					\
noinline __used int key##_##how(long unused)			\
{								\
	return how(&key) ? 1 : 0;				\
}

TK_OLD(tk_old_true_key, static_key_true)
TK_OLD(tk_old_false_key, static_key_false)
TK_NEW(tk_true_key, static_branch_likely)
TK_NEW(tk_true_key, static_branch_unlikely)
TK_NEW(tk_false_key, static_branch_likely)
TK_NEW(tk_false_key, static_branch_unlikely)
TK_OLD(tk_base_old_true_key, static_key_true)
TK_OLD(tk_base_inv_old_true_key, static_key_true)
TK_OLD(tk_base_old_false_key, static_key_false)
TK_OLD(tk_base_inv_old_false_key, static_key_false)
TK_NEW(tk_base_true_key, static_branch_likely)
TK_NEW(tk_base_true_key, static_branch_unlikely)
TK_NEW(tk_base_inv_true_key, static_branch_likely)
TK_NEW(tk_base_inv_true_key, static_branch_unlikely)
TK_NEW(tk_base_false_key, static_branch_likely)
TK_NEW(tk_base_false_key, static_branch_unlikely)
TK_NEW(tk_base_inv_false_key, static_branch_likely)
TK_NEW(tk_base_inv_false_key, static_branch_unlikely)
