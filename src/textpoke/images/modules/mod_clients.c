// SPDX-License-Identifier: GPL-2.0-only
/*
 * A loadable module for the bundled kernel image: it tests two of the
 * kernel's static keys, calls through one of its static calls, and carries
 * an alternative, a retpoline (an indirect call) and return-thunk sites, so
 * that loading it exercises every table the module loader handles.
 *
 * Built as a relocatable object with the kernel image's flags plus
 * -mcmodel=kernel; the site tables objtool would add are appended by
 * build.py.  Every probe is "int fn(long)" for the image's client loop.
 */
#include "types.h"
#include "jump_label.h"
#include "static_call.h"
#include "alternative.h"

extern struct static_key_false jl_key_false;
extern struct static_key_true jl_key_true;
extern int sc_double(int x);
extern int sc_square(int x);
DECLARE_STATIC_CALL(sc_op, sc_double);

/* a pointer in module data (R_X86_64_64), called indirectly: a retpoline site */
static int (*mod_fp)(int) = sc_square;
/* indexed with an absolute address (R_X86_64_32S under -mcmodel=kernel) */
static const int mod_tbl[4] = { 3, 5, 7, 11 };
int mod_calls;

/* 1 when jl_key_false is enabled: a NOP site (unlikely, initially false) */
noinline __used int mod_key_false(long x)
{
	return static_branch_unlikely(&jl_key_false) ? 1 : 0;
}

/* 1 when jl_key_false is enabled, through a JMP site (likely on a false key) */
noinline __used int mod_key_false_likely(long x)
{
	return static_branch_likely(&jl_key_false) ? 1 : 0;
}

/* 1 when jl_key_true is enabled: a NOP site (likely on a true key) */
noinline __used int mod_key_true(long x)
{
	return static_branch_likely(&jl_key_true) ? 1 : 0;
}

/* op(x) + 1000: a CALL site of sc_op */
noinline __used int mod_call_op(long x)
{
	WRITE_ONCE(mod_calls, mod_calls + 1);
	return static_call(sc_op)((int)x) + 1000;
}

/* op(x): a tail-call site of sc_op */
noinline __used int mod_tail_op(long x)
{
	return static_call(sc_op)((int)x);
}

/* alternative (2 with ALWAYS) * 100 + fp(x) + tbl[x & 3] + sc_double(x) */
noinline __used int mod_misc(long x)
{
	int alt;

	asm volatile(ALTERNATIVE("mov $1, %0", "mov $2, %0", X86_FEATURE_ALWAYS) : "=r" (alt));
	return alt * 100 + READ_ONCE(mod_fp)((int)x) + mod_tbl[x & 3] + sc_double((int)x);
}
