# SPDX-License-Identifier: GPL-2.0-only
"""Cancellation leaves no INT3.

A batch of mixed sites is patched on the sim while every vCPU runs them,
and an interrupt is injected at *every* yield point of the batch (the
count is finite and measured first), in the three ways one can arrive:

* ``throw``   -- raised inside the task at that step (a signal handler that
  raises while the patcher's own code runs);
* ``machine`` -- raised by the machine on its next scheduling step (a
  signal that arrives while the sim runs a vCPU), so it escapes
  ``run_task`` with the task suspended;
* ``close``   -- the scheduler holding the task abandons it and the task is
  closed (``GeneratorExit``), as when a tool shuts down mid-batch.

Afterwards: no INT3 of ours in the text, every site reads its old or new
bytes, every reference is zero, no CPU oopsed, every CPU keeps running,
and the machine patches normally again.
"""

from __future__ import annotations

import pytest

from textpoke import MachineError, TextPoke, TextPokeError
from textpoke.sim import FINE, boot_workload
from textpoke.testing import MemoryMachine

MIXED = ("nop2_jmp8", "nop5_jmp32", "call", "ret_jmp", "jcc32", "xline_nop5", "xline_jcc32")


class Interrupt(KeyboardInterrupt):
    """Our injected interrupt (a KeyboardInterrupt, so BaseException)."""


def _machine(seed: int):
    w = boot_workload(ncpus=3, seed=seed, policy=FINE)
    core = TextPoke(w.sim)
    w.start()
    w.sim.run(200)
    return w, core


def _sites(w):
    return [w.by_name[n] for n in MIXED]


def _batch(core, sites):
    for s in sites:
        yield from core.smp_text_poke_batch_add_task(s.addr, s.new)
    yield from core.smp_text_poke_batch_finish_task()


def _counting(task, box):
    """Forward *task*'s yields, counting them; at the yield numbered
    box['at'] do what box['how'] says."""
    n = 0
    try:
        item = next(task)
        while True:
            if n == box.get("at"):
                if box["how"] == "throw":
                    item = task.throw(Interrupt(f"at yield {n}"))
                    n += 1
                    continue
                if box["how"] == "machine":
                    box["armed"] = True
            n += 1
            box["yields"] = n
            yield item
            item = task.send(None)
    except StopIteration as stop:
        return stop.value


def _count_yields(seed: int) -> int:
    w, core = _machine(seed)
    box: dict = {}
    with core.text_mutex:
        w.sim.run_task(_counting(_batch(core, _sites(w)), box))
    w.close()
    return box["yields"]


def _check_after(w, core):
    sim = w.sim
    stray = []
    for s in w.sites:
        now = sim.text_read(s.addr, s.length)
        if s.name in MIXED:
            assert now in (s.old, s.new), f"{s.name} reads {now.hex()} (torn)"
        if now[0] == 0xCC and s.old[0] != 0xCC and s.new[0] != 0xCC:
            stray.append(s.name)
    assert not stray, f"INT3 left at {stray}"
    assert all(v == 0 for v in core.text_poke_array_refs.values()), core.text_poke_array_refs
    assert not core.text_poke_array.vec
    assert not sim.oopses, [str(o) for o in sim.oopses]
    # every CPU keeps running
    it = {c: w.iterations(c) for c in sim.cpus}
    assert sim.run_until(lambda: all(w.iterations(c) >= it[c] + 2 for c in sim.cpus), 200_000)
    # and the machine patches normally afterwards: everything to new, then old
    for target in ("new", "old"):
        with core.batch():
            for s in _sites(w):
                core.smp_text_poke_batch_add(s.addr, getattr(s, target))
        for s in _sites(w):
            assert sim.text_read(s.addr, s.length) == getattr(s, target)
    sim.run(2000)
    assert not sim.oopses, [str(o) for o in sim.oopses]


SEED = 77
N_YIELDS = None


def _n_yields() -> int:
    global N_YIELDS
    if N_YIELDS is None:
        N_YIELDS = _count_yields(SEED)
    return N_YIELDS


def test_the_batch_has_a_finite_number_of_yield_points():
    n = _n_yields()
    # 7 INT3s + the tails' bytes + 7 first bytes + syncs + ref drops
    assert 25 < n < 400


@pytest.mark.parametrize("how", ["throw", "machine", "close"])
def test_interrupt_at_every_yield_point_leaves_no_int3(how):
    n = _n_yields()
    outcomes = {"old": 0, "new": 0}
    for k in range(n):
        w, core = _machine(SEED)
        sim = w.sim
        box = {"at": k, "how": how}
        task = _counting(_batch(core, _sites(w)), box)
        if how == "close":
            core.text_mutex.acquire()
            t = sim.spawn(task, "patcher")
            sim.run_until(lambda: box.get("yields", 0) > k or t.done, 200_000)
            sim.abandon_tasks()
            task.close()                   # GeneratorExit inside the batch
            core.text_mutex.release()
        else:
            real_step = sim.step

            def step():
                if box.pop("armed", False):
                    raise Interrupt(f"machine step after yield {k}")
                return real_step()
            sim.step = step
            with pytest.raises(Interrupt) as info:
                with core.text_mutex:
                    core._run(task)
            sim.step = real_step
            assert "yield" in str(info.value)
        first = w.by_name[MIXED[0]]
        outcomes["new" if sim.text_read(first.addr, first.length) == first.new else "old"] += 1
        _check_after(w, core)
        w.close()
    # Early interrupts roll back, late ones finish: both must have happened.
    assert outcomes["old"] and outcomes["new"], outcomes


def test_close_recovers_a_batch_a_scheduler_still_holds():
    w, core = _machine(SEED)
    sim = w.sim
    box: dict = {}
    core.text_mutex.acquire()
    t = sim.spawn(_counting(_batch(core, _sites(w)), box), "patcher")
    sim.run_until(lambda: box.get("yields", 0) > 20, 200_000)
    assert not t.done and core._inflight is not None
    core.close()                          # abandons the task, then recovers
    core.text_mutex.release()
    for s in _sites(w):
        assert sim.text_read(s.addr, s.length) in (s.old, s.new)
        assert sim.text_read(s.addr, 1) != b"\xcc"
    sim.run(3000)
    assert not sim.oopses
    w.close()


# ----------------------------------------------------------- MemoryMachine

NOP5 = bytes.fromhex("0f1f440000")
JMP0 = bytes.fromhex("e900000000")


def _mem(n: int, **kw):
    return MemoryMachine({0x10000: NOP5 * n}, ncpus=2, **kw)


@pytest.mark.parametrize("mode", ["fail_on_write", "corrupt_on_write"])
def test_a_failing_write_anywhere_is_recovered_and_the_log_replays_to_the_text(mode):
    # Before the first-byte phase a failure rolls the batch back; during it
    # (every tail in place) the batch is finished instead: fewer steps.
    n = 6
    writes = _mem(n)
    with TextPoke(writes) as core, core.batch():
        for i in range(n):
            core.smp_text_poke_batch_add(0x10000 + 5 * i, JMP0)
    total = writes.writes
    outcomes = set()
    for k in range(total):
        m = _mem(n, **{mode: k})
        before = m.text_read(0x10000, 5 * n)
        with TextPoke(m) as core:
            with pytest.raises(TextPokeError):
                with core.batch():
                    for i in range(n):
                        core.smp_text_poke_batch_add(0x10000 + 5 * i, JMP0)
            sites = {m.text_read(0x10000 + 5 * i, 5) for i in range(n)}
            assert len(sites) == 1 and sites <= {NOP5, JMP0}, f"write {k}: {sites}"
            outcomes |= sites
            assert (sites == {NOP5}) == (k < 2 * n), f"write {k}: rolled back iff before phase 3"
            assert all(v == 0 for v in core.text_poke_array_refs.values())
            # replaying batch/rollback events over the original gives the text
            text = bytearray(before)
            for ev in core.events:
                if ev.phase in ("batch", "rollback"):
                    off = ev.addr - 0x10000
                    assert bytes(text[off:off + len(ev.old)]) == ev.old
                    text[off:off + len(ev.new)] = ev.new
            assert bytes(text) == m.text_read(0x10000, 5 * n)
    assert outcomes == {NOP5, JMP0}


def test_rollback_failure_keeps_the_original_error_with_a_note():
    m = _mem(2, fail_on_write=3)
    core = TextPoke(m)
    real = m.text_poke_write

    def write(addr, data):
        if m.writes >= 4:       # everything after the first failure fails too
            raise MachineError("the machine is gone")
        return real(addr, data)
    m.text_poke_write = write
    with pytest.raises(MachineError, match="injected failure") as info:
        with core.batch():
            core.smp_text_poke_batch_add(0x10000, JMP0)
            core.smp_text_poke_batch_add(0x10005, JMP0)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "the machine is gone" in notes


def test_event_log_is_a_ring_that_counts_what_it_lost():
    m = _mem(40)
    with TextPoke(m, events_capacity=16) as core, core.batch():
        for i in range(40):
            core.smp_text_poke_batch_add(0x10000 + 5 * i, JMP0)
    ev = list(core.events)
    assert len(ev) == 16
    assert core.events.total == 40 * 4            # int3, tail, batch, first per site
    assert core.events.lost == 40 * 4 - 16
    assert [e.seq for e in ev] == list(range(40 * 4 - 16, 40 * 4))


def test_releasing_text_mutex_with_queued_entries_drops_them():
    m = _mem(3)
    core = TextPoke(m)
    core.text_mutex.acquire()
    core.smp_text_poke_batch_add(0x10000, JMP0)
    from textpoke import TextMutexError
    with pytest.raises(TextMutexError, match="dropped"):
        core.text_mutex.release()
    # an unrelated batch later does not apply it
    with core.batch():
        core.smp_text_poke_batch_add(0x10005, JMP0)
    assert m.text_read(0x10000, 5) == NOP5 and m.text_read(0x10005, 5) == JMP0


def test_hotplug_refs_follow_the_cpus():
    m = _mem(2)
    core = TextPoke(m)
    new = m.add_cpu()
    assert core.text_poke_array_refs[new] == 0
    m.remove_cpu(0)
    assert 0 not in core.text_poke_array_refs
    with core.batch():
        core.smp_text_poke_batch_add(0x10000, JMP0)
    assert m.text_read(0x10000, 5) == JMP0
    assert set(core.text_poke_array_refs) == set(m.cpus)
