# SPDX-License-Identifier: GPL-2.0-only
"""The live machine on real processes: GCC-built targets whose threads call
patch sites in hot loops and count which variant ran.

Skipped (with the reason) where ptrace of a child is not permitted or gcc
is missing.  The helpers here (build_target, Target) are shared by the
other tests/test_live_*.py files and the contract suite."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from textpoke import BadAddressError, TextPoke, TextRange

HERE = Path(__file__).parent
NOP5 = bytes.fromhex("0f1f440000")

_ptrace_state: tuple[bool, str] | None = None
_built: dict[str, str] = {}
_tmp: str | None = None


def live_skip_reason() -> str | None:
    """Why live tests cannot run here, or None."""
    global _ptrace_state
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the live machine needs Linux on x86-64"
    if shutil.which("gcc") is None:
        return "gcc is needed to build the live test targets"
    if _ptrace_state is None:
        from textpoke.live import ptrace_permitted
        _ptrace_state = ptrace_permitted()
    ok, why = _ptrace_state
    return None if ok else f"ptrace is not permitted here: {why}"


def build_target(name: str = "hot", *flags: str) -> str:
    """Compile tests/live_targets/<name>.c once per session; the path."""
    global _tmp
    key = name + " ".join(flags)
    if key not in _built:
        if _tmp is None:
            _tmp = tempfile.mkdtemp(prefix="textpoke-live-")
            atexit.register(shutil.rmtree, _tmp, True)
        out = os.path.join(_tmp, f"{name}{len(_built)}")
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", *flags, "-o", out,
                        str(HERE / "live_targets" / f"{name}.c")], check=True)
        _built[key] = out
    return _built[key]


def rel32(frm: int, to: int) -> bytes:
    return (to - (frm + 5)).to_bytes(4, "little", signed=True)


class Target:
    """A running hot.c: ``sites[name] = (addr, *other addresses)``;
    :meth:`old` / :meth:`new` give each site's bytes."""

    def __init__(self, nthreads: int = 4, churn: bool = False) -> None:
        exe = build_target("hot")
        self.proc = subprocess.Popen([exe, str(nthreads), "1" if churn else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.sites: dict[str, list[int]] = {}
        for line in self.proc.stdout:
            if line.startswith("ready"):
                break
            parts = line.split()
            self.sites[parts[1]] = [int(x, 16) for x in parts[2:]]
        else:
            raise RuntimeError("target did not start")

    def hot(self) -> list[str]:
        return [n for n in self.sites if n != "idle"]

    def old(self, name: str) -> bytes:
        v = self.sites[name]
        return NOP5 if name[0] in "ji" else b"\xe8" + rel32(v[0], v[1])

    def new(self, name: str) -> bytes:
        v = self.sites[name]
        if name[0] in "ji":
            return b"\xe9" + rel32(v[0], v[1])
        return b"\xe8" + rel32(v[0], v[2])

    def read(self, addr: int, n: int) -> bytes:
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, n, addr)
        finally:
            os.close(fd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 30) -> tuple[int, dict[str, tuple[int, int]], dict[str, int]]:
        """Close stdin: the target joins its threads and prints its counters."""
        out, _ = self.proc.communicate("", timeout=timeout)
        counts, extra = {}, {}
        for line in out.splitlines():
            p = line.split()
            if p and p[0] == "count":
                counts[p[1]] = (int(p[2]), int(p[3]))
            elif len(p) == 2:
                extra[p[0]] = int(p[1])
        return self.proc.returncode, counts, extra

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        # a thread still traced by this process would keep the target from
        # being reaped: fail, saying so, rather than hang the suite
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"target {self.pid} not reaped; tracers of its threads: "
                                 f"{tracer_pids(self.pid)}") from None


def tracer_pids(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        out.append(int(line.split()[1]))
        except FileNotFoundError:
            pass                        # a thread that exited meanwhile
    return out


_reason = live_skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


@pytest.fixture
def target():
    t = Target(4)
    yield t
    t.kill()


def toggle(core, t: Target, names, to_new: bool) -> None:
    with core.batch():
        for n in names:
            core.smp_text_poke_batch_add(t.sites[n][0], t.new(n) if to_new else t.old(n))


# ---------------------------------------------------------------- attach
def test_attach_follows_every_thread_and_detach_leaves_it_running(target):
    from textpoke.live import LiveMachine
    with LiveMachine(target.pid) as m:
        tids = sorted(int(x) for x in os.listdir(f"/proc/{target.pid}/task"))
        assert sorted(m.cpus) == tids and len(tids) == 5
        assert set(tracer_pids(target.pid)) == {os.getpid()}
        first = m.text_ranges[0]
        assert isinstance(first, TextRange) and first.core
        assert os.path.realpath(f"/proc/{target.pid}/exe").endswith(first.name)
        assert m.is_text(target.sites["j0"][0], 5)
    assert set(tracer_pids(target.pid)) == {0}
    time.sleep(0.05)
    assert target.alive()
    rc, counts, _ = target.finish()
    assert rc == 0 and all(o > 0 for o, _ in counts.values())


def test_errors_are_typed_and_say_what_to_do():
    from textpoke.live import AccessDenied, LiveMachine, NoSuchProcess
    p = subprocess.Popen(["sleep", "30"])
    p.kill()
    p.wait()
    with pytest.raises(NoSuchProcess) as e:
        LiveMachine(p.pid)
    assert e.value.pid == p.pid
    t = Target(1)
    try:
        from textpoke.live import _ptrace as P
        # another tracer holds it: AccessDenied, naming that tracer
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys,time; sys.path[:0]=%r; from textpoke.live import _ptrace as P; "
            "P.seize(%d, 0); print('held', flush=True); time.sleep(30)") % (sys.path, t.pid)],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AccessDenied, match="already traced"):
            LiveMachine(t.pid)
        holder.kill()
        holder.wait()
        del P
        with pytest.raises(ValueError):
            LiveMachine(t.pid, trap_policy="nope")
    finally:
        t.kill()


def test_writes_outside_executable_mappings_are_refused(target):
    from textpoke.live import LiveMachine
    with LiveMachine(target.pid) as m:
        data = next(mp for mp in m._maps if not mp.executable)
        with pytest.raises(BadAddressError):
            m.run_task(m.text_poke_write(data.start, b"\x90"))
        with pytest.raises(BadAddressError):
            m.text_range_of(m.text_ranges[0].end - 2, 5)


def test_process_changed_when_the_pid_is_another_program(target):
    from textpoke.live import LiveMachine, ProcessChanged
    with LiveMachine(target.pid) as m:
        m._ident.start_time += 1          # as if the pid now named a newer process
        with pytest.raises(ProcessChanged):
            m.run_task(m.text_poke_write(target.sites["idle"][0], NOP5))
        m._ident.start_time -= 1


# ---------------------------------------------------------------- patching
@pytest.mark.parametrize("policy", ["park", "emulate"])
def test_toggling_hot_sites_runs_both_variants_and_never_crashes(policy):
    from textpoke.live import LiveMachine
    t = Target(4)
    try:
        with LiveMachine(t.pid, trap_policy=policy) as m, TextPoke(m) as core:
            for i in range(200):
                toggle(core, t, t.hot(), to_new=i % 2 == 0)
                if i % 50 == 0:
                    time.sleep(0.002)     # let both variants run for a while
            for n in t.hot():
                assert m.text_read(t.sites[n][0], 5) in (t.old(n), t.new(n))
            assert core.stats.batches == 200 and core.stats.rollbacks == 0
            stats = m.stats
        rc, counts, _ = t.finish()
        assert rc == 0
        for n in t.hot():
            old, new = counts[n]
            assert old > 0 and new > 0, (n, old, new)
        if policy == "park":
            assert stats.traps_emulated == 0
        else:
            assert stats.traps_parked == 0
    finally:
        t.kill()


def test_contiguous_writes_share_one_pwrite(target):
    from textpoke.live import LiveMachine
    with LiveMachine(target.pid) as m:
        a = target.sites["idle"][0]
        before = m.stats.writes
        m.run_task(m.text_poke_write_many([(a, b"\x0f"), (a + 1, b"\x1f"), (a + 3, b"\x00")]))
        assert m.stats.writes == before + 1
        assert target.read(a, 5) == NOP5


def test_signals_reach_the_target_unchanged_while_patching():
    from textpoke.live import LiveMachine
    t = Target(2)
    try:
        with LiveMachine(t.pid) as m, TextPoke(m) as core:
            for i in range(40):
                os.kill(t.pid, signal.SIGRTMIN)
                toggle(core, t, t.hot(), to_new=i % 2 == 0)
            time.sleep(0.05)
            passed = m.stats.signals_passed
        rc, _, extra = t.finish()
        assert rc == 0 and extra["usr1"] == 40 and passed >= 1
    finally:
        t.kill()


def test_group_stop_is_kept_while_attached():
    from textpoke.live import LiveMachine
    t = Target(2)
    try:
        with LiveMachine(t.pid) as m, TextPoke(m) as core:
            os.kill(t.pid, signal.SIGSTOP)
            toggle(core, t, t.hot(), True)
            # until the machine has seen the group stop (a traced process in
            # it reads "t", never "T": waiting for "T" spent the whole guard)
            deadline = time.monotonic() + 60          # a guard against a hang
            while not (m.stats.group_stops >= 1 and _state(t.pid) in ("T", "t")):
                assert time.monotonic() < deadline, (_state(t.pid), m.stats.group_stops)
                m.run_task(m.sync_each_cpu())
            toggle(core, t, t.hot(), False)       # patching a stopped process works
            assert m.stats.group_stops >= 1
            os.kill(t.pid, signal.SIGCONT)
            toggle(core, t, t.hot(), True)
        time.sleep(0.05)
        assert _state(t.pid) in ("R", "S")
        rc, counts, _ = t.finish()
        assert rc == 0 and all(new > 0 for _, new in counts.values())
    finally:
        t.kill()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rindex(b")") + 2:].split()[0].decode()


def test_threads_that_come_and_go_are_followed():
    from textpoke.live import LiveMachine
    t = Target(2, churn=True)
    try:
        seen = []
        with LiveMachine(t.pid) as m, TextPoke(m) as core:
            m.subscribe_cpus(lambda ev, cpu: seen.append(ev))
            for i in range(100):
                toggle(core, t, t.hot(), to_new=i % 2 == 0)
                time.sleep(0.002)         # threads are born and die meanwhile
            assert "add" in seen and "remove" in seen
            assert set(m.cpus) <= {int(x) for x in os.listdir(f"/proc/{t.pid}/task")} | set(m.cpus)
        assert set(tracer_pids(t.pid)) == {0}
        rc, counts, extra = t.finish()
        assert rc == 0 and extra["churned"] > 0
        assert all(new > 0 for _, new in counts.values())
    finally:
        t.kill()


def test_stop_machine_strategy_patches_too():
    from textpoke.live import LiveMachine
    t = Target(4)
    try:
        with LiveMachine(t.pid, strategy="stop-machine") as m, TextPoke(m) as core:
            for i in range(60):
                toggle(core, t, t.hot(), to_new=i % 2 == 0)
            assert m.stats.interrupts > 0
        rc, counts, _ = t.finish()
        assert rc == 0 and all(o > 0 and n > 0 for o, n in counts.values())
    finally:
        t.kill()


def test_trap_that_is_not_ours_reaches_the_process(target):
    """A SIGTRAP at an address that is no batch site is passed on: with no
    handler for it, the target dies of it as it would without us."""
    from textpoke.live import LiveMachine
    with LiveMachine(target.pid) as m, TextPoke(m) as core:
        with core.text_mutex:
            core.text_poke(target.sites["j0"][0], b"\xcc")      # a breakpoint nobody handles
        deadline = time.monotonic() + 5
        while target.alive() and time.monotonic() < deadline:
            m.run_task(m.sync_each_cpu())
        assert m.stats.signals_passed >= 1
    target.proc.wait(timeout=5)
    assert target.proc.returncode == -signal.SIGTRAP


def test_target_survives_many_batch_toggles_under_four_busy_threads():
    """The survival figure: 1,000 batch toggles of all 8 hot sites here
    (TEXTPOKE_LIVE_TOGGLES=10000 for the full figure; bench_live_traps.py
    runs 10,000): no crash, every site old or new, both variants counted."""
    from textpoke.live import LiveMachine
    n = int(os.environ.get("TEXTPOKE_LIVE_TOGGLES", "1000"))
    t = Target(4)
    try:
        with LiveMachine(t.pid) as m, TextPoke(m) as core:
            for i in range(n):
                toggle(core, t, t.hot(), to_new=i % 2 == 0)
            assert core.stats.batches == n and core.stats.rollbacks == 0
            for s in t.hot():
                assert t.read(t.sites[s][0], 5) == t.old(s)
        rc, counts, _ = t.finish()
        assert rc == 0
        assert all(o > 0 and nw > 0 for o, nw in counts.values()), counts
    finally:
        t.kill()
