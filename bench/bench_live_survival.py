# SPDX-License-Identifier: GPL-2.0-only
"""Survival: ``kill -9`` of the patcher at random moments, then ``live recover``.

Each run starts a busy 4-thread target with N fentry sites (every thread
calls every function all the time), starts ``textpoke live toggle`` (to
``call:fentry_ret`` or back to ``nop``) or ``textpoke live count``, sends
it SIGKILL a random delay after it attached (uniform over 0-0.5 s for
toggle, 0-1.2 s for count: both sessions and the window), and checks:

* the target is alive (not a zombie, not dead of SIGTRAP/SIGSEGV);
* ``textpoke live recover`` exits 0;
* every site reads NOP5 or ``call fentry_ret`` (toggle) / NOP5 (count):
  no INT3, no torn instruction, no CALL into a stub -- 0 stray bytes;
* no injected mapping is left (the target's maps equal those before) and
  no journal;
* the target still answers (SIGUSR1: it writes a snapshot and says so).

    python bench/bench_live_survival.py --runs 100 [--sites 10000] [--seed 1]

Prints one line per run and a summary (targets alive, stray bytes and leaked
mappings after recover, summed over the runs); exit 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "live_targets" / "count"))
from helpers import Target, gen  # noqa: E402

NOP5 = bytes.fromhex("0f1f440000")


def tp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *args],
                          capture_output=True, text=True, timeout=timeout)


def site_addrs(pid: int) -> list[int]:
    r = tp("sites", "--pid", str(pid), "--functions", "f0*", "--json")
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return [int(s["addr"], 16) for s in json.loads(r.stdout)["sites"]]


def read_sites(pid: int, addrs: list[int]) -> list[bytes]:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        out = []
        for a in addrs:
            f.seek(a)
            out.append(f.read(5))
        return out


def tracer(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def one_run(exe: Path, tmp: Path, rng: random.Random, i: int) -> dict:
    """One kill and one recover; every figure of the run, whatever failed."""
    cmd = rng.choice(["toggle", "toggle", "count"])
    res = {"cmd": cmd, "alive": False, "killed": False, "recover_rc": None, "stray_sites": 0,
           "stray_bytes": 0, "leaked_maps": 0, "journal_left": False, "answers": False,
           "left": "", "why": []}
    with Target(exe, tmp / f"s{i}", mode="busy", threads=4) as t:
        addrs = site_addrs(t.pid)
        maps0 = Path(f"/proc/{t.pid}/maps").read_text()
        from textpoke.live import Symbols
        with Symbols(t.pid) as syms:
            fentry_ret = syms.resolve("fentry_ret")
        if cmd == "toggle" and rng.random() < 0.5:
            # start from 'all on', so the kill lands in a switch back
            r = tp("toggle", "--pid", str(t.pid), "--functions", "f0*", "--to", "call:fentry_ret")
            if r.returncode != 0:
                res["why"].append(f"setup toggle failed: {r.stderr.strip()}")
                return res
            to = "nop"
        else:
            to = "call:fentry_ret"
        if cmd == "toggle":
            argv = ["toggle", "--pid", str(t.pid), "--functions", "f0*", "--to", to]
            delay = rng.uniform(0.0, 0.5)
        else:
            argv = ["count", "--pid", str(t.pid), "--functions", "f0*", "--duration", "0.2"]
            delay = rng.uniform(0.0, 1.2)
        res["delay"] = delay
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the random moment is counted from the attach (the target's TracerPid
        # turning to the patcher), not from the start of a Python process
        while p.poll() is None and tracer(t.pid) != p.pid:
            time.sleep(0.0005)
        time.sleep(delay)
        res["killed"] = p.poll() is None
        p.kill()
        p.wait()
        # the kernel has detached every thread once the patcher is reaped;
        # give the threads a moment to run into whatever was left
        time.sleep(0.05)
        if state(t.pid) in ("Z", "X", "gone") or not t.alive():
            t.proc.wait()
            res["why"].append(f"target died ({t.proc.poll()})")
            return res
        res["alive"] = True
        from textpoke.live._journal import Journal
        j = Journal.load(t.pid)
        res["left"] = j.summary() if j is not None else "nothing"
        r = tp("recover", "--pid", str(t.pid))
        res["recover_rc"] = r.returncode
        if r.returncode != 0:
            res["why"].append(f"recover exit {r.returncode}: {r.stderr.strip()} {r.stdout.strip()}")
        if not t.alive():
            res["alive"] = False
            res["why"].append(f"target died during recover ({t.proc.poll()})")
            return res
        for a, b in zip(addrs, read_sites(t.pid, addrs)):
            if b == NOP5:
                continue
            # a CALL to fentry_ret is a legitimate 'new' for toggle
            if cmd == "toggle" and b[:1] == b"\xe8":
                if a + 5 + int.from_bytes(b[1:], "little", signed=True) == fentry_ret:
                    continue
            res["stray_sites"] += 1
            res["stray_bytes"] += sum(x != y for x, y in zip(b, NOP5))
            if res["stray_sites"] == 1:
                res["why"].append(f"site {a:#x} reads {b.hex()}")
        maps1 = Path(f"/proc/{t.pid}/maps").read_text()
        extra = sorted(set(maps1.splitlines()) - set(maps0.splitlines()))
        res["leaked_maps"] = len(extra)
        if extra:
            res["why"].append("mappings left: " + " | ".join(extra[:3]))
        from textpoke.live import journal_path
        res["journal_left"] = journal_path(t.pid).exists()
        if res["journal_left"]:
            res["why"].append("journal left")
        line, _ = t.signal_and_read(signal.SIGUSR1)
        res["answers"] = line.startswith("snapshot")
        if not res["answers"]:
            res["why"].append(f"target answered {line!r}")
        return res


def ok(r: dict) -> bool:
    return (r["alive"] and r["recover_rc"] == 0 and not r["stray_sites"] and not r["leaked_maps"]
            and not r["journal_left"] and r["answers"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sites", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="write every run's figures to FILE")
    a = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"textpoke-survival-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    exe = gen.build(a.sites, tmp)
    rng = random.Random(a.seed)
    runs = []
    load0 = os.getloadavg()[0]
    for i in range(a.runs):
        r = one_run(exe, tmp, rng, i)
        runs.append(r)
        when = (f"{'killed' if r['killed'] else 'finished before the kill'} "
                f"{r.get('delay', 0):.3f}s after attaching")
        print(f"run {i + 1}/{a.runs}: {'PASS' if ok(r) else 'FAIL'} {r['cmd']} {when}: "
              f"left {r['left'] or '-'}"
              + ("; recovered: ok" if ok(r) else "; " + "; ".join(r["why"])), flush=True)
    n = len(runs)
    good = sum(ok(r) for r in runs)
    alive = sum(r["alive"] for r in runs)
    killed = sum(r["killed"] for r in runs)
    inflight = sum(bool(r["left"]) and r["left"] != "nothing" for r in runs)
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    print(f"survival at {commit}: {a.sites} sites, 4 busy threads, seed {a.seed}, load {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; {n} runs ({sum(r['cmd'] == 'toggle' for r in runs)} toggle, "
          f"{sum(r['cmd'] == 'count' for r in runs)} count), {killed} killed mid-command, "
          f"{inflight} leaving work in flight (INT3s, stubs or the guard)")
    print(f"  targets alive after the kill and after recover: {alive}/{n}")
    print(f"  'live recover' exit 0: {sum(r['recover_rc'] == 0 for r in runs)}/{alive}")
    print(f"  stray bytes after recover: {sum(r['stray_bytes'] for r in runs)} "
          f"(in {sum(r['stray_sites'] for r in runs)} sites)")
    print(f"  leaked mappings after recover: {sum(r['leaked_maps'] for r in runs)}; "
          f"journals left: {sum(r['journal_left'] for r in runs)}; "
          f"targets answering SIGUSR1: {sum(r['answers'] for r in runs)}/{alive}")
    print(f"  runs passing every check: {good}/{n}")
    if a.json:
        Path(a.json).write_text(json.dumps({"sites": a.sites, "seed": a.seed, "commit": commit,
                                            "runs": runs}, indent=1))
    return 0 if good == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
