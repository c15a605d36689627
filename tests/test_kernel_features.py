# SPDX-License-Identifier: GPL-2.0-only
"""The kernel lines' feature tables: one module (images/_features.py) with
what the lines share written once and each line's own entries apart, as
tools/kernel_features.py writes it; each line's table is the two merged."""

import importlib.util
from pathlib import Path

from textpoke.images import _features
from textpoke.images._lines import LINE_61, LINE_612, LINES, cpuinfo_table, feature_table

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("kernel_features",
                                                  ROOT / "tools" / "kernel_features.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_is_what_the_generator_writes_from_the_lines_tables():
    tables = {ln.name: (ln.ncapints, ln.nbugints, dict(ln.features), dict(ln.cpuinfo_names))
              for ln in LINES}
    text = (ROOT / "src/textpoke/images/_features.py").read_text()
    assert _tool().render(tables) == text


def test_shared_is_only_what_every_line_numbers_alike():
    for name, value in _features.SHARED.items():
        assert all(ln.features[name] == value for ln in LINES)
    for ln in LINES:
        for name, value in _features.OWN[ln.name].items():
            others = [o for o in LINES if o is not ln]
            assert name not in _features.SHARED
            assert any(o.features.get(name) != value for o in others)


def test_a_lines_table_is_in_number_order_and_keeps_what_changed():
    for ln in LINES:
        nums = list(feature_table(ln.name).values())
        assert nums == sorted(nums) and len(set(nums)) == len(nums)
    # numbers that moved between the lines (README, images/_lines.py)
    assert (LINE_61.features["indirect_thunk_its"], LINE_612.features["indirect_thunk_its"]) \
        == (21 * 32 + 5, 21 * 32 + 6)
    assert (LINE_61.features["clear_cpu_buf"] >> 5, LINE_612.features["clear_cpu_buf"] >> 5) \
        == (11, 3)
    assert "call_depth" in LINE_612.features and "call_depth" not in LINE_61.features
    assert cpuinfo_table("6.12")["bug_tlb_mmatch"] == "bug_amd_tlb_mmatch"
    assert "bug_tlb_mmatch" not in cpuinfo_table("6.1")


def test_parse_reads_features_bugs_and_cpuinfo_names():
    header = """
#define NCAPINTS 22
#define NBUGINTS 2
#define X86_FEATURE_FPU ( 0*32+ 0) /* "fpu" Onboard FPU */
#define X86_FEATURE_XMM ( 0*32+25) /* "sse" */
#define X86_FEATURE_ERMS ( 9*32+ 9) /* Enhanced REP MOVSB */
#define X86_BUG_F00F X86_BUG(0) /* "f00f" */
#define X86_BUG_GDS X86_BUG(1*32 + 6) /* "gds" */
"""
    ncap, nbug, feats, cpuinfo = _tool().parse(header)
    assert (ncap, nbug) == (22, 2)
    assert feats == {"fpu": 0, "xmm": 25, "erms": 297, "bug_f00f": 704, "bug_gds": 742}
    assert cpuinfo == {"sse": "xmm"}
