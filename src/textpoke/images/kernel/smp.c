// SPDX-License-Identifier: GPL-2.0-only
/*
 * Atomic operations with LOCK_PREFIX, each recorded in .smp_locks so that
 * a uniprocessor boot can turn the LOCK prefixes into harmless DS
 * prefixes and back.  The results do not depend on the prefix.
 */
#include "types.h"
#include "alternative.h"

static __always_inline void atomic_inc(int *v)
{
	asm volatile(LOCK_PREFIX "incl %0" : "+m" (*v));
}

static __always_inline void atomic_add(int i, int *v)
{
	asm volatile(LOCK_PREFIX "addl %1, %0" : "+m" (*v) : "ir" (i));
}

static __always_inline bool atomic_dec_and_test(int *v)
{
	bool zero;

	asm volatile(LOCK_PREFIX "decl %0" : "+m" (*v), "=@ccz" (zero));
	return zero;
}

static __always_inline int atomic_fetch_add(int i, int *v)
{
	asm volatile(LOCK_PREFIX "xaddl %0, %1" : "+r" (i), "+m" (*v) : : "memory");
	return i;
}

static __always_inline int atomic_cmpxchg(int *v, int old, int new)
{
	asm volatile(LOCK_PREFIX "cmpxchgl %2, %1"
		     : "+a" (old), "+m" (*v) : "r" (new) : "memory");
	return old;
}

static __always_inline void set_bit(long nr, unsigned long *addr)
{
	asm volatile(LOCK_PREFIX "btsq %1, %0" : "+m" (*addr) : "r" (nr) : "memory");
}

static __always_inline void clear_bit(long nr, unsigned long *addr)
{
	asm volatile(LOCK_PREFIX "btrq %1, %0" : "+m" (*addr) : "r" (nr) : "memory");
}

int smp_counter;
unsigned long smp_bits;

/* Runs every locked operation once on fresh state and returns a value
 * that depends on all of them: 0x1234 when they all behaved. */
noinline __used int smp_locks_exercise(void)
{
	int r = 0, old;

	smp_counter = 0;
	smp_bits = 0;
	atomic_inc(&smp_counter);			/* 1 */
	atomic_add(4, &smp_counter);			/* 5 */
	old = atomic_fetch_add(3, &smp_counter);	/* old 5, now 8 */
	if (old == 5)
		r |= 0x4;
	if (atomic_cmpxchg(&smp_counter, 8, 1) == 8)	/* now 1 */
		r |= 0x30;
	if (atomic_dec_and_test(&smp_counter))		/* now 0 */
		r |= 0x200;
	set_bit(3, &smp_bits);
	set_bit(12, &smp_bits);
	clear_bit(3, &smp_bits);
	if (smp_bits == (1UL << 12))
		r |= 0x1000;
	return r;
}

/* One locked increment of the counter at @v (for SMP scenarios). */
noinline __used void smp_atomic_inc(int *v)
{
	atomic_inc(v);
}
