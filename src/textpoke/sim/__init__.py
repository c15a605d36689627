# SPDX-License-Identifier: GPL-2.0-only
"""The sim backend: an emulated SMP x86-64 machine on Unicorn."""

from ._machine import COARSE, FINE, FREE, TRACE_EVENTS, Oops, SchedPolicy, SimMachine, VCpu
from ._report import format_oops, format_timeline, oops_report, timeline
from ._workload import Site, Workload, boot_workload

__all__ = ["SimMachine", "SchedPolicy", "Oops", "VCpu", "FINE", "COARSE", "FREE", "TRACE_EVENTS",
           "Site", "Workload", "boot_workload",
           "oops_report", "format_oops", "timeline", "format_timeline"]
