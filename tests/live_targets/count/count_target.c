/* SPDX-License-Identifier: GPL-2.0-only */
/* The counting target's head: NFUNCS is defined before this, the
 * functions and their table follow it (see gen.py). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t calls[NFUNCS];

/* A call target for "toggle --to call:fentry_ret": returns, touches nothing. */
__attribute__((no_instrument_function, noinline)) void fentry_ret(void)
{
	__asm__ volatile("");
}

#define FN(name, i) \
	__attribute__((noinline)) void f##name(void) \
	{ __atomic_fetch_add(&calls[i], 1, __ATOMIC_RELAXED); __asm__ volatile("" ::: "memory"); }
