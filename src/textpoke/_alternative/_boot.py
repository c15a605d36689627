# SPDX-License-Identifier: GPL-2.0-only
"""``alternative_instructions``: the boot-time sequence over an image's
tables -- INT3 self-test, retpolines, returns, alternatives, (ENDBR
sealing), SMP locks, relocation self-test."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Iterator

from .._core import TextPoke
from ..images._tables import KernelTables
from ._records import BootResult, SelfTest, SelfTestError, SitePatch
from ._selftest import alt_reloc_selftest, int3_selftest
from ._ktext import caps_of
from ._passes import TEXT_PASSES, TextPasses
from ._shadow import DebugLog, Shadow, SymbolSource, features_of, symbols_of
from ._smp_locks import SmpAlternatives

__all__ = ["DEFAULT_FEATURES", "alternative_instructions"]

#: A present-day x86-64 host without speculation mitigations (the default of
#: ``textpoke boot`` and of the demo's boot).
DEFAULT_FEATURES = ("xmm2", "rdtscp", "lfence_rdtsc", "popcnt", "avx2", "bmi2", "erms",
                    "fsrm", "smap", "clflushopt")


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = time.perf_counter() - t0


def alternative_instructions(core: TextPoke, image: SymbolSource, tables: KernelTables,
                             features: Iterable[str | int], *, ncpus: int | None = None,
                             noreplace_smp: bool = False, debug_alternative: int = 0,
                             selftests: bool = True, strict: bool = True,
                             smp: SmpAlternatives | None = None) -> BootResult:
    """Boot-time patching of *image* (an ElfImage) on ``core.machine``, from
    *tables* (``read_tables(image)``), for a CPU with *features* (names or
    numbers; ``always`` is implied).  *ncpus* is the number of present CPUs
    (default: the machine's); with one, LOCK prefixes are turned into DS
    and their range is registered in *smp* (a new :class:`SmpAlternatives`
    when not given; the result's ``smp`` either way).  Call it before any
    CPU was started: alternatives are written with ``text_poke_early``."""
    feats, names = features_of(features)
    machine = core.machine
    possible = len(machine.cpus)
    present = possible if ncpus is None else ncpus
    if not 1 <= present <= possible:
        raise ValueError(f"ncpus must be in 1..{possible} (the machine's CPUs), got {present}")
    if smp is None:
        smp = SmpAlternatives(core, possible_cpus=possible)
    elif smp.core is not core:
        raise ValueError("smp belongs to another TextPoke")
    sym = symbols_of(image)
    dbg = DebugLog(debug_alternative)
    timings: dict[str, float] = {}
    tests: list[SelfTest] = []

    def partial(**kw: Any) -> BootResult:
        return BootResult(features=names, ncpus=present, possible_cpus=possible,
                          selftests=tuple(tests), table_entries=tables.counts(),
                          debug=tuple(dbg.records), timings=dict(timings), smp=smp, **kw)

    with _timed(timings, "int3_selftest"):
        if selftests:
            tests.append(int3_selftest(core, image))
    if strict and selftests and tests[-1].passed is False:
        raise SelfTestError(f"int3_selftest failed: {tests[-1].detail}", partial())

    # The line's text passes on one shadow (retpolines first: the thunks
    # they stop using are alternative sites), committed only when all of
    # them succeeded.
    shadow = Shadow(core, sym)
    passes = TextPasses(shadow, {".retpoline_sites": [r.addr for r in tables.retpoline_sites],
                               ".return_sites": [r.addr for r in tables.return_sites],
                               ".altinstructions": tables.alt_instructions},
                      caps_of(feats, shadow.line), dbg=dbg, records=True)
    for name in shadow.line.passes:
        if name in TEXT_PASSES:
            with _timed(timings, name):
                passes.run(name)
    with _timed(timings, "commit"):
        shadow.commit()

    def records(table: str) -> tuple:
        log = passes.logs.get(table)
        return tuple(log.records) if log is not None else ()
    alts, retp, rets = (records(".altinstructions"), records(".retpoline_sites"),
                        records(".return_sites"))

    locks: tuple[SitePatch, ...] = ()
    with _timed(timings, "smp_locks"):
        if not noreplace_smp and present == 1:
            smp.uniproc_patched = True
            text = (sym.get("_text") or tables.text[0], sym.get("_etext") or tables.text[1])
            locks = smp.module_add("core kernel", tables.smp_locks, text, image=image, debug=dbg)

    if selftests:
        with _timed(timings, "alt_reloc_selftest"):
            tests.append(alt_reloc_selftest(core, image))
    result = partial(alternatives=tuple(alts), retpolines=tuple(retp), returns=tuple(rets),
                     smp_locks=locks, uniproc_patched=smp.uniproc_patched)
    if strict and not result.ok:
        bad = "; ".join(f"{s.name}: {s.detail}" for s in result.selftests if s.passed is False)
        raise SelfTestError(f"boot self-test failed: {bad}", result)
    return result
