# SPDX-License-Identifier: GPL-2.0-only
"""Errors of the live machine, in psutil's manner: each carries the pid
(and the process name when known) and says what to do about it."""

from __future__ import annotations

from .._errors import MachineError

__all__ = ["LiveError", "NoSuchProcess", "AccessDenied", "ProcessChanged"]


class LiveError(MachineError):
    """Base of the live machine's errors."""

    def __init__(self, pid: int, msg: str, name: str | None = None) -> None:
        self.pid = pid
        self.name = name
        self.msg = msg
        super().__init__(f"{msg} (pid={pid}{f', name={name!r}' if name else ''})")


class NoSuchProcess(LiveError):
    """The process (or the thread asked for) does not exist, or is gone."""


class AccessDenied(LiveError, PermissionError):
    """The kernel refused to let us trace the process."""


class ProcessChanged(LiveError):
    """The pid now names another program: the process exec'd, or exited and
    its pid was reused (its start time in /proc/PID/stat changed)."""


ACCESS_HINT = ("ptrace was refused. Check /proc/sys/kernel/yama/ptrace_scope (1 allows only "
               "descendants: run as the target's parent, or set it to 0; 2 needs "
               "CAP_SYS_PTRACE; 3 forbids ptrace), run as the same user as the target with "
               "CAP_SYS_PTRACE or as root, and make sure no other debugger (gdb, strace) is "
               "attached already")
