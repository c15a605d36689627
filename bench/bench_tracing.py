# SPDX-License-Identifier: GPL-2.0-only
"""Tracing clients: ftrace enable rate and guest instructions per hit.

    python bench/bench_tracing.py [--repeat R] [--quick] [--json] [--clock cpu]

ftrace enable: the kernel image with 2,000 and with 20,000 generated
functions (textpoke.images.gen, built with gcc once and cached) booted on
4 vCPUs that run the ftrace workload over every generated function.  One
sample is one ``Ftrace.start("function")`` with the filter ``gen_fn_*``:
every fentry site of the image checked, then the N sites switched NOP5 ->
CALL ftrace_caller through the SMP batch (ceil(N/256) batches) while the
vCPUs keep running between the protocol's steps; the figure is sites/s,
median and min-max of --repeat >= 5, the two sizes interleaved round by
round.  Disabling between samples is not timed.  Afterwards: every batch
count and sync count is checked (<= 3 syncs per batch), every site must be
back to its boot bytes, no CPU may have oopsed and no traced function may
have returned a wrong value.

Guest instructions per hit of an ftrace callback: one call of a generated
function on a stopped vCPU, counted instruction by instruction with a
Unicorn code hook, with the site a NOP5 and with it calling the
trampoline (function tracer: ring-buffer write; profiler: binary search +
count).  The difference is the cost of one hit: the CALL, ftrace_caller's
register save/restore and the callback.  Counts are exact (repeated
--repeat times; the range shows they do not vary).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import Series, fmt, fmt_range, interleaved, now, script_main, table  # noqa: E402

from textpoke.sim import FtraceMachine  # noqa: E402

SIZES = (2000, 20000)


def _machine(n: int, seed: int) -> FtraceMachine:
    from textpoke.images.gen import many_image
    fm = FtraceMachine(cpus=4, seed=seed, image=many_image(n), ring_size=1 << 16)
    gen = [r.ip for r in fm.ftrace.records if r.name.startswith("gen_fn_")]
    if len(gen) != n:
        raise SystemExit(f"bench_tracing: image has {len(gen)} generated functions, not {n}")
    fm.set_work(gen)
    fm.start()
    fm.wait_passes(1)
    if fm.ftrace.set_ftrace_filter("gen_fn_*") != n:
        raise SystemExit("bench_tracing: filter does not select every generated function")
    return fm


def enable_rates(args) -> tuple[dict[str, Series], dict]:
    from textpoke.images.build import have_gcc
    if not have_gcc():
        print("bench_tracing: no gcc, ftrace enable rate not measured", file=sys.stderr)
        return {}, {}
    sizes = SIZES[:1] if args.quick else SIZES
    machines = {n: _machine(n, seed=n) for n in sizes}
    ups: dict[int, list] = {n: [] for n in sizes}
    try:
        def sample(n: int) -> float:
            fm = machines[n]
            t0 = now()
            up = fm.ftrace.start("function")
            dt = now() - t0
            ups[n].append(up)
            fm.run(200)
            fm.ftrace.stop()
            fm.read_trace()
            fm.trace.clear()
            return n / dt
        res = interleaved({f"{n} functions": (lambda n=n: sample(n)) for n in sizes},
                          args.repeat, units={f"{n} functions": "sites/s" for n in sizes})
        checks = {}
        for n, fm in machines.items():
            want_b = -(-n // 256)
            bad_up = [u.as_dict() for u in ups[n] if u.enabled != n or u.batches != want_b
                      or u.syncs > 3 * u.batches]
            restored = fm.sites_now() == fm.sites_at_boot
            checks[n] = {"batches_per_enable": want_b, "max_syncs": max(u.syncs for u in ups[n]),
                         "oopses": fm.oopses, "bad": fm.bad(), "restored": restored,
                         "overruns": fm.ring.overruns}
            if bad_up or fm.oopses or fm.bad() or not restored:
                raise SystemExit(f"bench_tracing: {n} functions misbehaved: {checks[n]} {bad_up}")
    finally:
        for fm in machines.values():
            fm.close()
    return res, checks


def _count_insns(fm: FtraceMachine, fn: int) -> int:
    from unicorn import UC_HOOK_CODE
    uc = fm.sim.vcpus[0].uc
    n = [0]

    def hook(_uc, _addr, _size, _user):
        n[0] += 1
    h = uc.hook_add(UC_HOOK_CODE, hook)
    try:
        fm.sim.call(fn, 1, 2, 3, 4, 5, 6, cpu=0)
    finally:
        uc.hook_del(h)
    return n[0]


def insns_per_hit(args) -> dict[str, Series]:
    out = {}
    with FtraceMachine(cpus=1, seed=0) as fm:
        ft = fm.ftrace
        fn = fm.sym("ft_read")
        ft.set_ftrace_filter("ft_read")

        def measure(tracer: str | None) -> Series:
            s = Series(f"ft_read, {tracer or 'not traced'}", "instructions")
            if tracer:
                ft.start(tracer)
            for _ in range(args.repeat):
                s.samples.append(_count_insns(fm, fn))
            if tracer:
                ft.stop()
            return s
        base = measure(None)
        out[base.name] = base
        for tracer in ("function", "profile"):
            s = measure(tracer)
            out[s.name] = s
            d = Series(f"per hit: {tracer} callback", "instructions",
                       [a - b for a, b in zip(s.samples, base.samples)])
            out[d.name] = d
        entries = fm.ring.drain()
        if len(entries) != args.repeat or fm.ftrace.name(entries[0].ip) != "ft_read":
            raise SystemExit(f"bench_tracing: {len(entries)} entries for {args.repeat} calls")
    return out


def run(args):
    rates, checks = enable_rates(args)
    return rates, checks, insns_per_hit(args)


def report(r) -> str:
    rates, checks, insns = r
    out = []
    if rates:
        rows = [[k, fmt(s.median, 0), fmt_range(s, 0), str(checks[int(k.split()[0])]
                                                           ["batches_per_enable"]),
                 str(checks[int(k.split()[0])]["max_syncs"])] for k, s in rates.items()]
        out.append("ftrace enable (NOP5 -> CALL on every function) while 4 vCPUs call them "
                   "(median, min-max):\n" + table(["image", "sites/s", "range", "batches",
                                                   "max syncs"], rows))
    rows = [[k, fmt(s.median, 0), fmt_range(s, 0)] for k, s in insns.items()]
    out.append("guest instructions, one call of ft_read (exact counts, median, min-max):\n"
               + table(["what", "instructions", "range"], rows))
    return "\n\n".join(out)


def to_json(r):
    rates, checks, insns = r
    return {"ftrace_enable": {k: s.as_dict() for k, s in rates.items()},
            "checks": {str(k): v for k, v in checks.items()},
            "insns_per_hit": {k: s.as_dict() for k, s in insns.items()}}


def main(argv=None) -> int:
    return script_main(argv, __doc__, "tracing", run, report, to_json)


if __name__ == "__main__":
    raise SystemExit(main())
