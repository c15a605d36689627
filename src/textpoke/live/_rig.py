# SPDX-License-Identifier: GPL-2.0-only
"""The clients' probe-loop rig on a live process: the same self-tests as on
the sim (:mod:`textpoke.selftests`), run by the threads of a real process.

The bundled kernel image is linked at low, fixed user-space addresses
(0x1000000 up; the emulator cannot map the kernel's high half), and its
``client_loop`` and probe functions touch nothing but their own memory.
So a small loader, built with gcc at run time, maps the image's ``PT_LOAD``
segments from the file at their link addresses (``MAP_FIXED_NOREPLACE``;
text file-backed, so the live machine sees it as core text of
``kernel.elf``; the .bss zeroed), starts N threads that wait for a flag,
and then waits on stdin.  The host attaches a
:class:`~textpoke.live.LiveMachine`, boots the image on it with
:meth:`Kernel.start` -- the boot-time passes write the text with
``text_poke_early`` before any thread runs it -- and the threads, once the
flag is set, run ``client_loop`` on records of their own, which the host
fills and reads through ``machine.mem``.

:class:`LiveClientRig` answers the :class:`~textpoke.selftests.ClientRig`
protocol as the sim's ``ClientMachine`` does; its CPUs are the loop
threads, numbered 0..N-1.  Needs gcc and ptrace (the live tests' rule)."""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from .._core._machine import WaitUntil
from .._errors import TextPokeError
from ..images import load_bundled
from ..images._kernel import KERNEL_IMAGE
from ..images._tables import read_tables
from ..kernel import KPROBES_EXECMEM, Kernel
from ..selftests._rig import CLIENT_CPUS, CLIENT_REC, KernelRig, ProbeLoopRig
from ._cc import build_c
from ._errors import NoSuchProcess

__all__ = ["LiveClientRig", "LiveKernelRig", "LiveRigError", "LOADER_C", "start_loader", "boot_in_process"]

LOADER_C = r"""
/* SPDX-License-Identifier: GPL-2.0-only */
/* textpoke's live client rig: map an ELF's PT_LOAD segments at their link
 * addresses, start N threads that wait for go, then run loop(rec + i * size). */
#define _GNU_SOURCE
#include <elf.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#define PG 4096UL
volatile int go;
static uintptr_t loop_fn, recs, rec_size;
static void *worker(void *arg)
{
	uintptr_t i = (uintptr_t)arg;
	while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
		usleep(100);
	((void (*)(void *))loop_fn)((void *)(recs + i * rec_size));
	return NULL;
}
static void *map(void *at, size_t len, int prot, int flags, int fd, off_t off)
{
	void *p = mmap(at, len, prot, flags | MAP_FIXED_NOREPLACE, fd, off);
	if (p != at) { perror("mmap"); exit(3); }
	return p;
}
int main(int argc, char **argv)
{
	if (argc != 6) return 2;
	int n = atoi(argv[2]);
	loop_fn = strtoul(argv[3], 0, 0); recs = strtoul(argv[4], 0, 0);
	rec_size = strtoul(argv[5], 0, 0);
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0) { perror(argv[1]); return 3; }
	Elf64_Ehdr eh;
	if (pread(fd, &eh, sizeof eh, 0) != sizeof eh) return 3;
	for (int k = 0; k < eh.e_phnum; k++) {
		Elf64_Phdr ph;
		if (pread(fd, &ph, sizeof ph, eh.e_phoff + k * sizeof ph) != sizeof ph) return 3;
		if (ph.p_type != PT_LOAD) continue;
		int prot = (ph.p_flags & PF_R ? PROT_READ : 0) | (ph.p_flags & PF_W ? PROT_WRITE : 0)
			 | (ph.p_flags & PF_X ? PROT_EXEC : 0);
		uintptr_t va = ph.p_vaddr & ~(PG - 1), off = ph.p_offset & ~(PG - 1);
		uintptr_t fend = (ph.p_vaddr + ph.p_filesz + PG - 1) & ~(PG - 1);
		uintptr_t mend = (ph.p_vaddr + ph.p_memsz + PG - 1) & ~(PG - 1);
		if (ph.p_filesz)
			map((void *)va, fend - va, prot, MAP_PRIVATE, fd, off);
		if (ph.p_memsz > ph.p_filesz) {
			if (ph.p_filesz)   /* the rest of the last file page is .bss */
				memset((void *)(ph.p_vaddr + ph.p_filesz), 0, fend - (ph.p_vaddr + ph.p_filesz));
			if (mend > fend)
				map((void *)fend, mend - fend, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		}
	}
	pthread_t th;
	for (long i = 0; i < n; i++)
		pthread_create(&th, NULL, worker, (void *)i);
	printf("ready %p\n", (void *)&go);
	fflush(stdout);
	char buf[64];
	while (read(0, buf, sizeof buf) > 0)
		;
	return 0;
}
"""


class LiveRigError(TextPokeError):
    """The live rig cannot run here (no gcc)."""


def build_loader(outdir: str | Path) -> Path:
    return build_c(outdir, "loader.c", LOADER_C, "client_loader", ["-O1", "-pthread"],
                   error=LiveRigError, user="live client rig", thing="loader",
                   product="live client loader")


def start_loader(outdir: str | Path, image, cpus: int, loop: str, recs: int,
                 rec_size: int) -> tuple[subprocess.Popen, int]:
    """Build the loader in *outdir* and start it on *image*: *cpus* threads
    that will run the image's function *loop* on the records at *recs*
    (*rec_size* bytes each), once the flag is set.  Returns the process
    (stdin and stdout pipes: closing stdin ends it) and the flag's address."""
    exe = build_loader(outdir)
    proc = subprocess.Popen([str(exe), str(image.path), str(cpus), hex(image.sym(loop)),
                             hex(recs), str(rec_size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        proc.kill()
        proc.wait()
        raise LiveRigError(f"the live client loader did not start ({line!r})")
    return proc, int(line[1], 16)


def boot_in_process(machine, image, tables, *, features: tuple[str, ...] | None = None) -> Kernel:
    """:meth:`Kernel.start` of *image* mapped in *machine*'s process, with
    the kernel's execmem mapped first within rel32 reach of the image
    rather than of the process's main executable (the loader, far away in
    the PIE range): a module's PC32 relocations, kprobes' detours and the
    guest functions' RIP-relative data must reach the image as they reach
    ``_stext`` in a kernel.  :class:`Kernel` asks the machine for the range
    named "kernel" (EXECMEM) and gets this one."""
    placed = [s for s in image.sections.values() if s.addr]
    machine.execmem_range(4 * KPROBES_EXECMEM, "kernel",
                          near=(min(s.addr for s in placed), max(s.end for s in placed)))
    return Kernel.start(machine, image, tables=tables, features=features)


def _serve_for(secs: float):
    """A task that only waits *secs*: the machine serves every thread's
    stops while it waits (see :meth:`LiveMachine.run_task`)."""
    end = time.monotonic() + secs
    yield WaitUntil(lambda: time.monotonic() >= end, "the loop threads to run a while")


class LiveKernelRig(KernelRig):
    """The bundled image mapped into a loader process whose *cpus* threads
    wait to run its function *loop* on records of their own, booted on a
    :class:`~textpoke.live.LiveMachine` attached to it: what the live rigs
    (:class:`LiveClientRig`, :class:`~textpoke.live._trace_rig.LiveFtraceRig`)
    share.  :meth:`close` (:class:`KernelRig`'s) closes the kernel, then
    detaches and ends the loader (:meth:`_end_loader`)."""

    proc: subprocess.Popen | None = None
    machine = None

    def _start(self, *, cpus: int, loop: str, recs: str, rec_size: int, strategy: str,
               prefix: str, features: tuple[str, ...] | None = None) -> None:
        """Start the loader on the records at the image's symbol *recs*
        (*rec_size* bytes each), attach and boot; on failure everything
        made is freed again and the error raised."""
        from ._machine import LiveMachine
        self.image = load_bundled(KERNEL_IMAGE)
        self.tables = read_tables(self.image)
        self.recs = self.image.sym(recs)
        self.ncpus = cpus
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.proc = None
        self.machine = None
        self.kernel = None
        self.started = False
        with self._closing_on_error():
            self.proc, self._go = start_loader(self._tmp.name, self.image, cpus, loop,
                                               self.recs, rec_size)
            self.pid = self.proc.pid
            self._loader_started()
            self.machine = LiveMachine(self.pid, strategy=strategy)
            self.kernel = boot_in_process(self.machine, self.image, self.tables,
                                          features=features)

    def _loader_started(self) -> None:
        """The loader runs (its threads made), not yet attached."""

    def start(self) -> None:
        """Let the threads run the loop."""
        self.machine.mem.write(self._go, struct.pack("<i", 1))
        self.started = True

    def exited(self) -> bool:
        """Whether the loader has exited (its status is then in
        ``proc.returncode``), asked without taking anything the machine
        must see: the loader is this process's child *and* traced by it,
        so a plain wait (``Popen.poll``) also collects its main thread's
        ptrace-stops -- an interrupt stop of a sync, its exit stop -- and
        reads one as an exit status (-SIGTRAP, the stop's signal), while
        the machine waits on for that stop.  ``waitid(WNOWAIT)`` only
        looks; once what it reports is the death, ``Popen`` reaps it."""
        if self.proc.returncode is not None:
            return True
        try:
            r = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll() is not None
        if r is None or r.si_code not in (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED):
            return False
        self.proc.poll()
        return True

    @property
    def oopses(self) -> int:
        """1 once the process died (a crash of a loop thread kills it)."""
        return 0 if self.proc is None or not self.exited() else 1

    def _free(self) -> None:
        """After the kernel: the machine, then the loader process and its
        directory, whatever the first raised."""
        try:
            if self.machine is not None:
                # always: a machine left attached keeps the threads of a
                # dead loader unreaped, and the loader's wait would never end
                self.machine.close()
        finally:
            try:
                if self.proc is not None:
                    self._end_loader()
            finally:
                self._tmp.cleanup()

    def _end_loader(self) -> None:
        """End the loader process (detached by then) and reap it."""
        raise NotImplementedError


class LiveClientRig(LiveKernelRig, ProbeLoopRig):
    """The bundled image booted in a live process whose *cpus* threads run
    its ``client_loop`` (see the module doc).  A context manager; ``close()``
    closes the kernel (its clients), detaches, and ends the loader."""

    def __init__(self, *, cpus: int = 4, strategy: str = "int3",
                 features: tuple[str, ...] | None = None) -> None:
        if not 1 <= cpus <= CLIENT_CPUS:
            raise ValueError(f"cpus must be 1..{CLIENT_CPUS}")
        self.probes: list = []
        self._start(cpus=cpus, loop="client_loop", recs="client_recs", rec_size=CLIENT_REC,
                    strategy=strategy, features=features, prefix="textpoke-live-rig-")
        with self._closing_on_error():
            self.kernel.keys, self.kernel.calls      # read the tables before the CPUs run

    # the ClientRig protocol: core, keys and calls are ProbeLoopRig's, sym
    # KernelRig's, start LiveKernelRig's; the records, probes and the
    # oracle are ProbeLoopRig's, shared with the sim
    @property
    def mem(self):
        return self.machine.mem

    def loop_cpus(self) -> list[int]:
        return list(range(self.ncpus))

    def live_cpus(self) -> list[int]:
        return self.loop_cpus() if not self.exited() else []

    def _run_until(self, pred, max_steps: int) -> bool:
        """Look at the records until *pred* holds (False if the process
        died, or after ``min(max_steps, 200_000)`` looks).  Between two
        looks the machine serves the threads' stops -- a trap hit, an exit,
        a new thread -- for a while (0.2 ms, growing to 5 ms) and lets them
        run meanwhile: nothing is stopped unless it stops by itself.  (A
        sync of every thread between looks stopped three busy threads a few
        thousand times per pass on a loaded box: the kprobes self-test took
        3 to 45 s instead of 0.3.)"""
        nap, dying = 2e-4, False
        for _ in range(min(max_steps, 200_000)):
            if self.exited():
                return False
            if not dying:
                try:
                    if pred():
                        return True
                except NoSuchProcess:
                    # its memory is gone: the process is exiting.  Its
                    # threads are traced, so it ends only as the machine
                    # lets them through their exit stops and reaps them:
                    # serve on until its parent (us) can wait for it
                    dying = True
            self.machine.run_task(_serve_for(nap))
            nap = min(nap * 1.5, 5e-3)
        return False

    # lifetime -----------------------------------------------------------------
    def _end_loader(self) -> None:
        """Closing its stdin makes the loader return from main; killed if
        it does not end, and an error if even then it cannot be reaped."""
        stuck = False
        if not self.exited():
            self.proc.stdin.close()          # the loader returns from main
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    stuck = True
        if self.proc.stdout:
            self.proc.stdout.close()
        if stuck:
            # a thread still traced by us as a zombie (one the machine
            # lost) holds it: say so, never hang
            raise LiveRigError(f"the live client loader (pid {self.pid}) was not reaped "
                               "after SIGKILL")

