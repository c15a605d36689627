# SPDX-License-Identifier: GPL-2.0-only
"""Where a kprobe may go: the function table and ``symbol[+off]`` probe
points, the blacklist, the text as it was before our probes (decoded from
the start of a function, for the instruction-boundary check), and the text
other patchers reserve.  A part of :class:`~._core.Kprobes`.

Learnt from ``kernel/kprobes.c`` (``check_kprobe_address_safe``,
``within_kprobe_blacklist``) and ``arch/x86/kernel/kprobes/core.c``
(``can_probe``, ``recover_probed_instruction``, ``arch_adjust_kprobe_addr``),
Linux 6.12; the code is our own.
"""

from __future__ import annotations

import bisect

import re

from .._core._insn import Insn, insn_decode_kernel
from .._errors import BadInstructionError
from ..images._symbols import Symbols
from ._types import KprobeError

#: what ``is_endbr`` takes for an ENDBR: ENDBR64, ENDBR32, and the poison
#: ``apply_seal_endbr`` leaves in a sealed one (``66 0f 1f 00``) -- a
#: function never called indirectly still has its entry after those 4 bytes
_ENDBR = (bytes.fromhex("f30f1efa"), bytes.fromhex("f30f1efb"), bytes.fromhex("660f1f00"))
_SPEC = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*(?:\+\s*(0x[0-9a-fA-F]+|\d+))?\s*$")


class _Lookup:
    """Probe points and the places no probe may go (a part of
    :class:`~._core.Kprobes`: its ``functions``, ``blacklist``, ``fentry``,
    ``smp``, ``keys``, ``calls``, ``_sites``)."""

    # ------------------------------------------------------------ blacklist
    def _blacklist_range(self, b: "tuple[int, int] | str") -> tuple[int, int]:
        if isinstance(b, str):
            if b not in self.functions:
                raise KprobeError(f"blacklist: no function {b!r}", reason="symbol")
            a, sz = self.functions[b]
            return a, a + sz
        return int(b[0]), int(b[1])

    def _image_blacklist(self, image) -> list[tuple[int, int]]:
        """What the image's symbols say: the text areas ``populate_kprobe_
        blacklist`` adds and each ``_kbl_addr_NAME`` (NOKPROBE_SYMBOL)."""
        if image is None:
            return []
        sym = image.symbols
        out = []
        for area in ("__kprobes_text", "__noinstr_text", "__entry_text"):
            lo, hi = sym.get(area + "_start"), sym.get(area + "_end")
            if lo is not None and hi is not None and lo < hi:
                out.append((lo, hi))
        for n in sym:
            if n.startswith("_kbl_addr_") and n[len("_kbl_addr_"):] in self.functions:
                a, sz = self.functions[n[len("_kbl_addr_"):]]
                out.append((a, a + sz))
        return out

    def within_kprobe_blacklist(self, addr: int) -> bool:
        if any(lo <= addr < hi for lo, hi in self.blacklist):
            return True
        f = self.function_at(addr)
        if f is not None and "." in f[0]:          # foo.cold, foo.part.0: ask for foo
            base = self.functions.get(f[0].split(".", 1)[0])
            if base is not None:
                return any(lo <= base[0] < hi for lo, hi in self.blacklist)
        return False

    def add_function(self, name: str, addr: int, size: int) -> None:
        """Make generated code (execmem) probe-able by name."""
        self.machine.text_range_of(addr, size)
        self.functions[name] = (addr, size)
        self._fsyms = None

    # ------------------------------------------------------------ lookup
    def function_at(self, addr: int) -> tuple[str, int, int] | None:
        """(name, start, size) of the function covering *addr*, by the one
        symbolizer over :attr:`functions` (remade when a function is added)."""
        if self._fsyms is None or self._fsyms_n != len(self.functions):
            fs = self.functions
            self._fsyms = Symbols.from_mapping({n: a for n, (a, _) in fs.items()},
                                               {n: sz for n, (_, sz) in fs.items()})
            self._fsyms_n = len(fs)
        return self._fsyms.lookup(addr, covering=True)

    def resolve(self, spec: "str | int") -> tuple[str, int, int, int]:
        """``symbol[+off]`` or an address -> (symbol, offset, addr, size of
        the function).  A bare symbol whose first instruction is the fentry
        NOP means the instruction after it."""
        if isinstance(spec, int):
            f = self.function_at(spec)
            if f is None:
                raise KprobeError(f"{spec:#x} is not inside a known function", reason="symbol",
                                  addr=spec)
            return f[0], spec - f[1], spec, f[2]
        m = _SPEC.match(spec)
        if not m:
            raise KprobeError(f"cannot parse probe point {spec!r} (want SYMBOL[+OFFSET])",
                              reason="symbol")
        name = m.group(1)
        if name not in self.functions:
            raise KprobeError(f"no function {name!r}", reason="symbol")
        start, size = self.functions[name]
        if m.group(2) is None:
            if self.ftrace is not None:
                # arch_adjust_kprobe_addr: the entry, after an ENDBR
                off = 4 if self.machine.text_read(start, 4) in _ENDBR else 0
            else:
                off = 5 if start in self.fentry else 0
        else:
            off = int(m.group(2), 0)
        if not 0 <= off < size:
            raise KprobeError(f"{name}+{off:#x} is outside {name} (size {size:#x})",
                              reason="symbol", addr=start + off)
        return name, off, start + off, size

    def _recovered(self, addr: int, size: int) -> bytes:
        """Text as it was before our probes (``recover_probed_instruction``)."""
        buf = bytearray(self.machine.text_read(addr, size))
        for s in self._sites.values():
            if not addr - 16 < s.addr < addr + size:
                continue                    # (what a site covers is < 16 bytes)
            orig = s.displaced if s.optimized else s.orig
            for i, b in enumerate(orig):
                if addr <= s.addr + i < addr + size:
                    buf[s.addr + i - addr] = b
        return bytes(buf)

    def _decode_function(self, start: int, size: int) -> list[Insn]:
        code = self._recovered(start, size)
        # registering decodes the function, optimising decodes it again:
        # the same bytes decode the same (a few thousand functions kept)
        cache = self.__dict__.setdefault("_decoded", {})
        hit = cache.get((start, code))
        if hit is not None:
            return list(hit)
        out = self._decode(start, size, code)
        if len(cache) >= 4096:
            cache.pop(next(iter(cache)))
        cache[(start, code)] = tuple(out)
        return out

    def _decode(self, start: int, size: int, code: bytes) -> list[Insn]:
        out, off = [], 0
        while off < size:
            try:
                ins = insn_decode_kernel(code[off:off + 15] + b"\xcc" * 15, start + off)
            except BadInstructionError as e:
                raise KprobeError(f"cannot decode {start + off:#x}: {e}", reason="boundary",
                                  addr=start + off) from None
            out.append(ins)
            off += ins.length
        return out

    # ------------------------------------------------------------ reservations
    def _reserved_index(self) -> list:
        """Sorted (starts, ends, who) of the jump-label sites, the static-call
        sites and trampolines, and the fentry sites, in the order
        ``text_reserved`` asks them; rebuilt when keys or calls gain or lose
        sites (a module loaded or unloaded)."""
        keys = self.keys.keys.values() if self.keys is not None else ()
        calls = self.calls.calls.values() if self.calls is not None else ()
        # sites change only when a module comes or goes, which adds or drops
        # its symbol table in the keys' and calls' maps: their identities
        # (and the counts) tell when to rebuild, without walking every site
        sig = (len(keys), len(calls), len(self.fentry),
               *(tuple(map(id, getattr(getattr(o, a, None), "_tables", {}).values()))
                 for o, a in ((self.keys, "symbols"), (self.calls, "symmap"))))
        cache = self.__dict__.get("_res_index")
        if cache is not None and cache[0] == sig:
            return cache[1]

        def index(items) -> tuple:
            items = sorted(items)
            return ([a for a, _e, _w in items], [e for _a, e, _w in items],
                    [w for _a, _e, w in items])
        out = [("jump_label", index((s.entry.code, s.entry.code + s.size, f"jump_label ({k.name})")
                                    for k in keys for s in k.sites)),
               ("static_call", index([(s.site.addr, s.site.addr + 5, f"static_call ({c.name} site)")
                                      for c in calls for s in c.sites] +
                                     [(c.tramp, c.tramp + 5, f"static_call ({c.name} trampoline)")
                                      for c in calls])),
               ("ftrace", index((a, a + 5, "ftrace (fentry site)") for a in self.fentry))]
        self.__dict__["_res_index"] = (sig, out)
        return out

    def text_reserved(self, start: int, end: int) -> str | None:
        """Who reserves any byte of [start, end] (inclusive): alternatives,
        jump_label, static_call, ftrace -- or None."""
        if self.smp is not None:
            # the kernel compares with the end exclusively: a one-byte
            # query (a probe) never matches, a detour's range does
            with self.core.text_mutex:
                if self.smp.text_reserved(start, end - 1):
                    return "alternatives (LOCK prefix)"
        for who, idx in self._reserved_index():
            starts, ends, names = idx
            # every reserved range is at most 5 bytes long
            i = bisect.bisect_left(starts, start - 5)
            j = bisect.bisect_right(starts, end)
            for x in range(i, j):
                if starts[x] <= end and start < ends[x]:
                    return names[x]
        return None
