# SPDX-License-Identifier: GPL-2.0-only
"""What the benches' C harnesses share: the headers, and the report of each
variant's median block (ns a call), the variants having taken turns block by
block in one process (a preemption or a busy neighbour costs one block of
one variant, and the median drops it)."""

C_PRELUDE = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <asm/prctl.h>
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
static int cmp(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;
	return (x > y) - (x < y);
}
/* ns[v * blocks + b]: block b of variant v; prints each variant's median
 * block in ns a call, one line each */
static void report_medians(long *ns, int nv, long blocks, long per)
{
	for (int v = 0; v < nv; v++) {
		qsort(ns + v * blocks, blocks, sizeof *ns, cmp);
		printf("%.3f\n", (double)ns[v * blocks + blocks / 2] / per);
	}
}
"""
