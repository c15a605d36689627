# SPDX-License-Identifier: GPL-2.0-only
"""KPROBES_ON_FTRACE: a kprobe on a fentry NOP, through ftrace_ops.  A part
of :class:`~._core.Kprobes`.

**fentry**: without ``KPROBES_ON_FTRACE`` (no *ftrace* given) a probe on
the fentry NOP is refused, and a bare symbol name means the first
instruction after the NOP.  With it (``Kprobes(ftrace=...)``, the
kernel's ``CONFIG_KPROBES_ON_FTRACE``, Debian's): a bare symbol name means
the function's first byte (after an ENDBR, as ``arch_adjust_kprobe_addr``),
and a probe on the fentry NOP is no INT3 but an address in one of two
ftrace_ops (``check_ftrace_location`` / ``arm_kprobe_ftrace``):
``kprobe_ftrace_ops`` (every register saved), or ``kprobe_ipmodify_ops``
when the probe has a post-handler; the first probe registers the ops,
each later one adds its address (``ftrace_set_filter_ip``), the last one
out unregisters it.  The site then calls that ops' own trampoline (or
``ftrace_regs_caller``), whose callback ``kprobe_ftrace_handler`` -- an
INT3 into the host here -- runs the probe as the kernel's does: the
pre-handlers with ``ip`` = site + 1 (as an INT3 hit shows it); unless one
moved ``ip``, the post-handlers with ``ip`` = site + 5 (the NOP "single-
stepped"), then ``ip`` is put back.  Such a probe is never optimised.

Learnt from ``arch/x86/kernel/kprobes/ftrace.c`` and ``kernel/kprobes.c``
(Linux 6.12); the code is our own.
"""

from __future__ import annotations

import struct

from .._core._emulate import PtRegs
from .._core._insn import insn_decode_kernel
from ._types import Kprobe, KprobeError, _Site

#: struct pt_regs, word by word, as ftrace_regs_caller fills it
_PT_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
            "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")
_PT = struct.Struct(f"<{len(_PT_REGS)}Q")
_M64 = (1 << 64) - 1


class _FtraceProbes:
    """Probes on fentry NOPs as addresses in ``kprobe_ftrace_ops`` /
    ``kprobe_ipmodify_ops``, and ``kprobe_ftrace_handler``'s hit."""

    @staticmethod
    def _ftrace_ops_of(p: Kprobe) -> tuple[str, str]:
        """arm_kprobe_ftrace: the ops (and its object) for a probe."""
        if p.post_handler is not None:
            return "kprobe_ipmodify", "kprobe_ipmodify_ops"
        return "kprobe", "kprobe_ftrace_ops"

    def _ftrace_ips(self, ops: str) -> set[int]:
        return {s.addr for s in self._sites.values() if s.ftrace == ops}

    def _set_ftrace_ips(self, ops: str, ips: set[int], obj: str = "") -> None:
        ft = self.ftrace
        if not ips:
            if ops in ft.extra_ops:
                ft.unregister_ftrace_ops(ops)
        elif ops in ft.extra_ops:
            ft.ftrace_set_filter_ips(ops, ips)
        else:
            ft.register_ftrace_ops(ops, self._ftrace_handler, ips, save_regs=True, obj=obj)

    def _prepare_ftrace(self, p: Kprobe, fstart: int, fsize: int) -> None:
        addr = p.addr
        who = self.text_reserved(addr, addr)
        if who is not None and not who.startswith("ftrace"):
            raise KprobeError(f"{p.name} ({addr:#x}) is text reserved by {who}",
                              reason="reserved", addr=addr)
        nop = self.machine.text_read(addr, 5)
        insn = insn_decode_kernel(nop + b"\xcc" * 15, addr)
        ops, obj = self._ftrace_ops_of(p)
        site = _Site(addr, insn, b"", (p.symbol, fstart, fsize), None, ftrace=ops)
        site.probes.append(p)
        ips = self._ftrace_ips(ops) | {addr}
        self._sites[addr] = site
        try:
            self._set_ftrace_ips(ops, ips, obj)
        except BaseException:
            del self._sites[addr]
            raise
        p.registered = True

    def _ftrace_hit(self, regs: PtRegs) -> bool:
        """kprobe_ftrace_handler(ip, parent_ip, op, regs): the probe at ip
        (if any: the list function calls it for every record it runs for)
        with the pt_regs ftrace_regs_caller built."""
        ip = regs.gprs.get("rdi", 0) & _M64
        site = self._sites.get(ip)
        if site is None or not site.ftrace:
            return True                  # not a probe: back to the caller
        ptr = regs.gprs["rcx"] & _M64
        vals = _PT.unpack(regs.mem.read(ptr, _PT.size))
        f = dict(zip(_PT_REGS, vals))
        gprs = {n: f[n] for n in _PT_REGS[:15]}
        h = PtRegs(ip=ip + 1, sp=f["rsp"], flags=f["eflags"], mem=regs.mem, cpu=regs.cpu,
                   gprs=dict(gprs))
        self.stats.ftrace_hits += 1
        moved = False
        for p in list(site.probes):
            p.nhit += 1
            if p.pre_handler is not None and p.pre_handler(p, h):
                moved = True             # it changed ip: no post-handlers, ip stays
                break
        if not moved:
            h.ip = ip + 5                # the NOP, single-stepped
            self._post_handlers(site, h)
            h.ip = f["rip"]
        out = [h.gprs.get(n, gprs[n]) & _M64 for n in _PT_REGS[:15]]
        out += [f["orig_rax"], h.ip & _M64, f["cs"], h.flags & _M64, f["rsp"], f["ss"]]
        if out != list(vals):
            regs.mem.write(ptr, _PT.pack(*out))
        return True
