# SPDX-License-Identifier: GPL-2.0-only
"""A cache of the parsed symbol tables of the files a process maps.

Reading the 10,000 function symbols of a big program (struct entries, names
from the string table, duplicates of ``.symtab`` and ``.dynsym`` merged,
sorted by address) costs tens of milliseconds of CPU on every command --
more than the whole attached part of a 100-site ``live toggle``.  The
result depends only on the file, so it is kept under the project's cache
(``$TEXTPOKE_CACHE``, else ``~/.cache/textpoke``) in ``live-symbols/``, one
file per (device, inode), and used only when the file it was read from is
the same file: same device, inode, size, modification time and *change*
time (ns), and the same CRC-32 of its symbol and string tables' bytes.
The change time cannot be set back from user space -- any write,
truncate, rename or ``touch`` of the file moves it -- and the CRC covers
what the clock cannot (two writes within one tick of a coarse file-system
clock, an inode number reused for a file of the same size), so an entry
never describes other symbols than the file's.  A stale, truncated or
foreign cache file is ignored and rewritten; a cache that cannot be
written (a read-only home) costs nothing but the saving.
At most :data:`MAX_ENTRIES` entries are kept, the oldest written
dropped first.  ``TEXTPOKE_LIVE_SYMBOL_CACHE=0`` turns it off.

What is kept is the file's own data, link-time values (the load bias is
the process's, added by the caller): parallel lists of name, value, size
and ``st_info`` type of every defined function, GNU ifunc and object
symbol, one per (name, value), in (value, not function, name) order.
The format is fixed-width arrays plus the names joined by NULs: loading it
is a few ``array`` copies and one split, never code execution (no pickle,
no marshal).
"""

from __future__ import annotations

import os
import struct
from array import array

__all__ = ["Key", "Rows", "cache_dir", "enabled", "key", "load", "store"]

#: names, link-time values, sizes, st_info types
Rows = tuple[list[str], list[int], list[int], list[int]]

#: entries kept (the newest written); a new entry beyond drops the oldest
MAX_ENTRIES = 256

_MAGIC = b"textpoke live-symbols v1\n"
#: dev, ino, size, mtime_ns, ctime_ns, crc; n, bytes of the names
_HEAD = struct.Struct("<QQQqqQQQ")
Key = tuple[int, int, int, int, int, int]


def enabled() -> bool:
    return os.environ.get("TEXTPOKE_LIVE_SYMBOL_CACHE", "1") != "0"


def cache_dir() -> str:
    """``<cache root>/live-symbols``; the cache root as
    :func:`textpoke.images._vmlinux.cache_root` (not imported: it loads the
    kernel images' machinery)."""
    root = os.environ.get("TEXTPOKE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "textpoke")
    return os.path.join(root, "live-symbols")


def key(st: os.stat_result, crc: int) -> Key:
    """The identity of a file: its ``fstat`` and the CRC of its tables."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, crc)


def _path(k: Key) -> str:
    return os.path.join(cache_dir(), f"{k[0]:x}-{k[1]:x}.syms")


def load(k: Key) -> Rows | None:
    """The rows stored for the file whose :func:`key` is *k*, or None (no
    entry, an entry of another file or version, a damaged entry)."""
    try:
        with open(_path(k), "rb") as f:
            data = f.read()
    except OSError:
        return None
    m, h = len(_MAGIC), _HEAD.size
    if len(data) < m + h or not data.startswith(_MAGIC):
        return None
    *stored, n, nb = _HEAD.unpack_from(data, m)
    if tuple(stored) != k:
        return None
    at = m + h
    if len(data) != at + 17 * n + nb:
        return None
    vals, sizes, types = array("Q"), array("Q"), array("B")
    vals.frombytes(data[at:at + 8 * n])
    sizes.frombytes(data[at + 8 * n:at + 16 * n])
    types.frombytes(data[at + 16 * n:at + 17 * n])
    try:
        names = data[at + 17 * n:].decode("utf-8").split("\0") if n else []
    except UnicodeDecodeError:
        return None
    if len(names) != n:
        return None
    return names, vals.tolist(), sizes.tolist(), types.tolist()


def store(k: Key, rows: Rows) -> None:
    """Keep *rows* for the file whose :func:`key` is *k* (atomically: a
    reader sees the old entry or the new one; errors are ignored)."""
    names, vals, sizes, types = rows
    try:
        blob = "\0".join(names).encode("utf-8")
        if any("\0" in x for x in names):
            return
        data = b"".join((_MAGIC, _HEAD.pack(*k, len(names), len(blob)),
                         array("Q", vals).tobytes(), array("Q", sizes).tobytes(),
                         array("B", types).tobytes(), blob))
        d = cache_dir()
        os.makedirs(d, exist_ok=True)
        path = _path(k)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        _prune(d, path)
    except (OSError, ValueError, OverflowError, UnicodeEncodeError):
        try:
            os.unlink(tmp)           # type: ignore[possibly-undefined]
        except (OSError, NameError):
            pass


def _prune(d: str, keep: str) -> None:
    """At most :data:`MAX_ENTRIES` entries: the oldest written go (each
    entry is one file's table, a few hundred KiB for a big program)."""
    try:
        names = [n for n in os.listdir(d) if n.endswith(".syms")]
        if len(names) <= MAX_ENTRIES:
            return
        paths = [os.path.join(d, n) for n in names]
        ages = {}
        for p in paths:
            try:
                ages[p] = os.stat(p).st_mtime_ns
            except OSError:
                pass
        for p in sorted(ages, key=ages.__getitem__)[:len(ages) - MAX_ENTRIES]:
            if p != keep:
                os.unlink(p)
    except OSError:
        pass
