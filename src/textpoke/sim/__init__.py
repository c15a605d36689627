# SPDX-License-Identifier: GPL-2.0-only
"""The sim backend: an emulated SMP x86-64 machine on Unicorn."""

from .._core._lazy import lazy_names
from ._machine import COARSE, FINE, FREE, TRACE_EVENTS, Oops, SchedPolicy, SimMachine, VCpu
from ._report import format_oops, format_timeline, oops_report, timeline
from ._workload import Site, Workload, boot_workload

#: public name -> the module that defines it, imported when first used
#: (PEP 562): the kernel rigs load the clients, verify the oracle
_LAZY = {
    # the bundled kernel booted with its clients: the probe loop / the ftrace work loop
    "ClientMachine": "._clients_demo", "FtraceMachine": "._ftrace_work",
    # the schedule explorer behind `textpoke verify`
    "verify": "._verify", "run_schedule": "._verify", "schedule_seeds": "._verify",
    "SCENARIOS": "._verify", "VerifyReport": "._verify",
}
__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = ["SimMachine", "SchedPolicy", "Oops", "VCpu", "FINE", "COARSE", "FREE", "TRACE_EVENTS",
           "Site", "Workload", "boot_workload",
           "oops_report", "format_oops", "timeline", "format_timeline", *_LAZY]
