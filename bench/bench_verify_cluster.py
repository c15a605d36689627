# SPDX-License-Identifier: GPL-2.0-only
"""verify campaigns on Dask distributed against the local pool, and a model
of 100 workers from measured per-chunk costs.

Measured, interleaved round by round, for n = 1, 2, 4, 8 workers:

* ``pool n``  -- today's ``verify(jobs=n)`` (fork pool, in-order absorb);
* ``dask n``  -- the same campaign through :class:`Campaign` on a
  ``LocalCluster`` of n one-thread worker processes (started once per n,
  start-up timed apart).

Each run is the same campaign (``--scenarios`` x ``--schedules``, naive
strategy, chunks of ``--chunk``); figures: schedules per second (wall) and
per CPU-second (every process of the run: this one -- which hosts the Dask
scheduler -- plus its pool or cluster processes, read with psutil or
getrusage).  The box has 2 cores shared with other work, so 4 and 8
workers oversubscribe: that is measured as it is, not extrapolated; the
1-minute load average as each run started is printed next to each row.

Then what the user sees: ``textpoke verify`` vs ``textpoke verify --cluster
local:2``, process start to exit.

The model: one worker runs a chunk in ``t_chunk`` CPU-seconds (measured);
the scheduler and this process's result loop cost ``s_task`` CPU-seconds
per chunk (measured on a batch of tasks that do nothing: this process
hosts both; the round trip through the campaign's window is shown too);
the resume file costs one fsync per chunk (measured);
a result is ``b`` bytes on the wire (measured).  With W workers:

    chunks/s = min(W / t_chunk, 1 / s_task, 1 / t_fsync)

and the table shows, for W up to 100 and a few chunk sizes, which term
binds -- where the scheduler or the result stream becomes the limit.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import REPO, Series, add_common_args, fmt_range, meta, meta_line, table  # noqa: E402


def _tree_cpu(proc) -> float:
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:        # a process that just exited
            pass
    return total


def _self_cpu() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _noop(x: int) -> int:
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--scenarios", default="nop5-jmp32,call,xline,multi")
    ap.add_argument("--schedules", type=int, default=None,
                    help="per scenario (default 30; 10 with --quick)")
    ap.add_argument("--chunk", type=int, default=10)
    args = ap.parse_args(argv)
    if args.schedules is None:
        args.schedules = 10 if args.quick else 30
    import psutil
    from textpoke.sim import verify
    from textpoke.verify._cluster import Campaign, Cell, connect

    scn = args.scenarios.split(",")
    ns = [int(x) for x in args.workers.split(",")]
    total = len(scn) * args.schedules
    me = psutil.Process()
    res: dict = {"meta": meta(args), "schedules_per_run": total, "chunk": args.chunk,
                 "configs": {}}

    def pool_run(n: int) -> tuple[float, float]:
        c0, t0 = _self_cpu(), time.perf_counter()
        rep = verify(scn, args.schedules, strategy="naive", jobs=n, chunk=args.chunk)
        wall, cpu = time.perf_counter() - t0, _self_cpu() - c0
        assert rep.schedules == total
        return wall, cpu

    def dask_run(be, n: int) -> tuple[float, float, Campaign]:
        c0, t0 = _tree_cpu(me), time.perf_counter()
        camp = Campaign([Cell(s, "naive") for s in scn], args.schedules,
                        chunk=args.chunk).run(be)
        wall, cpu = time.perf_counter() - t0, _tree_cpu(me) - c0
        assert camp.completed == total
        return wall, cpu, camp

    chunk_cpu: list[float] = []
    chunk_bytes: list[int] = []
    for n in ns:
        t0 = time.perf_counter()
        be = connect(f"local:{n}")
        startup = time.perf_counter() - t0
        dask_run(be, n)                       # warm-up: imports in every worker
        pool_run(n)
        sr = {k: Series(f"{k} {n}", "schedules/s") for k in ("pool", "dask")}
        sc = {k: Series(f"{k} {n}", "schedules/CPU-s") for k in ("pool", "dask")}
        loads: list[float] = []
        for r in range(args.repeat):
            order = ("pool", "dask") if r % 2 == 0 else ("dask", "pool")
            for k in order:
                loads.append(os.getloadavg()[0])
                if k == "pool":
                    wall, cpu = pool_run(n)
                else:
                    wall, cpu, camp = dask_run(be, n)
                    if n == ns[0]:      # a worker's cost per chunk, fewest workers
                        chunk_cpu += [c for c, _w in camp.chunk_costs]
                sr[k].samples.append(total / wall)
                sc[k].samples.append(total / cpu)
        if n == ns[0]:
            # one result's size on the wire, as Dask would pickle it
            from textpoke.verify._cluster import run_chunk
            from textpoke.sim import schedule_seeds
            r1 = run_chunk({"scenario": scn[0], "strategy": "naive", "mutation": None,
                            "cpus": 3, "line_size": 64},
                           list(schedule_seeds(0, args.chunk)), 0)
            chunk_bytes.append(len(pickle.dumps(r1)))
        if n == max(ns):
            # the scheduler + result loop alone, on tasks that do nothing:
            # (a) capacity -- a batch submitted at once, this process's CPU
            # (it hosts the scheduler and the client) per task; (b) the round
            # trip through the campaign's window of 2 per worker thread
            from distributed import as_completed
            client = be.client
            tasks = 2000 if not args.quick else 600
            cap, per_task, rtt = [], [], []
            for _ in range(args.repeat):
                c0, t0 = me.cpu_times(), time.perf_counter()
                for f in as_completed(client.map(_noop, range(tasks), pure=False)):
                    f.result()
                wall, c1 = time.perf_counter() - t0, me.cpu_times()
                cap.append(tasks / wall)
                per_task.append((c1.user + c1.system - c0.user - c0.system) / tasks)
                t0 = time.perf_counter()
                it = iter(range(tasks // 4))
                window = 2 * sum(client.nthreads().values())
                ac = as_completed([client.submit(_noop, next(it), pure=False)
                                   for _ in range(window)])
                for f in ac:
                    f.result()
                    i = next(it, None)
                    if i is not None:
                        ac.add(client.submit(_noop, i, pure=False))
                rtt.append((time.perf_counter() - t0) / (tasks // 4) * window)
            res["scheduler_tasks_per_s"] = Series("no-op tasks/s", "tasks/s", cap).as_dict()
            res["scheduler_cpu_per_task_s"] = Series("CPU/task", "s", per_task).as_dict()
            res["task_round_trip_s"] = Series("round trip", "s", rtt).as_dict()
        be.close()
        res["configs"][n] = {"startup_s": startup, "load": [min(loads), max(loads)],
                             **{f"{k}_rate": sr[k].as_dict() for k in sr},
                             **{f"{k}_per_cpu": sc[k].as_dict() for k in sc}}
        print(f"n={n}: pool {fmt_range(sr['pool'])} /s, {fmt_range(sc['pool'])} /CPU-s; "
              f"dask {fmt_range(sr['dask'])} /s, {fmt_range(sc['dask'])} /CPU-s; "
              f"cluster start {startup:.1f} s; load {min(loads):.1f}-{max(loads):.1f}",
              file=sys.stderr, flush=True)

    # fsync of one resume-file line
    with tempfile.NamedTemporaryFile("a", dir=str(REPO), delete=True) as fh:
        fs = []
        line = json.dumps({"chunk": "x" * 40, "result": {"schedules": 25}}) + "\n"
        for _ in range(50):
            t0 = time.perf_counter()
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
            fs.append(time.perf_counter() - t0)
    res["fsync_s"] = Series("fsync per chunk", "s", fs).as_dict()

    # user view: process start to exit
    cmd = [sys.executable, "-m", "textpoke", "verify", "--strategy", "naive", "--schedules",
           str(args.schedules), "--scenario"]
    user = {"pool": Series("textpoke verify --jobs 2", "s"),
            "dask": Series("textpoke verify --cluster local:2", "s")}
    for r in range(args.repeat):
        for k in (("pool", "dask") if r % 2 == 0 else ("dask", "pool")):
            extra = ["--jobs", "2"] if k == "pool" else ["--cluster", "local:2"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd + [scn[0]] + extra, capture_output=True, text=True)
            user[k].samples.append(time.perf_counter() - t0)
            assert p.returncode in (0, 1), p.stderr[-500:]
    res["user_view"] = {k: v.as_dict() for k, v in user.items()}

    # the model
    t_chunk = statistics.median(chunk_cpu) / args.chunk          # CPU-s per schedule
    s_task = res["scheduler_cpu_per_task_s"]["median"]
    t_fsync = res["fsync_s"]["median"]
    model = []
    for chunk in (1, 10, 25, 100):
        for w in (1, 2, 8, 32, 64, 100):
            terms = {"workers": w / (t_chunk * chunk), "scheduler+stream": 1 / s_task,
                     "resume fsync": 1 / t_fsync}
            bind = min(terms, key=terms.get)
            model.append({"chunk": chunk, "workers": w, "binding": bind,
                          "schedules_per_s": terms[bind] * chunk,
                          "chunks_per_s": terms[bind]})
    res["model"] = {"t_schedule_cpu_s": t_chunk, "s_task_s": s_task, "t_fsync_s": t_fsync,
                    "result_bytes": chunk_bytes[0] if chunk_bytes else None, "rows": model}
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()
    _human(res, args, scn, total)
    return 0


def _human(res: dict, args: argparse.Namespace, scn: list[str], total: int) -> None:
    """The figures as text: on stdout, or on stderr under --json."""
    def print(*a, **k):          # noqa: A001 -- every line to the right stream
        builtins.print(*a, **k, file=sys.stderr if args.json else sys.stdout)
    t_fsync, s_task = res["model"]["t_fsync_s"], res["model"]["s_task_s"]
    t_chunk, model = res["model"]["t_schedule_cpu_s"], res["model"]["rows"]
    print(f"verify campaign: {total} schedules per run ({len(scn)} scenarios x "
          f"{args.schedules}, naive), chunk {args.chunk}; median (min-max, n={args.repeat})")
    rows = []
    for n, c in res["configs"].items():
        def f(d: dict) -> str:
            return f"{d['median']:,.0f} ({d['min']:,.0f}-{d['max']:,.0f})"
        lo, hi = c.get("load", (float("nan"),) * 2)
        rows.append([str(n), f(c["pool_rate"]), f(c["dask_rate"]), f(c["pool_per_cpu"]),
                     f(c["dask_per_cpu"]), f"{c['startup_s']:.1f}", f"{lo:.1f}-{hi:.1f}"])
    print(table(["workers", "pool sched/s", "dask sched/s", "pool sched/CPU-s",
                 "dask sched/CPU-s", "dask start s", "load (1 min)"], rows))
    u = res["user_view"]
    print(f"user view, {args.schedules} schedules of {scn[0]}: textpoke verify --jobs 2 "
          f"{u['pool']['median']:.2f} s ({u['pool']['min']:.2f}-{u['pool']['max']:.2f}); "
          f"--cluster local:2 {u['dask']['median']:.2f} s ({u['dask']['min']:.2f}-"
          f"{u['dask']['max']:.2f})")
    st, rt = res["scheduler_tasks_per_s"], res["task_round_trip_s"]
    print(f"scheduler + result loop, no-op tasks: {st['median']:,.0f}/s "
          f"({st['min']:,.0f}-{st['max']:,.0f}) in a batch, {s_task * 1e3:.2f} ms CPU of the "
          f"scheduler process per task, round trip {rt['median'] * 1e3:.0f} ms "
          f"({rt['min'] * 1e3:.0f}-{rt['max'] * 1e3:.0f}); fsync {t_fsync * 1e3:.2f} ms; "
          f"result {res['model']['result_bytes']} bytes; {t_chunk * 1e3:.1f} ms CPU per schedule")
    print("model (chunks/s = min(W / t_chunk, 1 / s_task, 1 / t_fsync)):")
    print(table(["chunk", "workers", "schedules/s", "bound by"],
                [[str(m["chunk"]), str(m["workers"]), f"{m['schedules_per_s']:,.0f}",
                  m["binding"]] for m in model]))
    print(meta_line(res["meta"]))


if __name__ == "__main__":
    sys.exit(main())
