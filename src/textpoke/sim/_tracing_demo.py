# SPDX-License-Identifier: GPL-2.0-only
"""The lines ``make demo`` ends with for the tracing clients: the ftrace
startup self-test and the kprobes self-test, each on running vCPUs."""

from __future__ import annotations

from .._ftrace._ring import FTRACE_CPUS
from .._kprobes._guest import build_guest_functions
from ._clients_demo import CLIENT_CPUS, ClientMachine
from ..selftests import ftrace_selftest, kprobes_selftest
from ._ftrace_work import FtraceMachine

__all__ = ["tracing_demo_lines"]


def _checks(cases: list[dict]) -> str:
    return f"{sum(c['passed'] for c in cases)}/{len(cases)} checks passed"


def tracing_demo_lines(*, cpus: int = 4, seed: int = 0) -> list[str]:
    lines = []
    n = min(cpus, FTRACE_CPUS)
    with FtraceMachine(cpus=n, seed=seed) as fm:
        r = ftrace_selftest(fm)
        lines.append(f"ftrace: startup self-test on {n} running vCPUs (trace counts == the "
                     f"workload's own, filters, profiler, overruns counted): {_checks(r.cases)}, "
                     f"{r.entries:,} trace entries, {r.batches} batches, {r.syncs} syncs, "
                     f"{r.oopses} oopses")
    n = min(cpus, CLIENT_CPUS)
    with ClientMachine(cpus=n, seed=seed) as cm:
        kp = cm.kernel.kprobes
        g = build_guest_functions(kp, cm.sim)
        s0 = cm.core.stats.syncs
        r = kprobes_selftest(cm, kp, g)
        lines.append(f"kprobes: lib/test_kprobes.c, kretprobes and an optimised probe on {n} "
                     f"running vCPUs: {_checks(r.cases)}, {cm.core.stats.syncs - s0} syncs, "
                     f"{len(cm.sim.oopses)} oopses")
    return lines
