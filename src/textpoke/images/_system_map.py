# SPDX-License-Identifier: GPL-2.0-only
"""A kernel's ``System.map``: parsed into the one symbolizer
(:class:`~._symbols.Symbols`), and checked against the symbols the image
carries itself (its kallsyms tables or ``.symtab``)."""

from __future__ import annotations

import re
from itertools import repeat

from ._elf import ImageError
from ._symbols import Symbols

__all__ = ["parse_system_map", "symbol_differences"]

_MAP_LINE = re.compile(r"^([0-9a-fA-F]{8,16}) ([A-Za-z?]) ([\x21-\x7e]+)\r?$", re.M)


def parse_system_map(raw: bytes, path: str = "<System.map>") -> Symbols:
    """A ``System.map`` (``nm -n`` lines: address, type letter, name)."""
    text = raw.decode("latin-1")
    words = text.split()
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    ok = False
    if words and len(words) % 3 == 0 and len(words) // 3 == lines:
        a, t, n = words[0::3], words[1::3], words[2::3]
        types = "".join(t)
        try:
            addrs = list(map(int, a, repeat(16)))
            ok = len(types) == len(t) and types.isalpha() and types.isascii() \
                and max(map(len, a)) <= 16 and "".join(n).isascii()
        except ValueError:
            pass
    if not ok:
        # not the plain layout: line by line, bad lines counted
        found = _MAP_LINE.findall(text)
        if not found or lines - len(found) > len(found) // 100 + 10:
            hint = ""
            if "real System.map is in" in text:
                hint = " (Debian's placeholder: the real one is in the -dbg package)"
            raise ImageError(f"{path}: not a System.map{hint}")
        a, t, n = (list(x) for x in zip(*found))
        addrs, types = list(map(int, a, repeat(16))), "".join(t)
    return Symbols.from_lists(addrs, list(n), types, source=path)


#: what ``scripts/kallsyms`` leaves out besides absolute symbols (6.1; 6.12's
#: ``mksysmap`` keeps these out of the map too): its own tables, which only
#: appear after its first pass, and a few name spaces of other architectures
_NOT_IN_KALLSYMS = frozenset(f"kallsyms_{t}" for t in (
    "addresses", "offsets", "relative_base", "num_syms", "names", "markers",
    "token_table", "token_index", "seqs_of_names"))
_NOT_IN_KALLSYMS_PREFIX = ("__kcfi_typeid_", "__efistub_", "__kvm_nvhe_$", "__kvm_nvhe_.L")


def symbol_differences(image: Symbols, smap: Symbols, *, strict: bool = False,
                       limit: int | None = None) -> list[str]:
    """How *smap* (a ``System.map``) disagrees with *image* (the symbols the
    image carries itself), one line each, at most *limit*; empty when it is
    the image's map.

    ``scripts/kallsyms`` takes its input from the same ``nm`` listing as the
    map, drops absolute symbols (type ``A``; in 6.1 also its own tables'
    names) and, on x86-64 SMP, stores the
    per-CPU symbols as absolute ones: so every image symbol must be in the
    map at the same address with the same type, per-CPU ones (``A`` in the
    image) excepted.  With *strict*, the map may hold nothing more than
    that (true of kernels built with ``CONFIG_KALLSYMS_ALL``)."""
    out: list[str] = []

    def full() -> bool:
        return limit is not None and len(out) >= limit

    def at(s: Symbols, n: str) -> str:
        return f"{s[n]:#x}" if n in s else "missing"

    for key in ("_text", "_etext", "_end", "linux_banner"):
        if key in image and image.get(key) != smap.get(key):
            out.append(f"{key} is {at(smap, key)} in the map but {image[key]:#x} in the image")
            if full():
                return out
    # the map without what kallsyms leaves out, entry for entry
    mt = smap.types
    drop = {i for i in (m.start() for m in re.finditer("[aA]", mt))
            if smap.names[i] not in image}
    drop.update(i for i, n in enumerate(smap.names)
                if (n in _NOT_IN_KALLSYMS or n.startswith(_NOT_IN_KALLSYMS_PREFIX))
                and n not in image)
    addrs, names = list(smap.addrs), list(smap.names)
    for i in sorted(drop, reverse=True):
        del addrs[i], names[i]
    if drop:
        mt = "".join([t for i, t in enumerate(mt) if i not in drop]) if mt else mt
    it = image.types
    if addrs == image.addrs and names == image.names:
        if mt and it and mt != it:
            # per-CPU symbols are "A" in the image: take the map's word there
            fixed = list(mt)
            for m in re.finditer("A", it):
                fixed[m.start()] = "A"
            if "".join(fixed) != it:
                for a, n, x, y in zip(addrs, names, it, mt):
                    if x != y and x != "A":
                        out.append(f"{n} is type {y!r} in the map but {x!r} in the image")
                        if full():
                            break
        return out
    have = set(zip(addrs, names))
    for a, n in zip(image.addrs, image.names):
        if (a, n) not in have:
            out.append(f"{n} is {at(smap, n)} in the map but {a:#x} in the image")
            if full():
                return out
    if strict:
        mine = set(zip(image.addrs, image.names))
        for a, n in zip(addrs, names):
            if (a, n) not in mine:
                out.append(f"{n} at {a:#x} is in the map but not in the image")
                if full():
                    return out
    return out
