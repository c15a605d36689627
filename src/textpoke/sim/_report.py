# SPDX-License-Identifier: GPL-2.0-only
"""Failure reports a kernel engineer can act on: an oops printed the way
the kernel prints one, and the timeline of a traced schedule.

* :func:`oops_report` turns an :class:`~textpoke.sim.Oops` (or its
  ``as_dict()``, e.g. from a worker process) into a JSON-ready dict: CPU,
  kind, RIP as ``symbol+off/size``, the faulting data address, registers and
  the ``Code:`` bytes around RIP as that CPU's view held them -- what it
  executed, not what memory holds now.
* :func:`format_oops` prints that dict like a kernel oops.
* :func:`timeline` merges the machine's trace (``SimMachine(trace=True)``)
  with the core's event log by scheduler step; :func:`format_timeline`
  prints it one line per entry, prefixed by who acted (``cpuN`` or
  ``patcher``) and indented by CPU so that each CPU reads as a column.

Symbols follow kallsyms: the nearest symbol at or below the address in the
same section, its size being the ELF size when the address lies inside it,
else the distance to the next symbol.  An unhandled INT3 is reported at the
INT3's own address (the kernel shows the address after it).
"""

from __future__ import annotations

import bisect
import weakref
from typing import Any, Iterable

from ..images._symbols import Symbols, format_symbol

__all__ = ["oops_report", "format_oops", "timeline", "format_timeline", "symbolize"]

_REG_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
              "r12", "r13", "r14", "r15")

#: x86 page-fault error code bits: P (protection), W (write), I (fetch)
_PF_CODE = {"read-unmapped": 0x00, "write-unmapped": 0x02, "fetch-unmapped": 0x10,
            "read-prot": 0x01, "write-prot": 0x03, "fetch-prot": 0x11}


# ------------------------------------------------------------------ symbols
_SYMTABS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def _symtab(image: Any) -> "tuple[Symbols, list[tuple[int, int]]]":
    """The image's symbols that lie in a section (by the one symbolizer),
    and the sections' [start, end), sorted."""
    try:
        return _SYMTABS[image]
    except (KeyError, TypeError):
        pass
    secs = sorted((s.addr, s.end) for s in image.sections.values() if s.end > s.addr)
    starts = [lo for lo, _ in secs]

    def in_section(_name: str, addr: int) -> bool:
        i = bisect.bisect_right(starts, addr) - 1
        return i >= 0 and addr < secs[i][1]
    got = (Symbols.from_mapping(image.symbols, image.sizes, keep=in_section), secs)
    try:
        _SYMTABS[image] = got
    except TypeError:
        pass
    return got


def symbolize(addr: int | None, image: Any = None) -> dict | None:
    """``{"name", "offset", "size", "text", "function"}`` for *addr*, or None
    when the image has no symbol for it.  ``text`` is ``name+0xoff/0xsize``;
    ``function`` is the enclosing sized symbol in the same form, when it is
    not the nearest one (a label inside a function)."""
    if addr is None or image is None:
        return None
    table, secs = _symtab(image)
    near = table.lookup(addr)
    if near is None:
        return None
    name, start, size = near
    i = bisect.bisect_right(secs, (start, float("inf"))) - 1
    lo, hi = secs[i]
    if not lo <= addr < hi:
        return None
    if not (size and addr < start + size):
        nxt = table.following(start)
        size = min(hi if nxt is None else nxt, hi) - start
    res = {"name": name, "offset": addr - start, "size": size,
           "text": format_symbol(name, addr - start, size), "function": None}
    fn = table.lookup(addr, function=True)
    if fn is not None and fn[0] != name:
        res["function"] = format_symbol(fn[0], addr - fn[1], fn[2])
    return res


# ------------------------------------------------------------------ oops
def _as_fields(oops: Any) -> dict:
    if isinstance(oops, dict):
        d = dict(oops)
        code = d.get("code", "")
        d["code"] = bytes.fromhex(code) if isinstance(code, str) else bytes(code)
        return d
    return {"cpu": oops.cpu, "kind": oops.kind, "rip": oops.rip, "regs": dict(oops.regs),
            "step": oops.step, "detail": oops.detail, "addr": getattr(oops, "addr", None),
            "access": getattr(oops, "access", ""), "code": getattr(oops, "code", b""),
            "code_start": getattr(oops, "code_start", oops.rip),
            "bytes": oops.bytes_at_rip.hex()}


def _code_line(code: bytes, start: int, rip: int) -> str:
    if not code or not start <= rip < start + len(code):
        return f"Unable to access opcode bytes at {rip:#018x}."
    i = rip - start
    return " ".join(f"<{b:02x}>" if k == i else f"{b:02x}" for k, b in enumerate(code))


def _title(kind: str, addr: int | None, access: str) -> list[str]:
    if kind.startswith("#PF"):
        lines = [f"BUG: unable to handle page fault for address: {addr:016x}" if addr is not None
                 else "BUG: unable to handle page fault"]
        if access:
            what = access.split("-")[0]
            verb = {"write": "write access", "read": "read access",
                    "fetch": "instruction fetch"}.get(what, what)
            why = "permissions violation" if access.endswith("prot") else "not-present page"
            lines.append(f"#PF: supervisor {verb} in kernel mode")
            lines.append(f"#PF: error_code({_PF_CODE.get(access, 0):#06x}) - {why}")
            lines.append(f"Oops: {_PF_CODE.get(access, 0):04x} [#1] SMP")
        else:
            lines.append("Oops: 0000 [#1] SMP")
        return lines
    if kind == "int3":
        return ["Oops: int3: 0000 [#1] SMP"]
    if kind == "#UD":
        return ["Oops: invalid opcode: 0000 [#1] SMP"]
    return [f"Oops: {kind}: 0000 [#1] SMP"]


def oops_report(oops: Any, image: Any = None) -> dict:
    """A JSON-ready description of *oops* (an ``Oops`` or its ``as_dict()``);
    *image* (an ``ElfImage``) names the addresses."""
    f = _as_fields(oops)
    rip, addr = f["rip"], f.get("addr")
    sym = symbolize(rip, image)
    asym = symbolize(addr, image)
    code = f.get("code", b"")
    code_start = f.get("code_start", rip)
    return {
        "cpu": f["cpu"], "kind": f["kind"], "step": f.get("step"), "detail": f.get("detail", ""),
        "rip": rip, "rip_symbol": sym["text"] if sym else None,
        "function": sym["function"] if sym else None,
        "addr": addr, "addr_symbol": asym["text"] if asym else None,
        "access": f.get("access", ""),
        "regs": f.get("regs", {}),
        "code": _code_line(code, code_start, rip), "code_bytes": code.hex(),
        "code_start": code_start,
        "title": _title(f["kind"], addr, f.get("access", "")),
    }


def format_oops(report: dict) -> str:
    """*report* (from :func:`oops_report`) as the kernel would print it."""
    out = list(report.get("title") or _title(report["kind"], report.get("addr"),
                                              report.get("access", "")))
    step = report.get("step")
    out.append(f"CPU: {report['cpu']} PID: 0 Comm: swapper/{report['cpu']} sim"
               + (f" step {step}" if step is not None else ""))
    where = report.get("rip_symbol") or f"{report['rip']:#x}"
    fn = report.get("function")
    out.append(f"RIP: 0010:{where}" + (f" (in {fn})" if fn else "")
               + ("" if report.get("rip_symbol") is None else f" [{report['rip']:#x}]"))
    out.append(f"Code: {report.get('code', '')}")
    regs = report.get("regs") or {}
    if regs:
        out.append(f"RSP: 0018:{regs.get('rsp', 0):016x} EFLAGS: {regs.get('rflags', 0):08x}")
        names = [n for n in _REG_ORDER if n in regs]
        for i in range(0, len(names), 3):
            out.append(" ".join(f"{n.upper():>3}: {regs[n]:016x}" for n in names[i:i + 3]))
    if report.get("addr") is not None:
        out.append(f"CR2: {report['addr']:016x}"
                   + (f" ({report['addr_symbol']})" if report.get("addr_symbol") else ""))
    if report.get("detail"):
        out.append(f"note: {report['detail']}")
    out.append("---[ end trace ]---")
    return "\n".join(out)


# ------------------------------------------------------------------ timeline
def _sym(addr: int, image: Any) -> str:
    s = symbolize(addr, image)
    return f"{addr:#x} {s['text']}" if s else f"{addr:#x}"


#: how each kind of trace tuple reads: (index of the address in the
#: detail, or None; the detail text from (detail, cpu, image))
_TRACE_TEXT = {
    "write": (0, lambda d, cpu, im: f"{_sym(d[0], im)} <- {bytes(d[1]).hex(' ')}"),
    "ipi-send": (None, lambda d, cpu, im: f"sync IPI to cpu{cpu}, delivered from step {d[0]}"),
    "ipi": (None, lambda d, cpu, im: f"took {d[0] if d else 1} IPI(s): sync_core"),
    "refill": (0, lambda d, cpu, im: f"line {d[0]:#x}+{d[1]} refilled ({d[2]})"),
    "int3": (0, lambda d, cpu, im: f"INT3 at {_sym(d[0], im)}"),
    "exec": (0, lambda d, cpu, im: f"ran {_sym(d[0], im)}: {bytes(d[1]).hex(' ')}"),
    "iret": (1, lambda d, cpu, im: f"handled by {d[0]}, resumes at {_sym(d[1], im)}"),
    "unhandled": (0, lambda d, cpu, im: f"no handler claimed the INT3 at {_sym(d[0], im)}"),
    "oops": (1, lambda d, cpu, im: f"{d[0]} at {_sym(d[1], im)}"),
    "cpu-up": (None, lambda d, cpu, im: "plugged in"),
    "cpu-down": (None, lambda d, cpu, im: "unplugged"),
}


def _sim_entry(ev: tuple, image: Any) -> dict:
    what = str(ev[0])
    step = ev[1] if len(ev) > 1 and isinstance(ev[1], (int, float)) else None
    cpu = ev[2] if len(ev) > 2 and (ev[2] is None or isinstance(ev[2], int)) else None
    d = ev[3:]
    addr = None
    known = _TRACE_TEXT.get(what)
    if known is not None:
        at, text = known
        detail = text(d, cpu, image)
        addr = d[at] if at is not None else None
    else:   # an entry someone else appended: keep what it says
        detail = " ".join(str(x) for x in (ev[2:] if cpu is None and len(ev) > 2 else d))
    e = {"step": step, "cpu": cpu, "what": what, "detail": detail}
    if addr is not None:
        e["addr"] = addr
    return e


def timeline(sim: Any, core: Any = None, image: Any = None) -> list[dict]:
    """The schedule's events in step order: the machine's trace (writes,
    IPIs sent and taken, line refills, INT3s and what the handler chain
    did, oopses, hotplug) and, with *core*, its event log (``poke/<phase>``:
    int3, tail, first, batch, rollback, ...).  Each entry is ``{"step",
    "cpu", "what", "detail"}`` (``cpu`` None for the patcher) plus ``"addr"``
    where one applies.  *image* names addresses."""
    merged: list[tuple[Any, int, int, dict]] = []
    for i, ev in enumerate(getattr(sim, "trace", None) or ()):
        if isinstance(ev, tuple) and ev:
            e = _sim_entry(ev, image)
            merged.append((e["step"] if e["step"] is not None else -1, 0, i, e))
    if core is not None:
        for i, ev in enumerate(core.events):
            step = int(ev.time) if float(ev.time).is_integer() else ev.time
            detail = f"{_sym(ev.addr, image)}: {ev.old.hex(' ')} -> {ev.new.hex(' ')}"
            merged.append((step, 1, i, {"step": step, "cpu": None, "what": f"poke/{ev.phase}",
                                        "detail": detail, "addr": ev.addr}))
    merged.sort(key=lambda t: (t[0], t[1], t[2]))
    return [t[3] for t in merged]


def format_timeline(entries: Iterable[dict]) -> str:
    """One line per entry: the step, who acted (``cpuN``, or ``patcher``
    for the core and its writes), what and the details.  CPU lines are
    indented by CPU id, so that each CPU's events read as a column."""
    entries = list(entries)
    cpus = sorted({e["cpu"] for e in entries if e.get("cpu") is not None})
    col = {c: i for i, c in enumerate(cpus)}
    lines = []
    for e in entries:
        cpu = e.get("cpu")
        step = e.get("step")
        s = f"{step:>8}" if step is not None else " " * 8
        if cpu is None:
            lines.append(f"{s}  patcher {e['what']:<14} {e.get('detail', '')}".rstrip())
        else:
            pad = "  " * col[cpu]
            lines.append(f"{s}  {pad}cpu{cpu:<4}{e['what']:<10} {e.get('detail', '')}".rstrip())
    return "\n".join(lines)
