# SPDX-License-Identifier: GPL-2.0-only
"""A kernel image booted on vCPUs for a workload to run on: what the sim's
rigs (:class:`~textpoke.sim._clients_demo.ClientMachine`,
:class:`~textpoke.sim._ftrace_work.FtraceMachine`) share.

:meth:`SimKernelRig._start` loads the image (the bundled kernel unless one
is given), boots the workload on *cpus* vCPUs and starts a
:class:`~textpoke.kernel.Kernel` on them; a rig adds its own records after
that inside :meth:`SimKernelRig._closing_on_error`, so that whatever fails
while the rig is being built frees the kernel and the machine.  The rig is
a context manager; :meth:`close` frees the kernel, its core and the
machine.
"""

from __future__ import annotations

from typing import Any

from ..images import load_bundled
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import read_tables
from ..kernel import Kernel
from ..selftests._rig import KernelRig
from ._machine import SchedPolicy
from ._workload import boot_workload

__all__ = ["SimKernelRig"]


class SimKernelRig(KernelRig):
    """The context manager, :meth:`close` and :meth:`_closing_on_error` are
    :class:`~textpoke.selftests._rig.KernelRig`'s, as live's rigs."""

    kernel: Kernel | None = None

    def _start(self, *, cpus: int, seed: int, line_size: int, policy: SchedPolicy,
               image: Any = None, **kernel_args: Any) -> None:
        """Boot *image* on *cpus* vCPUs and start the kernel on it
        (*kernel_args* go to :meth:`Kernel.start`); on failure everything
        is freed again and the error raised."""
        self.image = image or load_bundled(KERNEL_IMAGE)
        self.tables = read_tables(self.image)
        self.w = boot_workload(ncpus=cpus, seed=seed, line_size=line_size, policy=policy,
                               image=self.image)
        self.sim = self.w.sim
        self.kernel = None
        with self._closing_on_error():
            self.kernel = Kernel.start(self.sim, self.image, tables=self.tables, **kernel_args)

    def _free(self) -> None:
        self.w.close()
