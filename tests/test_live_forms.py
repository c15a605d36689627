# SPDX-License-Identifier: GPL-2.0-only
"""The compiler's other entry forms, counted on real processes: a PIE built
with ``-fpatchable-function-entry=5`` (five one-byte NOPs) and a PIE built
with ``-pg -mfentry`` (``call *__fentry__@GOTPCREL(%rip)``, ``ff 15``, 6
bytes).  Neither is one 5-byte instruction, so their sites are switched
with every thread stopped and none inside a site; counts must equal the
program's own, every site must read its original bytes again."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import Target, expected_window, gen, ptrace_skip_reason  # noqa: E402

_skip = ptrace_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

N, THREADS, ROUNDS = 100, 4, 3
KIND = {"patchable": "5xnop1", "pie-fentry": "call-got"}


def _bytes(pid: int, sites) -> list[bytes]:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        out = []
        for s in sites:
            f.seek(s.addr)
            out.append(f.read(len(s.found)))
        return out


@pytest.mark.parametrize("form", ["patchable", "pie-fentry"])
def test_count_is_exact_on_each_entry_form(tmp_path_factory, form):
    from textpoke.live import Symbols, fentry_sites, live_count
    exe = gen.build(N, tmp_path_factory.mktemp(f"forms_{form}"), form=form)
    with Target(exe, tmp_path_factory.mktemp("o") / "out", threads=THREADS, rounds=ROUNDS) as t:
        with Symbols(t.pid) as s:
            sites = fentry_sites(s, "f0*")
        assert len(sites) == N and {x.kind for x in sites} == {KIND[form]}
        before = _bytes(t.pid, sites)
        armed: list[list[bytes]] = []
        reported: list[list[int]] = []

        def window():
            armed.append(_bytes(t.pid, sites))
            line, counts = t.signal_and_read(signal.SIGUSR1)
            assert line == "window 1"
            reported.append(counts)

        res = live_count(t.pid, "f0*", window=window)
        assert all(b[:1] == b"\xe8" for b in armed[0])             # a CALL into a stub
        if form == "pie-fentry":
            assert all(b[5:] == b"\x90" for b in armed[0])         # + NOP1: site+6 stays a boundary
        got = dict(res.counts)
        assert reported[0] == expected_window(N, THREADS, ROUNDS)
        assert [got[f"f{i:05d}"] for i in range(N)] == reported[0]
        assert res.restored and res.freed and not res.skipped
        assert _bytes(t.pid, sites) == before
        line, counts = t.signal_and_read(signal.SIGUSR1)     # still runs right, uncounted
        assert line == "window 2" and counts == reported[0] and t.alive()


def test_patchable_entries_while_threads_run_through_them(tmp_path_factory):
    """Busy threads run through the five NOPs all the time: the switch waits
    until none stands between two of them (stepping it out), both ways."""
    from textpoke.live import live_count
    exe = gen.build(N, tmp_path_factory.mktemp("forms_busy"), form="patchable")
    with Target(exe, tmp_path_factory.mktemp("o") / "busy", mode="busy", threads=THREADS) as t:
        snaps: list[list[int]] = []

        def window():
            # the second snapshot once the threads have called anything since
            # the first (on a loaded box they may not run for a while)
            for k in range(1, 400):
                line, counts = t.signal_and_read(signal.SIGUSR1)
                assert line == f"snapshot {k}"
                if k == 1:
                    snaps.append(counts)
                elif sum(counts) > sum(snaps[0]):
                    snaps.append(counts)
                    return

        res = live_count(t.pid, "f0*", window=window)
        got = dict(res.counts)
        inside = [b - a for a, b in zip(*snaps)]
        assert sum(inside) > 0
        for i in range(N):
            assert inside[i] - THREADS <= got[f"f{i:05d}"]
        assert res.restored and res.freed and t.alive()


@pytest.mark.parametrize("form", ["patchable", "pie-fentry"])
def test_toggle_on_each_entry_form(tmp_path_factory, form):
    """toggle --to call:fentry_ret and back to nop on a busy target: every
    site switched (with every thread stopped), the target alive and right."""
    import json
    import subprocess
    exe = gen.build(N, tmp_path_factory.mktemp(f"toggle_{form}"), form=form)
    with Target(exe, tmp_path_factory.mktemp("o") / "busy", mode="busy", threads=THREADS) as t:
        for to, first in (("call:fentry_ret", b"\xe8"), ("nop", b"\x0f")):
            r = subprocess.run([sys.executable, "-m", "textpoke", "live", "toggle", "--pid",
                                str(t.pid), "--functions", "f0*", "--to", to, "--json"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            j = json.loads(r.stdout)
            assert j["switched"] == N and j["now_as_asked"] == N and j["int3_left"] == 0
            from textpoke.live import Symbols, fentry_sites
            with Symbols(t.pid) as s:
                assert {x.found[:1] for x in fentry_sites(s, "f0*")} == {first}
        line, _ = t.signal_and_read(signal.SIGUSR1)
        assert line.startswith("snapshot") and t.alive()
