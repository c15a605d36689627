# SPDX-License-Identifier: GPL-2.0-only
"""The bundled guest workload on a sim machine: its patch sites and the
per-CPU records in which every vCPU counts the variant it ran."""

from __future__ import annotations

import functools
import struct

from .._errors import BadAddressError
from ..images import ElfImage, load_bundled
from ..images._kernel import kernel_regions
from ..images._workload import VARIANTS, Site, read_sites   # shared with live
from ._machine import COARSE, SchedPolicy, SimMachine

__all__ = ["Site", "Workload", "boot_workload", "PERCPU_BASE", "PERCPU_STRIDE", "VARIANTS",
           "MODULE_BASE", "MODULE_SIZE"]

PERCPU_BASE = 0x0400_0000
PERCPU_STRIDE = 0x1000
MODULE_BASE = 0x0200_0000
MODULE_SIZE = 0x10_0000

class Workload:
    """A sim machine booted with the workload image."""

    def __init__(self, sim: SimMachine, image: ElfImage, sites: list[Site]) -> None:
        self.sim = sim
        self.image = image
        self.sites = sites
        self.by_name = {s.name: s for s in sites}
        self.loop_top = image.sym("workload_main")

    # --- lifetime: the workload owns its machine ----------------------------
    def close(self) -> None:
        """Close the sim machine (and the TextPoke on it).  Idempotent."""
        self.sim.close()

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- CPU hotplug ----------------------------------------------------------
    def add_cpu(self, *, start: bool = True) -> int:
        """Hot-plug a CPU with its own per-CPU record (zeroed) and, unless
        *start* is false, set it running the workload loop."""
        cpu = self.sim.add_cpu()
        base = self.percpu(cpu)
        try:
            self.sim.mem_read(base, PERCPU_STRIDE)
        except BadAddressError:
            self.sim.add_data_region(base, PERCPU_STRIDE, f"percpu{cpu}")
        if start:
            self.start([cpu])
        return cpu

    def remove_cpu(self, cpu: int) -> None:
        """Unplug *cpu* (see :meth:`SimMachine.remove_cpu`); its record stays readable."""
        self.sim.remove_cpu(cpu)

    def percpu(self, cpu: int) -> int:
        return PERCPU_BASE + cpu * PERCPU_STRIDE

    def iterations(self, cpu: int) -> int:
        return self.sim.read_u64(self.percpu(cpu))

    def counts(self, cpu: int, site: Site) -> list[int]:
        raw = self.sim.mem_read(self.percpu(cpu) + 64 + site.index * 64, 64)
        return list(struct.unpack("<8Q", raw))

    def start(self, cpus: list[int] | None = None) -> None:
        for cpu in (cpus if cpus is not None else self.sim.cpus):
            self.sim.start_cpu(cpu, self.loop_top,
                               {"rbx": self.percpu(cpu), "r12": 0, "r15": 16})

    def watch_sites(self) -> None:
        """With the machine's trace on, record ``("exec", step, cpu, addr,
        bytes)`` each time a CPU is about to execute a site: the bytes its
        own view held there (old, new, an INT3, or torn) -- what it ran.
        Opt-in (the timeline pictures use it): a watched run schedules
        exactly as an unwatched one, its trace just holds more."""
        sim = self.sim
        size = {s.addr: s.length for s in self.sites}

        def seen(cpu: int, addr: int) -> None:
            if sim.trace is not None:
                sim.trace.append(("exec", sim.steps, cpu, addr,
                                  sim.view_read(cpu, addr, size[addr])))
        for c in sim.cpus:
            sim.vcpus[c].watch_exec(size, seen)

    def current(self, site: Site) -> bytes:
        return self.sim.text_read(site.addr, site.length)


@functools.cache
def _sites_of(image: ElfImage) -> tuple[Site, ...]:
    return tuple(read_sites(image))


def boot_workload(*, ncpus: int = 4, seed: int = 0, line_size: int = 64,
                  policy: SchedPolicy = COARSE, image: ElfImage | None = None,
                  module_size: int = MODULE_SIZE, trace: bool = False) -> Workload:
    """Create a sim machine holding an image with the workload linked in
    (default: the bare ``workload.elf``; the kernel image carries it too).
    CPUs are not started.  ``trace=True`` records the machine's timeline
    (see :mod:`textpoke.sim._report`); :meth:`Workload.watch_sites` adds
    what each CPU ran at each site.  Use it as a context manager, or
    ``close()`` it, to free the machine at once."""
    image = image or load_bundled("workload.elf")
    regions = kernel_regions(image)
    regions.append((MODULE_BASE, module_size, "module", "execmem"))
    regions.append((PERCPU_BASE, PERCPU_STRIDE * ncpus, "data", "percpu"))
    sim = SimMachine(regions, ncpus=ncpus, seed=seed, line_size=line_size, policy=policy,
                     trace=trace)
    sim.preempt_addr = image.sym("preempt_point")
    return Workload(sim, image, list(_sites_of(image)))
