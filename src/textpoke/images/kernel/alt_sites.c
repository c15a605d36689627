// SPDX-License-Identifier: GPL-2.0-only
/*
 * Alternative sites in C, through inline asm as the kernel writes them.
 * alt_probe_* functions follow the probe convention of alt_asm.S (1 =
 * original, 1 + i = i-th table entry of the site).  The other functions
 * compute the same result whichever variant is patched in, so a test can
 * compare them before and after.
 */
#include "types.h"
#include "alternative.h"

#define PROBE	noinline __used

PROBE int alt_probe_c_always(void)
{
	int v;

	asm volatile(ALTERNATIVE("mov $1, %0", "mov $2, %0", X86_FEATURE_ALWAYS)
		     : "=a" (v));
	return v;
}

PROBE int alt_probe_c_erms(void)
{
	int v;

	asm volatile(ALTERNATIVE("mov $1, %0", "push $2; pop %q0", X86_FEATURE_ERMS)
		     : "=a" (v));
	return v;
}

PROBE int alt_probe_c_not_smap(void)
{
	int v;

	asm volatile(ALTERNATIVE("push $1; pop %q0", "mov $2, %0", ALT_NOT(X86_FEATURE_SMAP))
		     : "=a" (v));
	return v;
}

PROBE int alt_probe_c_nested2(void)
{
	int v;

	asm volatile(ALTERNATIVE_2("mov $1, %0",
				   "mov $2, %0", X86_FEATURE_AVX2,
				   "xor %0, %0; or $3, %0; nop; nop; nop", X86_FEATURE_BMI2)
		     : "=a" (v));
	return v;
}

PROBE int alt_probe_c_nested3(void)
{
	int v;

	asm volatile(ALTERNATIVE_3("push $1; pop %q0",
				   "mov $2, %0", X86_FEATURE_XMM2,
				   "mov $3, %0; nop", ALT_NOT(X86_FEATURE_HYPERVISOR),
				   "mov $4, %0; nop; nop", X86_FEATURE_FSRM)
		     : "=a" (v));
	return v;
}

PROBE int alt_probe_c_ternary(void)
{
	int v;

	/* entry 1 (ALWAYS) = the "no" side, entry 2 (POPCNT) = the "yes" side */
	asm volatile(ALTERNATIVE_TERNARY("mov $1, %0", X86_FEATURE_POPCNT,
					 "mov $3, %0", "mov $2, %0")
		     : "=a" (v));
	return v;
}

static u32 probe_c_data = 2;

PROBE int alt_probe_c_rip(void)
{
	int v;

	asm volatile(ALTERNATIVE("mov $1, %0", "mov %1, %0", X86_FEATURE_ALWAYS)
		     : "=a" (v) : "m" (probe_c_data));
	return v;
}

noinline __used int probe_c_one(void) { return 1; }
noinline __used int probe_c_two(void) { return 2; }

PROBE int alt_probe_c_call(void)
{
	int v;

	alternative_call(probe_c_one, probe_c_two, X86_FEATURE_RDTSCP, "=a" (v));
	return v;
}

PROBE int alt_probe_c_nops(void)
{
	int v = 2;

	/* 16 bytes of original that vanish when the feature is present */
	asm volatile(ALTERNATIVE("mov $1, %0; mov $0, %%ecx; mov $0, %%edx; nop", "",
				 X86_FEATURE_LFENCE_RDTSC)
		     : "+a" (v) : : "rcx", "rdx");
	return v;
}

/*
 * Behaves-the-same sites.
 */

/* Software population count with the popcnt calling convention: input in
 * %edi, result in %eax, nothing else touched. */
noinline __used unsigned int __sw_hweight32(unsigned int w)
{
	w -= (w >> 1) & 0x55555555;
	w  = (w & 0x33333333) + ((w >> 2) & 0x33333333);
	w  = (w + (w >> 4)) & 0x0f0f0f0f;
	return (w * 0x01010101) >> 24;
}

noinline __used unsigned int hweight32(unsigned int w)
{
	unsigned int res;

	asm volatile(ALTERNATIVE("call __sw_hweight32", "popcnt %1, %0", X86_FEATURE_POPCNT)
		     : "=a" (res), "+D" (w)
		     : : "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc");
	return res;
}

noinline __used void *tp_memcpy(void *dst, const void *src, unsigned long n)
{
	void *ret = dst;

	asm volatile(ALTERNATIVE_2("call memcpy_orig",
				   "rep movsb", X86_FEATURE_ERMS,
				   "rep movsb", X86_FEATURE_FSRM)
		     : "+D" (dst), "+S" (src), "+c" (n) : : "rax", "memory");
	return ret;
}

/* Paravirt-style operations: each call site is an indirect call through
 * the table, with an ALT_FLAG_DIRECT_CALL entry that turns it into a direct
 * call at boot. */
noinline __used unsigned long native_read_value(void) { return 42; }
noinline __used unsigned long native_add(unsigned long a, unsigned long b) { return a + b; }

struct pv_ops {
	unsigned long (*read_value)(void);
	unsigned long (*add)(unsigned long, unsigned long);
};

struct pv_ops pv_ops = {
	.read_value = native_read_value,
	.add = native_add,
};

#define PV_CALL(op)							\
	ALTERNATIVE("call *%c[pv_op](%%rip)", ALT_CALL_INSTR, ALT_CALL_ALWAYS)

noinline __used unsigned long pv_read_value(void)
{
	unsigned long ret;

	asm volatile(PV_CALL(read_value)
		     : "=a" (ret)
		     : [pv_op] "i" (&pv_ops.read_value)
		     : ALT_CALL_CLOBBERS);
	return ret;
}

noinline __used unsigned long pv_add(unsigned long a, unsigned long b)
{
	unsigned long ret;

	asm volatile(PV_CALL(add)
		     : "=a" (ret), "+D" (a), "+S" (b)
		     : [pv_op] "i" (&pv_ops.add)
		     : "rcx", "rdx", "r8", "r9", "r10", "r11", "memory", "cc");
	return ret;
}
