// SPDX-License-Identifier: GPL-2.0-only
// A target for the rescue tests: a spinner whose every register (and the
// direction flag, and rsp) is checked on each turn of its loop, and a reader
// blocked in read(2) on a pipe (a thread stopped inside an interruptible
// system call).  Prints where to look, then waits.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

volatile uint64_t spins, bad, got, bad2, saved_rsp, flags_tmp;
volatile int spinner_tid, reader_tid;
int pa[2], pi[2];

static void *spinner(void *arg) {
    (void)arg;
    spinner_tid = syscall(SYS_gettid);
    __asm__ volatile(
        "mov $0x71111111, %%rax\n mov $0x72222222, %%rbx\n mov $0x73333333, %%rcx\n"
        "mov $0x74444444, %%rdx\n mov $0x75555555, %%rsi\n mov $0x76666666, %%rdi\n"
        "mov $0x77777777, %%rbp\n mov $0x78888888, %%r8\n mov $0x79999999, %%r9\n"
        "mov $0x7aaaaaaa, %%r10\n mov $0x7bbbbbbb, %%r11\n mov $0x7ccccccc, %%r12\n"
        "mov $0x7ddddddd, %%r13\n mov $0x7eeeeeee, %%r14\n xor %%r15, %%r15\n"
        "mov %%rsp, saved_rsp(%%rip)\n std\n"
        "1: inc %%r15\n mov %%r15, spins(%%rip)\n"
        "cmp $0x71111111, %%rax\n jne 2f\n cmp $0x72222222, %%rbx\n jne 2f\n"
        "cmp $0x73333333, %%rcx\n jne 2f\n cmp $0x74444444, %%rdx\n jne 2f\n"
        "cmp $0x75555555, %%rsi\n jne 2f\n cmp $0x76666666, %%rdi\n jne 2f\n"
        "cmp $0x77777777, %%rbp\n jne 2f\n cmp $0x78888888, %%r8\n jne 2f\n"
        "cmp $0x79999999, %%r9\n jne 2f\n cmp $0x7aaaaaaa, %%r10\n jne 2f\n"
        "cmp $0x7bbbbbbb, %%r11\n jne 2f\n cmp $0x7ccccccc, %%r12\n jne 2f\n"
        "cmp $0x7ddddddd, %%r13\n jne 2f\n cmp $0x7eeeeeee, %%r14\n jne 2f\n"
        "cmp saved_rsp(%%rip), %%rsp\n jne 2f\n"
        "pushfq\n popq flags_tmp(%%rip)\n testq $0x400, flags_tmp(%%rip)\n jz 2f\n"
        "jmp 1b\n"
        "2: cld\n movq $1, bad(%%rip)\n 3: pause\n jmp 3b\n"
        ::: "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
            "r13", "r14", "r15", "memory", "cc");
    return 0;
}

static void *reader(void *arg) {
    (void)arg;
    reader_tid = syscall(SYS_gettid);
    for (;;) {
        char c;
        ssize_t n = read(pa[0], &c, 1);
        if (n == 1)
            got++;
        else
            bad2 = n < 0 ? (uint64_t)(-errno) : 1000 + (uint64_t)n;
    }
    return 0;
}

int main(void) {
    pthread_t a, b;
    if (pipe(pa) || pipe(pi))
        return 1;
    pthread_create(&a, 0, spinner, 0);
    pthread_create(&b, 0, reader, 0);
    while (!spinner_tid || !reader_tid || !spins)
        usleep(1000);
    printf("%p %p %p %p %d %d %d %d %d\n", (void *)&spins, (void *)&bad, (void *)&got,
           (void *)&bad2, spinner_tid, reader_tid, pi[0], pi[1], pa[1]);
    fflush(stdout);
    for (;;)
        pause();
}
