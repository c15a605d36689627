# SPDX-License-Identifier: GPL-2.0-only
"""A target whose threads turn RDTSC off (``prctl(PR_SET_TSC,
PR_TSC_SIGSEGV)``, a per-thread flag a thread's children inherit), for the
tests of live trace's and live probe's check: mode "one", only the second
worker turns it off (the check must ask every thread); "all", main does,
before its threads are made; "none", nobody does.  Every thread calls
``leaf``; a line on stdin makes main call it once and answer ``ok``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from livetest import build_c

__all__ = ["NOTSC_C", "build_notsc", "NoTscTarget"]

NOTSC_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
volatile long sink;
__attribute__((noinline)) long leaf(long a) { sink += a; return a * 3; }
static int one, none;
static pthread_barrier_t bar;
static void *w(void *a)
{
	if (one && a)
		prctl(PR_SET_TSC, PR_TSC_SIGSEGV);
	pthread_barrier_wait(&bar);
	for (;;) { leaf(1); usleep(100); }
}
int main(int argc, char **argv)
{
	pthread_t t;
	char buf[16];
	one = argc > 1 && !strcmp(argv[1], "one");
	none = argc > 1 && !strcmp(argv[1], "none");
	if (!one && !none)
		prctl(PR_SET_TSC, PR_TSC_SIGSEGV);
	pthread_barrier_init(&bar, NULL, 3);
	pthread_create(&t, 0, w, (void *)0);
	pthread_create(&t, 0, w, (void *)1);
	pthread_barrier_wait(&bar);
	printf("ready\n");
	fflush(stdout);
	while (fgets(buf, sizeof buf, stdin)) {
		leaf(2);
		printf("ok\n");
		fflush(stdout);
	}
	return 0;
}
"""


def build_notsc(d: Path) -> Path:
    """The target built in *d* (``d/notsc``; skips without gcc)."""
    return build_c(d, NOTSC_C, {"notsc": ()}, name="notsc.c") / "notsc"


class NoTscTarget:
    """The target started in *mode*, ready (its threads made and running)."""

    def __init__(self, exe: Path, mode: str) -> None:
        self.p = subprocess.Popen([str(exe), mode], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def ping(self) -> str:
        """Main calls leaf once: ``ok`` while the target is well."""
        self.p.stdin.write("x\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def maps(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return f.read().splitlines()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()
