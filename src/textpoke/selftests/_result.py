# SPDX-License-Identifier: GPL-2.0-only
"""The result of a client self-test: named cases, each passed or not, with
what the running CPUs did meanwhile (oopses, wrong values, syncs)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SelfTestResult"]


@dataclass
class SelfTestResult:
    name: str
    cases: list[dict] = field(default_factory=list)
    oopses: int = 0
    bad: list[dict] = field(default_factory=list)
    syncs: int = 0
    batches: int = 0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c["passed"] for c in self.cases) and not self.oopses \
            and not self.bad

    def case(self, name: str, passed: bool, **detail) -> bool:
        self.cases.append({"name": name, "passed": bool(passed), **detail})
        return passed

    def as_dict(self) -> dict:
        return {"passed": self.passed, "cases": self.cases, "failed":
                [c["name"] for c in self.cases if not c["passed"]],
                "bad": self.bad}
