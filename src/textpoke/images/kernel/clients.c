// SPDX-License-Identifier: GPL-2.0-only
/*
 * The probe loop the switching clients' tests run on every vCPU.
 *
 * Each CPU gets one struct client_rec.  The host fills its slots with a
 * function (int fn(long)), an argument and the results it accepts at the
 * moment; the CPU calls every slot in turn, forever, keeping the last
 * result, a call count and -- for any result outside what the host
 * accepts -- a "bad" count and the offending value.  A result is accepted
 * when it equals allow0 or allow1 or lies in [lo, hi] (an empty range
 * when lo > hi).  "passes" counts completed rounds over all slots, so the
 * host can wait until every CPU has called everything again after an
 * update.
 */
#include "types.h"

#define CLIENT_SLOTS	64
#define CLIENT_CPUS	8

typedef int (*probe_fn)(long);

struct probe_slot {
	probe_fn fn;
	long arg;
	long allow0, allow1;
	long lo, hi;
	long last;
	unsigned long calls;
	unsigned long bad;
	long badval;
	long pad[6];
};

struct client_rec {
	unsigned long passes;
	unsigned long nslots;
	unsigned long pad[14];
	struct probe_slot slot[CLIENT_SLOTS];
};

struct client_rec client_recs[CLIENT_CPUS];

noinline __used void client_loop(struct client_rec *rec)
{
	for (;;) {
		unsigned long i, n = READ_ONCE(rec->nslots);

		if (n > CLIENT_SLOTS)
			n = CLIENT_SLOTS;
		for (i = 0; i < n; i++) {
			struct probe_slot *s = &rec->slot[i];
			probe_fn fn = READ_ONCE(s->fn);
			long v;

			if (!fn)
				continue;
			v = fn(READ_ONCE(s->arg));
			WRITE_ONCE(s->last, v);
			WRITE_ONCE(s->calls, s->calls + 1);
			if (v != READ_ONCE(s->allow0) && v != READ_ONCE(s->allow1) &&
			    !(READ_ONCE(s->lo) <= v && v <= READ_ONCE(s->hi))) {
				WRITE_ONCE(s->bad, s->bad + 1);
				WRITE_ONCE(s->badval, v);
			}
		}
		WRITE_ONCE(rec->passes, rec->passes + 1);
	}
}
