# SPDX-License-Identifier: GPL-2.0-only
"""``lib/test_kprobes.c`` redone on the running CPUs of a :class:`ClientRig`,
plus an optimised probe counted against the guest's own call counter across
optimise/unoptimise, and the refusals.  It needs the machine's ``EXECMEM``
(slots, detours, the guest functions) and ``DATA`` (their counter), and no
backend."""

from __future__ import annotations

from .._core._machine import Capability
from .._kprobes._core import KprobeError, Kprobes
from .._kprobes._guest import DIV_FACTOR, HELPER_ADD, OPT_K, GuestFunctions, build_guest_functions
from ._result import SelfTestResult
from ._rig import ClientRig

__all__ = ["kprobes_selftest", "RAND1"]

RAND1 = 0x2F5A_1C37


def kprobes_selftest(cm: ClientRig, kp: Kprobes | None = None,
                     g: GuestFunctions | None = None) -> SelfTestResult:
    """Run on *cm*'s CPUs with *kp* (default: ``cm.kernel.kprobes``) and
    the guest functions *g* (default: built now into *kp*'s execmem, their
    counter in a data region).  A machine without ``EXECMEM`` or ``DATA``
    refuses with :class:`~textpoke.NotSupportedError` before any text
    changes."""
    m = cm.kernel.machine
    for cap in (Capability.EXECMEM, Capability.DATA):
        m.require(cap, "the kprobes self-test")
    if kp is None:
        kp = cm.kernel.kprobes
    if g is None:
        g = build_guest_functions(kp, m)
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    r = SelfTestResult("kprobes")
    q1, q2 = RAND1 // DIV_FACTOR, RAND1 // DIV_FACTOR + 1
    i1 = cm.add_probe("kprobe_target", addr=g.addr("kprobe_target"), arg=RAND1, allow=[q1])
    i2 = cm.add_probe("kprobe_target2", addr=g.addr("kprobe_target2"), arg=RAND1, allow=[q2])
    want_opt = 3 + OPT_K + HELPER_ADD
    i3 = cm.add_probe("kp_opt_target", addr=g.addr("kp_opt_target"), arg=3, allow=[want_opt])
    cm.disable_probe(i3)
    if not cm.started:
        cm.start()
    cm.wait_passes(1)

    # test_kprobe: pre- and post-handler values
    pre, post = [], []
    p = kp.register_kprobe("kprobe_target", lambda p, regs: pre.append(regs.gprs.get("rdi", 0)),
                           lambda p, regs, f: post.append(regs.gprs.get("rax", 0) & 0xFFFFFFFF))
    cm.wait_passes(2)
    kp.unregister_kprobe(p)
    r.case("kprobe pre/post handler", bool(pre) and len(pre) == len(post) == p.nhit
           and set(pre) == {RAND1} and set(post) == {RAND1}, hits=p.nhit)

    # test_kprobes: several probes, registered and unregistered together
    seen: dict[str, int] = {}

    def count(p, regs):
        seen[p.name] = seen.get(p.name, 0) + 1

    ps = kp.register_kprobes([("kprobe_target", count), ("kprobe_target2+4", count)])
    cm.wait_passes(2)
    kp.unregister_kprobes(ps)
    n = dict(seen)
    cm.wait_passes(1)
    r.case("register/unregister several kprobes", len(n) == 2 and all(n.values()) and seen == n,
           hits=n)

    # test_kretprobe / test_kretprobes: return values
    got: dict[int, set] = {1: set(), 2: set()}
    rp1 = kp.register_kretprobe("kprobe_target", lambda ri, regs: got[1].add(regs.gprs.get("rax")))
    rp2 = kp.register_kretprobe("kprobe_target2", lambda ri, regs: got[2].add(regs.gprs.get("rax")))
    cm.wait_passes(2)
    kp.unregister_kretprobe(rp1)
    kp.unregister_kretprobe(rp2)
    r.case("kretprobe return values", got[1] == {q1} and got[2] == {q2},
           values={k: sorted(v) for k, v in got.items()}, hits=[rp1.nhit, rp2.nhit])

    # an optimised probe counted against the guest's counter
    calls = []
    op = kp.register_kprobe("kp_opt_target", lambda p, regs: calls.append(regs.cpu))
    m.mem.write(g.counter, bytes(8))
    cm.enable_probe(i3, g.addr("kp_opt_target"))
    cm.wait_passes(1)
    states = []
    for _ in range(2):
        kp.optimize_kprobe(op)
        states.append(kp.is_optimized(op))
        cm.wait_passes(1)
        kp.unoptimize_kprobe(op)
        states.append(kp.is_optimized(op))
        cm.wait_passes(1)
    cm.disable_probe(i3)
    cm.wait_passes(2)
    guest = g.opt_calls(m)
    kp.unregister_kprobe(op)
    r.case("optimised kprobe: handler count == guest calls across optimise/unoptimise",
           states == [True, False, True, False] and guest > 0 and len(calls) == guest,
           handler=len(calls), guest=guest)

    # refusals, text unchanged
    for spec, reason in (("kp_opt_target+1", "boundary"), ("kp_int3_range+3", "int3"),
                         ("sc_func_a+0", "fentry")):
        name = spec.split("+")[0]
        a, size = kp.functions[name]
        before = m.text_read(a, size)
        try:
            kp.register_kprobe(spec, lambda p, regs: None)
            ok = False
        except KprobeError as e:
            ok = e.reason == reason
        r.case(f"refused {spec} ({reason})", ok and m.text_read(a, size) == before)
    for name, why in (("kp_jump_in", "jump into the range"), ("kp_indirect", "indirect jump"),
                      ("kp_int3_range", "INT3 in the range")):
        a, size = kp.functions[name]
        p = kp.register_kprobe(name, lambda p, regs: None)
        before = m.text_read(a, size)
        if name == "kp_indirect" and not kp.jump_tables:
            # a kernel built with IBT or retpolines has no jump tables, and
            # can_optimize takes a function with an indirect jump
            kp.optimize_kprobe(p)
            r.case("optimised: indirect jump (no jump tables: IBT)", kp.is_optimized(p))
            kp.unregister_kprobe(p)
            continue
        try:
            kp.optimize_kprobe(p)
            ok = False
        except KprobeError as e:
            ok = e.reason == "optimize"
        r.case(f"optimise refused: {why}", ok and m.text_read(a, size) == before)
        kp.unregister_kprobe(p)

    wrong = cm.expect({i1: q1, i2: q2})
    r.case("every CPU computes the right values", not wrong, wrong=wrong)
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r
