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

Prints one line per run and a summary; exit 1 if any run failed.
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


def one_run(exe: Path, tmp: Path, rng: random.Random, i: int) -> tuple[bool, str]:
    cmd = rng.choice(["toggle", "toggle", "count"])
    with Target(exe, tmp / f"s{i}", mode="busy", threads=4) as t:
        addrs = site_addrs(t.pid)
        maps0 = Path(f"/proc/{t.pid}/maps").read_text()
        from textpoke.live._symbols import Symbols
        with Symbols(t.pid) as syms:
            fentry_ret = syms.resolve("fentry_ret")
        if cmd == "toggle" and rng.random() < 0.5:
            # start from 'all on', so the kill lands in a switch back
            r = tp("toggle", "--pid", str(t.pid), "--functions", "f0*", "--to", "call:fentry_ret")
            if r.returncode != 0:
                return False, f"setup toggle failed: {r.stderr.strip()}"
            to = "nop"
        else:
            to = "call:fentry_ret"
        if cmd == "toggle":
            argv = ["toggle", "--pid", str(t.pid), "--functions", "f0*", "--to", to]
            delay = rng.uniform(0.0, 0.5)
        else:
            argv = ["count", "--pid", str(t.pid), "--functions", "f0*", "--duration", "0.2"]
            delay = rng.uniform(0.0, 1.2)
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the random moment is counted from the attach (the target's TracerPid
        # turning to the patcher), not from the start of a Python process
        while p.poll() is None and tracer(t.pid) != p.pid:
            time.sleep(0.0005)
        time.sleep(delay)
        killed = p.poll() is None
        p.kill()
        p.wait()
        time.sleep(0.05)
        if state(t.pid) in ("Z", "X", "gone") or not t.alive():
            return False, f"{cmd} killed at {delay:.2f}s: target died ({t.proc.poll()})"
        from textpoke.live._journal import Journal
        j = Journal.load(t.pid)
        left = j.summary() if j is not None else "nothing"
        r = tp("recover", "--pid", str(t.pid))
        if r.returncode != 0:
            return False, f"{cmd} at {delay:.2f}s: recover exit {r.returncode}: {r.stderr.strip()} {r.stdout.strip()}"
        now = read_sites(t.pid, addrs)
        for a, b in zip(addrs, now):
            if b == NOP5:
                continue
            # a CALL to fentry_ret is a legitimate 'new' for toggle
            if cmd == "toggle" and b[:1] == b"\xe8":
                if a + 5 + int.from_bytes(b[1:], "little", signed=True) == fentry_ret:
                    continue
            stray = sum(1 for x in now if x != NOP5 and x[:1] != b"\xe8")
            return False, f"{cmd} at {delay:.2f}s: site {a:#x} reads {b.hex()} ({stray} stray)"
        maps1 = Path(f"/proc/{t.pid}/maps").read_text()
        if maps1 != maps0:
            extra = sorted(set(maps1.splitlines()) - set(maps0.splitlines()))
            return False, (f"{cmd} at {delay:.2f}s: mappings differ after recover (left {left}): "
                           + " | ".join(extra[:3]))
        from textpoke.live._journal import journal_path
        if journal_path(t.pid).exists():
            return False, f"{cmd} at {delay:.2f}s: journal left"
        line, _ = t.signal_and_read(signal.SIGUSR1)
        if not line.startswith("snapshot"):
            return False, f"{cmd} at {delay:.2f}s: target answered {line!r}"
        return True, (f"{cmd} {'killed' if killed else 'finished before the kill'} "
                      f"{delay:.3f}s after attaching: left {left}; recovered: ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sites", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"textpoke-survival-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    exe = gen.build(a.sites, tmp)
    rng = random.Random(a.seed)
    good = killed = inflight = 0
    for i in range(a.runs):
        ok, msg = one_run(exe, tmp, rng, i)
        good += ok
        killed += " killed " in msg
        inflight += ok and "left nothing" not in msg
        print(f"run {i + 1}/{a.runs}: {'PASS' if ok else 'FAIL'} {msg}", flush=True)
    print(f"survival: {good}/{a.runs} runs with the target alive and 0 stray bytes after "
          f"'live recover' ({killed} killed mid-command, {inflight} leaving work in flight: INT3s, "
          f"stubs or the guard), {a.sites} sites, 4 busy threads")
    return 0 if good == a.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
