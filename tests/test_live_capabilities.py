# SPDX-License-Identifier: GPL-2.0-only
"""What a live process lends a client beyond the protocol -- executable
memory, data memory, per-thread storage (the GS base) and quiescence --
asked for through capabilities, as the clients do on the sim, on real
GCC-built processes."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from textpoke import Capability, ExecMem, TextPoke
from test_live_machine import Target, live_skip_reason, rel32

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from livetest import killed_at_end  # noqa: E402

pytestmark = pytest.mark.skipif(live_skip_reason() is not None, reason=live_skip_reason() or "")


def _maps(pid: int) -> set[int]:
    from textpoke.live import read_maps
    return {m.start for m in read_maps(pid)}


def test_live_declares_what_a_process_can_lend():
    from textpoke.live import LiveMachine
    assert {Capability.EXECMEM, Capability.DATA, Capability.PERCPU,
            Capability.QUIESCE} <= LiveMachine.capabilities
    assert Capability.CALL not in LiveMachine.capabilities


def test_per_thread_counters_through_execmem_data_and_gs_then_everything_goes():
    """A stub in injected executable memory counts into %gs:0; each thread's
    GS base points at its own slot of an injected data region; a hot NOP5
    site is switched to CALL the stub through the core.  Every busy thread
    counts in its own slot; switched back, quiesced and freed, the regions
    are unmapped at close and the target finishes normally."""
    from textpoke.live import LiveMachine
    t = Target(3)
    try:
        site = t.sites["j0"][0]
        with LiveMachine(t.pid) as m, TextPoke(m) as core:
            data = m.map_data(4096, "counters")
            assert m.map_data(4096, "counters") == data           # same name: same region
            slot = {tid: data + 64 * i for i, tid in enumerate(sorted(m.cpus))}
            for tid, a in slot.items():
                m.set_percpu_base(tid, a)
            em = ExecMem(core, size=4096)                          # the shared allocator
            rng = m.execmem_range(4096)
            assert not rng.core and em.start == rng.start and rng.end - rng.start >= 4096
            assert not m.text_range_of(rng.start, rng.end - rng.start).core
            assert rng.start in _maps(t.pid) and data in _maps(t.pid)
            stub = em.alloc(16)
            code = bytes.fromhex("65 48 ff 04 25 00 00 00 00 c3")  # incq %gs:0; ret
            core.text_poke_copy(stub, code)
            assert m.text_read(stub, len(code)) == code
            with core.batch():
                core.smp_text_poke_batch_add(site, b"\xe8" + rel32(site, stub))
            workers = [tid for tid in slot if tid != t.pid]        # main waits on stdin
            deadline = 2000
            while deadline and not all(struct.unpack("<Q", m.mem.read(slot[w], 8))[0] > 0
                                       for w in workers):
                m.run_task(m.sync_each_cpu())                      # let them run, see stops
                deadline -= 1
            counts = {tid: struct.unpack("<Q", m.mem.read(a, 8))[0] for tid, a in slot.items()}
            assert all(counts[w] > 0 for w in workers), counts
            assert counts[t.pid] == 0                             # its own slot, untouched
            with core.batch():
                core.smp_text_poke_batch_add(site, t.old("j0"))
            m.run_task(m.quiesce([(stub, stub + len(code))], "stub freed"))
            em.free(stub)                                          # INT3-filled
            assert m.text_read(stub, 16) == b"\xcc" * 16
        assert m.regions_kept == []
        left = _maps(t.pid)
        assert rng.start not in left and data not in left
        assert t.read(site, 5) == t.old("j0")
        rc, counts, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()


def test_execmem_with_code_still_in_it_stays_mapped_at_close():
    """A chunk never freed may still be reached: the region is kept (and
    said so), never unmapped under a caller."""
    from textpoke.live import LiveMachine
    t = Target(2)
    try:
        with LiveMachine(t.pid) as m, TextPoke(m) as core:
            em = ExecMem(core, size=4096)
            a = em.alloc(16)
            core.text_poke_copy(a, b"\xc3")
        assert len(m.regions_kept) == 1 and "code still in it" in m.regions_kept[0]
        assert em.start in _maps(t.pid)
        rc, _, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()


def test_quiesce_sees_a_return_address_on_a_stack_and_gives_up_with_the_reason(monkeypatch):
    """The main thread sleeps in read() called from main(): no rip in main,
    but its stack holds a return address into it -- so main is never
    quiet; an idle function is quiet at once."""
    from textpoke.live import LiveMachine, _regions
    from textpoke.live._regions import QuiesceTimeout
    from textpoke.live import Symbols
    t = Target(2)
    try:
        syms = Symbols(t.pid)
        main = syms.lookup("main")
        syms.close()
        idle = t.sites["idle"][0]
        with LiveMachine(t.pid) as m:
            why = m.threads_in([(main.addr, main.addr + main.size)])
            assert any(f"thread {t.pid}: stack word" in w for w in why), why
            m.run_task(m.quiesce([(idle, idle + 6)], "idle"))      # returns: nobody there
            monkeypatch.setattr(_regions, "QUIESCE_ATTEMPTS", 3)
            with pytest.raises(QuiesceTimeout, match=f"thread {t.pid}: stack word"):
                m.run_task(m.quiesce([(main.addr, main.addr + main.size)], "main"))
        rc, _, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()


def test_a_thread_running_in_a_range_is_seen_there():
    from textpoke.live import LiveMachine
    t = Target(2)
    try:
        lo = t.sites["j0"][0]
        text = None
        with LiveMachine(t.pid) as m:
            text = m.text_ranges[0]
            # the busy workers run the executable's text all the time
            seen = []
            for _ in range(200):
                seen = m.threads_in([(text.start, text.end)])
                if any("runs at" in w for w in seen):
                    break
            assert any("runs at" in w for w in seen), seen
        assert text.start <= lo < text.end
        rc, _, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()


# ---------------------------------------------------------------- a dead patcher's regions
DRIVER = """
import sys
from textpoke import ExecMem, TextPoke
from textpoke.live import LiveMachine
pid, code = int(sys.argv[1]), sys.argv[2] == "code"
m = LiveMachine(pid)
core = TextPoke(m)
data = m.map_data(4096, "d")
em = ExecMem(core, size=4096)
if code:
    core.text_poke_copy(em.alloc(16), b"\\xc3")
print("mapped", em.start, data, flush=True)
sys.stdin.readline()                      # the test kills us here
"""


@pytest.mark.parametrize("code", [False, True])
def test_recover_frees_a_dead_patchers_regions_unless_code_is_in_them(tmp_path, code):
    import json
    import subprocess
    from textpoke.live import journal_path
    t = Target(2)
    try:
        drv = tmp_path / "driver.py"
        drv.write_text(DRIVER)
        d = subprocess.Popen([sys.executable, str(drv), str(t.pid), "code" if code else "empty"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with killed_at_end(d):
            word, ex, data = d.stdout.readline().split()
            assert word == "mapped"
            ex, data = int(ex), int(data)
        assert journal_path(t.pid).exists() and {ex, data} <= _maps(t.pid)
        r = subprocess.run([sys.executable, "-m", "textpoke", "live", "recover", "--pid",
                            str(t.pid), "--json"], capture_output=True, text=True, timeout=120)
        # exit 1 when something had to stay (the CLI's "a check found a problem")
        assert r.returncode == (1 if code else 0), r.stdout + r.stderr
        rep = json.loads(r.stdout)
        if code:
            # a site may still call that code: both stay, said so, and are no leftover
            assert {ex, data} <= _maps(t.pid)
            assert any("execmem" in k and "code still in it" in k for k in rep["kept"]), rep
            assert any(k.startswith("data") for k in rep["kept"]), rep
        else:
            assert rep["regions_freed"] == 2 and rep["kept"] == [], rep
            assert not ({ex, data} & _maps(t.pid))
        assert not journal_path(t.pid).exists()
        rc, _, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()


def test_each_execmem_name_is_its_own_region_and_a_name_again_the_same():
    from textpoke.live import LiveMachine
    t = Target(1)
    try:
        with LiveMachine(t.pid) as m:
            a, b = m.execmem_range(4096, "a"), m.execmem_range(8192, "b")
            assert a.end <= b.start or b.end <= a.start
            assert m.execmem_range(4096, "a") == a
            with pytest.raises(Exception, match="already mapped"):
                m.execmem_range(1 << 20, "a")               # bigger than what "a" is
            with pytest.raises(Exception, match="already mapped"):
                m.map_data(4096, "a")                      # "a" is code
        assert m.regions_kept == [] and not ({a.start, b.start} & _maps(t.pid))
        rc, _, _ = t.finish()
        assert rc == 0
    finally:
        t.kill()
