# SPDX-License-Identifier: GPL-2.0-only
"""The module loader's self-test: a GCC-built module that uses a kernel key
and a kernel static call, loaded, switched, unloaded and refused while the
CPUs of a :class:`ClientRig` run.  It needs the machine's ``EXECMEM``
(module text) and ``DATA`` (module data), and no backend."""

from __future__ import annotations

from .._core._machine import Capability
from .._errors import TextPokeError
from .._jump_label._keys import UnknownKeyError
from .._module import Module, ModuleLoader
from .._module._link import ModuleRelocationError, UnknownSymbolError
from .._static_call._calls import UnknownCallError
from ..images.modules import module_path
from ._result import SelfTestResult
from ._rig import ClientRig

__all__ = ["module_selftest"]


# ---------------------------------------------------------------- self-test
#: mod_clients.o's probes: (function, argument, value for (jl_key_false, jl_key_true, sc_op func))
_MOD_PROBES = (
    ("mod_key_false", 0, lambda kf, kt, f: int(kf)),
    ("mod_key_false_likely", 0, lambda kf, kt, f: int(kf)),
    ("mod_key_true", 0, lambda kf, kt, f: int(kt)),
    ("mod_call_op", 5, lambda kf, kt, f: f(5) + 1000),
    ("mod_tail_op", 6, lambda kf, kt, f: f(6)),
    # alternative taken (2 * 100) + sc_square(3) through a retpoline site + tbl[3] + sc_double(3)
    ("mod_misc", 3, lambda kf, kt, f: 200 + 9 + 11 + 6),
)


def module_selftest(cm: ClientRig, loader: ModuleLoader | None = None) -> SelfTestResult:
    """A module that uses a kernel key and a kernel static call, loaded
    while every CPU of *cm* runs the probe loop, called
    from every CPU, switched both ways, unloaded, and loaded again with the
    key already flipped; then the refusals, each leaving module text and
    the allocators as they were.  Every check is a case of the result."""

    r = SelfTestResult("module")
    machine = cm.kernel.machine
    for cap in (Capability.EXECMEM, Capability.DATA):      # module text, module data
        machine.require(cap, "the module loader's self-test")
    st0 = cm.core.stats.syncs, cm.core.stats.batches
    L = loader or cm.kernel.modules
    keys, calls = cm.keys, cm.calls
    funcs = {cm.sym("sc_double"): lambda x: 2 * x, cm.sym("sc_square"): lambda x: x * x}
    if not cm.started:
        cm.start()
    cm.wait_passes(1)

    def want_now(**change) -> list[int]:
        """What the probes must return now, or once *change* is made."""
        kf = change.get("kf", keys.static_key_enabled("jl_key_false"))
        kt = change.get("kt", keys.static_key_enabled("jl_key_true"))
        f = funcs[calls.resolve(change["f"]) if "f" in change else calls.static_call_query("sc_op")]
        return [spec(kf, kt, f) for _n, _a, spec in _MOD_PROBES]

    def load(label: str) -> tuple[Module, list[int]]:
        image_sites = {k: len(keys.key(k).sites) for k in ("jl_key_false", "jl_key_true")}
        m = L.load(module_path("mod_clients.o"))
        want = want_now()
        slots = [cm.add_probe(f"{m.name}:{n}", m.sym(n), arg=a, allow=[w])
                 for (n, a, _s), w in zip(_MOD_PROBES, want)]
        wrong = cm.expect(dict(zip(slots, want)))
        added = {k: len(keys.key(k).sites) - image_sites[k] for k in image_sites}
        r.case(f"{label}: load, every CPU calls in and sees the current state", not wrong
               and added == {"jl_key_false": 2, "jl_key_true": 1}
               and m.static_call_sites == 2, want=want, jump_entries=added,
               finalize=m.finalize, wrong={cm.probes[i].name if i >= 0 else "passes": v
                                           for i, v in wrong.items()})
        # module_finalize's passes, as the text reads now
        text_ok = all(machine.text_read(a, len(b)) == b for a, b in m.patched)
        r.case(f"{label}: retpolines, returns and alternatives applied to its text",
               m.finalize.get(".return_sites", 0) >= 6 and m.finalize.get(".retpoline_sites") == 1
               and m.finalize.get(".altinstructions") == 1 and text_ok,
               finalize=m.finalize, text_reads_patched=text_ok)
        return m, slots

    def switch(m: Module, slots: list[int], label: str, action, **change) -> None:
        before, after = want_now(), want_now(**change)
        for i, b, a in zip(slots, before, after):
            cm.allow(i, [b, a])           # widen first: either variant while it switches
        action()
        wrong = cm.expect(dict(zip(slots, after)))
        r.case(f"{label}", not wrong and before != after and want_now() == after, want=after,
               wrong={cm.probes[i].name if i >= 0 else "passes": v for i, v in wrong.items()})

    def unload(m: Module, slots: list[int], label: str) -> None:
        for i in slots:
            cm.disable_probe(i)
        cm.wait_passes(2)                 # no CPU is inside the module any more
        text, size = m.text, m.text_size
        L.unload(m)
        gone = all(s.owner != m.name for k in keys.keys.values() for s in k.sites) and \
            all(s.owner != m.name for c in calls.calls.values() for s in c.sites)
        r.case(f"{label}: unload removes the entries and fills the text with INT3",
               gone and machine.text_read(text, size) == b"\xcc" * size and not L.execmem.used,
               entries_gone=gone)
        # a key flipped after unload does not touch the freed text
        n = len(keys.key("jl_key_false").sites)
        b0 = cm.core.stats.batches
        on = keys.static_key_enabled("jl_key_false")
        (keys.static_key_disable if on else keys.static_key_enable)("jl_key_false")
        (keys.static_key_enable if on else keys.static_key_disable)("jl_key_false")
        cm.wait_passes(1)
        r.case(f"{label}: a key flipped after unload leaves the freed text alone",
               machine.text_read(text, size) == b"\xcc" * size
               and cm.core.stats.batches - b0 == (2 if n else 0), image_entries=n)

    m, slots = load("first load")
    switch(m, slots, "static_key_enable(jl_key_false) switches the module's sites",
           lambda: keys.static_key_enable("jl_key_false"), kf=True)
    switch(m, slots, "static_key_disable(jl_key_false) switches them back",
           lambda: keys.static_key_disable("jl_key_false"), kf=False)
    switch(m, slots, "static_key_disable(jl_key_true)",
           lambda: keys.static_key_disable("jl_key_true"), kt=False)
    switch(m, slots, "static_key_enable(jl_key_true)",
           lambda: keys.static_key_enable("jl_key_true"), kt=True)
    switch(m, slots, "static_call_update(sc_op, sc_square) switches the module's sites",
           lambda: calls.static_call_update("sc_op", "sc_square"), f="sc_square")
    switch(m, slots, "static_call_update(sc_op, sc_double) switches them back",
           lambda: calls.static_call_update("sc_op", "sc_double"), f="sc_double")
    unload(m, slots, "first load")
    # loaded again while the key and the call are in their other states
    keys.static_key_enable("jl_key_false")
    calls.static_call_update("sc_op", "sc_square")
    m, slots = load("reload with jl_key_false on and sc_op = sc_square")
    switch(m, slots, "reload: static_key_disable(jl_key_false)",
           lambda: keys.static_key_disable("jl_key_false"), kf=False)
    switch(m, slots, "reload: static_call_update(sc_op, sc_double)",
           lambda: calls.static_call_update("sc_op", "sc_double"), f="sc_double")
    unload(m, slots, "reload")

    # refusals: typed errors, module text and the allocators unchanged
    expected = {"bad_reloc.o": ModuleRelocationError, "bad_range.o": ModuleRelocationError,
                "bad_sym.o": UnknownSymbolError, "bad_key.o": UnknownKeyError,
                "bad_call.o": UnknownCallError}
    rng = next(t for t in machine.text_ranges if not t.core)
    for obj, exc in expected.items():
        before = machine.text_read(rng.start, rng.end - rng.start)
        used = dict(L.execmem.used), dict(L._data_mem.used) if L._data_mem else {}
        err = None
        try:
            L.load(module_path(obj))
        except TextPokeError as e:
            err = e
        after = machine.text_read(rng.start, rng.end - rng.start)
        used2 = dict(L.execmem.used), dict(L._data_mem.used) if L._data_mem else {}
        r.case(f"refused {obj}: {exc.__name__}, text unchanged", isinstance(err, exc)
               and before == after and used == used2 and not L.modules,
               error=f"{type(err).__name__}: {err}" if err else None)
    r.oopses = cm.oopses
    r.bad = cm.bad()
    r.syncs = cm.core.stats.syncs - st0[0]
    r.batches = cm.core.stats.batches - st0[1]
    return r
