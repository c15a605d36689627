# SPDX-License-Identifier: GPL-2.0-only
"""The live machine: a running Linux x86-64 process as a textpoke machine.

    >>> from textpoke import TextPoke
    >>> from textpoke.live import LiveMachine
    >>> with LiveMachine(pid) as m, TextPoke(m) as core:       # doctest: +SKIP
    ...     with core.batch():
    ...         core.smp_text_poke_batch_add(addr, bytes.fromhex("e9 00 00 00 00"))

See :mod:`textpoke.live._machine` for what serialises a thread, the trap
policies (``park`` / ``emulate``), the strategies (``int3`` /
``stop-machine``) and what is left behind if the patcher is SIGKILLed;
:mod:`textpoke.live._regions` for what a process lends the clients
(``EXECMEM``, ``DATA``, ``PERCPU``, ``QUIESCE``), and
:mod:`textpoke.live._rig` for the clients' self-tests run on a process.
"""

from .._core._lazy import lazy_names as _lazy_names
from ._errors import AccessDenied, LiveError, NoSuchProcess, ProcessChanged
from ._machine import STRATEGIES, TRAP_POLICIES, LiveMachine, LiveStats
from ._process import Mapping, ProcMem, read_maps

#: public name -> the module that defines it, imported when the name is
#: first used (PEP 562)
_LAZY: dict[str, str] = {}


def _lazy(module: str, *names: str) -> None:
    for n in names:
        _LAZY[n] = module


# a process's symbols: its modules (the executable, its libraries) and their ELF symbols
_lazy("._symbols", "Symbols", "Symbol", "SymbolError")
# the sites a process offers: fentry sites and function entries
_lazy("._fentry", "FentrySite", "fentry_sites")
_lazy("._entry", "EntrySite", "Refusal", "entry_sites")
# the tools: count calls, trace them (ftrace on a process), probe a function
_lazy("._count", "CountResult", "live_count")
_lazy("._trace", "LiveTrace", "TraceError")
_lazy("._probe", "LiveProbe")
# where a patcher's journal (what it mapped and wrote in a process) is kept
_lazy("._journal", "journal_path")
# the clients' self-tests and the ftrace self-test on a process
_lazy("._rig", "LiveClientRig")
_lazy("._trace_rig", "LiveFtraceRig")

__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

__all__ = ["LiveMachine", "LiveStats", "TRAP_POLICIES", "STRATEGIES", "LiveError",
           "NoSuchProcess", "AccessDenied", "ProcessChanged", "Mapping", "ProcMem", "read_maps",
           "ptrace_permitted", *_LAZY]


def ptrace_permitted() -> tuple[bool, str]:
    """Whether this process may trace a child of its own: tries PTRACE_SEIZE
    on a short-lived child.  Returns (ok, reason when not)."""
    import errno
    import os
    import signal
    import subprocess
    import sys

    from . import _ptrace as P
    try:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError as e:
        return False, f"cannot start a child to try ptrace on: {e}"
    try:
        try:
            P.seize(child.pid, 0)
        except OSError as e:
            why = "EPERM" if e.errno == errno.EPERM else os.strerror(e.errno)
            return False, f"PTRACE_SEIZE of a child refused ({why}); {_hint()}"
        try:
            P.interrupt(child.pid)
            si = P.SigInfo()
            P.waitid(child.pid, si, True)
            P.detach(child.pid, 0)
        except OSError as e:
            return False, f"ptrace works only partly here: {e}"
        return True, ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def _hint() -> str:
    from ._errors import ACCESS_HINT
    return ACCESS_HINT
