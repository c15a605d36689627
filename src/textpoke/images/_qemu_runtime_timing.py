# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's own time for ftrace's biggest step, under QEMU: ``echo
function > current_tracer`` with an empty filter (every traceable
function) and ``echo nop > current_tracer``, timed by the guest itself.

:func:`ftrace_timing` boots Debian's kernel (``nokaslr``, the setup's CPU
model and command line) with a busybox initramfs whose init script writes
a marker to ``/dev/kmsg`` right before and right after each ``echo`` --
shell builtins, so nothing is forked in between -- *reps* times each way,
then powers the guest off.  Each marker's printk timestamp (``[ s.us ]``
on the console: the kernel's ``local_clock``, microseconds) is the
guest's clock; a step's time is its end marker's minus its begin marker's.
So the time is the whole write as the kernel serves it: ``tracing_set_tracer``
(the first time also grows the ring buffer to its run-time size), the
tracer's init, ``register_ftrace_function`` with its trampoline, the
update of every fentry site through ``text_poke_bp_batch``, the
``ftrace_call`` updates, the probes of the cmdline recording, and the
RCU/scheduler synchronisations in between.

The guest runs under TCG, as the run-time reference does: it runs much
slower than hardware (every guest instruction is translated) while its
clock follows the host's, so the times are an upper bound of the
kernel's on real hardware, and are quoted as such.  (KVM would give the
hardware's speed; it is not used: on the machine this was written on
``/dev/kvm`` is a paravirtual one that fails on QEMU's CPU models.)

Nothing is cached: a timing is a measurement of the run it was taken in.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

from ._qemu import Setup
from ._qemu_runtime_steps import EXTRA_CMDLINE, RUNTIME_SETUPS, T
from ._qemu_vm import BASE_CMDLINE, ReferenceError, build_initramfs, guest, qemu_version

__all__ = ["FtraceTiming", "ftrace_timing", "timing_script"]

_MARK = re.compile(r"\[\s*(\d+\.\d+)\] RTT (\S+) ?(.*)$")


@dataclass
class FtraceTiming:
    """Seconds of each ``echo`` by the guest's clock, in order."""

    setup: str
    release: str
    sites: int                          # lines of available_filter_functions
    enabled: list[int] = field(default_factory=list)   # enabled_functions after each on
    on: list[float] = field(default_factory=list)
    off: list[float] = field(default_factory=list)
    wall: float = 0.0                   # QEMU start -> power off (host)
    qemu: str = ""

    def summary(self, what: str) -> tuple[float, float, float]:
        v = getattr(self, what)
        return statistics.median(v), min(v), max(v)

    def as_dict(self) -> dict:
        return {"accel": "tcg", "setup": self.setup, "release": self.release,
                "sites": self.sites, "enabled": self.enabled, "on": self.on, "off": self.off,
                "wall": round(self.wall, 3), "qemu": self.qemu}


def timing_script(reps: int) -> str:
    """The init script: *reps* rounds of ``function`` on and ``nop``, each
    ``echo`` between two kmsg markers; then power off."""
    return "\n".join([
        "#!/bin/busybox sh",
        "/bin/busybox --install -s /bin",
        "export PATH=/bin",
        "mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev",
        "mount -t tracefs tracefs " + T,
        'say() { echo "RTT $*" > /dev/kmsg; }',
        f'say sites "$(grep -c . {T}/available_filter_functions)"',
        "i=1",
        f"while [ $i -le {int(reps)} ]; do",
        "  say $i on-begin",
        f"  echo function > {T}/current_tracer || say fail on",
        "  say $i on-end",
        f'  say $i enabled "$(grep -c . {T}/enabled_functions)"',
        "  say $i off-begin",
        f"  echo nop > {T}/current_tracer || say fail off",
        "  say $i off-end",
        "  i=$((i+1))",
        "done",
        "say done",
        "poweroff -f",
        ""])


def parse(serial: str) -> tuple[int, dict[str, dict[str, float]], dict[str, int], str]:
    """(sites, {round: {marker: seconds}}, {round: enabled}, failure)."""
    sites, marks, enabled, fail = 0, {}, {}, ""
    for line in serial.splitlines():
        m = _MARK.search(line.rstrip("\r"))
        if not m:
            continue
        ts, a, b = float(m.group(1)), m.group(2), m.group(3)
        if a == "sites":
            sites = int(b)
        elif a == "fail":
            fail = b
        elif a.isdigit() and b.startswith("enabled"):
            enabled[a] = int(b.split()[1])
        elif a.isdigit():
            marks.setdefault(a, {})[b] = ts
    return sites, marks, enabled, fail


def ftrace_timing(kernel, setup: Setup = RUNTIME_SETUPS[0], *, reps: int = 7,
                  memory: str = "1G", timeout: float = 900.0,
                  progress=None) -> FtraceTiming:
    """Boot *kernel* (a DebianKernel) once in *setup* and time *reps*
    rounds of the function tracer on and off (see the module's text)."""
    image = kernel.load()
    kcmd = f"{BASE_CMDLINE} {EXTRA_CMDLINE} {setup.cmdline}".strip()
    t0 = time.monotonic()
    with guest(kernel.vmlinuz, cpu=setup.cpu, smp=setup.smp, memory=memory, append=kcmd,
               initrd=build_initramfs(timing_script(reps), {}), prefix="textpoke-rttime-",
               die_with_parent=True) as g:
        g.qmp.run("cont")
        deadline = t0 + timeout
        seen = 0
        while True:
            serial = g.serial.read_text(errors="replace")
            if "RTT done" in serial or "RTT fail" in serial:
                break
            if g.proc.poll() is not None:
                raise ReferenceError(f"QEMU exited before the timing ended: {g.tail(2000)}")
            if time.monotonic() > deadline:
                raise ReferenceError(f"the timing did not end within {timeout:.0f} s: "
                                     f"{g.tail(2000)}")
            n = serial.count("off-end")
            if progress and n != seen:
                seen = n
                progress(f"round {n}/{reps}, {time.monotonic() - t0:.1f} s")
            time.sleep(0.2)
        wall = time.monotonic() - t0
    sites, marks, enabled, fail = parse(serial)
    if fail:
        raise ReferenceError(f"echo {'function' if fail == 'on' else 'nop'} > current_tracer "
                             f"failed in the guest")
    out = FtraceTiming(setup.label(), image.version, sites, wall=wall,
                       qemu=qemu_version())
    for r in sorted(marks, key=int):
        mk = marks[r]
        if not {"on-begin", "on-end", "off-begin", "off-end"} <= mk.keys():
            raise ReferenceError(f"round {r}: markers missing on the console: {sorted(mk)}")
        out.on.append(mk["on-end"] - mk["on-begin"])
        out.off.append(mk["off-end"] - mk["off-begin"])
        out.enabled.append(enabled.get(r, 0))
    if len(out.on) != reps:
        raise ReferenceError(f"{len(out.on)} rounds on the console, {reps} expected")
    return out
