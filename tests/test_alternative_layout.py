# SPDX-License-Identifier: GPL-2.0-only
"""The shape of ``textpoke._alternative``: a façade whose ``__all__`` is
exactly what it exports, private modules by concern, no imports hidden in
functions and no module-level state keyed by core."""

from __future__ import annotations

import ast
import importlib
import pathlib
import weakref

import textpoke._alternative as alt

PKG = pathlib.Path(alt.__file__).parent
MODULES = sorted(PKG.glob("_*.py"))


def test_all_is_exact_and_resolves():
    # what the façade imports is what it exports
    assert set(alt.__all__) == {n for n in vars(alt) if not n.startswith("_")}
    assert len(alt.__all__) == len(set(alt.__all__))
    for name in alt.__all__:
        assert getattr(alt, name) is not None


def test_names_others_import_are_still_there():
    for name in ("AlternativeError", "BootResult", "SelfTestError", "alternative_instructions",
                 "alternatives_enable_smp", "alternatives_smp_lock", "alternatives_smp_unlock",
                 "apply_alternatives", "apply_retpolines", "apply_returns", "apply_seal_endbr",
                 "DEFAULT_FEATURES", "DA_ALL", "parse_debug_alternative"):
        assert name in alt.__all__, name


def test_facade_is_short_and_modules_are_split_by_concern():
    assert {p.stem for p in MODULES} >= {"_records", "_shadow", "_apply", "_thunks",
                                           "_smp_locks", "_selftest", "_boot", "_reloc"}
    # the façade defines nothing: a docstring, imports and __all__
    body = ast.parse((PKG / "__init__.py").read_text()).body
    for node in body[1:]:
        assert isinstance(node, ast.ImportFrom) or (
            isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]), \
            ast.dump(node)[:80]
    for p in MODULES:
        assert len(p.read_text().splitlines()) < 400, p.name


def test_no_function_level_imports():
    for p in [PKG / "__init__.py", *MODULES]:
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{p.name}:{fn.name} imports inside a function"


def test_no_module_level_registry_keyed_by_core():
    for p in MODULES:
        mod = importlib.import_module(f"{alt.__name__}.{p.stem}")
        for name, value in vars(mod).items():
            assert not isinstance(value, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary)), \
                f"{p.stem}.{name}"
    src = "".join(p.read_text() for p in MODULES)
    assert "hasattr(" not in src and "stack_base" not in src
