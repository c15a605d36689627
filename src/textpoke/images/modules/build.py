# SPDX-License-Identifier: GPL-2.0-only
"""Build the modules' relocatable objects with GCC, as Kbuild builds a
module's ``.o`` before it becomes a ``.ko``:

    python -m textpoke.images.modules.build [--out DIR] [--check]

C sources are compiled with the kernel image's flags plus
``-mcmodel=kernel`` (the modules' code model), assembly with ``gcc -c``.
Then objtool-lite for objects: every CALL/JMP/Jcc whose rel32 relocation
names ``__x86_indirect_thunk_<reg>``, ``__x86_return_thunk`` or a
static-call trampoline ``__SCT__<name>`` becomes an entry of
``.retpoline_sites``, ``.return_sites`` or ``.static_call_sites``.  The
entries are emitted as assembly against a global anchor symbol put at the
start of each text section (``objcopy --add-symbol``), linked into the
object with ``ld -r`` and the anchors made local again -- so the tables are
ordinary relocated data, as objtool leaves them in a module.

With no --out the committed objects next to this file are replaced;
--check rebuilds into a temporary directory and compares byte for byte
(exit 1 on a difference).  :func:`many_functions_source` writes the
benchmark's generated module (N functions, each with a jump label and a
static-call site).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..build import KERNEL_CFLAGS, KERNEL_DIR, have_gcc
from .._elf import ElfFile
from .._objtool import (STATIC_CALL_KEY_PREFIX, STATIC_CALL_SITE_TAIL, STATIC_CALL_TRAMP_PREFIX,
                        _branch_at, branch_refs)

__all__ = ["MODULE_CFLAGS", "SOURCES", "build_module", "build_all", "object_sites",
           "many_functions_source", "main"]

HERE = Path(__file__).resolve().parent
MODULE_CFLAGS = [*KERNEL_CFLAGS, "-mcmodel=kernel"]
#: committed object <- source
SOURCES = {"mod_clients.o": "mod_clients.c", "bad_reloc.o": "bad_reloc.S",
           "bad_range.o": "bad_range.S", "bad_sym.o": "bad_sym.S", "bad_key.o": "bad_key.S",
           "bad_call.o": "bad_call.S"}
_PC32, _PLT32 = 2, 4
_ANCHOR = "__objtool_anchor_"


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")


def object_sites(raw: bytes) -> list[tuple[str, int, str, str]]:
    """(text section, offset, kind, detail) for every site of a relocatable
    object: kind "retpoline", "return" or "static_call" (detail: the call
    name, with "+tail" for a JMP)."""
    elf = ElfFile(raw, "<object>")
    out = []
    texts: dict[int, bytes] = {}
    for target, r_offset, name, kind in branch_refs(elf):
        text = texts.get(target.index)
        if text is None:
            text = texts[target.index] = elf.data(target)
        where = _branch_at(text, 0, r_offset)
        if where is None:
            continue
        off, flow = where
        detail = ""
        if kind == "static_call":
            if flow == "jcc":
                raise RuntimeError(f"conditional tail call to {name} at {target.name}+{off:#x}")
            detail = name[len(STATIC_CALL_TRAMP_PREFIX):] + ("+tail" if flow == "jmp" else "")
        out.append((target.name, off, kind, detail))
    return sorted(out)


def _sites_asm(sites: list[tuple[str, int, str, str]], anchors: dict[str, str]) -> str:
    out = ["# objtool-lite tables for a module object; generated.\n"]
    by_kind = {"static_call": [], "retpoline": [], "return": []}
    for sec, off, kind, detail in sites:
        by_kind[kind].append((anchors[sec], off, detail))
    out.append('\t.section .static_call_sites, "a"\n\t.balign 4\n')
    for anchor, off, detail in by_kind["static_call"]:
        call, _, tail = detail.partition("+")
        flags = STATIC_CALL_SITE_TAIL if tail else 0
        out.append(f"\t.long {anchor} + {off:#x} - .\n")
        out.append(f"\t.long {STATIC_CALL_KEY_PREFIX}{call} + {flags} - .\n")
    for table, kind in ((".retpoline_sites", "retpoline"), (".return_sites", "return")):
        out.append(f'\t.section {table}, "a"\n\t.balign 4\n')
        out.extend(f"\t.long {anchor} + {off:#x} - .\n" for anchor, off, _d in by_kind[kind])
    out.append('\t.section .note.GNU-stack, "", @progbits\n')
    return "".join(out)


def build_module(src: Path, out: Path, *, include: Path = KERNEL_DIR) -> Path:
    """Compile *src* (.c or .S) into the relocatable module object *out*."""
    src = Path(src).resolve()
    with tempfile.TemporaryDirectory(prefix="textpoke-module-") as tmp:
        work = Path(tmp)
        obj = work / "a.o"
        flags = MODULE_CFLAGS if src.suffix == ".c" else ["-fno-pic"]
        # relative names from the source directory: nothing depends on where the tree is
        _run(["gcc", *flags, f"-I{include}", "-c", src.name, "-o", str(obj)], cwd=src.parent)
        raw = obj.read_bytes()
        sites = object_sites(raw)
        if not sites:
            shutil.copyfile(obj, out)
            return out
        secs = sorted({s[0] for s in sites})
        anchors = {sec: f"{_ANCHOR}{i}" for i, sec in enumerate(secs)}
        _run(["objcopy", *[a for sec in secs for a in
                           ("--add-symbol", f"{anchors[sec]}={sec}:0,global")],
              str(obj), str(work / "b.o")])
        (work / "sites.s").write_text(_sites_asm(sites, anchors))
        _run(["as", "--64", "-o", str(work / "sites.o"), str(work / "sites.s")])
        _run(["ld", "-r", "-o", str(work / "c.o"), str(work / "b.o"), str(work / "sites.o")])
        _run(["objcopy", *[a for sec in secs for a in ("--localize-symbol", anchors[sec])],
              str(work / "c.o"), str(out)])
    return out


def build_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [build_module(HERE / src, out / obj) for obj, src in SOURCES.items()]


def many_functions_source(n: int) -> str:
    """A module of *n* functions ``int mod_fn_<i>(long)``, each testing the
    kernel's jl_key_false and calling through its sc_op static call."""
    head = ('// SPDX-License-Identifier: GPL-2.0-only\n// generated: a module of many functions\n'
            '#include "types.h"\n#include "jump_label.h"\n#include "static_call.h"\n'
            'extern struct static_key_false jl_key_false;\nextern int sc_double(int x);\n'
            'DECLARE_STATIC_CALL(sc_op, sc_double);\n')
    body = "".join(
        f"noinline __used int mod_fn_{i}(long x)\n{{\n"
        f"\treturn static_call(sc_op)((int)x + {i}) + (static_branch_unlikely(&jl_key_false) ? {i} : 0);\n}}\n"
        for i in range(n))
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m textpoke.images.modules.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="rebuild and compare with the committed objects")
    args = ap.parse_args(argv)
    if not have_gcc() or not shutil.which("objcopy"):
        print("gcc, binutils (as, ld, objcopy) are needed", file=sys.stderr)
        return 2
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            bad = 0
            for p in build_all(Path(tmp)):
                same = filecmp.cmp(p, HERE / p.name, shallow=False)
                print(f"{p.name}: {'identical' if same else 'DIFFERS'}")
                bad += not same
            return 1 if bad else 0
    for p in build_all(args.out or HERE):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
