// SPDX-License-Identifier: GPL-2.0-only
/*
 * Static-call keys, trampolines and call sites.  Until a patcher rewrites
 * them, sites reach the function through the trampoline; after
 * static_call_update() they call it directly.  The results below depend
 * only on which function the key selects, so they are the same whether a
 * site goes through the trampoline or not.
 */
#include "types.h"
#include "static_call.h"

noinline __used long __static_call_return0(void)
{
	return 0;
}

/* 16 one-byte NOPs before the entry: room for a call-depth thunk (callthunks.S) */
#define CALL_PADDED __attribute__((patchable_function_entry(16, 16)))

noinline __used CALL_PADDED int sc_double(int x) { return 2 * x; }
noinline __used CALL_PADDED int sc_square(int x) { return x * x; }
noinline __used CALL_PADDED void sc_hook_fn(int *p) { *p += 100; }

DEFINE_STATIC_CALL(sc_op, sc_double);
DEFINE_STATIC_CALL_NULL(sc_hook, sc_hook_fn);
DEFINE_STATIC_CALL_RET0(sc_ret0, sc_square);
/* Its only site is the Jcc.d32 tail call in sc_jcc.S. */
DEFINE_STATIC_CALL(sc_cond, sc_double);

/* A plain call site: the result is op(x) + 1. */
noinline __used int sc_call_op(int x)
{
	return static_call(sc_op)(x) + 1;
}

/* A tail call: GCC emits "jmp __SCT__sc_op". */
noinline __used int sc_tail_op(int x)
{
	return static_call(sc_op)(x);
}

/* Two sites of one key in one function: op(x) + op(x + 1). */
noinline __used int sc_call_op_twice(int x)
{
	int a = static_call(sc_op)(x);

	return a + static_call(sc_op)(x + 1);
}

/* A NULL call: nothing happens until a function is installed. */
noinline __used int sc_run_hook(int x)
{
	int v = x;

	static_call(sc_hook)(&v);
	return v;
}

/* A tail call to a NULL-able call: "jmp __SCT__sc_hook", RET when NULL. */
noinline __used void sc_hook_tail(int *p)
{
	static_call(sc_hook)(p);
}

noinline __used int sc_run_hook_tail(int x)
{
	int v = x;

	sc_hook_tail(&v);
	return v;
}

/* Returns 0 through __static_call_return0 until updated. */
noinline __used int sc_call_ret0(int x)
{
	return (int)static_call(sc_ret0)(x) + 5;
}

/* The kernel's static_call_selftest: a key starting at sc_func_a, then
 * set to sc_func_b and back; sc_selftest_tail(2) must answer 3, 4, 3. */
noinline __used int sc_func_a(int x) { return x + 1; }
noinline __used int sc_func_b(int x) { return x + 2; }

DEFINE_STATIC_CALL(sc_selftest, sc_func_a);

noinline __used int sc_selftest_tail(int x)
{
	return static_call(sc_selftest)(x);
}

/* A plain call site of the same key: func(x) + 1000. */
noinline __used int sc_selftest_call(int x)
{
	return static_call(sc_selftest)(x) + 1000;
}
