# SPDX-License-Identifier: GPL-2.0-only
"""How the sim's scheduler interleaves vCPUs, tasks and line refills: the
policy and its presets (FINE for verification, COARSE for throughput,
FREE for running to preemption points)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedPolicy", "FINE", "COARSE", "FREE", "WRITE_GRANULARITIES"]


#: How the patcher's writes reach text: ``"byte"`` stores one byte at a time
#: and yields after each (every byte-granular interleaving is reachable: the
#: verification default); ``"poke"`` stores the whole write with one memmove,
#: marks the lines it touched stale, and yields once (throughput).
WRITE_GRANULARITIES = ("byte", "poke")


@dataclass(frozen=True, slots=True)
class SchedPolicy:
    """How the scheduler interleaves vCPUs, tasks and line refreshes.

    ``slice_min/max``: guest instructions per vCPU slice (count mode), or,
    with ``until_preempt``, run until the guest's preemption point.
    ``refresh_prob``: chance per decision that one stale line of one vCPU's
    view is refilled.  ``task_burst``: steps a task may take per turn.
    ``ipi_latency``: an IPI is delivered up to this many scheduler decisions
    after it is sent (drawn per IPI); the CPU takes it at its first
    instruction boundary after delivery.  ``write_granularity``: see
    :data:`WRITE_GRANULARITIES`.  ``pokes_per_step``: with "poke"
    granularity, how many pokes of one ``text_poke_write_many`` are stored
    in one scheduler step (others look between steps, not between those
    pokes: a batch phase's independent sites, written while the patcher
    keeps its turn).
    """

    slice_min: int = 1
    slice_max: int = 8
    refresh_prob: float = 0.25
    task_burst: int = 1
    until_preempt: bool = False
    ipi_latency: int = 0
    cpu_weight: float = 1.0
    write_granularity: str = "byte"
    pokes_per_step: int = 1

    def __post_init__(self) -> None:
        if self.pokes_per_step < 1:
            raise ValueError(f"pokes_per_step must be >= 1, not {self.pokes_per_step}")
        if self.write_granularity not in WRITE_GRANULARITIES:
            raise ValueError(f"write_granularity must be one of {WRITE_GRANULARITIES}, "
                             f"not {self.write_granularity!r}")


FINE = SchedPolicy(ipi_latency=48)
COARSE = SchedPolicy(slice_min=20, slice_max=400, refresh_prob=0.2, task_burst=16, ipi_latency=4,
                     write_granularity="poke")
FREE = SchedPolicy(slice_min=1, slice_max=1, refresh_prob=0.0, task_burst=1 << 30, until_preempt=True,
                   write_granularity="poke")
