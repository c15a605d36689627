# SPDX-License-Identifier: GPL-2.0-only
"""Fast-forward (SimMachine.fast_forward): a quiet stretch of decisions made
at once runs the same schedule as one decision at a time -- the counting
random generator it rewinds with, a burst that a trap or a fault rolls
back, and a predicate that turns true inside a burst."""

import random

import pytest

from textpoke.lowlevel import drive
from textpoke.sim import FINE, boot_workload
from textpoke.sim._sched import CountingRandom, _Scheduler


def test_counting_random_draws_as_random_and_rewinds():
    a, b = CountingRandom(1234), random.Random(1234)
    marks = []
    for i in range(400):
        marks.append((a.words, a.random()))
        assert marks[-1][1] == b.random()
        assert a.randrange(3) == b.randrange(3)
        assert a.randint(1, 8) == b.randint(1, 8)
        assert a.getrandbits(70) == b.getrandbits(70)
        if i % 50 == 0:
            x = list(range(9))
            y = list(x)
            a.shuffle(x)
            b.shuffle(y)
            assert x == y
    # back to any earlier point (then further back: through a fresh shadow)
    for words, value in (marks[399], marks[300], marks[7], marks[0]):
        assert a.rewind(words)
        assert a.words == words and a.random() == value
    assert not a.rewind(a.words + 1)          # never ahead of where it is
    a.setstate(b.getstate())
    assert not a.rewind(0)                    # no longer follows from its seed


def _state(w):
    sim = w.sim
    return {"steps": sim.steps, "oopses": [o.as_dict() for o in sim.oopses],
            "trace": list(sim.trace),
            "regs": [c.regs_dict() for c in sim.vcpus],
            "cpu": [(c.state, c.slices, c.instructions, c.traps) for c in sim.vcpus],
            "counts": [w.counts(c, s) for c in sim.cpus for s in w.sites],
            "words": sim.rng.words}


def _run(fast, poison=None, seed=5):
    with boot_workload(ncpus=3, seed=seed, policy=FINE, trace=True) as w:
        sim = w.sim
        sim.fast_forward = fast
        if poison == "int3-late":
            # reached once every 16 iterations: clean bursts first, then
            # every CPU that gets there traps (nobody handles it) mid-burst
            sim.text_write_early(w.image.sym("preempt_point"), b"\xcc")
        w.start()
        sim.run(300)
        if poison in ("ud2", "garbage"):
            # written while the CPUs run: stale lines first (one by one),
            # refilled, then quiet again -- and the bursts hit it
            site = w.by_name["call" if poison == "ud2" else "jcc32"]
            drive(sim.text_poke_write(site.addr, b"\x0f\x0b" if poison == "ud2" else b"\xff\xff"))
        sim.run(1500)
        first = _state(w)
        it = {c: w.iterations(c) for c in sim.cpus}
        sim.run_until(lambda: bool(sim.oopses) or all(
            w.iterations(c) >= it[c] + 3 for c in sim.cpus if sim.vcpus[c].state != "dead"),
            5000, monotone=True)
        return first, _state(w)


@pytest.mark.parametrize("poison", [None, "int3-late", "ud2", "garbage"])
def test_fast_forward_runs_the_same_schedule(poison, monkeypatch):
    calls = {"bursts": 0, "kept": 0}
    real = _Scheduler._burst

    def counting(self, k, keep=False):
        r = real(self, k, keep=keep)
        calls["bursts"] += 1
        calls["kept"] += r is not None
        return r
    monkeypatch.setattr(_Scheduler, "_burst", counting)
    fast = _run(True, poison)
    assert calls["kept"] >= 1                     # it did fast-forward
    assert fast == _run(False, poison)
    if poison is not None:
        assert fast[0]["oopses"]                  # and it did roll back over an oops
        assert calls["bursts"] > calls["kept"]


def test_interrupt_in_a_burst_leaves_a_decision_boundary(monkeypatch):
    from textpoke.lowlevel import deliver_interrupt
    import textpoke.sim._ucfast as U

    with boot_workload(ncpus=3, seed=9, policy=FINE) as w:
        w.sim.fast_forward = True
        w.start()
        w.sim.run(50)
        before = (w.sim.steps, w.sim.rng.words, [c.regs_dict() for c in w.sim.vcpus],
                  [w.counts(c, s) for c in w.sim.cpus for s in w.sites])
        fired = []
        real = U.FastCpu.__init__

        def init(self, uc):
            real(self, uc)
            run = self.run_here

            def interrupted(until, count):
                if count > 8 and not fired:    # only a burst runs more than one slice
                    fired.append(1)
                    deliver_interrupt(KeyboardInterrupt())
                return run(until, count)
            self.run_here = interrupted
        monkeypatch.setattr(U.FastCpu, "__init__", init)
        for c in w.sim.vcpus:
            c.fast = U.FastCpu(c.uc)
        with pytest.raises(KeyboardInterrupt):
            w.sim.run(300)
        assert fired
        after = (w.sim.steps, w.sim.rng.words, [c.regs_dict() for c in w.sim.vcpus],
                 [w.counts(c, s) for c in w.sim.cpus for s in w.sites])
        assert after == before


def test_interrupt_while_drawing_a_burst_puts_it_all_back(monkeypatch):
    from textpoke.lowlevel import deliver_interrupt
    import textpoke.sim._sched as S

    with boot_workload(ncpus=3, seed=4, policy=FINE) as w:
        w.sim.fast_forward = True
        w.start()
        w.sim.run(40)
        before = (w.sim.steps, w.sim.rng.words, w.sim.rng.getstate(),
                  [c.regs_dict() for c in w.sim.vcpus])
        real = S._draw_slices
        fired = []

        def draws(*a):
            out = real(*a)
            if not fired:                      # mid-burst, before any CPU ran
                fired.append(1)
                deliver_interrupt(KeyboardInterrupt())
            return out
        monkeypatch.setattr(S, "_draw_slices", draws)
        with pytest.raises(KeyboardInterrupt):
            w.sim.run(200)
        assert fired
        assert (w.sim.steps, w.sim.rng.words, w.sim.rng.getstate(),
                [c.regs_dict() for c in w.sim.vcpus]) == before
        # and the machine goes on as if nothing happened
        monkeypatch.setattr(S, "_draw_slices", real)
        w.sim.run(200)
        after = (w.sim.steps, [c.regs_dict() for c in w.sim.vcpus],
                 [w.counts(c, s) for c in w.sim.cpus for s in w.sites])
    with boot_workload(ncpus=3, seed=4, policy=FINE) as ref:
        ref.sim.fast_forward = True
        ref.start()
        ref.sim.run(40)
        ref.sim.run(200)
        assert after == (ref.sim.steps, [c.regs_dict() for c in ref.sim.vcpus],
                         [ref.counts(c, s) for c in ref.sim.cpus for s in ref.sites])
