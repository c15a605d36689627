# SPDX-License-Identifier: GPL-2.0-only
"""The module loader's self-test on the sim's running vCPUs: the line
``make demo`` shows.  The self-test itself needs only capabilities and lives
in :mod:`textpoke.selftests`."""

from __future__ import annotations

from ..selftests import module_selftest
from ._clients_demo import ClientMachine

__all__ = ["module_selftest", "module_demo_line"]


def module_demo_line(*, cpus: int = 4, seed: int = 0) -> str:
    """The line ``make demo`` shows for modules."""
    with ClientMachine(cpus=cpus, seed=seed) as cm:
        r = module_selftest(cm)
        refused = sum(c["name"].startswith("refused") and c["passed"] for c in r.cases)
        return (f"modules: a GCC-built module loaded into execmem on {cpus} running vCPUs, "
                f"its key and static call switched both ways, unloaded, reloaded; {refused} bad "
                f"objects refused with the text unchanged: {sum(c['passed'] for c in r.cases)}/"
                f"{len(r.cases)} checks passed, {r.syncs} syncs, {r.oopses} oopses")
