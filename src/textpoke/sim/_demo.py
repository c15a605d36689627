# SPDX-License-Identifier: GPL-2.0-only
"""The main job on the sim machine: patch live code on every vCPU, many
times over, through the batch API, and account for what each CPU saw.

:class:`Demo` holds the machine and runs the steps (boot, toggles, final
check) one by one, so that a caller interrupted part-way (Ctrl-C) can still
ask it for the partial :meth:`Demo.result` -- which closes the core first
(finishing or rolling back a batch in flight) and then reads every site
back to count any INT3 of ours left in the text.  :func:`run_demo` is the
one-call form."""

from __future__ import annotations

import time
from typing import Callable

from .._alternative import DEFAULT_FEATURES, alternative_instructions
from .._core import TextPoke
from ..images import load_bundled
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import read_tables
from ..images._workload import DemoResult, flip_sites   # shared with live
from ._machine import COARSE, SchedPolicy
from ._verify import oops_report, stray_int3s, variant_name
from ._workload import Workload, boot_workload

__all__ = ["Demo", "DemoResult", "run_demo"]


def boot_kernel_with_workload(*, cpus: int = 4, seed: int = 0, line_size: int = 64,
                              policy: SchedPolicy = COARSE,
                              features: tuple[str, ...] | None = None) -> tuple[Workload, TextPoke, object]:
    """The bundled kernel image on *cpus* vCPUs, booted: self-tests,
    retpolines, returns, alternatives and SMP locks applied for *features*
    (default: those of ``textpoke boot``) before any CPU runs."""
    image = load_bundled(KERNEL_IMAGE)
    w = boot_workload(ncpus=cpus, seed=seed, line_size=line_size, policy=policy, image=image)
    core = TextPoke(w.sim)
    result = alternative_instructions(core, image, read_tables(image),
                                      DEFAULT_FEATURES if features is None else features)
    return w, core, result


class Demo:
    """The demo's machine and steps.  A context manager: the machine is
    released on exit.

        with Demo(cpus=4) as d:
            d.boot(); d.toggle(1000); d.check_final()
            r = d.result()
    """

    def __init__(self, *, cpus: int = 4, seed: int = 0, line_size: int = 64,
                 policy: SchedPolicy = COARSE, gap_steps: int = 24, boot: bool = True,
                 workload: Workload | None = None) -> None:
        self.t0 = time.perf_counter()
        self.seed, self.gap_steps, self.with_boot = seed, gap_steps, boot and workload is None
        self.image = load_bundled(KERNEL_IMAGE) if self.with_boot else None
        self._own = workload is None
        self.w = workload or boot_workload(ncpus=cpus, seed=seed, line_size=line_size,
                                           policy=policy, image=self.image)
        try:
            self.core = TextPoke(self.w.sim)
        except BaseException:
            self._close_machine()
            raise
        self.boot_info: dict | None = None
        self.sites = [s for s in self.w.sites if s.kind != "nop5-int3"]
        self.flipped = {s.name: False for s in self.sites}
        self.toggles = 0
        self.toggles_done = 0
        self.final_ok: bool | None = None
        self.started = False

    def __enter__(self) -> "Demo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_machine(self) -> None:
        if not self._own:
            return
        self.w.close()

    def close(self) -> None:
        try:
            self.core.close()
        finally:
            self._close_machine()

    def boot(self, features: tuple[str, ...] | None = None) -> None:
        """Boot-time patching of the kernel image, before any CPU runs."""
        if not self.with_boot:
            return
        res = alternative_instructions(self.core, self.image, read_tables(self.image),
                                       DEFAULT_FEATURES if features is None else features)
        counts = res.counts()
        self.boot_info = {
            "image": "kernel.elf", "features": list(res.features),
            "selftests": {t.name: t.passed for t in res.selftests},
            "alternatives": counts.get(".altinstructions", {}),
            "patched": {k: v for k, v in counts.items()},
        }

    def toggle(self, toggles: int, progress: Callable[[int, int], None] | None = None) -> None:
        """Start the CPUs and flip every site *toggles* times, one batch each."""
        w, sim, core = self.w, self.w.sim, self.core
        self.toggles = toggles
        if not self.started:
            w.start()
            self.started = True
            sim.run(self.gap_steps * 4)
        for i in range(toggles):
            if sim.oopses:
                break
            flip_sites(core, self.sites, self.flipped)
            self.toggles_done = i + 1
            sim.run(self.gap_steps)
            if progress:
                progress(i + 1, toggles)

    def check_final(self) -> bool:
        """Every CPU must now run the final variant at every site."""
        w, sim, sites = self.w, self.w.sim, self.sites
        final_ok = True
        if not sim.oopses:
            # finish the iteration in flight (it may record what it ran before)
            it_done = [w.iterations(c) for c in sim.cpus]
            sim.run_until(lambda: bool(sim.oopses) or all(
                w.iterations(c) >= it_done[c] + 1 for c in sim.cpus), 1_000_000)
            mid = {(c, s.name): w.counts(c, s) for c in sim.cpus for s in sites}
            it0 = [w.iterations(c) for c in sim.cpus]
            sim.run_until(lambda: bool(sim.oopses) or all(
                w.iterations(c) >= it0[c] + 2 for c in sim.cpus), 1_000_000)
            for c in sim.cpus:
                for s in sites:
                    d = [a - b for a, b in zip(w.counts(c, s), mid[(c, s.name)])]
                    want = {2, 3} if self.flipped[s.name] else {1, 3}
                    if any(n and v not in want for v, n in enumerate(d)):
                        final_ok = False
        self.final_ok = final_ok and not sim.oopses
        return self.final_ok

    def result(self, *, interrupted: bool = False) -> DemoResult:
        """What ran so far.  Closes the core first (a batch in flight is
        finished or rolled back), then reads the text back: ``int3_left``
        counts, it does not assume."""
        w, sim, core = self.w, self.w.sim, self.core
        core.close()
        int3_left = len(stray_int3s(w))
        site_rows = []
        misbehaviours = 0
        for s in w.sites:
            tot = [0] * 8
            for c in sim.cpus:
                for v, n in enumerate(w.counts(c, s)):
                    tot[v] += n
            bad = sum(n for v, n in enumerate(tot) if v not in s.allowed)
            misbehaviours += bad
            site_rows.append({
                "name": s.name, "addr": s.addr, "kind": s.kind, "len": s.length,
                "old": s.old.hex(), "new": s.new.hex(),
                "now": sim.text_read(s.addr, s.length).hex(),
                "behaviours": {variant_name(v): n for v, n in enumerate(tot) if n},
                "misbehaviours": bad,
            })
        oopses = []
        for o in sim.oopses:
            d = o.as_dict()
            d["report"] = oops_report(o, w.image)
            oopses.append(d)
        return DemoResult(
            cpus=sim.ncpus, toggles=self.toggles, seed=self.seed, sites=site_rows,
            instructions=[c.instructions for c in sim.vcpus],
            iterations=[w.iterations(c) for c in sim.cpus],
            int3_hits=core.stats.int3_hits, int3_emulated=core.stats.int3_emulated,
            syncs=core.stats.syncs, batches=core.stats.batches,
            pokes=core.events.counts.get("batch", 0),
            writes=sum(core.events.counts.get(p, 0) for p in ("int3", "tail", "first")),
            oopses=oopses, misbehaviours=misbehaviours,
            final_ok=None if self.final_ok is None else (self.final_ok and not sim.oopses),
            elapsed=time.perf_counter() - self.t0,
            steps=sim.steps, ipis=sum(c.ipis_taken for c in sim.vcpus),
            line_refills=sum(c.refreshes for c in sim.vcpus), boot=self.boot_info,
            toggles_done=self.toggles_done, interrupted=interrupted, int3_left=int3_left,
            line_size=sim.line_size, with_boot=self.with_boot,
        )


def run_demo(*, cpus: int = 4, toggles: int = 1000, seed: int = 0, line_size: int = 64,
             policy: SchedPolicy = COARSE, gap_steps: int = 24, boot: bool = True,
             progress: Callable[[int, int], None] | None = None,
             workload: Workload | None = None) -> DemoResult:
    """Boot the kernel image (or, with ``boot=False``, the bare workload) on
    *cpus* vCPUs, start the workload on all of them, and toggle every site
    *toggles* times (one batch per toggle) while they run it."""
    with Demo(cpus=cpus, seed=seed, line_size=line_size, policy=policy, gap_steps=gap_steps,
              boot=boot, workload=workload) as d:
        d.boot()
        d.toggle(toggles, progress)
        d.check_final()
        return d.result()
