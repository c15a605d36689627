# SPDX-License-Identifier: GPL-2.0-only
"""The clients' self-tests (the kernel's ``lib/test_kprobes.c``, the module
loader's), written against a :class:`~textpoke.kernel.Kernel` and a
:class:`ClientRig` -- the probe loop running on every CPU -- so that they
need only the machine's protocol and capabilities, never a backend."""

from ._kprobes import RAND1, kprobes_selftest
from ._module import module_selftest
from ._result import SelfTestResult
from ._rig import ClientRig

__all__ = ["ClientRig", "SelfTestResult", "kprobes_selftest", "module_selftest", "RAND1"]
