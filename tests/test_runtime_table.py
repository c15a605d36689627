# SPDX-License-Identifier: GPL-2.0-only
"""The run-time column of tools/kernel_reference.py's one table
(textpoke.kernel._runtime_table) and the kernel's own ftrace timing under
QEMU (images/_qemu_runtime_timing.py): their parsing offline, the
comparison against a cached run-time reference (opt-in)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from textpoke.images._qemu import Setup
from textpoke.images._qemu_runtime_timing import parse, timing_script
from textpoke.kernel._runtime_table import compare_reference, find_reference, runtime_cell


def test_the_timing_script_brackets_each_echo_with_markers():
    s = timing_script(5)
    lines = s.splitlines()
    on = next(i for i, x in enumerate(lines) if "echo function > " in x)
    off = next(i for i, x in enumerate(lines) if "echo nop > " in x)
    # nothing but the echo between its two markers (builtins: no fork)
    assert lines[on - 1].strip() == "say $i on-begin" and lines[on + 1].strip() == "say $i on-end"
    assert lines[off - 1].strip() == "say $i off-begin" and lines[off + 1].strip() == "say $i off-end"
    assert "-le 5 ]" in s and s.rstrip().endswith("poweroff -f")


def test_the_timing_is_read_from_the_guests_printk_clock():
    serial = "\n".join([
        "[    9.000001] RTT sites 40353",
        "[   10.250000] RTT 1 on-begin",
        "[   12.750000] RTT 1 on-end\r",
        "[   12.800000] RTT 1 enabled 40353",
        "[   13.000000] RTT 1 off-begin",
        "[   14.000000] something else the kernel printed",
        "[   14.500000] RTT 1 off-end",
        "[   14.600000] RTT done"])
    sites, marks, enabled, fail = parse(serial)
    assert sites == 40353 and enabled == {"1": 40353} and fail == ""
    m = marks["1"]
    assert m["on-end"] - m["on-begin"] == pytest.approx(2.5)
    assert m["off-end"] - m["off-begin"] == pytest.approx(1.5)


def test_a_setup_without_a_run_time_reference_is_a_dash(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTPOKE_CACHE", str(tmp_path))
    image = SimpleNamespace(version="6.12.0-nothing-here")
    assert find_reference(image, Setup("qemu64", "mitigations=off")) is None
    kernel = SimpleNamespace(vmlinuz=str(tmp_path / "vmlinuz"))
    assert runtime_cell(kernel, image, Setup("qemu64", "mitigations=off")) == "-"


def _refs() -> list[Path]:
    root = Path(os.environ.get("TEXTPOKE_CACHE", Path.home() / ".cache/textpoke")) / "reference"
    return sorted(root.glob("6.12.*-cloud-amd64/runtime-*/manifest.json"))[:1]


@pytest.mark.skipif(not os.environ.get("TEXTPOKE_KERNEL_TESTS"),
                    reason="boots the real image once per step group (set TEXTPOKE_KERNEL_TESTS=1)")
@pytest.mark.parametrize("manifest", _refs() or [None], ids=lambda p: p.parent.name if p else "none")
def test_the_run_time_column_counts_zero_for_every_step(manifest):
    if manifest is None:
        pytest.skip("no run-time reference cached (tools/kernel_runtime_reference.py)")
    import json
    from textpoke._alternative._kearly import read_config
    from textpoke.kernel import load_kernel
    m = json.loads(manifest.read_text())
    d = manifest.parents[3] / "kernel" / m["kernel"]["release"]
    if not (d / "vmlinuz").is_file():
        pytest.skip(f"{d}/vmlinuz is not cached")
    img = load_kernel(str(d / "vmlinuz"))
    r = compare_reference(manifest.parent, img, read_config(d / "config"))
    steps = {k: v for k, v in r.items() if ":" not in k}
    assert {"ftrace-function-on", "ftrace-function-off", "ftrace-graph-on", "ftrace-graph-off",
            "kprobe-optimized-on", "kretprobe-on", "kprobes-off", "schedstats-on",
            "schedstats-off", "insmod-bfq", "rmmod-bfq"} <= steps.keys()
    assert all(v == 0 for v in steps.values()), r
    st = Setup(m["setup"]["cpu"], m["setup"]["cmdline"], m["setup"]["smp"])
    cell = runtime_cell(SimpleNamespace(vmlinuz=str(d / "vmlinuz")), img, st)
    assert cell.startswith("fn 0/0 fg 0/0 kp 0 krp 0 off 0 ss 0/0 bfq 0/0"), cell
