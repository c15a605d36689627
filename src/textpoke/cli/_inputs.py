# SPDX-License-Identifier: GPL-2.0-only
"""Checks of file arguments, made before any work starts.

An input must be a regular file (not a FIFO, a directory, ``/dev/zero``)
no larger than its stated limit, checked with ``stat`` before a byte is
read; an output must be a regular file or a new one in a writable
directory (not a directory, not ``/dev/full``).  Refusals are one line.
"""

from __future__ import annotations

import os
import stat

from ._args import UsageError

__all__ = ["MiB", "GiB", "check_input", "check_new_name", "check_output", "input_file",
           "output_file", "read_bounded"]

MiB = 1 << 20
GiB = 1 << 30


def check_input(path: str, limit: int, what: str) -> int:
    """The size of input file *path*, refused unless it is a readable
    regular file of at most *limit* bytes."""
    if not path:
        raise UsageError(f"{_pre(what)}an empty path")
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{_pre(what)}cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{_pre(what)}{path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else
                "a block device" if stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise UsageError(f"{_pre(what)}{path} is {kind}, not a regular file")
    if st.st_size > limit:
        raise UsageError(f"{_pre(what)}{path} is {st.st_size:,} bytes; at most {limit:,}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{_pre(what)}cannot read {path}: permission denied")
    return st.st_size


def read_bounded(path: str, limit: int, what: str) -> bytes:
    """Read *path* after :func:`check_input`, never more than *limit* bytes
    (the file may grow between the check and the read)."""
    check_input(path, limit, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"{_pre(what)}cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{_pre(what)}{path} grew past {limit:,} bytes while being read")
    return data


def check_output(path: str, what: str) -> None:
    """*path* can be written: a regular file, or a new one in an existing
    writable directory.  Devices, FIFOs and directories are refused (a
    write to /dev/full would only fail after the whole run)."""
    if not path:
        raise UsageError(f"{_pre(what)}an empty path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"{_pre(what)}cannot write {path}: {e.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{_pre(what)}{path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{_pre(what)}{path} is not a regular file")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{_pre(what)}cannot write {path}: permission denied")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{_pre(what)}cannot write {_short(path)}: no directory "
                         f"{_short(parent)}")
    check_new_name(path, what)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{_pre(what)}cannot write {path}: permission denied in {parent}")


def check_new_name(path: str, what: str) -> None:
    """A file or directory about to be created can be: its name fits the
    file system (a longer one would fail only after the work was done)."""
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(os.path.basename(path))) > name_max or \
            len(os.fsencode(os.path.abspath(path))) >= 4096:
        raise UsageError(f"{_pre(what)}cannot create {_short(path)}: name too long "
                         f"(at most {name_max} bytes a name)")


def _short(path: str) -> str:
    return path if len(path) <= 120 else path[:60] + "..." + path[-40:]


def _pre(what: str) -> str:
    return f"{what}: " if what else ""


def input_file(limit: int):
    """An argparse ``type``: an input file checked by :func:`check_input`."""
    from ._args import checked
    t = checked(lambda p: check_input(p, limit, ""), f"a regular file of at most {limit:,} bytes")
    t.file = "input"              # type: ignore[attr-defined]  (for tests)
    return t


def output_file():
    """An argparse ``type``: an output path checked by :func:`check_output`."""
    from ._args import checked
    t = checked(lambda p: check_output(p, ""), "a writable file")
    t.file = "output"             # type: ignore[attr-defined]
    return t


def check_state(path: str, limit: int, what: str) -> None:
    """A file the command reads back if it exists and rewrites as it goes
    (``verify --resume``/``--state``): if it exists, a regular file of at
    most *limit* bytes; either way one that can be written."""
    if path and os.path.lexists(path):
        check_input(path, limit, what)
    check_output(path, what)


def state_file(limit: int):
    """An argparse ``type``: a file checked by :func:`check_state`."""
    from ._args import checked
    t = checked(lambda p: check_state(p, limit, ""),
                f"a writable regular file (read back if it exists) of at most {limit:,} bytes")
    t.file = "state"              # type: ignore[attr-defined]
    return t


def check_output_dir(path: str, what: str) -> None:
    """*path* is a writable directory, or one that can be created: its
    parent is a writable directory and its name fits the file system."""
    if not path:
        raise UsageError(f"{_pre(what)}an empty path")
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{_pre(what)}{_short(path)} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{_pre(what)}cannot write in {_short(path)}: permission denied")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{_pre(what)}cannot create {_short(path)}: {_short(parent)} is not a "
                         "writable directory")
    check_new_name(path, what)


def output_dir():
    """An argparse ``type``: a directory checked by :func:`check_output_dir`."""
    from ._args import checked
    t = checked(lambda p: check_output_dir(p, ""), "a writable directory")
    t.file = "dir"                # type: ignore[attr-defined]
    return t
