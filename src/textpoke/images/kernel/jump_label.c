// SPDX-License-Identifier: GPL-2.0-only
/*
 * Jump-label sites.  Each jl_* function returns 1 when the branch guarded
 * by its key is taken (the key is enabled) and 2 when it is not, so after
 * toggling a key every function that uses it must change its answer.
 */
#include "types.h"
#include "jump_label.h"

DEFINE_STATIC_KEY_TRUE(jl_key_true);
DEFINE_STATIC_KEY_FALSE(jl_key_false);
DEFINE_STATIC_KEY_TRUE(jl_key_true2);
DEFINE_STATIC_KEY_FALSE(jl_key_false2);
DEFINE_STATIC_KEY_FALSE(jl_key_shared);

int jl_counter;

/* NOP5 sites: the code matches the initial value and falls through */
noinline __used int jl_likely_true(void)
{
	if (static_branch_likely(&jl_key_true))
		return 1;
	return 2;
}

noinline __used int jl_unlikely_false(void)
{
	if (static_branch_unlikely(&jl_key_false))
		return 1;
	return 2;
}

/* JMP sites: the code starts out jumping */
noinline __used int jl_likely_false(void)
{
	if (static_branch_likely(&jl_key_false2))
		return 1;
	return 2;
}

noinline __used int jl_unlikely_true(void)
{
	if (static_branch_unlikely(&jl_key_true2))
		return 1;
	return 2;
}

/* One key, several sites */
noinline __used int jl_shared_a(void)
{
	if (static_branch_unlikely(&jl_key_shared))
		return 1;
	return 2;
}

noinline __used int jl_shared_b(int x)
{
	if (static_branch_unlikely(&jl_key_shared)) {
		WRITE_ONCE(jl_counter, jl_counter + x);
		return 1;
	}
	return 2;
}

noinline __used int jl_shared_likely(void)
{
	if (static_branch_likely(&jl_key_shared))
		return 1;
	return 2;
}

/* Two keys in one function: 10 * (key_true taken ? 1 : 2) + (key_false ...) */
noinline __used int jl_two_keys(void)
{
	int r = static_branch_likely(&jl_key_true) ? 10 : 20;

	return r + (static_branch_unlikely(&jl_key_false) ? 1 : 2);
}
