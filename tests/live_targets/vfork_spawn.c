// SPDX-License-Identifier: GPL-2.0-only
// A target whose children share its memory: a busy worker calls top()
// (-> leaf) for ever, and a spawner thread, which never calls them itself,
// makes children in a loop by the mode given as argv[1]:
//   spawn  posix_spawn("/bin/true") -- glibc's vfork child (CLONE_VM |
//          CLONE_VFORK), which resets every signal handler to SIG_DFL and
//          calls execve
//   vfork  clone(CLONE_VM | CLONE_VFORK) by hand: the child sets SIGTRAP to
//          SIG_DFL as posix_spawn's does, calls leaf() 2,000 times and
//          top() every 100th (some 0.1 ms: a batch's INT3 written
//          meanwhile is met; 20 events), _exit(0)
//   vm     clone(CLONE_VM) with SIGCHLD, no CLONE_VFORK: the child runs
//          beside its parent (which waits for it), the same
// "ready TID" on stdout (the spawner's thread id), then a line on stdin stops it; it prints how many
// children it made and how many died of a signal or failed.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

extern char **environ;
volatile long sink;
__attribute__((noinline)) long leaf(long a) { sink += a; return a * 3; }
__attribute__((noinline)) long top(long a) { return leaf(a) ^ a; }
static volatile int stop;
static long children, bad, lastsig;
static const char *mode = "spawn";
static volatile pid_t spawner_tid;

static void *worker(void *arg)
{
	for (long i = 0; !stop; i++)
		top(i);
	return NULL;
}

static int child(void *arg)
{
	struct sigaction sa = { .sa_handler = SIG_DFL };
	sigaction(SIGTRAP, &sa, NULL);
	for (int i = 0; i < 2000; i++)
		if (i % 100)
			leaf(i);
		else
			top(i);
	_exit(0);
}

static void *spawner(void *arg)
{
	char *argv[] = { "true", NULL };
	size_t size = 1 << 16;
	char *stack = malloc(size);
	int vm = !strcmp(mode, "vm");
	spawner_tid = gettid();
	while (!stop) {
		pid_t c;
		if (!strcmp(mode, "spawn")) {
			if (posix_spawn(&c, "/bin/true", NULL, NULL, argv, environ))
				continue;
		} else {
			c = clone(child, stack + size, CLONE_VM | (vm ? 0 : CLONE_VFORK) | SIGCHLD, NULL);
			if (c < 0)
				continue;
		}
		children++;
		int st;
		if (waitpid(c, &st, 0) == c) {
			if (WIFSIGNALED(st)) { bad++; lastsig = WTERMSIG(st); }
			else if (WEXITSTATUS(st)) { bad++; lastsig = 1000 + WEXITSTATUS(st); }
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char buf[64];
	pthread_t w, s;
	if (argc > 1)
		mode = argv[1];
	pthread_create(&w, NULL, worker, NULL);
	pthread_create(&s, NULL, spawner, NULL);
	while (!spawner_tid)
		usleep(100);
	printf("ready %d\n", (int)spawner_tid);
	fflush(stdout);
	if (!fgets(buf, sizeof buf, stdin))
		stop = 1;
	stop = 1;
	pthread_join(s, NULL);
	pthread_join(w, NULL);
	printf("children=%ld bad=%ld lastsig=%ld\n", children, bad, lastsig);
	fflush(stdout);
	return 0;
}
