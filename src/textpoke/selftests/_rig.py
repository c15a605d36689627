# SPDX-License-Identifier: GPL-2.0-only
"""What a client self-test needs from the machine it runs on.

A self-test acts through a :class:`~textpoke.kernel.Kernel` (its clients,
and the machine's protocol and capabilities) while every CPU runs a *probe
loop*: a guest loop that calls a table of functions ``long fn(long)`` over
and over and counts every result the host does not currently accept.  The
rig is whatever provides that loop on a machine -- on the sim,
:class:`textpoke.sim._clients_demo.ClientMachine` (the bundled image's
``client_loop`` on each vCPU); a live process would run the same loop in
its threads.  The self-tests in this package use nothing else: no backend
is imported."""

from __future__ import annotations

from typing import Iterable, Protocol

__all__ = ["ClientRig"]


class ClientRig(Protocol):
    #: the booted kernel: ``kernel.core``, ``kernel.machine``, the clients
    kernel: object
    started: bool
    probes: list

    @property
    def core(self): ...
    @property
    def keys(self): ...
    @property
    def calls(self): ...
    @property
    def oopses(self) -> int: ...

    def sym(self, name: str) -> int: ...

    def add_probe(self, name: str, addr: int | None = None, arg: int = 0,
                  allow: Iterable[int] = ()) -> int:
        """Add a function to every CPU's table; return its slot."""

    def enable_probe(self, i: int, addr: int) -> None:
        """Call *addr* from slot *i* again (after :meth:`disable_probe`)."""

    def disable_probe(self, i: int) -> None: ...

    def allow(self, i: int, values: Iterable[int], rng: tuple[int, int] | None = None,
              cpus: Iterable[int] | None = None) -> None:
        """What slot *i* may return from now on."""

    def widen(self, i: int, old: int, new: int) -> None:
        """Slot *i* may return *old* or *new* (around an update)."""

    def start(self) -> None: ...

    def wait_passes(self, n: int = 2, max_steps: int = 2_000_000) -> bool:
        """Let every live CPU complete *n* more rounds of the loop."""

    def expect(self, want: dict[int, int]) -> dict[int, list[int]]:
        """Narrow each slot to one value, let every CPU run two rounds,
        return the CPUs' last values that differ (empty: all right)."""

    def bad(self) -> list[dict]:
        """Every result the guest counted as not accepted when it came."""
