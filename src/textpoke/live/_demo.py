# SPDX-License-Identifier: GPL-2.0-only
"""``textpoke demo --machine live``: the demo's workload in a real process.

The sim's guest workload (``images/workload.S``: NOP2<->JMP8, NOP5<->JMP32,
CALL retarget, RET;INT3x4<->JMP32 and Jcc.d32 sites, two of them across a
64-byte line) is position-dependent x86-64 code that touches nothing but
its per-CPU record at %rbx, so the very same source is assembled by GCC
(GNU as) into a user-space program, at demo time, with a small C driver:
N threads, each running ``workload_main`` forever with %rbx pointing at its
own record.  **This needs gcc** (and binutils); without it the live demo
refuses to run and says so.

The host then attaches a :class:`~textpoke.live._machine.LiveMachine`,
toggles every site (one batch per toggle, all sites together) while the
threads run, reads the records through /proc/PID/mem, and fills the same
:class:`~textpoke.images._workload.DemoResult` the sim demo prints -- with what a
real machine cannot tell (instructions retired, scheduler steps, stale
lines) left at 0.  A crash of the target shows as an oops.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from .._errors import TextPokeError
from ._cc import build_c

__all__ = ["LiveDemo", "DRIVER_C", "build_workload"]

DRIVER_C = r"""
/* SPDX-License-Identifier: GPL-2.0-only */
/* textpoke's live demo: N threads run workload_main (workload.S) forever,
 * each with %rbx = its record (iterations, then per site 8 variant counters). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define NT_MAX 64
__attribute__((aligned(4096))) uint64_t records[NT_MAX][512];
extern void workload_main(void);
static void *worker(void *arg)
{
	__asm__ volatile("mov %0, %%rbx\n\txor %%r12d, %%r12d\n\tmov $16, %%r15d\n\tcall workload_main"
			 :: "r"(arg) : "rbx", "r12", "r15", "rax", "memory");
	return NULL;
}
int main(int argc, char **argv)
{
	int nt = argc > 1 ? atoi(argv[1]) : 4;
	if (nt < 1 || nt > NT_MAX) return 2;
	pthread_t th;
	for (int i = 0; i < nt; i++)
		pthread_create(&th, NULL, worker, records[i]);
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	for (;;)
		pause();
}
"""


class LiveDemoError(TextPokeError):
    """The live demo cannot run here (no gcc, no ptrace)."""


def build_workload(outdir: str | Path) -> Path:
    """Assemble workload.S + the driver into a non-PIE executable."""
    from ..images import __file__ as images_init
    return build_c(outdir, "driver.c", DRIVER_C, "workload_live",
                   ["-O1", "-no-pie", "-fno-pie", "-pthread", "-Wl,-z,noexecstack"],
                   more=(Path(images_init).with_name("workload.S"),), error=LiveDemoError,
                   user="live demo", thing="workload", product="live workload")


class LiveDemo:
    """Build, start and patch the live workload; the steps of the sim
    :class:`~textpoke.sim._demo.Demo`, on a real process."""

    def __init__(self, *, threads: int = 4, strategy: str = "int3") -> None:
        from ..images._elf import load_elf
        from ..images._workload import read_sites
        self.t0 = time.perf_counter()
        self.threads, self.strategy = threads, strategy
        self._tmp = tempfile.TemporaryDirectory(prefix="textpoke-live-demo-")
        self.proc: subprocess.Popen | None = None
        self.machine = None
        self.core = None
        try:
            exe = build_workload(self._tmp.name)
            self.image = load_elf(exe)
            self.sites = [s for s in read_sites(self.image) if s.kind != "nop5-int3"]
            self.all_sites = read_sites(self.image)
            self.records = self.image.sym("records")
            self.proc = subprocess.Popen([str(exe), str(threads)], stdout=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if not line.startswith("ready"):
                raise LiveDemoError(f"the live workload did not start ({line!r})")
            self.pid = self.proc.pid
        except BaseException:
            self.close()
            raise
        self.flipped = {s.name: False for s in self.sites}
        self.toggles = self.toggles_done = 0
        self.final_ok: bool | None = None
        self.died: str | None = None

    # --- steps --------------------------------------------------------------
    def attach(self) -> None:
        from .._core import TextPoke
        from ._machine import LiveMachine
        self.machine = LiveMachine(self.pid, strategy=self.strategy)
        self.core = TextPoke(self.machine)

    def toggle(self, toggles: int, progress: Callable[[int, int], None] | None = None) -> None:
        if self.machine is None:
            self.attach()
        from ..images._workload import flip_sites
        core = self.core
        self.toggles = toggles
        for i in range(toggles):
            if not self._alive():
                break
            flip_sites(core, self.sites, self.flipped)
            self.toggles_done = i + 1
            if progress:
                progress(i + 1, toggles)

    def check_final(self, timeout: float = 30.0) -> bool:
        """After the last batch every thread must run the final variant:
        wait for two more iterations of each and compare the counters."""
        deadline = time.monotonic() + timeout       # a guard against hanging, not a measure
        # one iteration to leave whatever text a thread was in, then two read
        if not (self._alive() and self._iterate(1, deadline)):
            self.final_ok = False
            return False
        mid = self.counts()
        if not self._iterate(2, deadline):
            self.final_ok = False
            return False
        end = self.counts()
        ok = True
        for t in range(self.threads):
            for s in self.sites:
                want = {2, 3} if self.flipped[s.name] else {1, 3}
                d = [a - b for a, b in zip(end[t][s.index], mid[t][s.index])]
                if any(n and v not in want for v, n in enumerate(d)):
                    ok = False
        self.final_ok = ok
        return ok

    def _iterate(self, n: int, deadline: float) -> bool:
        """Until every thread has run *n* more iterations of its loop (its
        own counter says so); False once *deadline* passes or the process
        is gone."""
        it0 = self.iterations()
        while min(a - b for a, b in zip(self.iterations(), it0)) < n:
            if time.monotonic() > deadline or not self._alive():
                return False
            time.sleep(0.001)
        return True

    # --- reading the process --------------------------------------------------
    def _read(self, addr: int, size: int) -> bytes:
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, size, addr)
        finally:
            os.close(fd)

    def iterations(self) -> list[int]:
        raw = self._read(self.records, self.threads * 4096)
        return [struct.unpack_from("<Q", raw, t * 4096)[0] for t in range(self.threads)]

    def counts(self) -> list[dict[int, list[int]]]:
        raw = self._read(self.records, self.threads * 4096)
        return [{s.index: list(struct.unpack_from("<8Q", raw, t * 4096 + 64 + s.index * 64))
                 for s in self.all_sites} for t in range(self.threads)]

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is None:
            return True
        rc = self.proc.returncode
        self.died = (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}")
        return False

    # --- the report ---------------------------------------------------------
    def result(self, *, interrupted: bool = False):
        from ..images._workload import DemoResult, variant_name
        core = self.core
        if core is not None:
            core.close()                        # finish or roll back a batch in flight
        alive = self._alive()
        rows, misbehaviours, int3_left = [], 0, 0
        counts = self.counts() if alive else []
        for s in self.all_sites:
            tot = [0] * 8
            for rec in counts:
                for v, n in enumerate(rec[s.index]):
                    tot[v] += n
            bad = sum(n for v, n in enumerate(tot) if v not in s.allowed)
            misbehaviours += bad
            now = self._read(s.addr, s.length) if alive else b""
            if now[:1] == b"\xcc" and s.old[:1] != b"\xcc" and s.new[:1] != b"\xcc":
                int3_left += 1
            rows.append({"name": s.name, "addr": s.addr, "kind": s.kind, "len": s.length,
                         "old": s.old.hex(), "new": s.new.hex(), "now": now.hex(),
                         "behaviours": {variant_name(v): n for v, n in enumerate(tot) if n},
                         "misbehaviours": bad})
        st = core.stats if core is not None else None
        ev = core.events.counts if core is not None else {}
        oopses = [] if alive else [{"cpu": 0, "reason": self.died, "report": {
            "title": [f"textpoke live demo: the workload process (pid {self.pid}) {self.died}"],
            "cpu": 0, "rip": 0, "code": ""}}]
        return DemoResult(
            cpus=self.threads, toggles=self.toggles, seed=0, sites=rows,
            instructions=[0] * self.threads,
            iterations=self.iterations() if alive else [0] * self.threads,
            int3_hits=st.int3_hits if st else 0, int3_emulated=st.int3_emulated if st else 0,
            syncs=st.syncs if st else 0, batches=st.batches if st else 0,
            pokes=ev.get("batch", 0), writes=sum(ev.get(p, 0) for p in ("int3", "tail", "first")),
            oopses=oopses, misbehaviours=misbehaviours,
            final_ok=None if self.final_ok is None else (self.final_ok and alive),
            elapsed=time.perf_counter() - self.t0, steps=0, ipis=0, line_refills=0, boot=None,
            toggles_done=self.toggles_done, interrupted=interrupted, int3_left=int3_left,
            line_size=0, with_boot=False)

    def close(self) -> None:
        try:
            if self.core is not None:
                self.core.close()
            if self.machine is not None:
                self.machine.close()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc is not None and self.proc.stdout:
                self.proc.stdout.close()
            self._tmp.cleanup()

    def __enter__(self) -> "LiveDemo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
