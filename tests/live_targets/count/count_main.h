/* SPDX-License-Identifier: GPL-2.0-only */
/* The counting target's threads and control (see gen.py). */
#define NTHREADS_MAX 64

static int nthreads = 4, rounds = 10, busy;
static const char *out_path;
static volatile uint64_t generation;     /* window mode: bumped per window */
static uint64_t done_count;              /* threads done with this window */
static volatile int running = 1;
static uint64_t snapshot[NFUNCS];

/* Not instrumented: the idle loop must not touch a counted function. */
__attribute__((no_instrument_function)) static void call_round(int t)
{
	for (int i = 0; i < NFUNCS; i++) {
		int k = 1 + (i + t) % 3;
		for (int j = 0; j < k; j++)
			table[i]();
	}
}

__attribute__((no_instrument_function)) static void *worker(void *arg)
{
	int t = (int)(intptr_t)arg;
	uint64_t seen = 0;

	while (running) {
		if (busy) {
			call_round(t);
			continue;
		}
		uint64_t g = generation;
		if (g == seen) {
			usleep(100);     /* idle: call nothing counted, burn no CPU */
			continue;
		}
		for (int r = 0; r < rounds; r++)
			call_round(t);
		seen = g;
		__atomic_fetch_add(&done_count, 1, __ATOMIC_RELEASE);
	}
	return NULL;
}

__attribute__((no_instrument_function)) static void dump(const uint64_t *base)
{
	FILE *f = fopen(out_path, "w");
	if (!f) { perror(out_path); exit(3); }
	for (int i = 0; i < NFUNCS; i++)
		fprintf(f, "%llu\n", (unsigned long long)(__atomic_load_n(&calls[i], __ATOMIC_RELAXED) - base[i]));
	fclose(f);
}

__attribute__((no_instrument_function)) int main(int argc, char **argv)
{
	/* count_target OUT [window|busy] [threads] [rounds] */
	out_path = argc > 1 ? argv[1] : "/dev/null";
	busy = argc > 2 && !strcmp(argv[2], "busy");
	if (argc > 3) nthreads = atoi(argv[3]);
	if (argc > 4) rounds = atoi(argv[4]);
	if (nthreads < 1 || nthreads > NTHREADS_MAX) return 2;

	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);   /* threads inherit: only main takes them */

	pthread_t th[NTHREADS_MAX];
	for (int t = 0; t < nthreads; t++)
		pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
	printf("ready %d\n", (int)getpid());
	fflush(stdout);

	static uint64_t zero[NFUNCS];
	uint64_t windows = 0;
	for (;;) {
		int sig;
		sigwait(&set, &sig);
		if (sig == SIGTERM)
			break;
		if (busy) {
			dump(zero);
			printf("snapshot %llu\n", (unsigned long long)++windows);
		} else {
			for (int i = 0; i < NFUNCS; i++)
				snapshot[i] = calls[i];
			uint64_t want = __atomic_load_n(&done_count, __ATOMIC_ACQUIRE) + nthreads;
			generation = generation + 1;
			while (__atomic_load_n(&done_count, __ATOMIC_ACQUIRE) < want)
				usleep(200);
			dump(snapshot);
			printf("window %llu\n", (unsigned long long)++windows);
		}
		fflush(stdout);
	}
	running = 0;
	for (int t = 0; t < nthreads; t++)
		pthread_join(th[t], NULL);
	dump(zero);
	return 0;
}
