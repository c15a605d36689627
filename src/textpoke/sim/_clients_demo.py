# SPDX-License-Identifier: GPL-2.0-only
"""The switching clients at work on running vCPUs.

:class:`ClientMachine` boots the bundled kernel image (boot-time patching
as ``make demo`` does), sets every vCPU running the image's
``client_loop`` -- which calls a table of probe functions over and over and
checks every result against what the host currently accepts -- and gives
the host :class:`StaticKeys` and :class:`StaticCalls` for the image.

:meth:`ClientMachine.expect` is the oracle: it narrows what each probe may
return to the values given, waits until every CPU has made two more full
rounds, and checks each CPU's last result.  Around an update the host
first *widens* (old or new value allowed), patches, then expects the new
value: any other value seen at any time by any CPU is counted by the guest
("bad") and reported.

:func:`static_keys_selftest` and :func:`static_call_selftest` are the
kernel's ``lib/test_static_keys.c`` and ``static_call_selftest`` redone on
the running CPUs; :func:`clients_demo_lines` is what ``make demo`` prints
at its end.
"""

from __future__ import annotations

from ..selftests import (Probe, SelfTestResult, many_key_flip, static_call_selftest,
                         static_keys_selftest)
from ..selftests._rig import CLIENT_CPUS, CLIENT_REC, CLIENT_SLOTS, ProbeLoopRig
from ._kernel_rig import SimKernelRig
from ._machine import COARSE, SchedPolicy

__all__ = ["ClientMachine", "Probe", "SelfTestResult", "static_keys_selftest",
           "static_call_selftest", "many_key_flip", "clients_demo_lines", "CLIENT_SLOTS"]


class ClientMachine(SimKernelRig, ProbeLoopRig):
    """The kernel image booted on *cpus* vCPUs with the client loop on each:
    a sim harness around a :class:`~textpoke.kernel.Kernel` (``.kernel``;
    its clients are ``cm.kernel.keys``, ``.calls``, ``.kprobes``,
    ``.modules`` ...).  A context manager; :meth:`close` frees the kernel,
    its core and the machine."""

    def __init__(self, *, cpus: int = 4, seed: int = 0, line_size: int = 64,
                 policy: SchedPolicy = COARSE, features: tuple[str, ...] | None = None,
                 rethunk: bool = False) -> None:
        if not 1 <= cpus <= CLIENT_CPUS:
            raise ValueError(f"cpus must be 1..{CLIENT_CPUS} (the image has {CLIENT_CPUS} "
                             "client records)")
        self._start(cpus=cpus, seed=seed, line_size=line_size, policy=policy,
                    features=features, rethunk=rethunk)
        with self._closing_on_error():
            self.kernel.keys, self.kernel.calls      # read the tables before the CPUs run
        self.recs = self.image.sym("client_recs")
        self.probes: list[Probe] = []
        self.started = False

    # ------------------------------------------------------------ the rig
    # (the kernel's parts -- core, boot, keys, calls -- the records, probes
    # and the oracle are ProbeLoopRig's, sym is KernelRig's: shared with live)
    @property
    def mem(self):
        return self.sim.mem

    def loop_cpus(self) -> list[int]:
        return self.sim.cpus

    def live_cpus(self) -> list[int]:
        dead = {o.cpu for o in self.sim.oopses}
        return [c for c in self.sim.cpus if c not in dead]

    def _run_until(self, pred, max_steps: int) -> bool:
        return self.sim.run_until(pred, max_steps)

    def start(self) -> None:
        for cpu in self.sim.cpus:
            self.sim.start_cpu(cpu, self.sym("client_loop"), {"rdi": self.recs + cpu * CLIENT_REC})
        self.started = True

    @property
    def oopses(self) -> int:
        return len(self.sim.oopses)


def clients_demo_lines(*, cpus: int = 4, seed: int = 0) -> list[str]:
    """The few lines ``make demo`` ends with: each client at work."""
    lines = []
    with ClientMachine(cpus=cpus, seed=seed) as cm:
        r = static_keys_selftest(cm)
        lines.append(f"static keys: lib/test_static_keys.c on {cpus} running vCPUs: "
                     f"{sum(c['passed'] for c in r.cases)}/{len(r.cases)} checks passed, "
                     f"{r.batches} batches, {r.syncs} syncs, {r.oopses} oopses")
        m = many_key_flip(cm, 1000, flips=2)
        c = m.cases[-1]
        lines.append(f"static keys: a key of {c['entries']} sites switched twice while the CPUs "
                     f"run them: {m.batches} batches, {m.syncs} syncs, "
                     f"{'ok' if m.passed else 'FAILED'}, {m.oopses} oopses")
    with ClientMachine(cpus=cpus, seed=seed) as cm:
        r = static_call_selftest(cm)
        lines.append(f"static calls: static_call_selftest and every site kind on {cpus} "
                     f"running vCPUs: {sum(c['passed'] for c in r.cases)}/{len(r.cases)} "
                     f"checks passed, {r.syncs} syncs, {r.oopses} oopses")
    return lines
