# SPDX-License-Identifier: GPL-2.0-only
"""Ordinary function entries (no fentry NOP): the relocator on its own, and
``live count`` on real processes -- a C target whose functions are written
in assembly (one per moved form and one per refusal reason), and Debian's
own ``/usr/bin/python3`` (and its libc) running a multithreaded workload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import iced_x86
import pytest

from textpoke._relocate import RelocError, plan_entry, relocated_copies, trampoline

sys.path.insert(0, str(Path(__file__).parent / "live_targets" / "count"))
from helpers import ptrace_skip_reason  # noqa: E402

HERE = Path(__file__).parent / "live_targets" / "entries"
sys.path.insert(0, str(HERE))
from entries_target import Entries, build_entries  # noqa: E402
MOVABLE = ["e_rip", "e_endbr", "e_jcc", "e_jmp", "e_inner"]
REFUSED = {"e_outer": "entry-point", "e_short": "short", "e_into": "jump-into",
           "e_ind": "indirect-jump", "e_call": "call", "e_ret": "ret", "e_sys": "syscall",
           "e_ud": "int", "e_loop": "loop"}
F = 0x5555_5540_1000


def _decode(code: bytes, ip: int) -> list:
    return list(iced_x86.Decoder(64, code, ip=ip))


# --- the relocator, on bytes --------------------------------------------------
def test_rip_relative_operand_is_retargeted():
    # lock incq 0x100(%rip); mov %rdi,%rax; ret
    code = bytes.fromhex("f048ff0500010000") + bytes.fromhex("4889f8c3")
    plan = plan_entry(code, F)
    assert plan.addr == F and plan.length == 8 and not plan.endbr
    dest = F + 0x10_0000
    tr = trampoline(plan, dest)
    ins = _decode(tr, dest)
    assert ins[0].ip_rel_memory_address == F + 8 + 0x100          # same data as before
    assert ins[1].near_branch_target == F + 8 and len(ins) == 2   # back to the next insn


def test_endbr64_stays_first_and_short_branches_widen():
    # endbr64; test %edi,%edi; je +0x10; jmp +0x20 ... (pad with ret)
    code = bytes.fromhex("f30f1efa") + bytes.fromhex("85ff7410eb20") + b"\x90" * 0x30 + b"\xc3"
    plan = plan_entry(code, F)
    assert plan.endbr and plan.addr == F + 4 and plan.length == 6
    dest = F - 0x4000_0000
    ins = _decode(relocated_copies(plan, dest), dest)
    assert [i.mnemonic for i in ins] == [iced_x86.Mnemonic.TEST, iced_x86.Mnemonic.JE,
                                          iced_x86.Mnemonic.JMP]
    assert ins[1].len == 6 and ins[1].near_branch_target == F + 8 + 0x10
    assert ins[2].len == 5 and ins[2].near_branch_target == F + 10 + 0x20


@pytest.mark.parametrize("hexcode, reason", [
    ("31c0c3", "short"),                                  # 3 bytes
    ("f30f1efa31c0c3", "short"),                          # ENDBR64 + 3 bytes
    ("", "no-size"),
    ("e800000000c3", "call"),                             # call among the moved
    ("85ff7501c3", "ret"),
    ("31c0b0270f05c3", "syscall"),
    ("0f0b909090c3", "int"),
    ("cc90909090c3", "int"),                              # someone's breakpoint
    ("ffcf75fc89f8c3", "loop"),                           # jnz back to the entry
    ("e2fe90909090c3", "branch"),                         # LOOP: no rel32 form
    ("31c0ffc083f8037cf9c3", "jump-into"),                # jl to +2
    ("488d0500000000ffe0c3", "indirect-jump"),            # jmp *%rax
    ("06909090909090c3", "undecodable"),              # PUSH ES: not in 64-bit mode
    ("4889f890900690c3", "undecodable"),              # ... later in the body
])
def test_each_refusal(hexcode, reason):
    with pytest.raises(RelocError) as e:
        plan_entry(bytes.fromhex(hexcode), F)
    assert e.value.reason == reason, str(e.value)


def test_a_tail_call_through_the_got_is_not_a_jump_table():
    # push %rbx; mov %rdi,%rbx; ...; jmp *0x100(%rip)
    code = bytes.fromhex("534889fb5b") + bytes.fromhex("ff2500010000")
    assert plan_entry(code, F).length == 5


def test_a_tail_call_through_a_loaded_pointer_is_not_a_jump_table():
    # push %rbx; mov 0x78(%rdi),%rax; pop %rbx; jmp *%rax
    assert plan_entry(bytes.fromhex("53488b47785bffe0"), F).length == 5
    # ... but a computed one is refused: lea (%rip),%rax; jmp *%rax
    with pytest.raises(RelocError) as e:
        plan_entry(bytes.fromhex("488d0500000000ffe0"), F)
    assert e.value.reason == "indirect-jump" and "computed" in str(e.value)


def _rel_table_function(entries: list[int]) -> tuple[bytes, callable]:
    """cmp $3,%edi; ja ret; lea T(%rip),%rdx; movslq (%rdx,%rdi,4),%rax;
    add %rdx,%rax; jmp *%rax; ret -- T at F+0x1000 holding *entries*."""
    t = F + 0x1000
    code = (bytes.fromhex("83ff03" "7710" "488d15") + (t - (F + 12)).to_bytes(4, "little")
            + bytes.fromhex("486304ba" "4801d0" "ffe0" "c3"))
    table = b"".join((x - t).to_bytes(4, "little", signed=True) for x in entries)
    return code, (lambda a, n: (table + b"\0" * 64)[a - t:a - t + n])


def test_a_bounded_jump_table_is_read_and_checked():
    code, read = _rel_table_function([F + 21] * 4)
    assert plan_entry(code, F, read=read).length == 5
    with pytest.raises(RelocError) as e:
        plan_entry(code, F)                         # cannot read it: refused
    assert e.value.reason == "indirect-jump"
    code, read = _rel_table_function([F + 21, F + 21, F + 3, F + 21])
    with pytest.raises(RelocError) as e:
        plan_entry(code, F, read=read)
    assert e.value.reason == "indirect-jump" and "entry 2" in str(e.value)


def test_a_computed_goto_table_indexed_by_a_byte():
    # movzbl %dil,%eax; mov T(,%rax,8),%rax; jmp *%rax  (non-PIE, T absolute)
    f, t = 0x40_1000, 0x60_0000
    code = bytes.fromhex("0fb6c7" "488b04c5") + t.to_bytes(4, "little") + bytes.fromhex("ffe0")
    good = b"".join((f + 11).to_bytes(8, "little") for _ in range(256))
    assert plan_entry(code, f, read=lambda a, n: good[a - t:a - t + n]).length == 11
    bad = good[:8 * 200] + (f + 4).to_bytes(8, "little") + good[8 * 201:]
    with pytest.raises(RelocError) as e:
        plan_entry(code, f, read=lambda a, n: bad[a - t:a - t + n])
    assert "entry 200" in str(e.value)


def test_taking_a_moved_address_is_refused():
    # nop5; lea F+2(%rip),%rax; ret
    code = bytes.fromhex("0f1f440000" "488d05") + (-10).to_bytes(4, "little", signed=True) + b"\xc3"
    with pytest.raises(RelocError) as e:
        plan_entry(code, F)
    assert e.value.reason == "jump-into" and "address" in str(e.value)


def test_second_entry_point_and_cold_part():
    code = bytes.fromhex("4889f84883c001c3")
    with pytest.raises(RelocError) as e:
        plan_entry(code, F, others=[F + 3])
    assert e.value.reason == "entry-point"
    cold = bytes.fromhex("e9") + (F + 3 - (F + 0x1000 + 5)).to_bytes(4, "little", signed=True)
    with pytest.raises(RelocError) as e:
        plan_entry(code, F, extra=[(cold, F + 0x1000, "f.cold")])
    assert e.value.reason == "jump-into" and "f.cold" in str(e.value)


def test_an_unnamed_cold_part_jumping_back_is_followed():
    """A stripped binary names no ``.cold`` part: the code the function
    jumps to outside its body is followed, and a branch from there into
    the replaced bytes refused (python3.11's PyOS_strtol has one)."""
    cold = F + 0x10_0000
    # f: push %rbx; mov %rdi,%rbx; test %edi,%edi; je cold; pop %rbx; ret
    je = (cold - (F + 12)).to_bytes(4, "little", signed=True)
    code = bytes.fromhex("534889fb85ff0f84") + je + bytes.fromhex("5bc3")
    # cold: add $1,%rdi; jmp f+1
    back = (F + 1 - (cold + 9)).to_bytes(4, "little", signed=True)
    blob = bytes.fromhex("4883c701e9") + back + b"\xcc" * 600
    read = lambda a, n: blob[a - cold:a - cold + n]  # noqa: E731
    with pytest.raises(RelocError) as e:
        plan_entry(code, F, read=read)
    assert e.value.reason == "jump-into" and "cold part" in str(e.value)
    assert plan_entry(code, F).length == 6             # unseen without a reader
    # a function's entry out there is another function: not followed
    assert plan_entry(code, F, read=read, starts=[cold]).length == 6


def test_targets_out_of_reach_are_refused():
    code = bytes.fromhex("f048ff0500010000c3")
    with pytest.raises(RelocError) as e:
        trampoline(plan_entry(code, F), F + (3 << 30))
    assert e.value.reason == "reach"


# --- on real processes -------------------------------------------------------
_skip = ptrace_skip_reason()
live = pytest.mark.skipif(_skip is not None, reason=_skip or "")


@pytest.fixture(scope="module")
def entries_exe(tmp_path_factory):
    return build_entries(tmp_path_factory.mktemp("entries"))


def _read(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def _functions(pid: int) -> dict:
    from textpoke.live import Symbols
    with Symbols(pid) as s:
        return {f.name: (f.addr, f.size) for f in s.functions("e_*")}


@live
def test_count_is_exact_and_every_refusal_has_its_reason(entries_exe):
    from textpoke.live import live_count
    t = Entries(entries_exe)
    try:
        funcs = _functions(t.pid)
        text = {n: _read(t.pid, a, s) for n, (a, s) in funcs.items()}
        base = t.ask("go 500")
        during: list = []

        def window():
            # the target's own bytes while counting: a JMP at each entry,
            # after the ENDBR64 of e_endbr, which stays first
            a, _ = funcs["e_endbr"]
            during.append((_read(t.pid, a, 5), {n: _read(t.pid, funcs[n][0], 1) for n in MOVABLE}))
            during.append(t.ask("go 500"))

        res = live_count(t.pid, "e_*", window=window)
        got = dict(res.counts)
        endbr, firsts = during[0]
        assert endbr[:4] == bytes.fromhex("f30f1efa") and endbr[4:] == b"\xe9"
        assert all(firsts[n] == b"\xe9" for n in MOVABLE if n != "e_endbr")
        line = during[1]
        assert line[1] == base[1]                      # the workload's results unchanged
        own = [int(b) - int(a) for a, b in zip(base[2:], line[2:])]
        assert own == [4 * 500] * 5
        assert [got[n] for n in MOVABLE] == own         # exact, as the program counts itself
        assert {k["function"]: k["kind"] for k in res.skipped} == REFUSED
        assert res.restored and res.freed and res.alive
        assert {n: _read(t.pid, a, s) for n, (a, s) in funcs.items()} == text
        assert t.ask("go 10")[1] == t.ask("go 10")[1] and t.proc.poll() is None
    finally:
        t.close()


@live
def test_threads_running_through_the_moved_bytes(entries_exe):
    """4 threads call the functions in a loop while their entries are
    switched both ways: any thread between two moved instructions is
    stepped out first; the target keeps running right."""
    from textpoke.live import live_count
    t = Entries(entries_exe)
    try:
        funcs = _functions(t.pid)
        text = {n: _read(t.pid, a, s) for n, (a, s) in funcs.items()}
        assert t.ask("busy") == ["busy"]

        def window():
            # until every counted function has been called since the switch
            from textpoke.live import Symbols
            with Symbols(t.pid) as s:
                h = s.lookup("hits").addr
            first = _read(t.pid, h, 40)
            for _ in range(100000):
                if all(a != b for a, b in zip(_chunks(first), _chunks(_read(t.pid, h, 40)))):
                    return
            raise AssertionError("the target's threads did not run")

        for strategy in ("int3", "stop-machine"):
            res = live_count(t.pid, "e_*", window=window, strategy=strategy)
            got = dict(res.counts)
            assert all(got[n] > 0 for n in MOVABLE), got
            assert res.restored and res.freed and res.alive
        stopped = t.ask("stop")
        assert stopped[0] == "stopped" and t.proc.poll() is None
        assert {n: _read(t.pid, a, s) for n, (a, s) in funcs.items()} == text
        assert t.ask("go 10")[0] == "done"
    finally:
        t.close()


def _chunks(b: bytes) -> list[bytes]:
    return [b[i:i + 8] for i in range(0, len(b), 8)]


@live
def test_sites_counts_refusals_and_a_breakpoint_is_not_moved(entries_exe):
    t = Entries(entries_exe, threads=1)
    try:
        funcs = _functions(t.pid)
        r = _tp("sites", "--pid", str(t.pid), "--functions", "e_*", "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert {e["function"] for e in doc["entries"]} == set(MOVABLE) | {"e_spare"}
        assert {x["function"]: x["reason"] for x in doc["refused"]} == REFUSED
        assert doc["refused_by_reason"] == {v: 1 for v in REFUSED.values()}
        mod = next(m for m in doc["modules"] if m["module"] == entries_exe.name)
        assert mod["entries"] == 6 and mod["refused"] == len(REFUSED)
        # someone's breakpoint in e_spare (never called): not moved, said why
        a = funcs["e_spare"][0]
        old = _read(t.pid, a, 1)
        with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as f:
            f.seek(a)
            f.write(b"\xcc")
        try:
            r = _tp("count", "--pid", str(t.pid), "--functions", "e_spare", "--duration", "0")
            assert r.returncode == 2 and "int3 1" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        finally:
            with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as f:
                f.seek(a)
                f.write(old)
        r = _tp("count", "--pid", str(t.pid), "--functions", "e_short", "--duration", "0")
        assert r.returncode == 2 and "short" in r.stderr and "Traceback" not in r.stderr
    finally:
        t.close()


def _tp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textpoke", "live", *args],
                          capture_output=True, text=True, timeout=120)


@live
def test_a_killed_count_is_recovered(entries_exe):
    """SIGKILL of 'live count' while the JMPs stand: the target lives (its
    stubs stay mapped, still counting); 'sites --check' says so (exit 1) and
    'recover' switches the entries back and frees the trampolines."""
    t = Entries(entries_exe)
    try:
        funcs = _functions(t.pid)
        text = {n: _read(t.pid, a, s) for n, (a, s) in funcs.items()}
        base = t.ask("go 200")
        p = subprocess.Popen([sys.executable, "-m", "textpoke", "live", "count", "--pid",
                              str(t.pid), "--functions", "e_*", "--duration", "60"],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            assert "counting for" in p.stderr.readline()
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait()
            p.stderr.close()
        assert t.ask("go 200")[1] == base[1]            # runs through the stubs, unchanged
        r = _tp("sites", "--pid", str(t.pid), "--check", "--json")
        assert r.returncode == 1, r.stdout
        left = json.loads(r.stdout)["journal"]
        # e_spare too: patched, never called
        assert left["calls_into_stubs"] == len(MOVABLE) + 1 and left["stub_regions_mapped"]
        r = _tp("recover", "--pid", str(t.pid), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert rep["calls_restored"] == len(MOVABLE) + 1 and rep["regions_freed"] == 1
        assert {n: _read(t.pid, a, s) for n, (a, s) in funcs.items()} == text
        assert t.ask("go 200")[1] == base[1] and t.proc.poll() is None
        assert _tp("sites", "--pid", str(t.pid), "--check").returncode == 0
    finally:
        t.close()


# --- Debian's python3 -------------------------------------------------------------
WORKLOAD = r"""
import hashlib, json, sys, threading
def work(seed, out, i):
    d = {}
    for k in range(2000):
        s = f"{seed}-{k}"
        d[s] = len(json.dumps([k, s, {"a": k}])) + (hash(s) & 0xff)
    out[i] = hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:16]
print("ready", flush=True)
for line in sys.stdin:
    out = [None] * 4
    ts = [threading.Thread(target=work, args=(int(line) * 10 + i, out, i)) for i in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    print(" ".join(out), flush=True)
"""
PY = "/usr/bin/python3"


@live
@pytest.mark.skipif(not os.path.exists(PY), reason="no /usr/bin/python3")
def test_an_ifunc_is_refused_with_the_reason():
    """libc's memcpy is an IFUNC: its symbol is the resolver, not what the
    calls reach; counting it would print 0, so it is refused, saying why."""
    from textpoke.live import Symbols, entry_sites
    p = subprocess.Popen([PY, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        with Symbols(p.pid) as s:
            ok, refused = entry_sites(s, "libc.so.6:memcpy")
        assert not ok and refused[0].reason == "ifunc" and "resolver" in refused[0].why
    finally:
        p.kill()
        p.wait()


@live
@pytest.mark.skipif(not os.path.exists(PY), reason="no /usr/bin/python3")
def test_python3_cold_part_into_an_entry_is_refused():
    """PyOS_strtol's cold part (unnamed: .dynsym only) jumps back to
    PyOS_strtol+1 after skipping a space: moving its entry would break it."""
    from textpoke.live import Symbols, entry_sites
    p = subprocess.Popen([PY, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        with Symbols(p.pid) as s:
            ok, refused = entry_sites(s, "python3:PyOS_strtol")
        if not refused and ok and ok[0].plan.orig[:1] != b"\xf3":
            pytest.skip("this python3 build has no cold jump into PyOS_strtol")
        assert not ok and refused[0].reason == "jump-into" and "cold part" in refused[0].why
    finally:
        p.kill()
        p.wait()


@live
@pytest.mark.skipif(not os.path.exists(PY), reason="no /usr/bin/python3")
@pytest.mark.parametrize("pattern, must", [
    ("libc.so.6:malloc", {"malloc"}),
    # a tail call through tp_hash (jmp *%rax) in the body: proved a pointer
    ("python3:PyObject_Hash", {"PyObject_Hash"}),
    # computed gotos: every opcode_targets entry read, none into the entry
    ("python3:_PyEval_EvalFrameDefault", {"_PyEval_EvalFrameDefault"}),
    ("python3:PyList_*", {"PyList_Append", "PyList_New"})])
def test_count_on_debian_python3(pattern, must):
    p = subprocess.Popen([PY, "-c", WORKLOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "")})
    try:
        assert p.stdout.readline().strip() == "ready"

        def rnd(n: int) -> str:
            p.stdin.write(f"{n}\n")
            p.stdin.flush()
            return p.stdout.readline().strip()

        base = [rnd(1), rnd(2)]
        during: list[str] = []
        from textpoke.live import live_count
        res = live_count(p.pid, pattern, window=lambda: during.extend([rnd(1), rnd(2)]))
        got = dict(res.counts)
        assert during == base and [rnd(1), rnd(2)] == base      # output unchanged
        assert all(got.get(f, 0) > 0 for f in must), got
        assert res.restored and res.freed and res.alive and p.poll() is None
    finally:
        p.kill()
        p.wait()


# --- the quiescence between the INT3 and the tail, on a stand-in machine ------------
class _FakeMachine:
    """Records the quiescence asked for and the writes, in order."""

    def __init__(self, stays: bool = False) -> None:
        self.log: list = []
        self.stays = stays

    def quiesce(self, ranges, why=""):
        from textpoke.live._regions import QuiesceTimeout
        self.log.append(("quiesce", sorted(ranges)))
        if self.stays:
            raise QuiesceTimeout("a thread stays inside")
        yield

    def text_poke_write_many(self, writes):
        self.log.append(("write", [(a, bytes(d)) for a, d in writes]))
        yield


def test_tails_wait_for_quiescence_of_the_moved_bytes():
    from textpoke import MachineError
    from textpoke.live._entry import EntrySite, quiescent_tails
    addr = 0x7000_0000_1000
    code = bytes.fromhex("f048ff0500010000c3")               # lock incq; ret: 8 moved
    site = EntrySite(addr, "f", addr, "m", code[:5], plan_entry(code, addr))
    jmp_tail = bytes.fromhex("00100000")
    # the JMP's tail: no thread inside [addr+1, addr+8) first, then written
    m = _FakeMachine()
    with quiescent_tails(m, [site]):
        list(m.text_poke_write_many([(addr, b"\xcc")]))            # the INT3: no wait
        list(m.text_poke_write_many([(addr + 1, jmp_tail)]))
    assert m.log == [("write", [(addr, b"\xcc")]),
                     ("quiesce", [(addr + 1, addr + 8)]),
                     ("write", [(addr + 1, jmp_tail)])]
    assert "text_poke_write_many" not in vars(m)               # the machine's own again
    # putting the original bytes back needs no wait
    m = _FakeMachine()
    with quiescent_tails(m, [site]):
        list(m.text_poke_write_many([(addr + 1, code[1:5])]))
    assert m.log == [("write", [(addr + 1, code[1:5])])]
    # a thread that stays: nothing written, the batch fails (the core rolls back)
    m = _FakeMachine(stays=True)
    with pytest.raises(MachineError, match="stays"):
        with quiescent_tails(m, [site]):
            list(m.text_poke_write_many([(addr + 1, jmp_tail)]))
    assert [k for k, _ in m.log] == ["quiesce"]
