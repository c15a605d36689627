# SPDX-License-Identifier: GPL-2.0-only
"""Fetch-args of ``live probe``, in the kernel's ``kprobe_events`` syntax
(a subset): parsed into functions of a hit's registers and memory
(:func:`parse_fetchargs`), and their values formatted for a trace line
(:func:`format_value`).  A hit is anything with ``ip``, ``sp``,
``flags``, ``gprs`` (a dict by full register name) and ``mem`` (with
``read(addr, n)``): the INT3 path's stopped thread, or a record of the
optimised path."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from .._errors import TextPokeError

__all__ = ["FetchArg", "FetchArgError", "parse_fetchargs", "format_value", "STRING_MAX"]

_M64 = (1 << 64) - 1


class FetchArgError(TextPokeError, ValueError):
    """A fetch-arg that does not parse (one line, exit 2 in the CLI)."""


# ------------------------------------------------------------------ fetch-args
#: the kernel's x86 register names (``%di``) and the full ones (``%rdi``)
_REGS = {"ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi",
         "bp": "rbp", "sp": "rsp", "ip": "rip", "flags": "eflags",
         **{f"r{i}": f"r{i}" for i in range(8, 16)}}
_REGS.update({v: v for v in list(_REGS.values())})
_REGS.update({"eflags": "eflags", "rflags": "eflags"})
#: SysV x86-64: the first six integer arguments
_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_TYPES = {f"{k}{n}": (k, n) for k in "usx" for n in (8, 16, 32, 64)}
_TYPES.update({"string": ("string", 0), "ustring": ("string", 0), "symbol": ("symbol", 64)})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEREF = re.compile(r"^([+-])(u?)(0x[0-9a-fA-F]+|\d+)\((.*)\)$")
_MEMSYM = re.compile(r"^@([A-Za-z_.$][\w.$]*(?::[A-Za-z_.$][\w.$]*)?)([+-](?:0x[0-9a-fA-F]+|\d+))?$")
STRING_MAX = 256


@dataclass
class FetchArg:
    """One ``[NAME=]FETCHARG[:TYPE]``: *fetch* computes the value from
    (regs, memory, symbol resolver)."""

    name: str
    text: str
    kind: str                # u / s / x / string / symbol
    bits: int
    fetch: Callable[[Any], int] = field(repr=False)
    needs_entry: bool = False


def _num(t: str) -> int:
    return int(t, 0)


def _compile(expr: str, spec: str, resolve: Callable[[str], int] | None) -> tuple[Callable, bool]:
    """The value of a FETCHARG (without NAME= and :TYPE), as a function of
    the hit's registers."""
    if expr.startswith("%"):
        r = _REGS.get(expr[1:].lower())
        if r is None:
            raise FetchArgError(f"fetch-arg {spec!r}: unknown register {expr!r} (x86-64: %ax %bx "
                                "%cx %dx %si %di %bp %sp %ip %flags %r8..%r15, or %rdi ...)")
        if r == "rip":
            return (lambda h: h.ip), False
        if r == "rsp":
            return (lambda h: h.sp), False
        if r == "eflags":
            return (lambda h: h.flags), False
        return (lambda h: h.gprs.get(r, 0)), False
    if expr == "$stack":
        return (lambda h: h.sp), False
    m = re.fullmatch(r"\$stack(\d+)", expr)
    if m:
        n = int(m.group(1))
        return (lambda h: _read_word(h, h.sp + 8 * n)), False
    m = re.fullmatch(r"\$arg(\d+)", expr)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 32:
            raise FetchArgError(f"fetch-arg {spec!r}: $argN needs 1 <= N <= 32")
        if n <= 6:
            r = _ARG_REGS[n - 1]
            return (lambda h: h.gprs.get(r, 0)), True
        # at the entry the return address is at sp; the 7th argument above it
        return (lambda h: _read_word(h, h.sp + 8 * (n - 6))), True
    if expr in ("$comm", "$COMM"):
        return (lambda h: 0), False           # printed from the thread's name
    if expr.startswith("$"):
        raise FetchArgError(f"fetch-arg {spec!r}: unknown variable {expr!r} (known: $stack, "
                            "$stackN, $argN, $comm; $retval needs a return probe)")
    if expr.startswith("\\"):
        try:
            v = _num(expr[1:])
        except ValueError:
            raise FetchArgError(f"fetch-arg {spec!r}: bad immediate {expr!r}") from None
        return (lambda h: v & _M64), False
    if expr.startswith("@"):
        try:
            a = _num(expr[1:])
            return (lambda h: _read_word(h, a)), False
        except ValueError:
            pass
        m = _MEMSYM.match(expr)
        if not m:
            raise FetchArgError(f"fetch-arg {spec!r}: bad memory reference {expr!r} "
                                "(@ADDR or @SYM[+|-OFF])")
        if resolve is None:
            raise FetchArgError(f"fetch-arg {spec!r}: no symbols to resolve {m.group(1)!r}")
        try:
            a = resolve(m.group(1)) + (_num(m.group(2)) if m.group(2) else 0)
        except (TextPokeError, ValueError) as e:
            raise FetchArgError(f"fetch-arg {spec!r}: {e}") from None
        return (lambda h: _read_word(h, a)), False
    m = _DEREF.match(expr)
    if m:
        off = _num(m.group(3)) * (-1 if m.group(1) == "-" else 1)
        inner, entry = _compile(m.group(4), spec, resolve)
        return (lambda h: _read_word(h, (inner(h) + off) & _M64)), entry
    raise FetchArgError(f"fetch-arg {spec!r}: cannot parse {expr!r} (want %REG, @ADDR, @SYM[+OFF], "
                        "$stackN, $stack, $argN, $comm, \\IMM or +|-OFF(FETCHARG))")


def _read_word(h, addr: int) -> int:
    return struct.unpack("<Q", h.mem.read(addr & _M64, 8))[0]


def parse_fetchargs(specs: list[str], resolve: Callable[[str], int] | None = None) -> list[FetchArg]:
    """``[NAME=]FETCHARG[:TYPE]`` each, as ``kprobe_events`` takes them:
    unnamed ones are ``arg1``, ``arg2``... by position; the default type
    is ``x64`` (hex).  FetchArgError, one line, on the first bad one."""
    out: list[FetchArg] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs, 1):
        s = spec.strip()
        name = f"arg{i}"
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", s)
        if m:
            name, s = m.group(1), m.group(2)
        elif "=" in s.split("(")[0]:
            raise FetchArgError(f"fetch-arg {spec!r}: bad name (want a C identifier before '=')")
        if not s:
            raise FetchArgError(f"fetch-arg {spec!r}: nothing to fetch")
        kind, bits = "x", 64
        tm = re.search(r":(\w+)$", s)
        if tm and (tm.group(1) in _TYPES or not s.startswith("@")):
            head, _, typ = s.rpartition(":")
            if typ not in _TYPES:
                raise FetchArgError(f"fetch-arg {spec!r}: unknown type {typ!r} (u8..u64, s8..s64, "
                                    "x8..x64, string, symbol)")
            kind, bits = _TYPES[typ]
            s = head
        if name in seen:
            raise FetchArgError(f"fetch-arg {spec!r}: the name {name!r} is used twice")
        if name in ("common_pid", "common_type", "common_flags", "common_preempt_count"):
            raise FetchArgError(f"fetch-arg {spec!r}: {name!r} is reserved")
        seen.add(name)
        fetch, entry = _compile(s, spec, resolve)
        if s in ("$comm", "$COMM"):
            kind = "comm"
        out.append(FetchArg(name, s, kind, bits, fetch, entry))
    return out


def format_value(a: FetchArg, h, value: int, comm: str, symbolize: Callable[[int], str]) -> str:
    if a.kind == "comm":
        return f'"{comm}"'
    if a.kind == "string":
        try:
            raw = h.mem.read(value & _M64, STRING_MAX)
            txt = raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
            return '"' + txt.replace('"', '\\"') + '"'
        except Exception:
            return "(fault)"
    if a.kind == "symbol":
        return symbolize(value)
    v = value & ((1 << a.bits) - 1)
    if a.kind == "x":
        return f"{v:#x}"
    if a.kind == "s" and v >> (a.bits - 1):
        v -= 1 << a.bits
    return str(v)
