# SPDX-License-Identifier: GPL-2.0-only
"""One probe point of ``live probe``: where (``[lib:]SYMBOL[+OFF]``,
resolved in the process), what to fetch per hit (its fetch-args), its
event name and trace line, and what became of it (the client's kprobe,
the bytes it replaced, optimised or why not, its hits).  The session
(:class:`._probe.LiveProbe`) arms every point of a command through one
machine and one kprobes client."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._fetchargs import FetchArg, FetchArgError, parse_fetchargs

__all__ = ["ProbePoint", "Hit", "split_probe_def"]


@dataclass
class Hit:
    tid: int
    cpu: int
    ts: float
    values: list[str]
    comm: str
    #: the point hit (a command may probe several)
    point: "ProbePoint | None" = field(default=None, repr=False)


def split_probe_def(text: str) -> tuple[str, list[str]]:
    """``perf probe -a``'s PROBEDEF: ``SYMBOL[+OFF] [FETCHARG...]`` in one
    string, split at blanks (a fetch-arg has none)."""
    words = text.split()
    if not words:
        raise FetchArgError("an empty probe definition (want 'SYMBOL[+OFF] [FETCHARG...]')")
    return words[0], words[1:]


class ProbePoint:
    """*spec* (``[lib:]symbol[+off]``) with *fetchargs*, resolved with
    *syms* (the session's :class:`._symbols.Symbols`).  FetchArgError, one
    line, for a point or a fetch-arg that does not do."""

    def __init__(self, syms, spec: str, fetchargs: list[str]) -> None:
        from ._symbols import check_boundary, parse_address
        self.spec = spec
        lib, name, off = parse_address(spec)
        if name is None:
            raise FetchArgError(f"probe point {spec!r}: give a symbol (SYMBOL[+OFF] or "
                                "lib:SYMBOL[+OFF]), not a number")
        s = syms.lookup(name, lib)
        if not s.func or s.size <= 0:
            raise FetchArgError(f"probe point {spec!r}: {s.name} is not a function with a size")
        if off:
            check_boundary(s, off)
        self.symbol, self.offset, self.addr, self.size = s.name, off, s.addr + off, s.size
        self.module = s.module
        self.event = f"p_{s.name}_{off}"
        self.args: list[FetchArg] = parse_fetchargs(fetchargs, syms.resolve)
        if off and any(a.needs_entry for a in self.args):
            raise FetchArgError(f"$argN is only for a probe on a function's entry "
                                f"({s.name}, not {s.name}+{off:#x})")
        #: the client's Kprobe once registered
        self.probe = None
        #: the bytes the probe point read before anything was written
        self.orig: bytes | None = None
        #: why not optimised (None: optimised, or not asked)
        self.opt_reason: str | None = None
        #: the first argument its detour passes the recorder (its slot)
        self.op: int | None = None
        self.nhit = 0
        #: of nhit, the hits read from the rings (the others went through
        #: the INT3 before the JMP was in)
        self.nrecorded = 0

    @property
    def name(self) -> str:
        """The point as the client names it: offset 0 is the function's
        first byte (a process has no __mcount_loc)."""
        return self.symbol if not self.offset else f"{self.symbol}+{self.offset:#x}"

    def entry_refusal(self) -> str | None:
        if self.offset:
            return (f"{self.symbol}+{self.offset:#x} is past the function's entry: code there "
                    "may keep data in the 128-byte red zone below %rsp, which the detour's "
                    "pushes would overwrite (only an entry is optimised)")
        from ._probe_opt import fetch_refusal
        return fetch_refusal(self.args)

    def line(self, h: Hit) -> str:
        args = "".join(f" {a.name}={v}" for a, v in zip(self.args, h.values))
        return (f"{h.comm:>16}-{h.tid:<7} [{h.cpu:03d}] {h.ts:.6f}: {self.event}: "
                f"({self.symbol}+{self.offset:#x}){args}")
