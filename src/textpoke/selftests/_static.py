# SPDX-License-Identifier: GPL-2.0-only
"""The static-key and static-call self-tests: the kernel's
``lib/test_static_keys.c`` and ``static_call_selftest``, plus inc/dec
counting, a key of many sites and every static-call site kind, redone on
the running CPUs of a :class:`ClientRig`.  They need nothing but the
machine protocol (the clients switch sites through the batch) and import
no backend."""

from __future__ import annotations

from typing import Callable

from ._result import SelfTestResult
from ._rig import ClientRig

__all__ = ["static_keys_selftest", "static_call_selftest", "many_key_flip"]


# ---------------------------------------------------------------- self-tests
#: lib/test_static_keys.c (with its "base" module): (key, initial state, probe)
_TK_CASES = [
    ("tk_old_true_key", True, "tk_old_true_key_static_key_true"),
    ("tk_old_false_key", False, "tk_old_false_key_static_key_false"),
    ("tk_true_key", True, "tk_true_key_static_branch_likely"),
    ("tk_true_key", True, "tk_true_key_static_branch_unlikely"),
    ("tk_false_key", False, "tk_false_key_static_branch_likely"),
    ("tk_false_key", False, "tk_false_key_static_branch_unlikely"),
    ("tk_base_old_true_key", True, "tk_base_old_true_key_static_key_true"),
    ("tk_base_inv_old_true_key", False, "tk_base_inv_old_true_key_static_key_true"),
    ("tk_base_old_false_key", False, "tk_base_old_false_key_static_key_false"),
    ("tk_base_inv_old_false_key", True, "tk_base_inv_old_false_key_static_key_false"),
    ("tk_base_true_key", True, "tk_base_true_key_static_branch_likely"),
    ("tk_base_true_key", True, "tk_base_true_key_static_branch_unlikely"),
    ("tk_base_inv_true_key", False, "tk_base_inv_true_key_static_branch_likely"),
    ("tk_base_inv_true_key", False, "tk_base_inv_true_key_static_branch_unlikely"),
    ("tk_base_false_key", False, "tk_base_false_key_static_branch_likely"),
    ("tk_base_false_key", False, "tk_base_false_key_static_branch_unlikely"),
    ("tk_base_inv_false_key", True, "tk_base_inv_false_key_static_branch_likely"),
    ("tk_base_inv_false_key", True, "tk_base_inv_false_key_static_branch_unlikely"),
]
_TK_INVERTED_BY_BASE = ("tk_base_inv_old_true_key", "tk_base_inv_old_false_key",
                        "tk_base_inv_true_key", "tk_base_inv_false_key")


def _switch(cm: ClientRig, slots: dict[int, tuple[int, int]], action: Callable[[], None],
            mixed: dict[int, tuple[int, int]] | None = None) -> dict:
    """Widen each slot to (old, new) -- or to the range *mixed* gives it,
    for a probe that passes several sites updated one after the other --
    act, then expect new everywhere."""
    for i, (old, new) in slots.items():
        cm.allow(i, [old, new], rng=(mixed or {}).get(i))
    action()
    return cm.expect({i: new for i, (_old, new) in slots.items()})


def static_keys_selftest(cm: ClientRig) -> SelfTestResult:
    """``lib/test_static_keys.c`` on the running CPUs, plus inc/dec counting."""
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    r = SelfTestResult("static_keys")
    keys = cm.keys
    slots = {}
    for key, _init, probe in _TK_CASES:
        slots[probe] = cm.add_probe(probe, allow=[1 if keys.static_key_enabled(key) else 0])
    if not cm.started:
        cm.start()

    def want() -> dict[int, int]:
        return {slots[p]: int(keys.static_key_enabled(k)) for k, _i, p in _TK_CASES}

    def invert(key: str) -> None:
        on = not keys.static_key_enabled(key)
        before = want()
        for k, _i, p in _TK_CASES:
            if k == key:
                cm.widen(slots[p], before[slots[p]], int(on))
        (keys.static_key_enable if on else keys.static_key_disable)(key)
        wrong = cm.expect(want())
        r.case(f"invert {key} -> {int(on)}", not wrong and keys.static_key_enabled(key) == on,
               wrong={cm.probes[i].name if i >= 0 else "passes": v for i, v in wrong.items()})

    for key in _TK_INVERTED_BY_BASE:          # what the base module's init does
        invert(key)

    def verify(inverted: bool, label: str) -> None:
        wrong = cm.expect(want())
        for key, init, probe in _TK_CASES:
            state = keys.static_key_enabled(key)
            r.case(f"{label}: {probe}", state == (not init if inverted else init)
                   and slots[probe] not in wrong, state=state, last=cm.last(slots[probe]))

    def invert_keys() -> None:
        prev = None
        for key, _init, _p in _TK_CASES:
            if key != prev:
                invert(key)
                prev = key

    verify(False, "initial")
    invert_keys()
    verify(True, "inverted")
    invert_keys()
    verify(False, "restored")

    # reference counting: only 0 <-> 1 patches
    k = "tk_false_key"
    both = [slots[p] for key, _init, p in _TK_CASES if key == k]
    i = both[0]
    for step, count, state in (("inc", 1, 1), ("inc", 2, 1), ("dec", 1, 1), ("dec", 0, 0)):
        b0 = cm.core.stats.batches
        before = cm.last(i)[0]
        for j in both:
            cm.widen(j, before, state)
        getattr(keys, f"static_branch_{step}")(k)
        wrong = cm.expect({j: state for j in both})
        patched = cm.core.stats.batches - b0
        r.case(f"static_branch_{step}({k}) -> count {count}",
               not wrong and keys.static_key_count(k) == count
               and patched == (1 if before != state else 0),
               count=keys.static_key_count(k), batches=patched)
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r


def many_key_flip(cm: ClientRig, n: int = 1000, flips: int = 2) -> SelfTestResult:
    """Switch key jl_key_many_<n> while every CPU runs its n sites."""
    r = SelfTestResult(f"many_{n}")
    key, probe = f"jl_key_many_{n}", f"jl_many_{n}"
    i = cm.add_probe(probe, allow=[n if cm.keys.static_key_enabled(key) else 0])
    if not cm.started:
        cm.start()
    cm.wait_passes(1)
    for _ in range(flips):
        on = not cm.keys.static_key_enabled(key)
        s0, b0 = cm.core.stats.syncs, cm.core.stats.batches
        cm.allow(i, [0, n], rng=(0, n))       # mid-update: any mix of old and new sites
        (cm.keys.static_key_enable if on else cm.keys.static_key_disable)(key)
        syncs, batches = cm.core.stats.syncs - s0, cm.core.stats.batches - b0
        wrong = cm.expect({i: n if on else 0})
        # one batch per array of sites: the kernel's page of 256 entries, or
        # what the machine declares (live: one batch for 32,768)
        want_batches = -(-n // cm.core.array_max)
        r.case(f"{key} -> {int(on)}", not wrong and batches == want_batches
               and syncs <= 3 * batches, entries=len(cm.keys.key(key).sites), batches=batches,
               syncs=syncs, last=cm.last(i))
        r.syncs += syncs
        r.batches += batches
    r.oopses = cm.oopses
    r.bad = cm.bad()
    return r


def static_call_selftest(cm: ClientRig) -> SelfTestResult:
    """``static_call_selftest`` (func_a, func_b, func_a: 3, 4, 3) on the
    running CPUs, and every site kind of the image switched both ways."""
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    r = SelfTestResult("static_call")
    calls = cm.calls
    fa, fb = cm.sym("sc_func_a"), cm.sym("sc_func_b")
    funcs = {fa: lambda x: x + 1, fb: lambda x: x + 2,
             cm.sym("sc_double"): lambda x: 2 * x, cm.sym("sc_square"): lambda x: x * x,
             cm.sym("__static_call_return0"): lambda x: 0}
    # (probe, arg, value for the call's function f -- None is NULL)
    specs = {
        "sc_selftest_tail": ("sc_selftest", 2, lambda f: funcs[f](2)),
        "sc_selftest_call": ("sc_selftest", 2, lambda f: funcs[f](2) + 1000),
        "sc_call_op": ("sc_op", 5, lambda f: funcs[f](5) + 1),
        "sc_tail_op": ("sc_op", 6, lambda f: funcs[f](6)),
        "sc_call_op_twice": ("sc_op", 3, lambda f: funcs[f](3) + funcs[f](4)),
        "sc_jcc_op": ("sc_cond", 4, lambda f: funcs[f](4) if f else 0),
        "sc_run_hook": ("sc_hook", 7, lambda f: 107 if f else 7),
        "sc_run_hook_tail": ("sc_hook", 8, lambda f: 108 if f else 8),
        "sc_call_ret0": ("sc_ret0", 9, lambda f: funcs[f](9) + 5),
    }
    slots = {}
    for probe, (call, arg, val) in specs.items():
        slots[probe] = cm.add_probe(probe, arg=arg, allow=[val(calls.static_call_query(call))])
    if not cm.started:
        cm.start()
    cm.wait_passes(1)

    def update(call: str, func: str | None, label: str) -> bool:
        f = calls.resolve(func)
        cur = calls.static_call_query(call)
        sl = {slots[p]: (spec[2](cur), spec[2](f)) for p, spec in specs.items() if spec[0] == call}
        mixed = {}
        if call == "sc_op":     # two sites in one function: one may be new, the other old
            a, b = funcs[cur], funcs[f]
            combos = [a(3) + b(4), b(3) + a(4), a(3) + a(4), b(3) + b(4)]
            mixed[slots["sc_call_op_twice"]] = (min(combos), max(combos))
        wrong = _switch(cm, sl, lambda: calls.static_call_update(call, f), mixed)
        return r.case(label, not wrong, wrong={cm.probes[i].name if i >= 0 else "passes": v
                                              for i, v in wrong.items()})

    # the kernel's table: NULL means "no update" there
    for func, val, expect in ((None, 2, 3), ("sc_func_b", 2, 4), ("sc_func_a", 2, 3)):
        if func:
            update("sc_selftest", func, f"static_call_update(sc_selftest, {func})")
        last = cm.last(slots["sc_selftest_tail"])
        r.case(f"static_call(sc_selftest)({val}) == {expect}", all(v == expect for v in last),
               last=last)
    # every site kind, both ways
    for call, func in (("sc_op", "sc_square"), ("sc_op", "sc_double"),
                       ("sc_cond", "sc_square"), ("sc_cond", None), ("sc_cond", "sc_double"),
                       ("sc_hook", "sc_hook_fn"), ("sc_hook", None),
                       ("sc_ret0", "sc_square"), ("sc_ret0", "__static_call_return0")):
        update(call, func, f"static_call_update({call}, {func or 'NULL'})")
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r
