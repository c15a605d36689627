# SPDX-License-Identifier: GPL-2.0-only
"""Optimised ``live probe``: the probe's INT3 becomes a JMP to an
out-of-line buffer, and a hit is recorded in the target's memory without
stopping the thread.

The JMP and the buffer are the kprobes client's own optimisation
(:meth:`textpoke._kprobes.Kprobes.optimize_kprobe`: ``can_optimize``'s scan
of the function, the displaced instructions' copy rules, quiescence before
the write, the kernel's ``optprobe_template``: a ``struct pt_regs`` pushed
on the stack, ``call optimized_callback(op, regs)``, the registers popped,
the displaced instructions, a JMP back).  What a process adds is the
callback: where the kernel runs the handlers in ``optimized_callback``,
the image this module describes names as ``optimized_callback`` a small
recorder of ours in the target (:data:`RECORDER`), which copies the
``pt_regs``, the top :data:`STACK_WORDS` words of the stack at the probe
point, the TSC, the CPU and the thread id into a ring in the target's
data memory (:mod:`._probe_rings`) and returns.  The thread never stops; the
host drains the ring and evaluates the fetch-args on what was recorded.

Each thread has a ring of its own (:mod:`._probe_rings`): its GS base
(the machine's ``PERCPU``: x86-64 user code leaves %gs to whoever wants
it; glibc's TLS is %fs) points at its ring's header, whose first word is
the header's own address and whose second is the thread's id, written by
the host when it gives the ring (it knows every thread from ptrace's
clone events).  So the recorder neither shares a cache line with other
threads' hits nor makes a ``gettid`` system call per hit.  A hit claims
its entry with one ``lock xadd`` on its ring's head (uncontended: one
thread per ring; still atomic where threads beyond the rings share the
spare ring, whose thread id reads 0 and makes the recorder ask
``gettid``), writes it, then commits it by storing its sequence number
(index + 1) in the entry's first word, after having zeroed that word
first.  The host reads a batch of entries, then their first words again,
and takes an entry only if both reads show its own sequence number (x86
keeps stores in order, so a half-written or overwritten entry shows
another number in one of the two reads).  An entry the ring's writer has
lapped is an overrun (counted); one not yet committed stops the read
there until it is.

Why not the thread id from the thread's own memory: glibc keeps it in
``struct pthread`` at an offset from %fs that changes between versions,
and a thread made by a raw ``clone`` (or another libc, or Go) has no such
structure; a value cached in a TLS slot needs a slot we do not own.  The
GS record is written by the host for every thread it sees, whatever made
it.  A thread whose GS base is the program's own -- set before the probe
(that thread is then left without a ring of its own) or after (see the
recorder's listing below: the base is read with RDGSBASE and range-checked
before it is followed) -- has its hits recorded in the spare ring, with
``gettid``; without FSGSBASE in user mode no thread gets a ring of its
own and every hit goes there.

What is not optimised, and stays an INT3 probe (said with the reason):

* a probe point past a function's first instruction: user code may keep
  data in the 128 bytes below ``%rsp`` (the red zone), which the
  template's pushes would overwrite (the kernel, built without a red zone,
  has no such rule); at a function's entry the red zone holds nothing;
* a fetch-arg that reads memory other than the recorded stack words (a
  string, ``@SYM``, ``+8(%di)``...): it must be read at the hit, which
  only a stopped thread allows;
* a TSC that is not one clock for every CPU, or no RDTSCP;
* a thread that turned RDTSC off (``prctl(PR_SET_TSC, PR_TSC_SIGSEGV)``:
  the recorder's ``rdtscp`` would be its SIGSEGV), asked of every thread
  before anything is mapped (``live trace``'s check, in ``_trace_clock``);
* whatever the client's own rules refuse (a jump into the displaced
  bytes, a CALL among them, a function too short...).
"""

from __future__ import annotations

import struct

from ._gscheck import gs_range_check, rdgsbase

__all__ = ["RECORDER", "RECORDER_UNCHECKED", "RECORDER_SIZE", "fsgsbase", "ENTRY_SIZE", "STACK_WORDS", "RING_HDR", "ENTRY",
           "fetch_refusal", "cpu_refusal", "Recorded", "recorder_code", "stack_words"]

#: ``optimized_callback(op, regs)`` for a process, position-independent,
#: hand-written (GNU as, then the bytes; no code of the kernel's).  The
#: head finds the thread's ring; LO, SPAN and SPARE are immediates written
#: in when the recorder is made (:func:`recorder_code`):
#:
#:   rec:  cld                                  # rep movsq forwards
#:         mov %rdi,%r8; mov %rsi,%r9           # op, &pt_regs
#:         rdgsbase %r10                        # the GS base, read, not followed
#:         movabs $-LO,%rcx; add %r10,%rcx      # (the check is ._gscheck's,
#:         cmp $SPAN,%rcx; jae 2f               #  shared with live trace) not
#:         cmp %r10,(%r10); je 3f               # among our ring headers, or a
#:                                              # header not its own address:
#:   2:    movabs $SPARE,%r10                   #   the spare ring (tid 0: gettid)
#:   3:    mov 8(%r10),%rdx                     # the thread id the host wrote
#:         test %rdx,%rdx; jnz 1f               # 0: the spare ring, shared --
#:         mov $186,%eax; syscall; mov %rax,%rdx   # then gettid
#:   1:    mov $1,%eax; lock xadd %rax,16(%r10) # this hit's index
#:         mov %rax,%r11
#:         and 24(%r10),%rax; imul $320,%rax,%rax; lea 64(%r10,%rax),%r10   # its entry
#:         movq $0,(%r10)                       # seq 0: being written
#:         mov %rdx,24(%r10); mov %r8,32(%r10)  # tid, op
#:         lea 40(%r10),%rdi; mov %r9,%rsi; mov $21,%ecx; rep movsq        # pt_regs
#:         mov 152(%r9),%rsi; add $8,%rsi       # pt_regs.sp + 8: %rsp at the probe
#:         mov $14,%ecx; rep movsq              # the top 14 stack words
#:         rdtscp; shl $32,%rdx; or %rdx,%rax   # TSC; %ecx = TSC_AUX (node << 12 | cpu)
#:         mov %rax,8(%r10); mov %rcx,16(%r10)
#:         lea 1(%r11),%rax; mov %rax,(%r10)    # seq = index + 1: committed
#:         pop %rcx; movq $0,-8(%rsp); jmp *%rcx   # a RET that leaves no copy of
#:                                              # the return address (into the
#:                                              # buffer) below %rsp
#:
#: Why the GS base is checked before it is followed: a program may set a
#: thread's GS base itself after the probe was armed (``arch_prctl
#: (ARCH_SET_GS)``, or a thread it makes then), and the recorder would
#: take whatever the program keeps at ``%gs:0`` for a ring header and write
#: its entry there -- into the program's memory, or a SIGSEGV.  RDGSBASE
#: reads the base without touching memory; only a base among the rings'
#: headers (a range check of two instructions, then the header's
#: self-pointer) is followed, any other sends the hit to the spare ring,
#: whose thread id 0 makes the recorder ask ``gettid``: the hit is kept,
#: with its thread, and the program's memory is not touched.  Nothing of
#: the program's ``arch_prctl`` needs intercepting.
#:
#: RDGSBASE runs in user mode only when the kernel enabled it (Linux 5.9+
#: on a CPU with FSGSBASE; it says so in AT_HWCAP2, bit 1).  Without it
#: the base cannot be read without following it (a dereference through a
#: base the program may own) or a system call (``arch_prctl(ARCH_GET_GS)``,
#: as dear as the ``gettid`` it would save), so there the recorder's head
#: is only ``movabs $SPARE,%r10``: every thread writes the one spare ring
#: and asks ``gettid``, and no thread's GS base is touched (slower per hit,
#: see the bench, but still no stop; the INT3 probe is not needed).
#:
#: Every register it uses is caller-saved (the template saved them all in
#: the pt_regs and pops them after the call, flags included).  The return
#: is not a RET: a RET would leave the return address into the client's
#: buffer in the dead stack below %rsp, where a thread that then sleeps
#: keeps it, and the live machine, which scans that red zone too, would
#: never see the buffer free (its slot could not be freed at the end).
#: (So a process running with a CET shadow stack must not be optimised:
#: the CALL's shadow entry is never popped.  Linux enables user shadow
#: stacks only on request, which Debian's glibc does not make.)
_REC_HEAD = bytes.fromhex("fc4989f84989f1")                 # cld; the two movs
_REC_SPARE_LEN = 10                                        # movabs $SPARE,%r10


def _rec_check(lo: int, hi: int) -> bytes:
    """rdgsbase %r10, then the shared check (scratch %rcx): a base not
    ours falls through to the spare ring's movabs, ours jumps past it."""
    return rdgsbase(10) + gs_range_check(10, 1, lo, hi, miss=0, hit=_REC_SPARE_LEN)


_REC_SPARE = bytes.fromhex("49ba" "0000000000000000")      # 2: movabs $SPARE,%r10
_REC_BODY = bytes.fromhex(
    "498b52084885d2750ab8ba0000000f054889c2b801000000f0"
    "490fc142104989c3492342184869c0400100004d8d54024049c70200000000498952184d894220498d"
    "7a284c89ceb915000000f348a5498bb1980000004883c608b90e000000f348a50f01f948c1e220480"
    "9d04989420849894a10498d43014989025948c74424f800000000ffe1")
#: the recorder as H3 first wrote it: ``mov %gs:0,%r10`` follows whatever
#: the GS base is (kept for the bench's same-run baseline and the test that
#: shows what the check closes; never injected by live probe)
RECORDER_UNCHECKED = _REC_HEAD + bytes.fromhex("654c8b142500000000") + _REC_BODY
RECORDER = _REC_HEAD + _rec_check(0, 0) + _REC_SPARE + _REC_BODY
#: bytes of execmem the recorder takes (the client's allocator gets the rest)
RECORDER_SIZE = 256
ENTRY_SIZE = 320
STACK_WORDS = 14
#: a ring's header: self, tid, head, mask (then padding to a cache line)
RING_HDR = 64
_PT_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
            "rdx", "rsi", "rdi", "orig_ax", "ip", "cs", "flags", "sp", "ss")
ENTRY = struct.Struct(f"<QQQQQ{len(_PT_REGS)}Q{STACK_WORDS}Q")
assert ENTRY.size == ENTRY_SIZE
assert len(RECORDER) <= RECORDER_SIZE
assert len(_REC_SPARE) == _REC_SPARE_LEN
_M64 = (1 << 64) - 1


#: where, in the body, ``mov $14,%ecx`` keeps its count of stack words
_REC_WORDS = 0x6B - 16


def recorder_code(words: int = STACK_WORDS, *, spare: int, rings: tuple[int, int] | None
                  ) -> bytes:
    """The recorder copying *words* stack words (only what the fetch-args
    read: a word above the stack's mapping would fault in the target, where
    the kernel's fetch would only fail).  *spare*: the spare ring's header;
    *rings*: ``(lo, hi)``, the span of every ring header a thread's GS base
    may point at (the checked head, RDGSBASE), or None: no GS base is
    used, every hit goes to the spare ring (a CPU or kernel without
    FSGSBASE in user mode)."""
    if not 0 <= words <= STACK_WORDS:
        raise ValueError(f"{words} stack words: 0..{STACK_WORDS}")
    body = bytearray(_REC_BODY)
    assert body[_REC_WORDS - 1] == 0xB9 and body[_REC_WORDS] == STACK_WORDS
    struct.pack_into("<I", body, _REC_WORDS, words)
    check = b""
    if rings is not None:
        lo, hi = rings
        if not 0 < hi - lo < 1 << 31 or not lo <= spare < hi:
            raise ValueError(f"rings {lo:#x}-{hi:#x} (spare {spare:#x}): a span under 2 GiB "
                             "holding the spare")
        check = _rec_check(lo, hi)
    head = bytearray(_REC_HEAD + check + _REC_SPARE)
    struct.pack_into("<Q", head, len(head) - 8, spare & _M64)
    return bytes(head + body)


def fsgsbase(pid: int) -> bool:
    """Whether RDGSBASE runs in *pid*'s user mode: AT_HWCAP2 (26) of its
    auxiliary vector has HWCAP2_FSGSBASE (bit 1), which Linux sets only
    when it enabled the instructions (CR4.FSGSBASE, 5.9 and later)."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    for k, v in struct.iter_unpack("<QQ", raw[:len(raw) // 16 * 16]):
        if k == 26:
            return bool(v & 2)
        if k == 0:
            break
    return False


class _StackWindow:
    """Memory as a hit recorded it: the stack words at the probe point's
    %rsp, nothing else (a read elsewhere is an error)."""

    __slots__ = ("sp", "raw")

    def __init__(self, sp: int, raw: bytes) -> None:
        self.sp, self.raw = sp, raw

    def read(self, addr: int, n: int) -> bytes:
        off = (addr - self.sp) & _M64
        if off + n > len(self.raw):
            raise OSError(f"{addr:#x} was not recorded")
        return self.raw[off:off + n]


class Recorded:
    """One hit as the recorder wrote it, shaped as the registers the INT3
    path's pre-handler sees (``ip`` at the probe point)."""

    __slots__ = ("seq", "tsc", "cpu", "tid", "op", "gprs", "ip", "sp", "flags", "mem")

    def __init__(self, vals: tuple, addr: int) -> None:
        self.seq, self.tsc, aux, self.tid, self.op = vals[:5]
        self.cpu = aux & 0xFFF
        regs = dict(zip(_PT_REGS, vals[5:5 + len(_PT_REGS)]))
        self.gprs = {r: regs[r] for r in _PT_REGS[:15]}
        self.ip = addr
        self.sp = (regs["sp"] + 8) & _M64           # the template pushed it 8 low
        self.flags = regs["flags"]
        self.mem = _StackWindow(self.sp, struct.pack(f"<{STACK_WORDS}Q",
                                                     *vals[5 + len(_PT_REGS):]))


class _Probe:
    """Registers and memory made up to see what a fetch-arg reads."""

    __slots__ = ("ip", "sp", "flags", "gprs", "mem", "reads")

    def __init__(self, seed: int) -> None:
        import random
        rnd = random.Random(seed)
        self.gprs = {r: rnd.getrandbits(47) << 4 for r in _PT_REGS[:15]}
        self.sp = rnd.getrandbits(47) << 4
        self.ip = rnd.getrandbits(47)
        self.flags = 0x246
        self.reads: list[tuple[int, int]] = []
        self.mem = self

    def read(self, addr: int, n: int) -> bytes:
        self.reads.append((addr & _M64, n))
        return ((addr * 0x9E3779B97F4A7C15) & _M64).to_bytes(8, "little")[:n].ljust(n, b"\0")


def stack_words(args) -> int:
    """How many stack words (from %rsp up) the fetch-args read, at most
    :data:`STACK_WORDS` (see :func:`fetch_refusal` for the others)."""
    most = 0
    for a in args:
        p = _Probe(1)
        try:
            a.fetch(p)
        except Exception:
            continue
        for addr, n in p.reads:
            if 0 <= addr - p.sp <= 8 * STACK_WORDS - n:
                most = max(most, -(-(addr - p.sp + n) // 8))
    return most


def fetch_refusal(args) -> str | None:
    """Why these fetch-args cannot be evaluated on a recorded hit (they read
    memory other than the top :data:`STACK_WORDS` stack words), or None."""
    for a in args:
        if a.kind == "string":
            return (f"the fetch-arg {a.name}={a.text} reads a string, which only a stopped "
                    "thread's memory shows as it is at the hit")
        for seed in (1, 2):
            p = _Probe(seed)
            try:
                a.fetch(p)
            except Exception:
                return f"the fetch-arg {a.name}={a.text} cannot be evaluated on a record"
            for addr, n in p.reads:
                if not 0 <= addr - p.sp <= 8 * STACK_WORDS - n:
                    return (f"the fetch-arg {a.name}={a.text} reads memory other than the top "
                            f"{STACK_WORDS} stack words the recorder copies (from +0 to "
                            f"+{8 * STACK_WORDS - 8}(%sp)); it must be read at the hit")
    return None


def cpu_refusal() -> str | None:
    """Why the recorder cannot run here (it stamps hits with RDTSCP)."""
    from ._trace_clock import tsc_variant_reason
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    if "rdtscp" not in flags.split():
        return "the CPU has no RDTSCP (the recorder's clock and CPU number)"
    why = tsc_variant_reason()
    return None if why is None else f"the TSC is not one clock for every CPU: {why}"
