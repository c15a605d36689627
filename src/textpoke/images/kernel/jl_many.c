// SPDX-License-Identifier: GPL-2.0-only
/*
 * Keys with many sites, for the batch-size tests and the benchmarks:
 * jl_many_N() passes N jump-label sites of key jl_key_many_N and returns
 * how many of them jumped (0 or N once an update has finished; anything
 * in between while one is in flight).  The sites are written out by the
 * preprocessor, so there is nothing to generate.
 */
#include "types.h"
#include "jump_label.h"

DEFINE_STATIC_KEY_FALSE(jl_key_many_1);
DEFINE_STATIC_KEY_FALSE(jl_key_many_100);
DEFINE_STATIC_KEY_FALSE(jl_key_many_1000);

#define JL_SITE(k)	do { if (static_branch_unlikely(&k)) n++; barrier(); } while (0)
#define barrier()	asm volatile("" ::: "memory")
#define X10(s)		s; s; s; s; s; s; s; s; s; s
#define X100(s)		X10(X10(s))
#define X1000(s)	X10(X100(s))

noinline __used int jl_many_1(long unused)
{
	int n = 0;

	JL_SITE(jl_key_many_1);
	return n;
}

noinline __used int jl_many_100(long unused)
{
	int n = 0;

	X100(JL_SITE(jl_key_many_100));
	return n;
}

noinline __used int jl_many_1000(long unused)
{
	int n = 0;

	X1000(JL_SITE(jl_key_many_1000));
	return n;
}
