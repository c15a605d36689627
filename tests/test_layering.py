# SPDX-License-Identifier: GPL-2.0-only
"""Imports run one way: every module's imports (module-level and inside
functions, read with ``ast``) are checked against the layers the README's
*Layout* section describes.

* a package may import only its own layer or the layers below it;
* the backends (``sim``, ``live``) import nothing of each other, and the
  modules that *are* the sim machine import nothing but the core;
* only the top (``cli``, ``__main__``) imports the ``textpoke`` façade;
* no import inside a function hides a cycle: if the imported module can
  reach the importing one again, the cycle is there, only postponed;
* packages do not import each other in a ring.

A new top-level package must be given a layer in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "textpoke"

#: bottom to top; a module may import its own layer and those below it
LAYERS: list[tuple[str, set[str]]] = [
    ("errors", {"_errors"}),
    ("core", {"_core", "lowlevel", "testing"}),
    ("kernel data", {"images"}),
    ("boot passes", {"_alternative"}),
    ("clients", {"_execmem", "_jump_label", "_static_call", "_ftrace", "_kprobes", "_module",
                 "_relocate", "_indirect_jumps", "_bpf"}),
    ("kernel", {"kernel", "selftests"}),
    ("backends", {"sim", "live"}),
    ("tools", {"verify"}),
    ("top", {"cli", "__main__", "<facade>"}),
]
BACKENDS = {"sim", "live"}
#: the modules that implement the sim machine itself (not its harnesses)
SIM_MACHINE = {"_machine", "_vcpu", "_sched", "_traps", "_fetchview"}

#: Known violations, each with why it is still here.  This list only shrinks:
#: a fixed one must be removed (the test fails on a stale entry).
ALLOWED: dict[tuple[str, str], str] = {}


def _layer_of(pkg: str) -> int:
    for i, (_name, pkgs) in enumerate(LAYERS):
        if pkg in pkgs:
            return i
    raise AssertionError(f"textpoke.{pkg} has no layer: give it one in tests/test_layering.py "
                         "(and say where it sits in the README's Layout section)")


def _modname(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _modules() -> dict[str, Path]:
    return {_modname(p)[0]: p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of
    textpoke code; ``from pkg import name`` counts as importing pkg.name
    when that is a module, and pkg otherwise."""
    name, is_pkg = _modname(path)
    pkg = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    in_fn: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_fn.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.append(sub if sub in mods else mod)
        for t in targets:
            if t == "textpoke" or t.startswith("textpoke."):
                out.append((t, node.lineno, id(node) in in_fn))
    return out


def _pkg(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "<facade>"
    return parts[1]


@functools.lru_cache(maxsize=1)
def _graph():
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    fn_edges: list[tuple[str, str, int]] = []
    all_edges: list[tuple[str, str, int, bool]] = []
    for m, p in mods.items():
        for t, line, in_fn in _imports(p, mods):
            while t not in mods and "." in t:       # an attribute, not a module
                t = t.rpartition(".")[0]
            # importing a.b.c runs a/__init__ and a/b/__init__ first -- except
            # the packages holding the importer, which are already running
            chain = t.split(".")
            for i in range(1, len(chain) + 1):
                anc = ".".join(chain[:i])
                if anc in mods and anc != m and (i == len(chain) or not
                                                 m.startswith(anc + ".")):
                    edges[m].add(anc)
            all_edges.append((m, t, line, in_fn))
            if in_fn:
                fn_edges.append((m, t, line))
    return mods, edges, fn_edges, all_edges


def _reaches(edges: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    seen, stack = {start: None}, [start]
    while stack:
        n = stack.pop()
        if n == goal:
            path = [n]
            while seen[path[-1]] is not None:
                path.append(seen[path[-1]])
            return path[::-1]
        for nxt in edges.get(n, ()):
            if nxt not in seen:
                seen[nxt] = n
                stack.append(nxt)
    return None


def _violations() -> dict[tuple[str, str], str]:
    mods, edges, fn_edges, all_edges = _graph()
    bad: dict[tuple[str, str], str] = {}
    for m, t, line, in_fn in all_edges:
        a, b = _pkg(m), _pkg(t)
        where = f"{m}:{line}{' (in a function)' if in_fn else ''} imports {t}"
        if b == "<facade>" and a not in ("cli", "__main__", "<facade>"):
            bad[(m, t)] = f"{where}: only the top imports the textpoke façade"
        elif a != b and _layer_of(a) < _layer_of(b):
            bad[(m, t)] = (f"{where}: {LAYERS[_layer_of(a)][0]} may not import "
                           f"{LAYERS[_layer_of(b)][0]}")
        elif a in BACKENDS and b in BACKENDS and a != b:
            bad[(m, t)] = f"{where}: a backend imports another backend"
        elif a == "sim" and m.rpartition(".")[2] in SIM_MACHINE and b not in (
                "sim", "_core", "_errors"):
            bad[(m, t)] = f"{where}: the sim machine itself imports only the core"
    for m, t, line in fn_edges:
        back = _reaches(edges, t, m)
        if back is not None:
            bad.setdefault((m, t), f"{m}:{line} imports {t} inside a function, hiding the cycle "
                                   + " -> ".join(back + [t]))
    return bad


def test_every_package_has_a_layer():
    for m in _modules():
        _layer_of(_pkg(m))


def test_imports_run_downwards_only():
    bad = _violations()
    new = {k: v for k, v in bad.items() if k not in ALLOWED}
    assert not new, "imports that run the wrong way:\n" + "\n".join(sorted(new.values()))


def test_allow_list_only_shrinks():
    bad = _violations()
    stale = [k for k in ALLOWED if k not in bad]
    assert not stale, f"fixed, so take these off ALLOWED: {stale}"


def test_packages_import_each_other_in_no_ring():
    _mods, edges, _fn, _all = _graph()
    pkg_edges: dict[str, set[str]] = defaultdict(set)
    for m, ts in edges.items():
        for t in ts:
            a, b = _pkg(m), _pkg(t)
            if a != b and (m, t) not in ALLOWED:
                pkg_edges[a].add(b)
    rings = []
    for a in list(pkg_edges):
        for b in pkg_edges[a]:
            back = _reaches(pkg_edges, b, a)
            if back is not None:
                rings.append(" -> ".join([a] + back))
    assert not rings, "package cycles:\n" + "\n".join(sorted(set(rings)))


@pytest.mark.parametrize("snippet,expect", [
    ("from ..sim._machine import RUN", "clients may not import backends"),
    ("from .._ftrace import Ftrace", "core may not import clients"),
])
def test_the_checker_has_teeth(tmp_path, monkeypatch, snippet, expect):
    """A planted wrong-way import is reported (the check is not vacuous)."""
    target = "_kprobes" if "sim" in snippet else "_core"
    fake = ROOT / target / "_layering_probe.py"
    real_read = Path.read_text

    def read_text(self, *a, **kw):
        if self == fake:
            return f"def f():\n    {snippet}\n"
        return real_read(self, *a, **kw)

    real_rglob = Path.rglob

    def rglob(self, pattern):
        yield from real_rglob(self, pattern)
        if self == ROOT:
            yield fake
    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "rglob", rglob)
    _graph.cache_clear()
    try:
        bad = _violations()
    finally:
        _graph.cache_clear()
    msgs = [v for (m, _t), v in bad.items() if m.endswith("_layering_probe")]
    assert msgs and expect in msgs[0], msgs


def test_readme_layout_names_every_package():
    """The README's Layout section says where each concern lives."""
    text = (SRC.parent / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    for d in sorted(ROOT.iterdir()):
        if (d / "__init__.py").exists():
            assert d.name in layout, f"README's Layout section does not mention {d.name}/"
    for _name, pkgs in LAYERS:
        for pkg in pkgs - {"<facade>", "__main__"}:
            assert pkg in layout, f"README's Layout section does not place {pkg}"
