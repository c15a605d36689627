# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke kprobe``: a kprobe (or kretprobe, or optimised kprobe) on the
bundled image -- or on the self-test's functions generated into execmem --
while every vCPU runs the probe loop.  Prints the hits with the registers
the handler saw.  Exit 1 on a failed self-test, an oops or a wrong result
computed by a CPU; 2 on an unknown symbol or a place that cannot be
probed."""

from __future__ import annotations

import argparse

from ._args import U64, Bounds, UsageError, checked, int_in, number
from ._real_clients import add_image_arguments, refuse_image_only, run_on_image
from .keys import add_common, on_clients, report_selftest, start_workload

__all__ = ["add_arguments", "run", "NAME", "HELP", "DESCRIPTION"]

NAME = "kprobe"
HELP = "kprobes, kretprobes and optimised kprobes on running vCPUs"
DESCRIPTION = ("Boot the kernel image, run the probe loop on every vCPU and, while they\n"
               "run, put a kprobe on SYMBOL[+OFF] (an image function, or one of the\n"
               "self-test's generated functions: kprobe_target, kp_opt_target, ...),\n"
               "printing each hit with the registers the handler saw; or redo\n"
               "lib/test_kprobes.c with --selftest.")
PASSES = Bounds(1, 1000)
SHOW = Bounds(0, 100000)
_REGS = ("rdi", "rsi", "rdx", "rax")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("symbol", nargs="?", metavar="SYMBOL[+OFF]",
                   help="where to probe (a bare symbol skips the fentry NOP)")
    p.add_argument("--optimize", action="store_true",
                   help="optimise the probe (JMP32 to a detour buffer) once registered")
    p.add_argument("--retprobe", action="store_true",
                   help="a kretprobe: print each return value (rax)")
    p.add_argument("--selftest", action="store_true",
                   help="lib/test_kprobes.c, an optimised probe and the refusals on the "
                        "running CPUs")
    p.add_argument("--passes", type=int_in(PASSES), default=3, metavar="N",
                   help=f"rounds of the probe loop every CPU makes with the probe armed, "
                        f"{PASSES} (default 3)")
    p.add_argument("--show", type=int_in(SHOW), default=8, metavar="N",
                   help=f"hits to print, {SHOW} (default 8)")
    add_common(p)
    add_image_arguments(p, ("kprobes", "optprobes", "ftrace"))
    p.add_argument("--optprobe-op", metavar="ADDR", type=checked(kernel_addr, "ADDR"),
                   help="with --image --optimize: the address of the kernel's struct "
                        "optimized_kprobe for the probe (kmalloc'ed; the optprobe buffer "
                        "loads it into rdi -- read it from the run-time reference's optinsn "
                        "page); without it the buffer's own address stands for it")


def kernel_addr(text: str) -> int:
    v = number(text, U64, "address")
    if v < 1 << 63:
        raise UsageError(f"{text} is not a kernel address (0xffff...)")
    return v


def run_image(args: argparse.Namespace) -> int:
    """``kprobe --image``: the probe registered (and optimised) on the real
    image offline -- the text as the kernel leaves it with the probe armed."""
    if args.selftest or not args.symbol:
        raise UsageError("with --image: give SYMBOL[+OFF] (--selftest runs on the sim's CPUs)")
    if args.optprobe_op is not None and not args.optimize:
        raise UsageError("--optprobe-op applies to an optimised probe: give --optimize too")

    def step(ok, d: dict, lines: list[str]) -> bool:
        from .._errors import NotSupportedError
        from .._kprobes import KprobeError
        try:
            kp = ok.kernel.kprobes
            if args.retprobe:
                probe = kp.register_kretprobe(args.symbol).kp
            else:
                probe = kp.register_kprobe(args.symbol)
        except NotSupportedError as e:
            raise UsageError(f"{e}: give --kprobe-slots ADDR (the kernel's insn-slot "
                             "page)") from None
        except KprobeError as e:
            raise UsageError(f"cannot probe {args.symbol}: {e}") from None
        info = kp.site_info(probe)
        d["probe"] = {"symbol": probe.symbol, "offset": probe.offset, "addr": hex(probe.addr),
                      "insn": info["insn"], "how": info["how"], "retprobe": args.retprobe,
                      "preemption": ok.kernel.config["PREEMPTION"],
                      "kprobes_on_ftrace": ok.kernel.config["KPROBES_ON_FTRACE"]}
        # as kprobe_events does: the probe is a trace event, and enabling an
        # event starts the tracers' cmdline recording (scheduler tracepoints)
        from ..kernel._offline import tracing_cmdline_record
        try:
            d["tracepoints"] = tracing_cmdline_record(ok.kernel, True)
        except ValueError as e:
            d["tracepoints_refused"] = str(e)
        if args.optimize:
            if args.optprobe_op is not None:
                kp.optprobe_ops[probe.addr] = kernel_addr(args.optprobe_op)
            _optimize(kp, probe, d, lines)
        lines.append(f"{'kretprobe' if args.retprobe else 'kprobe'} {probe.name} "
                     f"({probe.addr:#x}: {info['insn']}): {d['probe']['how']}")
        return False

    return run_on_image(args, ("kprobes", "optprobes", "ftrace"), step)


def _optimize(kp, probe, d: dict, lines: list[str]) -> None:
    """--optimize: the probe becomes a JMP, or the report says why not."""
    from .._kprobes import KprobeError
    try:
        kp.optimize_kprobe(probe)
        d["probe"]["how"] = "optimized"
    except KprobeError as e:
        d["probe"]["optimize_refused"] = str(e)
        lines.append(f"not optimised: {e}")


def _probe_call(cm, kp, addr: int, name: str) -> int | None:
    """Let the CPUs call *name* too, checking its result, when it is a
    function that returns (computed once before anything is armed)."""
    try:
        want = cm.sim.call(addr, 3, max_insns=100_000)
    except Exception:
        return None
    return cm.add_probe(name, addr=addr, arg=3, allow=[want])


def run(args: argparse.Namespace) -> int:
    if getattr(args, "image", None):
        return run_image(args)
    refuse_image_only(args, ("kprobes", "optprobes", "ftrace"))
    if args.optprobe_op is not None:
        raise UsageError("--optprobe-op applies to a real kernel image: give --image too")
    if not args.symbol and not args.selftest:
        raise UsageError("give SYMBOL[+OFF] or --selftest")
    from .._kprobes import KprobeError
    from .._kprobes._guest import build_guest_functions
    from ..selftests._rig import _CALLS
    from ..sim._clients_demo import ClientMachine
    from ..selftests import kprobes_selftest

    def body(cm, d: dict, lines: list[str]) -> bool:
        # cm.kernel's kprobes: closing the kernel (at the end, or at once on
        # an interrupt) unregisters every probe, so no INT3 stays armed
        return _body(cm, cm.kernel.kprobes, d, lines)

    def _body(cm, kp, d: dict, lines: list[str]) -> bool:
        g = build_guest_functions(kp, cm.sim)
        failed = False
        if args.symbol:
            try:
                name, off, addr, _sz = kp.resolve(args.symbol)
            except KprobeError as e:
                raise UsageError(str(e)) from None
        if args.selftest:
            r = kprobes_selftest(cm, kp, g)
            failed |= not report_selftest(d, lines, f"kprobes self-test on {args.cpus} running vCPUs",
                                          r.cases, r.passed, r.bad)
        if args.symbol:
            slot = _probe_call(cm, kp, kp.functions[name][0], name)
            if not cm.started:
                start_workload(cm)
            hits: list[dict] = []

            def pre(p, regs):
                hits.append({"cpu": regs.cpu, "ip": regs.ip,
                             **{k: regs.gprs.get(k) for k in _REGS}, "sp": regs.sp})

            def ret(ri, regs):
                hits.append({"cpu": regs.cpu, "ip": regs.ip, "rax": regs.gprs.get("rax"),
                             "sp": regs.sp})

            def calls() -> dict[int, int]:
                if slot is None:
                    return {}
                return {c: cm._r(cm._slot(c, slot, _CALLS)) for c in cm.sim.cpus}

            calls0 = calls()
            try:
                if args.retprobe:
                    rp = kp.register_kretprobe(args.symbol, ret)
                    probe = rp.kp
                else:
                    probe = kp.register_kprobe(args.symbol, pre)
            except KprobeError as e:
                raise UsageError(f"cannot probe {args.symbol}: {e}") from None
            info = kp.site_info(probe)
            d["probe"] = {"symbol": probe.symbol, "offset": probe.offset, "addr": probe.addr,
                          "insn": info["insn"], "how": info["how"], "retprobe": args.retprobe}
            d["hits"], d["nhit"] = hits, 0
            if args.optimize:
                _optimize(kp, probe, d, lines)
            try:
                cm.wait_passes(args.passes)
                calls1 = calls()        # before unregistering: every one armed
            finally:
                d["hits"] = hits[:args.show]
                d["nhit"] = len(hits)
            nhit = len(hits)
            if args.retprobe:
                kp.unregister_kretprobe(rp)
            else:
                kp.unregister_kprobe(probe)
            d["detour_hits"] = kp.stats.detour_hits
            what = "kretprobe" if args.retprobe else "kprobe"
            # Hits are owed only for calls that certainly began after the
            # probe was armed: on each CPU, every call it completed after
            # the first (which may have begun before).  With --passes 1 a
            # CPU may finish its round without calling the function again:
            # 0 hits then is no failure.
            owed = sum(max(0, calls1[c] - calls0.get(c, calls1[c]) - 1) for c in calls1)
            d["hits_owed"] = owed
            failed |= nhit < owed
            lines.append(f"{what} {probe.name} ({probe.addr:#x}: {info['insn']}), "
                         f"{d['probe']['how']}: {len(hits)} hits"
                         + ("" if hits else " (no CPU ran the probed code while it was armed)"
                            if owed == 0 else f" (FAILED: at least {owed} owed)"))
            for h in hits[:args.show]:
                regs = " ".join(f"{k}={h[k]:#x}" for k in ("ip", *_REGS, "sp")
                                if h.get(k) is not None)
                lines.append(f"  cpu{h['cpu']} {regs}")
            if slot is not None:
                wrong = cm.expect({slot: cm._r(cm._slot(cm.sim.cpus[0], slot, 2))})
                d["wrong"] = {str(k): v for k, v in wrong.items()}
                failed |= bool(wrong)
            bad = cm.bad()
            d["bad"] = bad
            failed |= bool(bad)
        return failed

    return on_clients(args, lambda: ClientMachine(cpus=args.cpus, seed=args.seed), body)
