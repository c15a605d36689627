# SPDX-License-Identifier: GPL-2.0-only
"""The ftrace client: ``ftrace_init`` turns every ``__mcount_loc`` call into
the ideal NOP5; run-time enabling builds on it."""

from ._boot import ftrace_init

__all__ = ["ftrace_init"]

# run-time ftrace: sites, the guest ring buffers, the tracer at work
from ._ops import (DynFtrace, Ftrace, FtraceBugError, FtraceDisabledError,  # noqa: E402
                   FtraceFilterError, FtraceUpdate)
from ._ring import RingBuffer, TraceEntry, format_trace_line  # noqa: E402

__all__ += ["DynFtrace", "Ftrace", "FtraceBugError", "FtraceDisabledError", "FtraceFilterError",
            "FtraceUpdate",
            "RingBuffer", "TraceEntry", "format_trace_line"]
