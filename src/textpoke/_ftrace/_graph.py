# SPDX-License-Identifier: GPL-2.0-only
"""The function graph tracer: :class:`FunctionGraph`.

What ``echo function_graph > current_tracer`` changes in a 6.12 x86-64
kernel's text, in the kernel's order (``graph_trace_init`` ->
``register_ftrace_graph``, then ``tracing_start_cmdline_record``):

1. ``ftrace_graph_enable_direct``: with one graph user the static calls
   ``fgraph_func`` and ``fgraph_retfunc`` (their trampolines and inline
   sites in ``function_graph_enter`` / ``ftrace_return_to_handler``) go
   from ``ftrace_graph_entry_stub`` / ``ftrace_graph_ret_stub`` to the
   tracer's ``trace_graph_entry`` / ``trace_graph_return``; the key
   ``fgraph_do_direct`` is left on, as boot set it;
2. ``start_graph_tracing``: a probe on ``sched_switch``
   (``ftrace_graph_probe_sched_switch``: its static call, then its key);
3. ``ftrace_startup_subops``: fgraph's manager ops ``graph_ops``, whose
   callback is ``ftrace_graph_func``, is registered on the selected
   records like any ops -- its own dynamic trampoline (a copy of
   ``ftrace_caller`` calling ``ftrace_graph_func``, ``&graph_ops`` after
   it), every selected fentry NOP5 -> CALL of that trampoline, and
   ``ftrace_call``/``ftrace_regs_call`` -> ``ftrace_graph_func``, through
   :class:`~._ops.Ftrace`'s update (the tracer ``function_graph``).  On
   x86-64 with ``DYNAMIC_FTRACE_WITH_ARGS`` there is no
   ``ftrace_graph_call`` JMP to patch, and ``return_to_handler`` is
   never written: the return hook is data (the return address on the
   stack);
4. the cmdline recording's probes on ``sched_switch`` (now two probes: its
   static call goes back to the iterator), ``sched_wakeup`` and
   ``sched_wakeup_new``.

``echo nop`` undoes it in the kernel's order (``graph_trace_reset``): the
cmdline probes, the sites and ``ftrace_call`` (``ftrace_stub``), the
static calls back to the stubs (``ftrace_graph_disable_direct``), the
``sched_switch`` probe.  The ops' trampoline is kept (``graph_ops`` is
static).  Whatever the image lacks (the bundled image has no static calls
or tracepoints for fgraph) is skipped.

On a machine whose CPUs run (the sim), the tracing itself: the image's
``ftrace_graph_func`` and ``return_to_handler`` are guest stubs whose
INT3 is the call into the host (see the bundled ``ftrace_64.S``).  At a
traced function's entry the host (``function_graph_enter``) pushes
(function, return address, slot, entry time) on the CPU's return stack
and writes ``return_to_handler`` into the return-address slot; at its
return it pops the stack, checks the slot is the one hooked (else, as
the kernel's "Bad frame pointer", graph tracing stops for good:
:attr:`FunctionGraph.dead`, and the CPU is left to oops), writes the
real return address back and records the return with its duration.
Times are the tracer's own event counter (the kernel's ``counter`` trace
clock: one tick per event on any CPU), so a duration counts the graph
events in between.  The return stack holds :data:`FTRACE_RETFUNC_DEPTH`
frames; deeper entries are not hooked and counted in
:attr:`FunctionGraph.overruns` (the kernel's ``trace_overrun``).  Tasks
never migrate on the sim: a CPU's return stack is its task's.

What is traced follows ``trace_graph_entry`` / ``trace_graph_return``
(per CPU: the sim's tasks never migrate, so a CPU's flags are its task's
``fgraph_get_task_var``):

* :meth:`FunctionGraph.set_graph_function` (``set_graph_function``): only
  those functions and what they call, at any depth, are traced; the first
  one entered sets the task's flag and its depth (two bits: the kernel
  keeps ``depth & 3``), whose return at that same depth clears it;
* :meth:`FunctionGraph.set_graph_notrace` (``set_graph_notrace``): the
  function's return is still hooked (it clears the task's flag) but
  neither it nor anything it calls is recorded;
* :attr:`FunctionGraph.max_graph_depth` (``max_graph_depth``, 0: no
  limit): a call at that depth or deeper is not hooked at all;
* :attr:`FunctionGraph.tracing_thresh` (``tracing_thresh``, here in the
  clock's ticks, 0: off): entries are not recorded, and a return only when
  the call lasted at least that long.  It is read when the tracer starts
  (``graph_trace_init`` then makes ``trace_graph_thresh_return`` the
  return function, and the ``fgraph_retfunc`` static call goes there
  instead of ``trace_graph_return``); :meth:`FunctionGraph.set_tracing_thresh`
  on a running tracer stops and starts it again, as a write of the file
  does (``graph_trace_update_thresh``).

A call that is not hooked (filtered out, too deep, under a notrace
function) leaves its return address alone and does not count in the
depth of what it calls, as ``function_graph_enter``'s ``-EBUSY``.

Rules learnt from ``kernel/trace/fgraph.c``, ``trace_functions_graph.c``,
``arch/x86/kernel/ftrace.c`` and ``ftrace_64.S`` (Linux 6.12); the code
is our own.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass, field

from .._core._machine import Capability, TrapPriority
from ._ops import FtraceUpdate

__all__ = ["FunctionGraph", "GraphEvent", "GraphError", "FTRACE_RETFUNC_DEPTH",
           "format_graph"]

#: the return stack's depth (the kernel's FTRACE_RETFUNC_DEPTH)
FTRACE_RETFUNC_DEPTH = 50
TRACER = "function_graph"
#: (static call, the tracer's function, the stub) -- ftrace_graph_enable_direct
DIRECT_CALLS = (("fgraph_func", "trace_graph_entry", "ftrace_graph_entry_stub"),
                ("fgraph_retfunc", "trace_graph_return", "ftrace_graph_ret_stub"))
#: the return function graph_trace_init picks when tracing_thresh is set
THRESH_RETURN = "trace_graph_thresh_return"
#: the per-task flags of trace_functions_graph.c (TRACE_GRAPH_FL, the
#: two depth bits, TRACE_GRAPH_NOTRACE)
_FL, _DEPTH_SHIFT, _NOTRACE = 1, 1, 1 << 3
SCHED_PROBE = ("sched_switch", "ftrace_graph_probe_sched_switch")
_M64 = (1 << 64) - 1
#: machine -> its one trap handler and the FunctionGraph objects it serves
_TRAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class GraphError(RuntimeError):
    """The graph tracer cannot start (another tracer is on, no callback)."""


@dataclass(frozen=True, slots=True)
class GraphEvent:
    """One entry (``ftrace_graph_ent``) or return (``ftrace_graph_ret``)."""

    kind: str                   # "entry" or "return"
    cpu: int
    depth: int
    func: int                   # the fentry site
    ts: int                     # entry: calltime; return: rettime
    calltime: int = 0
    retval: int = 0

    @property
    def duration(self) -> int:
        return self.ts - self.calltime if self.kind == "return" else 0


@dataclass(slots=True)
class _Frame:
    func: int
    ret: int
    slot: int
    calltime: int


@dataclass
class FunctionGraph:
    """The function_graph tracer of *kernel* (a :class:`~textpoke.kernel.Kernel`)."""

    kernel: object
    depth_max: int = FTRACE_RETFUNC_DEPTH
    events: list = field(default_factory=list)
    #: ``max_graph_depth``: calls at this depth or deeper are not hooked (0: no limit)
    max_graph_depth: int = 0
    #: ``tracing_thresh`` in the clock's ticks (0: off); read at start()
    tracing_thresh: int = 0

    def __post_init__(self) -> None:
        k = self.kernel
        self.ft = k.ftrace
        self.machine = k.core.machine
        self.symbols = k.image.symbols
        #: the return stack of each CPU's task
        self.stacks: dict[int, list[_Frame]] = {}
        self.clock = 0
        self.overruns = 0
        #: graph tracing stopped for good (ftrace_graph_stop), and why
        self.dead = False
        self.why_dead = ""
        #: the tracer is registered (entries are recorded)
        self.active = False
        self._trap = None
        self.tracepoints: list[str] = []
        #: set_graph_function / set_graph_notrace: fentry sites (ftrace_graph_hash)
        self.graph_hash: frozenset[int] = frozenset()
        self.notrace_hash: frozenset[int] = frozenset()
        #: each CPU's task's flags (fgraph_get_task_var)
        self._task_var: dict[int, int] = {}
        #: the tracing_thresh the running tracer was started with
        self._thresh = 0

    # ------------------------------------------------------------ the filters
    def _hash(self, globs) -> frozenset[int]:
        from ._ops import FtraceFilterError, _match, parse_globs
        g = parse_globs(globs)
        recs = self.ft.records
        for gl in g:
            if not any(_match(r.name, [gl]) for r in recs):
                raise FtraceFilterError(f"{gl!r} matches no traceable function")
        return frozenset(r.ip for r in recs if _match(r.name, g))

    def set_graph_function(self, globs, *, append: bool = False) -> int:
        """``set_graph_function``: trace only these functions and what they
        call (empty: every function the filter selects).  A glob matching
        no traceable function is refused, nothing changed.  Returns how many
        functions the list holds."""
        h = self._hash(globs)
        self.graph_hash = (self.graph_hash | h) if append else h
        return len(self.graph_hash)

    def set_graph_notrace(self, globs, *, append: bool = False) -> int:
        """``set_graph_notrace``: these functions and what they call are not
        traced."""
        h = self._hash(globs)
        self.notrace_hash = (self.notrace_hash | h) if append else h
        return len(self.notrace_hash)

    def set_tracing_thresh(self, ticks: int) -> None:
        """A write of ``tracing_thresh``: on a running tracer, stop and
        start again (``graph_trace_update_thresh``), so that the return
        function follows."""
        if ticks < 0:
            raise ValueError("tracing_thresh cannot be negative")
        self.tracing_thresh = ticks
        if self.active:
            self.stop()
            self.start()

    def _graph_entry(self, cpu: int, func: int, depth: int) -> tuple[bool, bool]:
        """trace_graph_entry: (hook the return, record the entry)."""
        tv = self._task_var.get(cpu, 0)
        if tv & _NOTRACE:
            return False, False
        if func in self.notrace_hash:
            self._task_var[cpu] = tv | _NOTRACE
            return True, False          # its return clears the flag
        # ftrace_graph_ignore_func: nested in a set_graph_function one, or
        # one itself (ftrace_graph_addr sets the flag and keeps depth & 3)
        ok = bool(tv & _FL)
        if not ok:
            if not self.graph_hash:
                ok = True
            elif func in self.graph_hash:
                tv = (tv & ~(3 << _DEPTH_SHIFT)) | _FL | ((depth & 3) << _DEPTH_SHIFT)
                self._task_var[cpu] = tv
                ok = True
        if not ok or (self.max_graph_depth and depth >= self.max_graph_depth):
            return False, False
        return True, not self._thresh

    def _graph_return(self, cpu: int, depth: int, duration: int) -> bool:
        """trace_graph_return / trace_graph_thresh_return: record it?"""
        tv = self._task_var.get(cpu, 0)
        # ftrace_graph_addr_finish: the flag goes with the return at the
        # depth it was set at (the unmasked depth against the two bits kept)
        if tv & _FL and depth == (tv >> _DEPTH_SHIFT) & 3:
            tv &= ~_FL
        if tv & _NOTRACE:
            self._task_var[cpu] = tv & ~_NOTRACE
            return False
        self._task_var[cpu] = tv
        return not (self._thresh and duration < self._thresh)

    # ------------------------------------------------------------ the tracer
    def start(self) -> FtraceUpdate:
        """``graph_trace_init``: register the tracer on the functions the
        filter selects."""
        ft = self.ft
        if TRACER not in ft.callbacks:
            raise GraphError("this image has no function graph tracer (ftrace_graph_func)")
        if ft.func != "none":
            raise GraphError(f"the {ft.func} tracer is on: stop it first (current_tracer "
                             "takes one tracer)")
        if self.active:
            raise GraphError("the function graph tracer is already on")
        if self.tracing_thresh < 0 or self.max_graph_depth < 0:
            raise GraphError("tracing_thresh and max_graph_depth cannot be negative")
        self._hook_traps()
        self._thresh = self.tracing_thresh
        self._task_var = {}             # a new user's task storage starts zeroed
        self._direct(True)
        from ._graph_tp import tracepoint_probe_register, tracing_cmdline_record
        done = []
        if tracepoint_probe_register(self.kernel, *SCHED_PROBE):
            done.append(SCHED_PROBE[0])
        self.active = True
        try:
            up = ft.start(TRACER)
        except BaseException:
            self.active = False
            raise
        self.tracepoints = done + tracing_cmdline_record(self.kernel, True)
        return up

    def stop(self) -> FtraceUpdate:
        """``graph_trace_reset``: every site back to its NOP, the static
        calls to their stubs, the probes off.  Frames still hooked return
        through ``return_to_handler`` as before."""
        if not self.active:
            raise GraphError("the function graph tracer is not on")
        from ._graph_tp import tracepoint_probe_unregister, tracing_cmdline_record
        tracing_cmdline_record(self.kernel, False)
        up = self.ft.stop()
        self.active = False
        self._direct(False)
        tracepoint_probe_unregister(self.kernel, *SCHED_PROBE)
        return up

    def _direct(self, on: bool) -> None:
        calls = self.kernel.calls
        for call, func, stub in DIRECT_CALLS:
            if call == "fgraph_retfunc" and self._thresh:
                func = THRESH_RETURN         # graph_trace_init's choice with tracing_thresh
            if call in calls.calls and func in self.symbols and stub in self.symbols:
                calls.static_call_update(call, func if on else stub)

    # ------------------------------------------------------------ the host halves
    def _hook_traps(self) -> None:
        """On an image whose graph callbacks are INT3 stubs (the sim's),
        put the host halves on the machine's trap chain: one handler per
        machine, serving every FunctionGraph made on it (an entry goes to
        the one that is on, a return to the one whose frame it is)."""
        if self._trap is not None:
            return
        s = self.symbols
        need = ("ftrace_graph_func_trap", "return_to_handler_trap", "return_to_handler")
        if any(n not in s for n in need):
            return
        if self.machine.text_read(s["ftrace_graph_func_trap"], 1) != b"\xcc":
            return
        self.machine.require(Capability.DATA, "the function graph tracer's return hook")
        self._entry_trap = s["ftrace_graph_func_trap"]
        self._ret_trap = s["return_to_handler_trap"]
        self._hooker = s["return_to_handler"]
        t = _TRAPS.get(self.machine)
        if t is None:
            t = _TRAPS[self.machine] = {"graphs": [], "handle": None,
                                        "entry": self._entry_trap, "ret": self._ret_trap}
            t["handle"] = self.machine.register_trap_handler(
                lambda regs, t=t: _dispatch(t, regs), priority=TrapPriority.KPROBES,
                name="function_graph")
        t["graphs"].append(self)
        self._trap = t

    def close(self) -> None:
        """Take the host halves off the trap chain (every frame must have
        returned: a hooked frame left would return into an INT3 nobody
        handles)."""
        t = self._trap
        if t is not None and not any(self.stacks.values()):
            t["graphs"].remove(self)
            self._trap = None
            if not t["graphs"]:
                t["handle"].unregister()
                _TRAPS.pop(self.machine, None)

    @property
    def in_flight(self) -> int:
        """Frames hooked and not yet returned, on every CPU."""
        return sum(len(v) for v in self.stacks.values())

    def _int3(self, regs):
        """This object's halves alone (what the machine's handler calls)."""
        ip = regs.ip - 1
        if ip == self._entry_trap:
            return self._enter(regs)
        if ip == self._ret_trap:
            return self._return(regs)
        return False
        yield       # a trap handler is a task

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _enter(self, regs) -> bool:
        """function_graph_enter (prepare_ftrace_return): hook the return."""
        g = regs.gprs
        func, parent, slot = g["rdi"] & _M64, g["rsi"] & _M64, g["rcx"] & _M64
        if self.dead or not self.active:
            return True                 # ftrace_graph_is_dead: nothing hooked
        stack = self.stacks.setdefault(regs.cpu, [])
        if len(stack) >= self.depth_max:
            self.overruns += 1          # trace_overrun: this call is not hooked
            return True
        mem = regs.mem
        if int.from_bytes(mem.read(slot, 8), "little") != parent:
            self._die(f"cpu{regs.cpu}: the return slot {slot:#x} of {func:#x} does not hold "
                      f"its caller {parent:#x}")
            return True
        hook, record = self._graph_entry(regs.cpu, func, len(stack))
        if not hook:
            return True                 # -EBUSY: the return is left alone
        t = self._tick()
        if record:
            self.events.append(GraphEvent("entry", regs.cpu, len(stack), func, t))
        stack.append(_Frame(func, parent, slot, t))
        mem.write(slot, struct.pack("<Q", self._hooker))
        return True

    def _return(self, regs) -> bool:
        """ftrace_return_to_handler: pop the frame, record the return,
        give the real return address back (in the slot above the saved
        rax and rdx)."""
        mem = regs.mem
        slot = (regs.sp + 16) & _M64
        stack = self.stacks.get(regs.cpu) or []
        if not stack or stack[-1].slot != slot:
            # the kernel's "Bad frame pointer": ftrace_graph_stop, then panic
            self._die(f"cpu{regs.cpu}: return through {slot:#x} matches no hooked frame "
                      f"({stack[-1].slot:#x} expected)" if stack else
                      f"cpu{regs.cpu}: a return with no hooked frame")
            return False                # unhandled: the CPU oopses
        fr = stack.pop()
        rax = int.from_bytes(mem.read(regs.sp + 8, 8), "little")
        t = self._tick()
        if self._graph_return(regs.cpu, len(stack), t - fr.calltime):
            self.events.append(GraphEvent("return", regs.cpu, len(stack), fr.func, t,
                                          fr.calltime, rax))
        mem.write(slot, struct.pack("<Q", fr.ret))
        return True

    def _die(self, why: str) -> None:
        self.dead = True
        self.why_dead = why

    # ------------------------------------------------------------ reading
    def drain(self) -> list[GraphEvent]:
        out, self.events = self.events, []
        return out


def _dispatch(t: dict, regs):
    """The machine's one handler: an entry to the tracer that is on (none:
    nothing hooked, as after ``ftrace_graph_stop``), a return to the
    object whose frame the slot is (none: the newest, which reports the
    bad frame)."""
    ip = regs.ip - 1
    graphs = t["graphs"]
    if ip == t["entry"]:
        on = [g for g in graphs if g.active]
        if not on:
            return True             # a CPU still in the trampoline after a stop
        return (yield from on[-1]._int3(regs))
    if ip == t["ret"]:
        slot = (regs.sp + 16) & _M64
        mine = [g for g in graphs if (g.stacks.get(regs.cpu) or [None])[-1] is not None
                and g.stacks[regs.cpu][-1].slot == slot]
        return (yield from (mine or graphs)[-1]._int3(regs))
    return False


def format_graph(events, name, *, cpus: bool = True) -> list[str]:
    """The function_graph tracer's default output: ``CPU) DURATION |
    FUNCTION``, a call with nothing in between as ``func();`` with its
    duration, others as ``func() {`` ... ``}`` (indented by depth)."""
    out = ["# CPU  DURATION                  FUNCTION CALLS",
           "# |     |   |                     |   |   |   |"]
    ev = list(events)
    i = 0
    while i < len(ev):
        e = ev[i]
        pre = f"{e.cpu:>2}) " if cpus else ""
        ind = "  " * e.depth
        if e.kind == "entry":
            nxt = next((x for x in ev[i + 1:] if x.cpu == e.cpu), None)
            if nxt is not None and nxt.kind == "return" and nxt.func == e.func and \
                    nxt.calltime == e.ts:
                out.append(f"{pre}{nxt.duration:>10}  |  {ind}{name(e.func)}();")
                ev.remove(nxt)
            else:
                out.append(f"{pre}{'':>10}  |  {ind}{name(e.func)}() {{")
        else:
            out.append(f"{pre}{e.duration:>10}  |  {ind}}} /* {name(e.func)} */")
        i += 1
    return out
