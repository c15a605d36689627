# SPDX-License-Identifier: GPL-2.0-only
"""The main job on the sim machine: patch live code on every vCPU, many
times over, through the batch API, and account for what each CPU saw."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .._alternative import DEFAULT_FEATURES, alternative_instructions
from .._core import TextPoke
from ..images import load_bundled
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import read_tables
from ._machine import COARSE, SchedPolicy
from ._workload import VARIANTS, Workload, boot_workload

__all__ = ["DemoResult", "run_demo"]


@dataclass(slots=True)
class DemoResult:
    cpus: int
    toggles: int
    seed: int
    sites: list[dict]
    instructions: list[int]
    iterations: list[int]
    int3_hits: int
    int3_emulated: int
    syncs: int
    batches: int
    pokes: int
    writes: int
    oopses: list[dict]
    misbehaviours: int
    final_ok: bool
    elapsed: float
    steps: int
    ipis: int
    line_refills: int
    boot: dict | None = None
    events: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "events"}
        d["oopses_detail"] = d.pop("oopses")
        d["oopses"] = len(self.oopses)
        return d


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


def run_demo(*, cpus: int = 4, toggles: int = 1000, seed: int = 0, line_size: int = 64,
             policy: SchedPolicy = COARSE, gap_steps: int = 24, boot: bool = True,
             progress: Callable[[int, int], None] | None = None,
             workload: Workload | None = None) -> DemoResult:
    """Boot the kernel image (or, with ``boot=False``, the bare workload) on
    *cpus* vCPUs, start the workload on all of them, and toggle every site
    *toggles* times (one batch per toggle) while they run it."""
    t0 = time.perf_counter()
    boot_info = None
    if workload is not None:
        w, core = workload, TextPoke(workload.sim)
    elif boot:
        w, core, res = boot_kernel_with_workload(cpus=cpus, seed=seed, line_size=line_size,
                                                 policy=policy)
        counts = res.counts()
        boot_info = {
            "image": "kernel.elf", "features": list(res.features),
            "selftests": {t.name: t.passed for t in res.selftests},
            "alternatives": counts.get(".altinstructions", {}),
            "patched": {k: v for k, v in counts.items()},
        }
    else:
        w = boot_workload(ncpus=cpus, seed=seed, line_size=line_size, policy=policy)
        core = TextPoke(w.sim)
    sim = w.sim
    sites = [s for s in w.sites if s.kind != "nop5-int3"]
    w.start()
    sim.run(gap_steps * 4)
    flipped = {s.name: False for s in sites}
    for i in range(toggles):
        if sim.oopses:
            break
        with core.batch():
            for s in sites:
                core.smp_text_poke_batch_add(s.addr, s.old if flipped[s.name] else s.new)
                flipped[s.name] = not flipped[s.name]
        sim.run(gap_steps)
        if progress:
            progress(i + 1, toggles)
    # Every CPU must now run the final variant at every site.
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
                want = {2, 3} if flipped[s.name] else {1, 3}
                if any(n and v not in want for v, n in enumerate(d)):
                    final_ok = False
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
            "behaviours": {VARIANTS[v]: n for v, n in enumerate(tot) if n},
            "misbehaviours": bad,
        })
    return DemoResult(
        cpus=sim.ncpus, toggles=toggles, seed=seed, sites=site_rows,
        instructions=[c.instructions for c in sim.vcpus],
        iterations=[w.iterations(c) for c in sim.cpus],
        int3_hits=core.stats.int3_hits, int3_emulated=core.stats.int3_emulated,
        syncs=core.stats.syncs, batches=core.stats.batches,
        pokes=core.events.counts.get("batch", 0),
        writes=sum(core.events.counts.get(p, 0) for p in ("int3", "tail", "first")),
        oopses=[o.as_dict() for o in sim.oopses], misbehaviours=misbehaviours,
        final_ok=final_ok and not sim.oopses, elapsed=time.perf_counter() - t0,
        steps=sim.steps, ipis=sum(c.ipis_taken for c in sim.vcpus),
        line_refills=sum(c.refreshes for c in sim.vcpus), boot=boot_info,
    )
