# SPDX-License-Identifier: GPL-2.0-only
"""The sim backend: an emulated SMP x86-64 machine on Unicorn."""

from ._machine import COARSE, FINE, FREE, Oops, SchedPolicy, SimMachine, VCpu
from ._workload import Site, Workload, boot_workload

__all__ = ["SimMachine", "SchedPolicy", "Oops", "VCpu", "FINE", "COARSE", "FREE",
           "Site", "Workload", "boot_workload"]
