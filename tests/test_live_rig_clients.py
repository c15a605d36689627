# SPDX-License-Identifier: GPL-2.0-only
"""The kprobes and module-loader self-tests on a live process: the very
functions of :mod:`textpoke.selftests` that run on the sim's vCPUs, run by
the threads of a real process that has the bundled image mapped (see
``test_live_rig.py``).  What they need beyond the machine protocol they ask
as capabilities (EXECMEM, DATA, QUIESCE); an INT3 the image holds by design
(the rethook trampoline's call into the host) reaches the machine's trap
chain on live as on the sim."""

from __future__ import annotations

import contextlib
import os
import signal
import struct

import pytest

from textpoke import Capability, NotSupportedError, TrapPriority
from textpoke.selftests import kprobes_selftest, module_selftest
from test_live_machine import live_skip_reason

pytestmark = pytest.mark.skipif(live_skip_reason() is not None, reason=live_skip_reason() or "")


@pytest.fixture
def rig():
    from textpoke.live._rig import LiveClientRig
    with LiveClientRig(cpus=3) as r:
        yield r
    assert r.proc.returncode == 0        # the loader ended by itself, nothing killed it


def _failed(r) -> list[dict]:
    return [c for c in r.cases if not c["passed"]]


def test_the_kernels_execmem_is_within_rel32_of_the_image(rig):
    """Modules link against the image with PC32 relocations and optprobes
    jump between a function and its detour: execmem must be near the image
    (low addresses), not near the loader (the PIE range)."""
    em = rig.kernel.execmem
    lo = min(s.addr for s in rig.image.sections.values() if s.addr)
    hi = max(s.end for s in rig.image.sections.values() if s.addr)
    assert abs(em.start - lo) < 1 << 31 and abs(em.end - hi) < 1 << 31
    loader = rig.machine.text_ranges[0]
    assert loader.name == "client_loader" and abs(em.start - loader.start) >= 1 << 31


def test_kprobes_selftest_on_a_live_process(rig):
    """lib/test_kprobes.c, kretprobes through the image's rethook
    trampoline, an optimised probe counted against the guest's counter,
    the refusals: the same function as on the sim."""
    kp = rig.kernel.kprobes
    r = kprobes_selftest(rig)
    assert r.passed, _failed(r)
    names = [c["name"] for c in r.cases]
    assert len(names) == 11 and "kretprobe return values" in names
    assert r.oopses == 0 and r.bad == [] and r.batches > 0
    assert kp.rethook and kp.stats.ret_hits > 0          # the image's INT3 reached the chain
    assert kp.stats.quiesce_waits > 0                    # QUIESCE asked of the live machine


def test_module_selftest_on_a_live_process(rig):
    """A GCC-built module linked against the image in the process, switched
    by the image's keys and calls while the threads call into it, unloaded,
    reloaded, and the five refusals."""
    r = module_selftest(rig)
    assert r.passed, _failed(r)
    names = [c["name"] for c in r.cases]
    assert sum(n.startswith("refused") for n in names) == 5
    assert sum(n.startswith("reload") for n in names) >= 4
    assert r.oopses == 0 and r.bad == [] and r.syncs >= 3 * 6
    assert not rig.kernel.modules.modules


@pytest.mark.parametrize("cap", [Capability.DATA, Capability.EXECMEM])
def test_a_machine_without_a_capability_refuses_the_selftests_before_any_text_changes(rig, cap):
    m = rig.machine
    m.capabilities = m.capabilities - {cap}         # this instance only
    image = [(r.start, r.end - r.start) for r in m.text_ranges if r.name == "kernel.elf"]
    before = [m.text_read(*r) for r in image]
    for run in (kprobes_selftest, module_selftest):
        with pytest.raises(NotSupportedError, match=cap.value if cap is Capability.DATA
                           else "execmem|executable"):
            run(rig)
    assert [m.text_read(*r) for r in image] == before and rig.probes == []


def _return_plus(regs, add: int) -> None:
    """Emulate ``return rdi + add`` at a function's first byte."""
    regs.gprs["rax"] = (regs.gprs["rdi"] + add) & ((1 << 64) - 1)
    regs.ip = struct.unpack("<Q", regs.mem.read(regs.sp, 8))[0]
    regs.sp += 8


def test_an_int3_in_the_images_text_reaches_the_chain_and_unclaimed_kills_as_before():
    """An INT3 at a core-text function of the image, with a client's handler
    on the chain: the handler sees it and its emulation is what every
    thread gets; once no handler claims it, the process gets the SIGTRAP
    unchanged (it dies, as it would without us)."""
    from textpoke.live._rig import LiveClientRig
    rig = LiveClientRig(cpus=2)
    try:
        fn = rig.sym("sc_func_b")                    # x + 2
        assert next(r for r in rig.machine.text_ranges if fn in r).core
        i = rig.add_probe("sc_func_b", arg=5, allow=[7])
        rig.start()
        assert rig.expect({i: 7}) == {}
        hits = []

        def handler(regs):
            if False:
                yield
            if regs.ip - 1 != fn:
                return False
            hits.append(regs.cpu)
            _return_plus(regs, 100)
            return True

        h = rig.machine.register_trap_handler(handler, priority=TrapPriority.NOTIFIER,
                                              name="test-host-call")
        rig.allow(i, [7, 105])
        with rig.core.text_mutex:
            rig.core.text_poke(fn, b"\xcc")
        assert rig.expect({i: 105}) == {} and hits
        # a handler of kprobes' priority still on the chain; nobody claims fn
        h.unregister()
        other = rig.machine.register_trap_handler(lambda regs: (yield from ()) or False,
                                                  priority=TrapPriority.KPROBES, name="unclaiming")
        assert not rig.wait_passes(2, max_steps=20_000)
        assert rig.proc.wait(timeout=30) == -signal.SIGTRAP
        other.unregister()
    finally:
        rig.close()


def _killed_loader_with_an_armed_kprobe():
    from textpoke.live._rig import LiveClientRig
    rig = LiveClientRig(cpus=2)
    rig.kernel.kprobes.register_kprobe("sc_func_a", lambda p, regs: None)
    rig.add_probe("sc_func_b", arg=1, allow=[3])
    rig.start()
    rig.proc.kill()
    return rig


def test_a_loader_killed_under_an_armed_kprobe_is_reaped_with_its_status_and_reported_by_close():
    """The process dies while a probe is armed.  Killed is not gone yet:
    its threads stop at their exit event, memory still mapped, until their
    tracer lets them on -- so the rig serves them and says the process
    died once its parent (the test) has reaped it, with its real status;
    then close() says the probe's text cannot be restored in a process
    that is gone, and still detaches."""
    from textpoke.live import NoSuchProcess
    rig = _killed_loader_with_an_armed_kprobe()
    assert not rig.wait_passes(1)
    assert rig.proc.returncode == -signal.SIGKILL
    with pytest.raises(NoSuchProcess):
        rig.close()
    assert rig.machine.threads == []


def test_a_loader_killed_just_before_close_is_let_through_and_reaped_by_close():
    """Closed at once after the kill: the threads are on their way out
    (some in their exit stop, the memory still there), so whether the
    probe's byte goes back before the memory goes is a race -- close()
    restores it or says the process is gone.  Either way it lets every
    thread through, never hangs on a loader whose threads stay traced, and
    the loader is reaped with its own status (not stolen by the tracer's
    waits, which would leave the parent a 0)."""
    from textpoke.live import NoSuchProcess
    rig = _killed_loader_with_an_armed_kprobe()
    with contextlib.suppress(NoSuchProcess):
        rig.close()
    assert rig.proc.returncode == -signal.SIGKILL


def test_a_thread_killed_while_its_trap_is_handled_is_kept_until_its_death_is_reaped():
    """The process is killed while the machine handles a thread's trap, and
    the thread leaves its stop before the handling is over (a hook in the
    handler kills the loader and lets the thread through its exit stop:
    what a SIGKILL landing between the stop's report and the next ptrace
    request does).  The requests on that thread then fail with ESRCH: the
    machine keeps the thread as running until its death is reaped -- no
    error out of the handling (before: ProcessLookupError out of
    run_task), the rig reports the process dead, its parent gets the real
    status, and no thread is left behind."""
    from textpoke.live import NoSuchProcess, _ptrace as P
    from textpoke.live._rig import LiveClientRig
    rig = LiveClientRig(cpus=2)
    try:
        fn = rig.sym("sc_func_b")                    # x + 2
        i = rig.add_probe("sc_func_b", arg=5, allow=[7])
        rig.start()
        assert rig.expect({i: 7}) == {}
        armed, killed = [], []

        def handler(regs):
            if False:
                yield
            if regs.ip - 1 != fn:
                return False
            if armed and not killed:
                tid = regs.cpu
                killed.append(tid)
                os.kill(rig.pid, signal.SIGKILL)
                exit_stop = signal.SIGTRAP | P.PTRACE_EVENT_EXIT << 8
                while True:                          # until it has left its trap stop
                    try:
                        si = P.getsiginfo(tid)
                    except ProcessLookupError:
                        break                        # running to its exit
                    if si.si_code == exit_stop:
                        P.cont(tid, 0)               # through its exit stop, unseen
                        break
            _return_plus(regs, 100)
            return True

        rig.machine.register_trap_handler(handler, priority=TrapPriority.NOTIFIER,
                                          name="test-kill-mid-handling")
        rig.allow(i, [7, 105])
        with rig.core.text_mutex:
            rig.core.text_poke(fn, b"\xcc")
        armed.append(1)
        assert not rig.wait_passes(2)
        assert killed and rig.proc.returncode == -signal.SIGKILL
        assert rig.machine.threads == []
    finally:
        with contextlib.suppress(NoSuchProcess):
            rig.close()
