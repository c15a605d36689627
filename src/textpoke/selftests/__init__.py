# SPDX-License-Identifier: GPL-2.0-only
"""The clients' self-tests (the kernel's ``lib/test_static_keys.c``,
``static_call_selftest``, the function tracer's startup test and
``lib/test_kprobes.c``, the module loader's),
written against a :class:`~textpoke.kernel.Kernel` and a
:class:`ClientRig` -- the probe loop running on every CPU -- so that they
need only the machine's protocol and capabilities, never a backend."""

from ._ftrace import DEMO_FUNCTIONS, FtraceRig, FtraceSelfTest, expected_hits, ftrace_selftest
from ._fgraph import GraphSelfTest, graph_selftest
from ._kprobes import RAND1, kprobes_selftest
from ._module import module_selftest
from ._result import SelfTestResult
from ._rig import ClientRig, Probe
from ._static import many_key_flip, static_call_selftest, static_keys_selftest

__all__ = ["ClientRig", "Probe", "SelfTestResult", "kprobes_selftest", "module_selftest", "RAND1",
           "static_keys_selftest", "static_call_selftest", "many_key_flip",
           "FtraceRig", "FtraceSelfTest", "ftrace_selftest", "expected_hits", "DEMO_FUNCTIONS",
           "GraphSelfTest", "graph_selftest"]
