/* SPDX-License-Identifier: GPL-2.0-only */
/* Functions with ordinary entries (no fentry NOP), written in assembly so
 * that each has exactly the first instructions a test needs: some that the
 * relocator moves (a RIP-relative operand, ENDBR64 first, a short Jcc and
 * a short JMP among the moved bytes), and one per refusal reason.
 *
 * Each movable e_* adds 1 to its own hits[] slot, so a count can be checked
 * against the program's own.  stdin drives it:
 *   "go K"   T threads each call every movable function K times; then the
 *            line "done <sum> <hits...>" (sum: a checksum of the results)
 *   "busy"   T threads call them in a loop until "stop" (answers "busy",
 *            then "stopped <hits...>")
 * It prints "ready" first; EOF ends it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NHITS 5
uint64_t hits[NHITS];
long e_rip(long), e_endbr(long), e_jcc(long), e_jmp(long), e_inner(long);
long e_short(long), e_into(long), e_ind(long), e_call(long), e_ret(long), e_sys(long),
     e_ud(long), e_loop(long), e_outer(long), e_spare(long);

__asm__(
	".text\n"
	/* movable: a RIP-relative locked increment */
	".globl e_rip\n.type e_rip,@function\n"
	"e_rip:\n\tlock incq hits+0(%rip)\n\tlea 3(%rdi),%rax\n\tret\n.size e_rip,.-e_rip\n"
	/* movable, ENDBR64 first: patched after it */
	".globl e_endbr\n.type e_endbr,@function\n"
	"e_endbr:\n\tendbr64\n\tlock incq hits+8(%rip)\n\tlea 1(%rdi),%rax\n\tret\n.size e_endbr,.-e_endbr\n"
	/* movable: test; je rel8 (becomes Jcc rel32); lock incq rip */
	".globl e_jcc\n.type e_jcc,@function\n"
	"e_jcc:\n\ttest %edi,%edi\n\tje 1f\n\tlock incq hits+16(%rip)\n\tlea 7(%rdi),%rax\n\tret\n"
	"1:\tlock incq hits+16(%rip)\n\tmov $5,%eax\n\tret\n.size e_jcc,.-e_jcc\n"
	/* movable: jmp rel8 over three NOPs (becomes JMP rel32) */
	".globl e_jmp\n.type e_jmp,@function\n"
	"e_jmp:\n\tjmp 1f\n\tnop\n\tnop\n\tnop\n1:\tlock incq hits+24(%rip)\n\tlea 2(%rdi,%rdi),%rax\n\tret\n"
	".size e_jmp,.-e_jmp\n"
	/* refused: entry-point (e_inner starts inside its first 5 bytes); e_inner movable */
	".globl e_outer\n.type e_outer,@function\n"
	"e_outer:\n\tnop\n.globl e_inner\n.type e_inner,@function\n"
	"e_inner:\n\tlock incq hits+32(%rip)\n\tlea 9(%rdi),%rax\n\tret\n"
	".size e_inner,.-e_inner\n.size e_outer,.-e_outer\n"
	/* refused: short */
	".globl e_short\n.type e_short,@function\n"
	"e_short:\n\txor %eax,%eax\n\tret\n.size e_short,.-e_short\n"
	/* refused: jump-into (the jl lands at +2) */
	".globl e_into\n.type e_into,@function\n"
	"e_into:\n\txor %eax,%eax\n2:\tinc %eax\n\tcmp $3,%eax\n\tjl 2b\n\tret\n.size e_into,.-e_into\n"
	/* refused: indirect-jump */
	".globl e_ind\n.type e_ind,@function\n"
	"e_ind:\n\tlea 1f(%rip),%rax\n\tjmp *%rax\n1:\tmov %rdi,%rax\n\tret\n.size e_ind,.-e_ind\n"
	/* refused: call among the moved instructions */
	".globl e_call\n.type e_call,@function\n"
	"e_call:\n\tcall e_short\n\tret\n.size e_call,.-e_call\n"
	/* refused: ret among the moved instructions */
	".globl e_ret\n.type e_ret,@function\n"
	"e_ret:\n\ttest %edi,%edi\n\tjne 1f\n\tret\n1:\tmov %edi,%eax\n\tret\n.size e_ret,.-e_ret\n"
	/* refused: syscall among the moved instructions (getpid) */
	".globl e_sys\n.type e_sys,@function\n"
	"e_sys:\n\txor %eax,%eax\n\tmov $39,%al\n\tsyscall\n\tret\n.size e_sys,.-e_sys\n"
	/* refused: int (UD2) among the moved instructions; never called */
	".globl e_ud\n.type e_ud,@function\n"
	"e_ud:\n\tud2\n\tnop\n\tnop\n\tnop\n\tret\n.size e_ud,.-e_ud\n"
	/* refused: loop (a branch back into the moved bytes) */
	".globl e_loop\n.type e_loop,@function\n"
	"e_loop:\n\tdec %edi\n\tjnz e_loop\n\tmov %edi,%eax\n\tret\n.size e_loop,.-e_loop\n"
	/* movable, never called: a test writes an INT3 into it */
	".globl e_spare\n.type e_spare,@function\n"
	"e_spare:\n\tmov %rdi,%rax\n\tadd $1,%rax\n\tadd $2,%rax\n\tret\n.size e_spare,.-e_spare\n");

static long (*const movable[])(long) = {e_rip, e_endbr, e_jcc, e_jmp, e_inner};
#define NMOV (sizeof(movable) / sizeof(movable[0]))
static volatile int running;
static long rounds;

static long one_round(long k)
{
	long sum = 0;
	for (unsigned f = 0; f < NMOV; f++)
		sum += movable[f](k % 3);
	sum += e_short(0) + e_into(0) + e_ind(k) + e_call(0) + e_ret(k % 2) + e_loop(2);
	sum += e_sys(0) > 0;
	return sum;
}

static void *worker(void *arg)
{
	long *sum = arg;
	if (rounds < 0) {
		while (running)
			*sum += one_round(*sum & 7);
		return NULL;
	}
	for (long k = 0; k < rounds; k++)
		*sum += one_round(k);
	return NULL;
}

static void print_hits(const char *what, long sum)
{
	printf("%s %ld", what, sum);
	for (int i = 0; i < NHITS; i++)
		printf(" %lu", (unsigned long)__atomic_load_n(&hits[i], __ATOMIC_RELAXED));
	printf("\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	int t = argc > 1 ? atoi(argv[1]) : 4;
	pthread_t th[64];
	long sums[64];
	char line[64];
	if (t > 64)
		t = 64;
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "go ", 3)) {
			rounds = atol(line + 3);
			long total = 0;
			for (int i = 0; i < t; i++) {
				sums[i] = 0;
				pthread_create(&th[i], NULL, worker, &sums[i]);
			}
			for (int i = 0; i < t; i++) {
				pthread_join(th[i], NULL);
				total += sums[i];
			}
			print_hits("done", total);
		} else if (!strncmp(line, "busy", 4)) {
			rounds = -1;
			running = 1;
			for (int i = 0; i < t; i++) {
				sums[i] = 0;
				pthread_create(&th[i], NULL, worker, &sums[i]);
			}
			printf("busy\n");
			fflush(stdout);
		} else if (!strncmp(line, "stop", 4)) {
			running = 0;
			for (int i = 0; i < t; i++)
				pthread_join(th[i], NULL);
			print_hits("stopped", 0);
		}
	}
	return 0;
}
