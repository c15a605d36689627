# SPDX-License-Identifier: GPL-2.0-only
"""What the run-time reference's guest does: its steps (:data:`STEPS`, one
shell command list each, with what the script lists after it), the init
script made from them (:func:`script`), the probes' targets
(:func:`kprobe_target`) and the CPU setups (:data:`RUNTIME_SETUPS`).
Taking the reference (QEMU, the stops, the manifest) is
:mod:`._qemu_runtime`'s."""

from __future__ import annotations

from dataclasses import dataclass

from ._elf import ImageError
from ._qemu import Setup
from ._vmlinux import RealKernelImage

__all__ = ["Step", "STEPS", "steps", "script", "kprobe_target", "RUNTIME_SETUPS",
           "DEFAULT_MODULES", "FTRACE_GLOB", "KPROBE_CANDIDATES", "KRETPROBE_FUNCTION",
           "EXTRA_CMDLINE", "T"]

#: the modules loaded and unloaded, in order: (module name, path in the package)
DEFAULT_MODULES: tuple[tuple[str, str], ...] = (
    ("bfq", "kernel/block/bfq.ko.xz"),
    ("kyber_iosched", "kernel/block/kyber-iosched.ko.xz"),
)
FTRACE_GLOB = "vfs_read*"
#: functions tried in order for the optimised kprobe (the first instruction
#: after the fentry site: pushes and register moves the optimiser relocates)
KPROBE_CANDIDATES = ("vfs_statx", "ksys_write", "vfs_fstat")
KRETPROBE_FUNCTION = "do_sys_openat2"
#: "no mitigations", "retpolines + return thunks", "call-depth tracking"
RUNTIME_SETUPS: tuple[Setup, ...] = (
    Setup("qemu64", "mitigations=off"),
    Setup("EPYC"),              # retpolines, return thunk (srso_return_thunk), untrain_ret
    Setup("Skylake-Client-v4", "retbleed=stuff"),
)
#: /dev/kmsg is rate-limited by default: the script's lines must all arrive
EXTRA_CMDLINE = "printk.devkmsg=on rdinit=/init"
T = "/sys/kernel/tracing"


@dataclass(frozen=True)
class Step:
    name: str
    did: tuple[str, ...]              # shell commands (templates: {glob} {kprobe} {kretprobe})
    collect: tuple[str, ...] = ()     # filter enabled kprobes sysctl sections:<mod>


#: what the init script does, in order (module steps are added per module)
STEPS: tuple[Step, ...] = (
    Step("boot", (), ("enabled", "sysctl")),
    Step("ftrace-function-on", (f"echo '{{glob}}' > {T}/set_ftrace_filter",
                                f"echo function > {T}/current_tracer"),
         ("filter", "enabled")),
    Step("ftrace-function-off", (f"echo nop > {T}/current_tracer",), ("enabled",)),
    Step("ftrace-graph-on", (f"echo function_graph > {T}/current_tracer",),
         ("filter", "enabled")),
    Step("ftrace-graph-off", (f"echo nop > {T}/current_tracer", f"echo > {T}/set_ftrace_filter"),
         ("filter", "enabled")),
    Step("kprobe-optimized-on", (f"echo 'p:rtref/opt {{kprobe}}' >> {T}/kprobe_events",
                                 f"echo 1 > {T}/events/rtref/opt/enable",
                                 "wait_optimized"),
         ("kprobes",)),
    Step("kretprobe-on", (f"echo 'r:rtref/ret {{kretprobe}}' >> {T}/kprobe_events",
                          f"echo 1 > {T}/events/rtref/ret/enable"),
         ("kprobes", "enabled")),
    Step("kprobes-off", (f"echo 0 > {T}/events/rtref/opt/enable",
                         f"echo 0 > {T}/events/rtref/ret/enable",
                         # unoptimising is deferred to the optimiser's work; turning
                         # optimisation off waits for it (and on again optimises nothing:
                         # no probe is enabled)
                         "echo 0 > /proc/sys/debug/kprobes-optimization",
                         "echo 1 > /proc/sys/debug/kprobes-optimization",
                         f"echo > {T}/kprobe_events"),
         ("kprobes", "enabled")),
    Step("schedstats-on", ("echo 1 > /proc/sys/kernel/sched_schedstats",), ("sysctl",)),
    Step("schedstats-off", ("echo 0 > /proc/sys/kernel/sched_schedstats",), ("sysctl",)),
)


def steps(modules: tuple[tuple[str, str], ...]) -> list[Step]:
    out = list(STEPS)
    for name, _ in modules:
        out.append(Step(f"insmod-{name}", (f"insmod /m/{name}.ko",), (f"sections:{name}",)))
    for name, _ in reversed(modules):
        out.append(Step(f"rmmod-{name}", (f"rmmod {name}",), ()))
    return out


# ------------------------------------------------------------ the probes
def kprobe_target(image: RealKernelImage) -> tuple[str, int]:
    """(``func+off``, address): the first candidate whose instructions right
    after its fentry site are at least 5 bytes of pushes and register moves
    with no branch of the function into them (what the optimiser can move)."""
    import iced_x86
    from ._tables import mcount_table
    mc = image.table("__mcount_loc")
    fentry = set(mcount_table(mc.data, mc.start, mc.start, mc.stop))
    ok = {iced_x86.Mnemonic.PUSH, iced_x86.Mnemonic.MOV}
    for name in KPROBE_CANDIDATES:
        if name not in image.symbols:
            continue
        fn, code = image.sym(name), image.function_bytes(name)
        insns = list(iced_x86.Decoder(64, code, ip=fn))
        sites = [i.ip for i in insns if i.ip in fentry]
        if not sites:
            continue
        start = sites[0] + 5
        covered, i = 0, next(k for k, x in enumerate(insns) if x.ip == start)
        while covered < 5 and i < len(insns):
            ins = insns[i]
            if ins.mnemonic not in ok or ins.is_ip_rel_memory_operand:
                break
            covered += ins.len
            i += 1
        if covered < 5:
            continue
        targets = {x.near_branch_target for x in insns if x.flow_control in (
            iced_x86.FlowControl.UNCONDITIONAL_BRANCH, iced_x86.FlowControl.CONDITIONAL_BRANCH)}
        if any(start < t < start + covered for t in targets):
            continue
        return f"{name}+{start - fn}", start
    raise ImageError(f"{image.path}: none of {', '.join(KPROBE_CANDIDATES)} can take an "
                     f"optimised kprobe after its fentry site")


# ------------------------------------------------------------- the script
def script(steps: list[Step], subst: dict[str, str]) -> str:
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox --install -s /bin",
        "export PATH=/bin",
        "mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev",
        "mount -t debugfs debugfs /sys/kernel/debug; mount -t tracefs tracefs " + T,
        "echo 0 > /proc/sys/kernel/kptr_restrict",
        'say() { echo "RTREF $STEP $*" > /dev/kmsg; }',
        'fail() { echo "RTREF $STEP fail $*" > /dev/kmsg; hostname rt-fail; sync; '
        'while :; do sleep 1000; done; }',
        'run() { eval "$1" || fail "$1"; }',
        'mark() { say end; hostname "rt-$1"; sync; }',
        # copy first, with read(2) in pages: the shell's read reads a byte at a
        # time, and busybox cat's sendfile(2) gets nothing from debugfs files
        'lines() { grep "" "$2" > /tmp/l; while IFS= read -r l; do say "$1" "$l"; done < /tmp/l; }',
        'builtins() { grep __builtin__ /proc/kallsyms > /tmp/b; lines kallsyms /tmp/b; }',
        'sections() { for f in /sys/module/$1/sections/* /sys/module/$1/sections/.*; do '
        '[ -f "$f" ] && say sect $1 "${f##*/}" "$(cat $f)"; done; }',
        # the optimiser runs from a delayed work: wait for it (at most ~30 s)
        'wait_optimized() { n=0; while ! grep -q OPTIMIZED /sys/kernel/debug/kprobes/list; do '
        'n=$((n+1)); [ $n -gt 300 ] && fail "kprobe not optimized"; usleep 100000; done; }',
    ]
    for i, st in enumerate(steps):
        lines.append(f"STEP={i}-{st.name}")
        for cmd in st.did:
            c = cmd.format(**subst)
            lines.append(c if c == "wait_optimized" else f"run {_sh_quote(c)}")
        for what in st.collect:
            if what == "filter":
                lines.append(f"lines filter {T}/set_ftrace_filter")
            elif what == "enabled":
                lines.append(f"lines enabled {T}/enabled_functions")
            elif what == "kprobes":
                lines.append("lines kprobes /sys/kernel/debug/kprobes/list")
            elif what == "sysctl":
                lines.append('say sysctl kernel.sched_schedstats '
                             '"$(cat /proc/sys/kernel/sched_schedstats)"')
            elif what.startswith("sections:"):
                lines.append(f"sections {what.split(':', 1)[1]}")
            else:
                raise ValueError(f"step {st.name}: nothing to collect called {what!r}")
        # what the kernel allocated is listed after every step (so a step's
        # regions are what is alive at its stop)
        lines.append("builtins")
        lines.append(f"mark {i}")
    lines += ['echo "RTREF done" > /dev/kmsg', "while :; do sleep 1000; done", ""]
    return "\n".join(lines)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
