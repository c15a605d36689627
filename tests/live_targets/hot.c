// SPDX-License-Identifier: GPL-2.0-only
/*
 * A live target for textpoke's tests: NTHREADS threads call patchable sites
 * in hot loops and count which variant of each ran.
 *
 *   jsiteN: a NOP5 that can become "jmp jaltN"; falls through to count
 *           old_count[N], jaltN counts new_count[N].
 *   csiteN: "call caN" (counts old_count[NJ+N]) that can become "call cbN"
 *           (counts new_count[NJ+N]); emulating this CALL writes the
 *           thread's stack.
 *
 * Usage: hot [NTHREADS [CHURN]]; prints the sites, then runs until stdin
 * reaches EOF, then joins the threads and prints the counters:
 *   count <site> <old> <new>
 * CHURN=1 adds a thread that keeps creating and joining short-lived
 * threads that call the sites too (threads come and go while patched).
 * SIGUSR1 and SIGRTMIN are counted (signals must reach the process unchanged;
 * SIGRTMIN is queued, so every one sent is counted).
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define NJ 4
#define NC 4

unsigned long old_count[NJ + NC] __attribute__((aligned(64)));
unsigned long new_count[NJ + NC] __attribute__((aligned(64)));
static volatile int stop_flag;
static volatile unsigned long usr1_count;
static volatile unsigned long churned;

#define JSITE(i) \
	".globl jsite" #i "\n.type jsite" #i ",@function\n.p2align 4\njsite" #i ":\n" \
	".byte 0x0f,0x1f,0x44,0x00,0x00\n" \
	"lock incq old_count+8*" #i "(%rip)\nret\n" \
	".globl jalt" #i "\n.type jalt" #i ",@function\njalt" #i ":\n" \
	"lock incq new_count+8*" #i "(%rip)\nret\n"
#define CSITE(i) \
	".globl csite" #i "\n.type csite" #i ",@function\n.p2align 4\ncsite" #i ":\n" \
	"call ca" #i "\nret\n" \
	".globl ca" #i "\n.type ca" #i ",@function\nca" #i ":\n" \
	"lock incq old_count+8*(" #i "+4)(%rip)\nret\n" \
	".globl cb" #i "\n.type cb" #i ",@function\ncb" #i ":\n" \
	"lock incq new_count+8*(" #i "+4)(%rip)\nret\n"

/* idle: a NOP5 no thread ever runs (for writes that need no protocol) */
asm(".text\n.globl idle\n.type idle,@function\n.p2align 4\nidle:\n"
    ".byte 0x0f,0x1f,0x44,0x00,0x00\nret\n");
asm(".text\n" JSITE(0) JSITE(1) JSITE(2) JSITE(3) CSITE(0) CSITE(1) CSITE(2) CSITE(3));

extern void idle(void);
extern void jsite0(void), jsite1(void), jsite2(void), jsite3(void);
extern void jalt0(void), jalt1(void), jalt2(void), jalt3(void);
extern void csite0(void), csite1(void), csite2(void), csite3(void);
extern void ca0(void), ca1(void), ca2(void), ca3(void);
extern void cb0(void), cb1(void), cb2(void), cb3(void);

static void (*const jsites[NJ])(void) = {jsite0, jsite1, jsite2, jsite3};
static void (*const jalts[NJ])(void) = {jalt0, jalt1, jalt2, jalt3};
static void (*const csites[NC])(void) = {csite0, csite1, csite2, csite3};
static void (*const cas[NC])(void) = {ca0, ca1, ca2, ca3};
static void (*const cbs[NC])(void) = {cb0, cb1, cb2, cb3};

static void round_of_calls(void)
{
	for (int i = 0; i < NJ; i++)
		jsites[i]();
	for (int i = 0; i < NC; i++)
		csites[i]();
}

static void *worker(void *arg)
{
	(void)arg;
	while (!stop_flag)
		round_of_calls();
	return NULL;
}

static void *short_lived(void *arg)
{
	(void)arg;
	for (int k = 0; k < 1000; k++)
		round_of_calls();
	return NULL;
}

static void *churner(void *arg)
{
	(void)arg;
	while (!stop_flag) {
		pthread_t t;
		if (pthread_create(&t, NULL, short_lived, NULL) == 0) {
			pthread_join(t, NULL);
			churned++;
		}
	}
	return NULL;
}

static void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 4;
	int churn = argc > 2 ? atoi(argv[2]) : 0;
	pthread_t th[64], ch;
	char buf[256];

	signal(SIGUSR1, on_usr1);
	signal(SIGRTMIN, on_usr1);	/* queued: none is merged with another */
	if (n > 64)
		n = 64;
	printf("site idle %p %p\n", (void *)idle, (void *)jalt0);
	for (int i = 0; i < NJ; i++)
		printf("site j%d %p %p\n", i, (void *)jsites[i], (void *)jalts[i]);
	for (int i = 0; i < NC; i++)
		printf("site c%d %p %p %p\n", i, (void *)csites[i], (void *)cas[i], (void *)cbs[i]);
	for (int i = 0; i < n; i++)
		pthread_create(&th[i], NULL, worker, NULL);
	if (churn)
		pthread_create(&ch, NULL, churner, NULL);
	printf("ready %d\n", n);
	fflush(stdout);
	while (read(0, buf, sizeof(buf)) > 0)
		;
	stop_flag = 1;
	for (int i = 0; i < n; i++)
		pthread_join(th[i], NULL);
	if (churn)
		pthread_join(ch, NULL);
	for (int i = 0; i < NJ; i++)
		printf("count j%d %lu %lu\n", i, old_count[i], new_count[i]);
	for (int i = 0; i < NC; i++)
		printf("count c%d %lu %lu\n", i, old_count[NJ + i], new_count[NJ + i]);
	printf("usr1 %lu\nchurned %lu\n", usr1_count, churned);
	return 0;
}
