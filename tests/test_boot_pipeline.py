# SPDX-License-Identifier: GPL-2.0-only
"""One boot pipeline: the passes that patch the bundled image on a machine
are the passes that patch a real kernel's flat memory, and a module being
loaded goes through them too.  What differs is the text buffer and the
kernel line's data, never a second copy of a pass."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from textpoke import TextPoke, alternative_instructions
from textpoke._alternative import DEFAULT_FEATURES
from textpoke.kernel import BootOptions, KernelText
from textpoke._alternative._ktext import TextBuffer, caps_of
from textpoke._alternative._livetext import LiveText
from textpoke._alternative._passes import TEXT_PASSES, TextPasses
from textpoke._alternative._records import DebugLog
from textpoke._alternative._shadow import Shadow, features_of, symbols_of
from textpoke.images._lines import LINE_61, LINE_612, LINE_BUNDLED
from textpoke.sim._boot import boot_kernel_image

ALT = Path(__file__).resolve().parents[1] / "src" / "textpoke" / "_alternative"


def _flat(sim, image) -> KernelText:
    """The bundled image's memory as one flat buffer, the way a real
    kernel's is held: text as the machine has it, data from the image."""
    lo = min(s.addr for s in image.sections.values() if s.data)
    hi = max(s.end for s in image.sections.values() if s.data)
    buf = bytearray(hi - lo)
    for s in image.sections.values():
        if s.data:
            buf[s.addr - lo:s.addr - lo + len(s.data)] = s.data
    ranges = []
    for r in sim.text_ranges:
        if lo <= r.start and r.end <= hi:
            buf[r.start - lo:r.end - lo] = sim.text_read(r.start, r.end - r.start)
            ranges.append((f"text@{r.start:#x}", r.start, r.end))
    return KernelText(buf, lo, dict(image.symbols), ranges, line=LINE_BUNDLED)


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, ("retpoline",),
                                      ("retpoline", "retpoline_lfence", "rethunk")])
def test_the_bundled_image_patched_on_a_machine_equals_the_real_kernel_path(features):
    """The same TextPasses over the machine's shadow (alternative_instructions)
    and over a flat KernelText of the same image with the bundled line's
    rules leave the same bytes at every site."""
    sim, image, tables = boot_kernel_image(1)
    kt = _flat(sim, image)
    res = alternative_instructions(TextPoke(sim), image, tables, features, selftests=False,
                                   noreplace_smp=True)
    feats, _ = features_of(features)
    passes = TextPasses(kt, {".retpoline_sites": [r.addr for r in tables.retpoline_sites],
                             ".return_sites": [r.addr for r in tables.return_sites],
                             ".altinstructions": tables.alt_instructions},
                        caps_of(feats), BootOptions())
    for name in LINE_BUNDLED.passes:
        if name in TEXT_PASSES:
            passes.run(name)
    sites = ([(a.instr, a.instrlen) for a in res.alternatives]
             + [(r.addr, len(r.new)) for r in res.retpolines + res.returns])
    assert len(sites) > 100
    for addr, n in sites:
        assert kt.read(addr, n) == sim.text_read(addr, n), hex(addr)
    assert any(a.written for a in res.alternatives)
    # and the counts the real boot reports agree with the machine's records
    assert passes.logs[".altinstructions"].stats.applied == sum(a.taken for a in res.alternatives)
    assert passes.logs[".return_sites"].stats.changed == sum(r.patched for r in res.returns)


def test_every_buffer_speaks_the_protocol():
    sim, image, _tables = boot_kernel_image(1)
    core = TextPoke(sim)
    names = [n for n in dir(TextBuffer) if not n.startswith("_")]
    assert {"read", "write", "decode", "describe", "sym", "opt", "data_u64"} <= set(names)
    for tb in (_flat(sim, image), Shadow(core, symbols_of(image)),
               LiveText(core, symbols_of(image))):
        for n in names:
            assert hasattr(tb, n), (type(tb).__name__, n)
        a = image.symbols["alt_probe_always"]
        name, _, off = tb.describe(a + 1).partition("+")
        assert image.symbols[name] == a and off == "0x1"
        assert tb.decode(a) is not None and tb.read(a, 4) == sim.text_read(a, 4)
        assert tb.line is LINE_BUNDLED


def test_lines_differ_only_by_data():
    """What the passes ask of a line is in KernelLine, and each line says it."""
    assert LINE_BUNDLED.checked and not LINE_612.checked and not LINE_61.checked
    assert (LINE_612.nops, LINE_61.nops, LINE_BUNDLED.nops) == ("nops", "nop1", "nops")
    assert "apply_paravirt" in LINE_61.passes and "apply_paravirt" not in LINE_612.passes
    assert "callthunks" in LINE_612.passes and "callthunks" not in LINE_61.passes
    for line in (LINE_BUNDLED, LINE_612, LINE_61):
        assert set(TEXT_PASSES) >= {p for p in line.passes if p.startswith("apply_")}


def _defs(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_no_pass_helper_is_written_twice():
    """The helpers the two pipelines used to keep each (fits, rel32, the
    indirect-branch encoder, NOP fill, relocation) are defined once."""
    seen: dict[str, list[str]] = {}
    for p in sorted(ALT.glob("*.py")):
        for d in _defs(p):
            seen.setdefault(d.lstrip("_"), []).append(p.name)
    for name in ("fits", "rel32", "emit_indirect", "add_nop", "add_nops", "optimize_nops",
                 "apply_relocation", "decode_buf", "is_nop", "recompute_jump",
                 "group_lengths", "lengths", "s64"):
        assert len(seen.get(name, [])) <= 1, (name, seen.get(name))
    # the old real-kernel-only copies are gone
    for gone in ("_kalt.py", "_kretpoline.py", "_knops.py"):
        assert not (ALT / gone).exists()


def _names(code) -> set[str]:
    out = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            out |= _names(c)
    return out


def test_a_module_is_patched_by_the_same_passes():
    """The module loader imports the machine wrappers of the boot's passes,
    and each wrapper hands its shadow to the one pass."""
    from textpoke._alternative import _apply, _thunks
    imported = {(n.module, a.name) for p in (ALT.parent / "_module").glob("*.py")
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom)
                for a in n.names}
    assert ("_alternative._apply", "alt_instructions_pass") in imported
    assert ("_alternative._thunks", "retpolines_pass") in imported
    assert ("_alternative._thunks", "returns_pass") in imported
    for fn, inner in ((_apply.alt_instructions_pass, "alternatives"),
                      (_thunks.retpolines_pass, "retpolines"),
                      (_thunks.returns_pass, "returns")):
        assert {"shadow_pass", inner} <= _names(fn.__code__), fn.__name__


def test_debug_lines_come_from_the_shared_passes_on_both_buffers():
    sim, image, tables = boot_kernel_image(1)
    res = alternative_instructions(TextPoke(sim), image, tables, ("retpoline_lfence",),
                                   selftests=False, debug_alternative=0x1F, noreplace_smp=True)
    msgs = [d.message for d in res.debug]
    assert any(m.startswith("retpoline at: ") for m in msgs)
    assert any(m.startswith("return thunk at: ") for m in msgs)
    kt = _flat(boot_kernel_image(1)[0], image)
    dlog = DebugLog(0x1F)
    feats, _ = features_of(("retpoline_lfence",))
    TextPasses(kt, {".retpoline_sites": [r.addr for r in tables.retpoline_sites]},
               caps_of(feats), dbg=dlog).run("apply_retpolines")
    def where(lines):      # (site, length) of each line; names follow each buffer's symbols
        return [re.search(r"\((0x[0-9a-f]+)\) len: (\d+)", m).groups() for m in lines
                if m.startswith("retpoline at: ")]
    assert where(dlog.lines()) == where(msgs) and len(where(msgs)) == len(tables.retpoline_sites)
