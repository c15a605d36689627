# SPDX-License-Identifier: GPL-2.0-only
"""Small statistics helpers shared by the benchmarks.

The project's rule for figures: the median of at least five runs, with the
min-max range, against a fair baseline doing the same work under the same
conditions, measured side by side in the same process and interleaved so
that drift (frequency scaling, another process waking up, heap growth)
hits both alike.

* :func:`interleaved` runs several measurements round by round: A, B, then
  B, A, then A, B, ... (each round alternates the order so that neither
  side always runs right after the other), returning every raw sample.
* :class:`Series` is one named list of samples: median, min, max, n.
* :func:`paired_ratios` gives the per-round ratio A/B of two interleaved
  series (the figure to quote for "A is x times B"), itself a Series.
* :func:`child_times` runs one command as a user runs it (wall and CPU
  time of the process, start to exit); :func:`command_series` measures
  several such commands interleaved.
* :func:`as_json` turns a result holding Series into plain JSON.
* :func:`add_common_args` gives every benchmark the same ``--repeat``
  (default 5, never fewer), ``--quick`` (less work per run, never fewer
  runs) and ``--json`` (every raw sample) options.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["MIN_RUNS", "Series", "interleaved", "interleaved_rates", "repeated", "paired_ratios",
           "add_common_args", "child_times", "command_series", "as_json", "timed", "now",
           "set_clock", "setup", "clock_name", "fmt", "fmt_range", "table", "meta", "meta_line",
           "REPO"]

#: never report a figure from fewer runs than this
MIN_RUNS = 5
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Series:
    """Samples of one quantity, in *unit* (larger or smaller is better as
    the name says; nothing here picks a "best")."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)

    def scaled(self, name: str, unit: str, f: Callable[[float], float]) -> "Series":
        """The same samples through *f* (e.g. seconds -> sites/s); the median
        of f(x) is f(median) for a monotonic f, min/max may swap."""
        return Series(name, unit, [f(x) for x in self.samples], [f(x) for x in self.warmup])

    def as_dict(self) -> dict:
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": self.lo,
                "max": self.hi, "n": self.n, "samples": list(self.samples),
                "warmup_samples": list(self.warmup)}


def _check_runs(repeat: int) -> None:
    if repeat < MIN_RUNS:
        raise ValueError(f"at least {MIN_RUNS} runs per figure, got {repeat}")


def interleaved(fns: dict[str, Callable[[], float]], repeat: int, *, units: dict[str, str] | None = None,
                warmup: int = 1) -> dict[str, Series]:
    """Run each of *fns* (each returns one sample) *repeat* times, round by
    round, alternating the order within a round (A B, B A, A B, ...).
    *warmup* untimed rounds come first; their samples are kept apart."""
    _check_runs(repeat)
    names = list(fns)
    out = {k: Series(k, (units or {}).get(k, "")) for k in names}
    for r in range(warmup + repeat):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            gc.collect()
            v = fns[k]()
            (out[k].warmup if r < warmup else out[k].samples).append(v)
    return out


def interleaved_rates(fns: dict[str, Callable[[], tuple[float, float]]], repeat: int, *,
                      chunks: int = 8, units: dict[str, str] | None = None,
                      warmup: int = 1) -> dict[str, Series]:
    """As :func:`interleaved`, but each run is *chunks* short pieces of work
    per side, alternated piece by piece (A B A B ..., the next round B A B
    A ...), so that drift on any time scale longer than one piece hits
    every side alike.  Each fn does one piece and returns (work, seconds);
    a sample is one round's total work / total seconds per side."""
    _check_runs(repeat)
    names = list(fns)
    out = {k: Series(k, (units or {}).get(k, "")) for k in names}
    for r in range(warmup + repeat):
        work = dict.fromkeys(names, 0.0)
        secs = dict.fromkeys(names, 0.0)
        gc.collect()
        for i in range(chunks):
            order = names if (r + i) % 2 == 0 else names[::-1]
            for k in order:
                w, t = fns[k]()
                work[k] += w
                secs[k] += t
        for k in names:
            (out[k].warmup if r < warmup else out[k].samples).append(work[k] / secs[k])
    return out


def repeated(name: str, fn: Callable[[], float], repeat: int, *, unit: str = "",
             warmup: int = 1) -> Series:
    """One measurement, *repeat* times after *warmup* untimed runs."""
    return interleaved({name: fn}, repeat, units={name: unit}, warmup=warmup)[name]


def child_times(argv: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run *argv* to its exit (*kw* go to :func:`subprocess.run`): the wall
    time, the CPU time (user + system) of the process and its children, and
    the result, whose return code the caller checks."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, **kw)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), p


def command_series(cmds: dict[str, Callable[[], tuple[float, float]]],
                   repeat: int) -> dict[str, Series]:
    """Commands as the user sees them, interleaved round by round: each of
    *cmds* runs one command to its exit and returns (wall s, CPU s).
    Returns a "NAME (wall)" and a "NAME (CPU)" Series for each."""
    cpu: dict[str, list[float]] = {k: [] for k in cmds}

    def one(k: str) -> float:
        wall, c = cmds[k]()
        cpu[k].append(c)
        return wall
    walls = interleaved({k: (lambda k=k: one(k)) for k in cmds}, repeat,
                        units={k: "s" for k in cmds})
    out = {}
    for k, s in walls.items():
        out[f"{k} (wall)"] = s
        c = Series(f"{k} (CPU)", "s", cpu[k][-s.n:], cpu[k][:-s.n])
        out[c.name] = c
    return out


def as_json(v):
    """*v* with every Series as its :meth:`Series.as_dict` and every dict's
    keys as strings, through dicts, lists and tuples."""
    if isinstance(v, Series):
        return v.as_dict()
    if isinstance(v, dict):
        return {str(k): as_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [as_json(x) for x in v]
    return v


def paired_ratios(name: str, a: Series, b: Series) -> Series:
    """Per-round a/b of two interleaved series (round i of a with round i of b)."""
    if a.n != b.n:
        raise ValueError("paired ratios need the same number of rounds")
    return Series(name, "ratio", [x / y for x, y in zip(a.samples, b.samples)],
                  [x / y for x, y in zip(a.warmup, b.warmup)])


#: the clock every benchmark reads through now(): wall time by default;
#: ``--clock cpu`` uses this process's CPU time instead, which a shared,
#: loaded machine disturbs far less (time the process spends waiting for a
#: core is not counted; cache and memory-bandwidth contention still is).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"name": "wall", "fn": time.perf_counter}


def set_clock(name: str) -> None:
    _clock["name"], _clock["fn"] = name, CLOCKS[name]


def clock_name() -> str:
    return _clock["name"]


def now() -> float:
    return _clock["fn"]()


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call, on the chosen clock."""
    t = now()
    fn()
    return now() - t


def _at_least_min_runs(s: str) -> int:
    n = int(s)
    if n < MIN_RUNS:
        raise argparse.ArgumentTypeError(f"--repeat must be at least {MIN_RUNS} (medians of >= {MIN_RUNS} runs)")
    return n


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--repeat", type=_at_least_min_runs, default=MIN_RUNS,
                    help=f"runs per figure (default and minimum {MIN_RUNS}); the median is reported "
                         "with the min-max range")
    ap.add_argument("--quick", action="store_true",
                    help="less work per run (smaller sizes, shorter runs); never fewer runs")
    ap.add_argument("--json", action="store_true", help="JSON with every raw sample")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default) or this process's CPU time (steadier on a loaded "
                         "machine)")


def setup(args: argparse.Namespace) -> None:
    set_clock(getattr(args, "clock", "wall"))


def fmt(v: float, digits: int = 1, scale: float = 1.0) -> str:
    v = v / scale
    return f"{v:,.{digits}f}"


def fmt_range(s: Series, digits: int = 1, scale: float = 1.0) -> str:
    """'median (min-max, n=5)'"""
    return (f"{fmt(s.median, digits, scale)} ({fmt(s.lo, digits, scale)}\u2013"
            f"{fmt(s.hi, digits, scale)}, n={s.n})")


def table(headers: list[str], rows: Iterable[list[str]], indent: str = "  ") -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: indent + "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), indent + "  ".join("-" * w for w in widths)]
                     + [line(r) for r in rows])


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def meta(args: argparse.Namespace | None = None) -> dict:
    """What was measured where: commit, uncommitted changes under src/,
    interpreter, Unicorn, cores."""
    try:
        import unicorn
        uc_version = unicorn.__version__
    except Exception:   # noqa: BLE001 -- informational only
        uc_version = None
    dirty = [ln[3:] for ln in _git("status", "--porcelain", "--", "src").splitlines() if ln]
    return {
        "commit": _git("rev-parse", "--short=12", "HEAD").strip() or os.environ.get("BENCH_COMMIT"),
        "commit_subject": _git("log", "-1", "--format=%s").strip() or None,
        "uncommitted_src_changes": dirty,
        "python": platform.python_version(),
        "unicorn": uc_version,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "clock": clock_name(),
        "repeat": getattr(args, "repeat", None),
        "quick": getattr(args, "quick", None),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def meta_line(m: dict) -> str:
    s = f"measured at {m['commit']} ({m['commit_subject']})"
    if m["uncommitted_src_changes"]:
        s += f" + uncommitted changes in {', '.join(m['uncommitted_src_changes'][:4])}"
        if len(m["uncommitted_src_changes"]) > 4:
            s += ", ..."
    return (s + f"; Python {m['python']}, Unicorn {m['unicorn']}, {m['cpus']} CPUs, "
            f"load {m['loadavg_at_start'][0]:.1f}; {m['clock']} clock; "
            f"median (min\u2013max, n runs)")


def script_main(argv: list[str] | None, doc: str | None, key: str,
                run: Callable[[argparse.Namespace], object], report: Callable[[object], str],
                to_json: Callable[[object], object],
                add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The main() every bench script shares: common options, run, then a
    table or JSON (``{"meta": ..., key: ...}``)."""
    import json
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    setup(args)
    res = run(args)
    m = meta(args)
    if args.json:
        json.dump({"meta": m, key: to_json(res)}, sys.stdout, indent=2)
        print()
    else:
        print(meta_line(m))
        print(report(res))
    return 0
