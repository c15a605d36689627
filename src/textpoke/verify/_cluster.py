# SPDX-License-Identifier: GPL-2.0-only
"""Campaigns in chunks: the same schedules as ``verify``, cut into chunks of
seeds, run on a Dask distributed cluster (or on this machine's process
pool), results streamed back as chunks finish, and resumable.

* A campaign is a list of *cells* -- (scenario, strategy, mutation, CPUs,
  line size) -- times the same seeded schedules per cell
  (:func:`textpoke.sim._verify.schedule_seeds`: the seeds ``verify`` runs).
  Each cell's seeds are cut into chunks of ``chunk`` seeds; a chunk has a
  stable key (``cell-key#index``).
* Chunks are submitted a bounded window at a time (twice the cluster's
  threads) and taken back in completion order (``as_completed``), so the
  scheduler's queue and this process's memory stay flat for any campaign.
* Every finished chunk is appended to the *resume file* (one JSON line,
  flushed and fsynced) before it counts.  Run the same campaign with the
  same file again and the chunks recorded there are taken from it, not run:
  an interrupted campaign loses at most the chunks that were in flight, and
  none is counted twice.  A file written for other parameters is refused.
* A worker lost mid-chunk (killed, its machine gone) is the engine's
  business: the Dask scheduler re-runs the chunk on another worker (up to
  its ``allowed-failures``); the chunk is recorded once, when a result
  comes back.
* The report does not depend on the order chunks finish in: counts add up,
  and the first violation is the one with the lowest (cell, seed index) --
  the one a sequential ``verify`` meets first.

The engine is optional (``pip install 'textpoke[cluster]'``): this module
imports ``distributed`` only when a Dask backend is asked for.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Cell", "Campaign", "CellResult", "DaskBackend", "LocalBackend", "run_chunk",
           "dask_available", "connect", "ResumeMismatch"]


def dask_available() -> str | None:
    """None when ``distributed`` imports, else why not (for skips and errors)."""
    try:
        import distributed  # noqa: F401
    except Exception as e:          # ImportError, or a broken install
        return (f"Dask distributed is not installed ({type(e).__name__}: {e}); "
                "pip install 'textpoke[cluster]'")
    return None


@dataclass(frozen=True, slots=True)
class Cell:
    scenario: str
    strategy: str = "int3"
    mutation: str | None = None
    cpus: int = 3
    line_size: int = 64

    @property
    def key(self) -> str:
        what = self.strategy + (f"-{self.mutation}" if self.mutation else "")
        return f"{self.scenario}/{what}/c{self.cpus}/l{self.line_size}"

    @property
    def variant(self) -> str:
        """The protocol variant: int3, naive, or the mutation's name."""
        return self.mutation or self.strategy


@dataclass(slots=True)
class CellResult:
    schedules: int = 0
    violating: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    #: (seed index, violation dict) of the first violation by seed order
    first: tuple[int, dict] | None = None
    int3_emulated: int = 0
    syncs: int = 0
    int3_left: int = 0
    chunks: int = 0
    cpu_s: float = 0.0


# ------------------------------------------------------------------ worker side
_STOP: Any = None        # the local pool's stop flag (None on a Dask worker)


def _local_init(stop: Any) -> None:
    import signal
    global _STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _STOP = stop


def run_chunk(cell: dict, seeds: list[int], first_index: int) -> dict:
    """Run the schedules of one chunk (in a worker) and sum them up.  A
    chunk stopped part-way (the local pool's stop flag) says so and is not
    recorded."""
    from ..sim._verify import run_schedule
    c = Cell(**cell)
    t0, w0 = time.process_time(), time.perf_counter()
    out = {"schedules": 0, "violating": 0, "by_kind": {}, "first": None, "int3_emulated": 0,
           "syncs": 0, "int3_left": 0}
    for i, sd in enumerate(seeds):
        if _STOP is not None and _STOP.is_set():
            return {"stopped": True}
        r = run_schedule(c.scenario, sd, strategy=c.strategy, mutation=c.mutation,
                         ncpus=c.cpus, line_size=c.line_size, reuse=True)
        out["schedules"] += 1
        out["int3_emulated"] += r.int3_emulated
        out["syncs"] += r.syncs
        out["int3_left"] += r.int3_left
        if r.violations:
            out["violating"] += 1
            k = r.violations[0].kind
            out["by_kind"][k] = out["by_kind"].get(k, 0) + 1
            if out["first"] is None:
                out["first"] = [first_index + i, r.violations[0].as_dict()]
    out["cpu_s"] = time.process_time() - t0
    out["wall_s"] = time.perf_counter() - w0
    out["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return out


# ------------------------------------------------------------------ backends
class LocalBackend:
    """This machine's process pool (fork), the embedded default."""

    name = "local"

    def __init__(self, jobs: int) -> None:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.jobs = jobs
        self.ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                         initializer=_local_init, initargs=(self.stop,))

    def threads(self) -> int:
        return self.jobs

    def submit(self, key: str, *args: Any) -> Any:
        return self.ex.submit(run_chunk, *args)

    def stream(self, futures: list) -> "_LocalStream":
        return _LocalStream(futures)

    def cancel(self, futures: list) -> None:
        self.stop.set()
        for f in futures:
            f.cancel()

    def close(self) -> None:
        self.stop.set()
        self.ex.shutdown(wait=True, cancel_futures=True)


class _LocalStream:
    def __init__(self, futures: list) -> None:
        self.pending = set(futures)

    def add(self, f: Any) -> None:
        self.pending.add(f)

    def __iter__(self) -> Iterator:
        while self.pending:
            done, self.pending = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            yield from done


def connect(address: str, *, jobs: int = 2, timeout: float = 20) -> "DaskBackend":
    """A Dask backend: ``local`` (or ``local:N``) starts a LocalCluster of
    N (default *jobs*) one-thread worker processes on this machine; else a
    scheduler address such as ``tcp://127.0.0.1:8786``."""
    why = dask_available()
    if why:
        raise RuntimeError(why)
    from distributed import Client, LocalCluster
    cluster = None
    if address == "local" or address.startswith("local:"):
        n = int(address.split(":", 1)[1]) if ":" in address else jobs
        if n < 1:
            raise ValueError(f"--cluster {address}: at least one worker")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=50)
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    return DaskBackend(client, cluster)


class DaskBackend:
    """Chunks as Dask tasks (pure=False: a re-run is a new task, never a
    cached result); a lost worker's tasks are re-run by the scheduler."""

    name = "dask"

    def __init__(self, client: Any, cluster: Any = None) -> None:
        self.client, self.cluster = client, cluster

    def threads(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def submit(self, key: str, *args: Any) -> Any:
        return self.client.submit(run_chunk, *args, key=f"textpoke-{key}-{os.urandom(4).hex()}",
                                  pure=False)

    def stream(self, futures: list) -> Any:
        from distributed import as_completed
        return as_completed(futures)

    def cancel(self, futures: list) -> None:
        if futures:
            try:
                self.client.cancel(futures)
            except Exception:
                pass

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


# ------------------------------------------------------------------ campaign
class ResumeMismatch(ValueError):
    """The resume file was written for other parameters."""


class Campaign:
    """Cells x seeded schedules, cut into chunks; see the module doc."""

    def __init__(self, cells: list[Cell], schedules: int, *, seed: int = 0, chunk: int = 25,
                 resume: str | os.PathLike | None = None) -> None:
        if schedules < 0 or chunk < 1 or not cells:
            raise ValueError("a campaign needs cells, schedules >= 0 and chunk >= 1")
        self.cells, self.schedules, self.seed, self.chunk = list(cells), schedules, seed, chunk
        self.results = [CellResult() for _ in cells]
        self.done: set[str] = set()
        self.resumed_chunks = 0
        self.interrupted = False
        self.ran_chunks = 0
        self.workers: dict[str, int] = {}      # worker -> chunks it returned
        self.chunk_costs: list[tuple[float, float]] = []   # (cpu_s, wall_s) of chunks run here
        self.resume = Path(resume) if resume is not None else None
        self._file = None
        if self.resume is not None:
            self._load()

    # --- identity and the resume file ------------------------------------
    def params(self) -> dict:
        return {"cells": [asdict(c) for c in self.cells], "schedules": self.schedules,
                "seed": self.seed, "chunk": self.chunk}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:16]

    def _load(self) -> None:
        assert self.resume is not None
        lines: list[str] = []
        if self.resume.exists():
            raw = self.resume.read_text(encoding="utf-8").splitlines()
            header = None
            for ln in raw:
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    continue            # a line cut short by a kill: that chunk runs again
                if header is None:
                    header = rec
                    if rec.get("fingerprint") != self.fingerprint():
                        raise ResumeMismatch(
                            f"{self.resume} records another campaign (its parameters: "
                            f"{json.dumps(rec.get('params'))[:200]}); use a new file, or the "
                            "same options as the run that wrote it")
                    lines.append(ln)
                    continue
                key = rec.get("chunk")
                if key in self.done or not isinstance(rec.get("result"), dict):
                    continue
                self._absorb(rec["cell"], rec["result"])
                self.done.add(key)
                self.resumed_chunks += 1
                lines.append(ln)
        if not lines:
            lines = [json.dumps({"textpoke_campaign": 1, "fingerprint": self.fingerprint(),
                                 "params": self.params()})]
        # rewrite it whole (dropping any torn line), then append to it
        tmp = self.resume.with_name(self.resume.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.resume)

    def _record(self, key: str, cell: int, index: int, result: dict) -> None:
        if self.resume is None:
            return
        if self._file is None:
            self._file = open(self.resume, "a", encoding="utf-8")
        self._file.write(json.dumps({"chunk": key, "cell": cell, "index": index,
                                     "result": result}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    # --- plan ---------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.schedules * len(self.cells)

    @property
    def completed(self) -> int:
        return sum(r.schedules for r in self.results)

    def chunks(self) -> Iterator[tuple[str, int, int, list[int], int]]:
        """(key, cell index, chunk index, seeds, index of the first seed),
        lazily, skipping chunks already done."""
        from ..sim._verify import schedule_seeds
        for ci, cell in enumerate(self.cells):
            seeds = schedule_seeds(self.seed, self.schedules)
            for k in itertools.count():
                part = list(itertools.islice(seeds, self.chunk))
                if not part:
                    break
                key = f"{cell.key}#{k}"
                if key not in self.done:
                    yield key, ci, k, part, k * self.chunk

    def _absorb(self, ci: int, res: dict) -> None:
        r = self.results[ci]
        r.schedules += res["schedules"]
        r.violating += res["violating"]
        for k, n in res["by_kind"].items():
            r.by_kind[k] = r.by_kind.get(k, 0) + n
        r.int3_emulated += res["int3_emulated"]
        r.syncs += res["syncs"]
        r.int3_left += res["int3_left"]
        r.chunks += 1
        r.cpu_s += res.get("cpu_s", 0.0)
        if res["first"] is not None:
            idx, v = res["first"]
            if r.first is None or idx < r.first[0]:
                r.first = (idx, v)

    # --- run ----------------------------------------------------------------
    def run(self, backend: Any, progress: Callable[[int, int], None] | None = None) -> "Campaign":
        """Run the chunks not done yet on *backend*, absorbing results as
        they come.  On an interrupt (any BaseException) the chunks in flight
        are cancelled -- not recorded, so a resume runs them -- the campaign
        is marked interrupted and the exception goes on."""
        todo = self.chunks()
        inflight: dict[Any, tuple[str, int, int]] = {}

        def submit_one() -> Any:
            nxt = next(todo, None)
            if nxt is None:
                return None
            key, ci, k, seeds, first = nxt
            f = backend.submit(key, asdict(self.cells[ci]), seeds, first)
            inflight[f] = (key, ci, k)
            return f

        if progress:
            progress(self.completed, self.total)
        try:
            window = max(2, 2 * backend.threads())
            initial = [f for f in (submit_one() for _ in range(window)) if f is not None]
            stream = backend.stream(initial)
            for f in stream:
                key, ci, k = inflight.pop(f)
                res = f.result()
                if res.get("stopped"):
                    continue
                self._record(key, ci, k, res)
                self._absorb(ci, res)
                self.done.add(key)
                self.ran_chunks += 1
                self.workers[res.get("worker", "?")] = self.workers.get(res.get("worker", "?"), 0) + 1
                self.chunk_costs.append((res.get("cpu_s", 0.0), res.get("wall_s", 0.0)))
                if progress:
                    progress(self.completed, self.total)
                while len(inflight) < max(2, 2 * backend.threads()):
                    g = submit_one()
                    if g is None:
                        break
                    stream.add(g)
        except BaseException as e:
            if not isinstance(e, Exception):
                self.interrupted = True
            backend.cancel(list(inflight))
            raise
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
        return self

    # --- reports ------------------------------------------------------------
    def first_violation(self) -> tuple[int, dict] | None:
        """(cell index, violation dict) of the first violation in
        (cell, seed) order."""
        for ci, r in enumerate(self.results):
            if r.first is not None:
                return ci, r.first[1]
        return None

    def verify_report(self, report: Any = None) -> Any:
        """A :class:`~textpoke.sim._verify.VerifyReport` of a campaign of one
        cell per scenario (what ``verify`` prints), filled in place."""
        from ..sim._verify import Replay, VerifyReport, Violation
        rep = report if report is not None else VerifyReport()
        c0 = self.cells[0]
        rep.scenarios = [c.scenario for c in self.cells]
        rep.strategy, rep.mutation, rep.cpus, rep.line_size = (c0.strategy, c0.mutation,
                                                               c0.cpus, c0.line_size)
        rep.schedules_per_scenario, rep.seed = self.schedules, self.seed
        rep.schedules = self.completed
        rep.violating_schedules = sum(r.violating for r in self.results)
        rep.violations_by_kind = {}
        rep.by_scenario = {}
        for c, r in zip(self.cells, self.results):
            rep.by_scenario[c.scenario] = {"schedules": r.schedules, "violations": r.violating}
            for k, n in r.by_kind.items():
                rep.violations_by_kind[k] = rep.violations_by_kind.get(k, 0) + n
        rep.int3_emulated = sum(r.int3_emulated for r in self.results)
        rep.syncs = sum(r.syncs for r in self.results)
        rep.int3_left = sum(r.int3_left for r in self.results)
        rep.interrupted = self.interrupted
        fv = self.first_violation()
        if fv is not None:
            v = fv[1]
            rep.first = Violation(v["kind"], v["scenario"], v["seed"], v["detail"],
                                  Replay(**v["replay"]) if v.get("replay") else None)
        return rep
