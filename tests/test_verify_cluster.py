# SPDX-License-Identifier: GPL-2.0-only
"""Campaigns in chunks (textpoke.verify._cluster): the same report as
``verify`` whatever the engine and the order chunks finish in; an
interrupted campaign resumes from its file without losing or repeating a
chunk; on Dask, a worker killed mid-chunk has its chunk re-run elsewhere.

The Dask tests need the optional engine (``pip install 'textpoke[cluster]'``)
and skip, saying so, without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from textpoke.sim import verify
from textpoke.verify._cluster import (Campaign, Cell, LocalBackend, ResumeMismatch, connect,
                                      dask_available)

SCN = ["nop5-jmp32", "call"]
needs_dask = pytest.mark.skipif(dask_available() is not None, reason=str(dask_available()))


def _reference(n: int, **kw) -> dict:
    return verify(SCN, n, jobs=1, **kw).as_dict()


def _cells(**kw) -> list[Cell]:
    return [Cell(s, **kw) for s in SCN]


def test_local_campaign_reports_as_verify():
    camp = Campaign(_cells(strategy="naive"), 12, chunk=4).run(LocalBackend(2))
    assert camp.verify_report().as_dict() == _reference(12, strategy="naive")
    assert camp.ran_chunks == 2 * 3 and camp.resumed_chunks == 0


def test_interrupt_then_resume_loses_and_repeats_no_chunk(tmp_path):
    f = tmp_path / "campaign.jsonl"
    cells = _cells(strategy="naive")
    seen = []

    def stop_after_two(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 3:          # the initial call and two chunks back
            raise KeyboardInterrupt
    camp = Campaign(cells, 12, chunk=3, resume=f)
    with pytest.raises(KeyboardInterrupt):
        camp.run(LocalBackend(2), progress=stop_after_two)
    assert camp.interrupted and camp.ran_chunks == 2
    lines = f.read_text().splitlines()
    assert len(lines) == 1 + 2                      # header + the two recorded chunks
    # a kill while a line was written leaves it torn: that chunk just runs again
    with open(f, "a") as fh:
        fh.write('{"chunk": "torn')
    again = Campaign(cells, 12, chunk=3, resume=f)
    assert again.resumed_chunks == 2
    again.run(LocalBackend(2))
    assert again.ran_chunks == 8 - 2
    keys = [json.loads(x)["chunk"] for x in f.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 8
    assert again.verify_report().as_dict() == _reference(12, strategy="naive")


def test_resume_file_of_another_campaign_is_refused(tmp_path):
    f = tmp_path / "c.jsonl"
    Campaign(_cells(), 2, chunk=1, resume=f)
    with pytest.raises(ResumeMismatch):
        Campaign(_cells(), 3, chunk=1, resume=f)


def test_cli_resume_mismatch_is_a_usage_error(tmp_path):
    f = tmp_path / "c.jsonl"
    run = [sys.executable, "-m", "textpoke", "verify", "--scenario", "call", "--jobs", "1",
           "--resume", str(f), "--schedules"]
    p = subprocess.run(run + ["2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    q = subprocess.run(run + ["3"], capture_output=True, text=True, timeout=300)
    assert q.returncode == 2 and "another campaign" in q.stderr and "Traceback" not in q.stderr


@pytest.fixture(scope="module")
def dask_backend():
    """One local Dask cluster of two worker processes for the module (the
    kill test goes last: its nanny restarts the worker it loses)."""
    be = connect("local:2")
    yield be
    be.close()


@needs_dask
def test_dask_campaign_reports_as_verify(dask_backend):
    camp = Campaign(_cells(strategy="naive"), 10, chunk=3).run(dask_backend)
    assert camp.verify_report().as_dict() == _reference(10, strategy="naive")
    assert sum(camp.workers.values()) == camp.ran_chunks == 2 * 4


@needs_dask
def test_dask_worker_killed_mid_chunk_is_rerun_elsewhere(tmp_path, dask_backend):
    f = tmp_path / "campaign.jsonl"
    be = dask_backend
    client = be.client
    pids = client.run(os.getpid)                # worker address -> pid
    cells = _cells(strategy="naive")
    camp = Campaign(cells, 16, chunk=8, resume=f)
    box: dict = {}

    def go() -> None:
        try:
            camp.run(be)
        except BaseException as e:           # pragma: no cover - reported below
            box["error"] = e
    t = threading.Thread(target=go)
    t.start()
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and t.is_alive():
            for addr, keys in client.processing().items():
                if keys and addr in pids and camp.ran_chunks == 0:
                    killed = (pids[addr], [k for k in keys])
                    os.kill(pids[addr], signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        t.join(300)
    assert killed is not None, "no chunk was seen running"
    assert "error" not in box, box.get("error")
    recs = [json.loads(x) for x in f.read_text().splitlines()[1:]]
    assert sorted(r["chunk"] for r in recs) == sorted({r["chunk"] for r in recs})
    assert len(recs) == 4                         # every chunk once
    # the chunks that were on the killed worker came back from another process
    running = {k.split("-", 1)[1].rsplit("-", 1)[0] for k in killed[1]}
    back = {r["chunk"]: r["result"]["worker"] for r in recs}
    assert running and all(not back[c].endswith(f":{killed[0]}") for c in running)
    assert camp.verify_report().as_dict() == _reference(16, strategy="naive")
