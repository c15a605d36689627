// SPDX-License-Identifier: GPL-2.0-only
/*
 * Indirect calls compiled with -mindirect-branch=thunk-extern: each becomes
 * a call or jump to __x86_indirect_thunk_<reg>, which objtool-lite lists in
 * .retpoline_sites.  start_kernel is the image's entry point.
 */
#include "types.h"

typedef int (*op_fn)(int);

noinline __used int op_inc(int x) { return x + 1; }
noinline __used int op_neg(int x) { return -x; }
noinline __used int op_twice(int x) { return 2 * x; }

op_fn op_table[3] = { op_inc, op_neg, op_twice };

/* An indirect call whose result is used: "call __x86_indirect_thunk_*". */
noinline __used int dispatch(int which, int x)
{
	return op_table[which % 3](x) + 1;
}

/* An indirect tail call: "jmp __x86_indirect_thunk_*". */
noinline __used int dispatch_tail(op_fn fn, int x)
{
	return fn(x);
}

/* Two indirect calls through different registers in one function. */
noinline __used int dispatch_compose(op_fn f, op_fn g, int x)
{
	int y = f(x);

	return g(y) + y;
}

extern int alt_reloc_selftest(void);

/* Entry point: not run by the boot patcher; a workload may call it. */
noinline __used int start_kernel(void)
{
	return dispatch(0, 1) + dispatch_tail(op_twice, 3) + alt_reloc_selftest();
}
