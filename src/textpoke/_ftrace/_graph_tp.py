# SPDX-License-Identifier: GPL-2.0-only
"""Tracepoints as the tracers use them: probes registered on a
tracepoint change its static call and its key (``tracepoint_add_func`` /
``tracepoint_remove_func``), over a :class:`~textpoke.kernel.Kernel`'s
static calls and keys.  The function graph tracer's ``sched_switch``
probe and the tracers' cmdline recording (``tracing_start_cmdline_record``)
go through here.  Rules learnt from ``kernel/tracepoint.c`` and
``kernel/trace/trace_sched_switch.c`` (Linux 6.12); the code is our own.
"""

from __future__ import annotations

import weakref

__all__ = ["CMDLINE_RECORD", "tracepoint_probe_register", "tracepoint_probe_unregister",
           "tracepoint_probes", "tracing_cmdline_record"]

#: the tracepoints the tracers' cmdline/tgid recording hooks, and its probes
#: (kernel/trace/trace_sched_switch.c: tracing_sched_register)
CMDLINE_RECORD = (("sched_wakeup", "probe_sched_wakeup"),
                  ("sched_wakeup_new", "probe_sched_wakeup"),
                  ("sched_switch", "probe_sched_switch"))

#: each kernel's tracepoints' probes, as this process registered them
_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tracepoint_probes(kernel, tp: str) -> list[str]:
    """The probes registered on the tracepoint *tp* through
    :func:`tracepoint_probe_register` (oldest first)."""
    return list(_PROBES.get(kernel, {}).get(tp, ()))


def _tracepoint(kernel, tp: str) -> "tuple[int, str] | None":
    sym = kernel.image.symbols
    key = sym.get(f"__tracepoint_{tp}")
    call = f"tp_func_{tp}"
    if key is None or call not in kernel.calls.calls:
        return None
    return key + 8, call                    # struct tracepoint: name, then key


def tracepoint_probe_register(kernel, tp: str, probe: str) -> bool:
    """``tracepoint_probe_register`` (``tracepoint_add_func``): the first
    probe gets the tracepoint's static call (from the iterator
    ``__traceiter_X``) and then its key is enabled (0 -> 1); a second one
    puts the iterator back in the static call (1 -> 2); more change no
    text.  Returns False when the image has no such tracepoint or probe.
    A key already on with no probe registered here (someone else's probe)
    is refused: its probes are not known."""
    t = _tracepoint(kernel, tp)
    if t is None or probe not in kernel.image.symbols:
        return False
    key, call = t
    probes = _PROBES.setdefault(kernel, {}).setdefault(tp, [])
    if probe in probes:
        raise ValueError(f"tracepoint {tp}: probe {probe} is already registered (-EEXIST)")
    if not probes and kernel.keys.key(key).enabled:
        raise ValueError(f"tracepoint {tp} already has a probe this model did not register: "
                         "not modelled")
    probes.append(probe)
    if len(probes) == 1:
        kernel.calls.static_call_update(call, probe)
        kernel.keys.static_key_enable(key)
    elif len(probes) == 2:
        kernel.calls.static_call_update(call, f"__traceiter_{tp}")
    return True


def tracepoint_probe_unregister(kernel, tp: str, probe: str) -> bool:
    """``tracepoint_probe_unregister`` (``tracepoint_remove_func``): the
    last probe going disables the key, then puts the iterator back (1 ->
    0); going from two to one aims the static call at the one left."""
    t = _tracepoint(kernel, tp)
    probes = _PROBES.get(kernel, {}).get(tp, [])
    if t is None or probe not in probes:
        return False
    key, call = t
    probes.remove(probe)
    if not probes:
        kernel.keys.static_key_disable(key)
        kernel.calls.static_call_update(call, f"__traceiter_{tp}")
    elif len(probes) == 1:
        kernel.calls.static_call_update(call, probes[0])
    return True


def tracing_cmdline_record(kernel, on: bool) -> list[str]:
    """What a tracer's start (and stop) does besides ftrace in the real
    kernel: ``tracing_start_cmdline_record`` registers one probe on each of
    :data:`CMDLINE_RECORD`'s tracepoints (:func:`tracepoint_probe_register`:
    alone on it, its static call goes from the iterator to the probe and its
    key is enabled; beside another probe -- function_graph's on
    ``sched_switch`` -- the static call goes back to the iterator);
    stopping unregisters them.  Returns the tracepoints changed."""
    done = []
    for tp, probe in CMDLINE_RECORD:
        if (tracepoint_probe_register if on else tracepoint_probe_unregister)(kernel, tp, probe):
            done.append(tp)
    return done
