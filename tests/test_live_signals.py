# SPDX-License-Identifier: GPL-2.0-only
"""Never kill the patient: the patcher (a driver script in a subprocess) is
sent SIGINT or SIGTERM at each phase boundary of a batch; the batch is
rolled back (int3, tail) or finished (first), the threads are detached,
and the target runs on with every site old or new and no INT3 left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from test_live_machine import Target, live_skip_reason, tracer_pids

_reason = live_skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

DRIVER = textwrap.dedent("""
    import json, signal, sys
    from textpoke import TextPoke
    from textpoke.live import LiveMachine

    class Terminated(BaseException):
        pass

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C as an interactive user's: a shell without job control starts
    # background jobs (a CI runner's, `make test &`) with SIGINT ignored,
    # and Python then leaves it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pid, phase, policy, sites = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    m = LiveMachine(pid, trap_policy=policy)
    core = TextPoke(m)
    said = []

    def listener(ev):
        if ev.phase == phase and not said:
            said.append(1)
            print("phase", phase, flush=True)
            sys.stdin.readline()          # the test signals us, then lets us go on

    core.events.subscribe(listener)
    code = 0
    try:
        with core.batch():
            for addr, new in sites:
                core.smp_text_poke_batch_add(addr, bytes.fromhex(new))
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted KeyboardInterrupt", flush=True)
        code = 130
    except Terminated:
        print("interrupted Terminated", flush=True)
        code = 143
    finally:
        st = core.stats
        m.close()
    print("detached", st.rollbacks, st.finished_forward, flush=True)
    sys.exit(code)
""")


@pytest.mark.parametrize("policy", ["park", "emulate"])
@pytest.mark.parametrize("phase", ["int3", "tail", "first"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_at_each_phase_boundary_leaves_the_target_running(tmp_path, sig, phase, policy):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    t = Target(4)
    try:
        names = t.hot()
        sites = [(t.sites[n][0], t.new(n).hex()) for n in names]
        d = subprocess.Popen([sys.executable, str(driver), str(t.pid), phase, policy,
                              json.dumps(sites)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = d.stdout.readline().strip()
        assert line == f"phase {phase}", line
        d.send_signal(sig)
        d.stdin.write("go\n")
        d.stdin.flush()
        out, _ = d.communicate(timeout=30)
        assert d.returncode == (130 if sig == signal.SIGINT else 143), out
        assert "interrupted" in out
        rollbacks, forward = map(int, out.split("detached")[1].split())
        if phase == "first":
            assert (rollbacks, forward) == (0, 1)
        else:
            assert (rollbacks, forward) == (1, 0)
        assert set(tracer_pids(t.pid)) == {0}
        time.sleep(0.05)
        assert t.alive()
        for n in names:
            now = t.read(t.sites[n][0], 5)
            assert now in (t.old(n), t.new(n)), (n, now.hex())
            assert now == (t.new(n) if phase == "first" else t.old(n))
        rc, counts, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()
