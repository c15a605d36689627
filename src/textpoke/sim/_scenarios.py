# SPDX-License-Identifier: GPL-2.0-only
"""What ``verify`` checks, as data: the scenarios, the strategies, and the
records of a schedule -- the six values that decide it (:class:`Replay`),
what the oracle found (:class:`Violation`, :class:`ScheduleResult`) --
and the checks of a campaign's names."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._core import MUTATIONS

if TYPE_CHECKING:                 # the data alone loads no machine
    from ._workload import Workload

__all__ = ["Scenario", "SCENARIOS", "STRATEGIES", "Replay", "Violation", "ScheduleResult",
           "check_arguments", "stray_int3s"]

STRATEGIES = ("int3", "naive")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    batches: tuple[tuple[str, ...], ...]
    shuffle: bool = False
    probe: bool = False
    #: the two sites of ``sim._teeth`` are installed (the loop calls them)
    teeth: bool = False


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("nop2-jmp8", "NOP2 -> JMP8 (a jump label, short form)", (("nop2_jmp8",),)),
    Scenario("nop5-jmp32", "NOP5 -> JMP32 (a jump label)", (("nop5_jmp32",),)),
    Scenario("call", "CALL retarget (a static call site)", (("call",),)),
    Scenario("ret-jmp32", "RET; INT3x4 -> JMP32 (a static-call trampoline)", (("ret_jmp",),)),
    Scenario("jcc32", "Jcc.d32 retarget, a length-6 entry", (("jcc32",),)),
    Scenario("xline", "NOP5->JMP32 and Jcc.d32 sites that cross a 64-byte line",
             (("xline_nop5", "xline_jcc32"),)),
    Scenario("multi", "all seven sites in one batch, added in random order",
             (("nop2_jmp8", "nop5_jmp32", "call", "ret_jmp", "jcc32", "xline_nop5",
               "xline_jcc32"),), shuffle=True),
    Scenario("int3-entry", "a probe's INT3 installed as a batch entry (nothing "
             "to write after it, so no final sync), then a second batch while the "
             "probe fires", (("probe",), ("nop5_jmp32", "call")), probe=True),
    Scenario("call-xline", "CALL retarget, all four displacement bytes differ, across "
             "a line (E8 d0 | d1 d2 d3)", (("xline_call",),), teeth=True),
    Scenario("jcc32-xline", "Jcc.d32 retarget, all four displacement bytes differ, across "
             "a line (0F 84 d0 | d1 d2 d3)", (("xline_jcc32w",),), teeth=True),
)}


@dataclass(frozen=True, slots=True)
class Replay:
    """Everything that shapes one schedule: run it again with these and the
    same thing happens, event for event."""

    scenario: str
    seed: int
    strategy: str = "int3"
    mutation: str | None = None
    cpus: int = 3
    line_size: int = 64

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "strategy": self.strategy, "mutation": self.mutation,
                "cpus": self.cpus, "line_size": self.line_size, "seed": self.seed}

    def argv(self) -> list[str]:
        """The command line that replays this schedule."""
        a = ["textpoke", "verify", "--scenario", self.scenario, "--strategy", self.strategy]
        if self.mutation:
            a += ["--mutation", self.mutation]
        return a + ["--cpus", str(self.cpus), "--line-size", str(self.line_size),
                    "--replay", str(self.seed)]

    def command(self) -> str:
        return shlex.join(self.argv())

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`run_schedule` after scenario and seed."""
        return {"strategy": self.strategy, "mutation": self.mutation, "ncpus": self.cpus,
                "line_size": self.line_size}


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str          # oops | mixed | stale | hang | error
    scenario: str
    seed: int
    detail: str
    replay: Replay | None = None

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "scenario": self.scenario, "seed": self.seed,
             "detail": self.detail}
        if self.replay is not None:
            d["replay"] = self.replay.as_dict()
            d["replay_command"] = self.replay.command()
        return d


@dataclass(slots=True)
class ScheduleResult:
    scenario: str
    seed: int
    violations: list[Violation]
    steps: int
    int3_emulated: int
    syncs: int
    #: per site, times each variant ran (named as in ``VARIANTS``), all CPUs
    behaviours: dict[str, dict[str, int]] = field(default_factory=dict)
    replay: Replay | None = None
    #: one report per oops (``sim._report.oops_report``: RIP as symbol+off/size,
    #: CR2, registers, Code: bytes)
    oopses: list[dict] = field(default_factory=list)
    #: sites whose first byte is an INT3 of ours once the schedule is over
    int3_left: int = 0
    #: the schedule's timeline when run with ``trace=True`` (``sim._report.timeline``)
    timeline: list[dict] | None = None

    def as_dict(self) -> dict:
        d = {"params": self.replay.as_dict() if self.replay else None,
             "replay_command": self.replay.command() if self.replay else None,
             "steps": self.steps, "int3_emulated": self.int3_emulated, "syncs": self.syncs,
             "int3_left": self.int3_left,
             "violations": [v.as_dict() for v in self.violations],
             "behaviours": self.behaviours, "oopses": self.oopses}
        if self.timeline is not None:
            d["timeline"] = self.timeline
        return d


def stray_int3s(w: Workload) -> list[str]:
    """Names of the workload's sites whose first byte reads INT3 although
    neither their old nor their new bytes start with one: an INT3 of the
    protocol left behind.  Read back from the text, not assumed."""
    return [s.name for s in w.sites
            if s.old[:1] != b"\xcc" and s.new[:1] != b"\xcc"
            and w.sim.text_read(s.addr, 1) == b"\xcc"]


def check_arguments(scenarios: list[str], strategy: str, mutation: str | None) -> None:
    """ValueError, with a message for people, for any name verify does not know."""
    for s in scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (use {', '.join(STRATEGIES)})")
    if mutation is not None and mutation not in MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r} (use {', '.join(MUTATIONS)})")
    if strategy == "naive" and mutation:
        raise ValueError("mutations remove steps of the int3 protocol; they do not apply to naive")
