// SPDX-License-Identifier: GPL-2.0-only
/*
 * The guest side of the function tracer and its workload.
 *
 * Tracer callbacks (called by ftrace_caller, see ftrace_64.S, with the
 * traced function's fentry address and its caller's return address) find
 * their CPU's struct ftrace_cpu through %gs:0, as this_cpu_ptr() does: the
 * host points each vCPU's GS base at its own record, whose first word
 * points at itself.  They are notrace, so tracing never recurses.
 *
 * The ring buffer is one single-producer, single-consumer ring per CPU:
 * the CPU writes an entry and then advances "head"; the host reads the
 * entries up to head and then advances "tail".  What a full ring does
 * follows the kernel's "overwrite" trace option, per CPU in "overwrite":
 * set (the kernel's default) the new event takes the slot of the oldest
 * unread one, counted in "overruns" (the host then reads only the newest
 * mask + 1 entries); clear, the new event is dropped and counted in
 * "dropped" (the kernel's "dropped events").  Never silently either way.
 * The producer never writes "tail": the host alone moves it.
 * Timestamps come from a global counter bumped atomically by every event
 * (the kernel's "counter" trace clock): they order events across CPUs.
 *
 * The function profiler counts hits per function in a per-CPU array,
 * indexed by a binary search over the sorted table of traced addresses.
 *
 * ftrace_work_loop is the workload every vCPU runs: it calls a table of
 * functions long fn(long, long, long, long, long, long), checks each
 * result and counts every call it makes, so tests can compare the trace
 * with the workload's own counts.  Each function returns the weighted sum
 * of its arguments plus its own address, which catches a trampoline that
 * clobbers an argument register.
 */
#include "types.h"

#define FTRACE_CPUS	8

struct trace_entry {
	u64 ts;
	u64 ip;
	u64 parent_ip;
	u64 pid;
};

struct ftrace_cpu {
	struct ftrace_cpu *self;	/* %gs:0 */
	u64 cpu;
	u64 pid;			/* the task running on this CPU */
	struct trace_entry *buf;
	u64 mask;			/* ring size - 1 (a power of two) */
	u64 head;			/* written by this CPU */
	u64 tail;			/* written by the host */
	u64 overruns;
	u64 hits;			/* callbacks run on this CPU */
	u64 *prof;			/* profiler: per-function hits */
	u64 overwrite;			/* host: a full ring overwrites its oldest */
	u64 dropped;			/* events refused by a full ring (no overwrite) */
	u64 pad[4];
};

/*
 * The tracers' ops, named as the kernel's: what the trampolines pass as
 * their third argument (ftrace_caller loads function_trace_op; a dynamic
 * trampoline loads the pointer stored at its own end).  The callbacks here
 * do not need it.
 */
struct ftrace_ops {
	void *func;
	u64 flags;
	void *trampoline;
	u64 pad;
};

struct ftrace_ops ftrace_list_end;
struct ftrace_ops global_ops;
struct ftrace_ops ftrace_profile_ops;
struct ftrace_ops kprobe_ftrace_ops;
struct ftrace_ops kprobe_ipmodify_ops;
struct ftrace_ops graph_ops;		/* fgraph's ops (ftrace_graph_func) */
struct ftrace_ops *function_trace_op = &ftrace_list_end;

/*
 * Which ops the list function calls (the host keeps it in step with the
 * ops registered, as the kernel's ftrace_ops_list): the function tracer,
 * the profiler, the kprobes' ops (whose handler checks the ip itself).
 */
#define LIST_TRACE	1
#define LIST_PROFILE	2
#define LIST_KPROBE	4
u64 ftrace_list_ops = LIST_TRACE | LIST_PROFILE;

void kprobe_ftrace_handler(u64 ip, u64 parent_ip, void *op, void *regs);

struct ftrace_cpu ftrace_percpu[FTRACE_CPUS];
u64 trace_clock_counter;
/* the profiler's sorted table of traced fentry addresses */
const u64 *ftrace_prof_ips;
u64 ftrace_prof_n;

static __always_inline struct ftrace_cpu *this_ftrace_cpu(void)
{
	struct ftrace_cpu *c;

	asm volatile("movq %%gs:0, %0" : "=r"(c));
	return c;
}

static __always_inline void trace_record(struct ftrace_cpu *c, u64 ip, u64 parent_ip)
{
	u64 head = c->head;
	u64 ts = __atomic_fetch_add(&trace_clock_counter, 1, __ATOMIC_RELAXED);
	struct trace_entry *e;

	if (head - READ_ONCE(c->tail) > c->mask) {
		if (!READ_ONCE(c->overwrite)) {
			c->dropped++;
			return;
		}
		/* the slot written next holds the oldest unread event */
		c->overruns++;
	}
	e = &c->buf[head & c->mask];
	e->ts = ts;
	e->ip = ip;
	e->parent_ip = parent_ip;
	e->pid = c->pid;
	WRITE_ONCE(c->head, head + 1);
}

static __always_inline void profile_record(struct ftrace_cpu *c, u64 ip)
{
	const u64 *ips = READ_ONCE(ftrace_prof_ips);
	u64 lo = 0, hi = READ_ONCE(ftrace_prof_n);

	while (lo < hi) {
		u64 mid = (lo + hi) / 2;

		if (ips[mid] < ip)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < ftrace_prof_n && ips[lo] == ip)
		c->prof[lo]++;
}

noinline __used notrace void function_trace_call(u64 ip, u64 parent_ip)
{
	struct ftrace_cpu *c = this_ftrace_cpu();

	c->hits++;
	trace_record(c, ip, parent_ip);
}

noinline __used notrace void function_profile_call(u64 ip, u64 parent_ip)
{
	struct ftrace_cpu *c = this_ftrace_cpu();

	c->hits++;
	profile_record(c, ip);
}

/* Every registered ops: what the kernel's list function does for two or more. */
noinline __used notrace void ftrace_ops_list_func(u64 ip, u64 parent_ip, void *op, void *regs)
{
	struct ftrace_cpu *c = this_ftrace_cpu();
	u64 ops = READ_ONCE(ftrace_list_ops);

	if (ops & (LIST_TRACE | LIST_PROFILE))
		c->hits++;
	if (ops & LIST_TRACE)
		trace_record(c, ip, parent_ip);
	if (ops & LIST_PROFILE)
		profile_record(c, ip);
	if (ops & LIST_KPROBE)
		kprobe_ftrace_handler(ip, parent_ip, op, regs);
}

/* ------------------------------------------------------------ workload */
typedef long (*ft_fn)(long, long, long, long, long, long);

#define FT_LIN(a, b, c, d, e, f) ((a) + 2 * (b) + 3 * (c) + 4 * (d) + 5 * (e) + 6 * (f))

struct ft_work {
	u64 passes;
	u64 nfuncs;
	ft_fn *fns;
	u64 *counts;			/* calls made, per function */
	u64 bad;
	u64 badfn;
	u64 pause;			/* host: stop at the end of a pass */
	u64 paused;			/* this CPU: stopped */
	ft_fn oneshot;			/* host: call this once */
	u64 oneshot_calls;
	u64 pad[6];
};

struct ft_work ft_work_recs[FTRACE_CPUS];

static __always_inline void ft_call(struct ft_work *w, ft_fn fn, u64 *count, long x)
{
	long v = fn(x, x + 1, x + 2, x + 3, x + 4, x + 5);

	WRITE_ONCE(*count, *count + 1);
	if (v - FT_LIN(x, x + 1, x + 2, x + 3, x + 4, x + 5) != (long)fn) {
		WRITE_ONCE(w->bad, w->bad + 1);
		WRITE_ONCE(w->badfn, (u64)fn);
	}
}

noinline __used void ftrace_work_loop(struct ft_work *w)
{
	for (;;) {
		u64 i, n = READ_ONCE(w->nfuncs);
		ft_fn *fns = READ_ONCE(w->fns);
		ft_fn one;

		for (i = 0; i < n; i++) {
			ft_fn fn = READ_ONCE(fns[i]);

			if (fn)
				ft_call(w, fn, &w->counts[i], (long)(w->passes + i));
		}
		one = READ_ONCE(w->oneshot);
		if (one) {
			ft_call(w, one, &w->oneshot_calls, (long)w->passes);
			WRITE_ONCE(w->oneshot, 0);
		}
		WRITE_ONCE(w->passes, w->passes + 1);
		if (READ_ONCE(w->pause)) {
			WRITE_ONCE(w->paused, 1);
			while (READ_ONCE(w->pause))
				asm volatile("pause");
			WRITE_ONCE(w->paused, 0);
		}
	}
}

/* The functions of the kernel's startup test (trace_selftest.c names). */
noinline __used long trace_selftest_dynamic_test_func(long a, long b, long c, long d, long e,
						       long f)
{
	return FT_LIN(a, b, c, d, e, f) + (long)&trace_selftest_dynamic_test_func;
}

noinline __used long trace_selftest_dynamic_test_func2(long a, long b, long c, long d, long e,
							long f)
{
	return FT_LIN(a, b, c, d, e, f) + (long)&trace_selftest_dynamic_test_func2;
}

/* A small call graph for the demo trace: ft_open -> ft_lookup -> ft_hash. */
noinline __used long ft_hash(long a, long b, long c, long d, long e, long f)
{
	return FT_LIN(a, b, c, d, e, f) + (long)&ft_hash;
}

noinline __used long ft_lookup(long a, long b, long c, long d, long e, long f)
{
	return ft_hash(a, b, c, d, e, f) - (long)&ft_hash + (long)&ft_lookup;
}

noinline __used long ft_permission(long a, long b, long c, long d, long e, long f)
{
	return FT_LIN(a, b, c, d, e, f) + (long)&ft_permission;
}

noinline __used long ft_open(long a, long b, long c, long d, long e, long f)
{
	long v = ft_lookup(a, b, c, d, e, f) - (long)&ft_lookup;

	if (ft_permission(a, b, c, d, e, f) - (long)&ft_permission != v)
		return 0;
	return v + (long)&ft_open;
}

noinline __used long ft_read(long a, long b, long c, long d, long e, long f)
{
	return FT_LIN(a, b, c, d, e, f) + (long)&ft_read;
}
