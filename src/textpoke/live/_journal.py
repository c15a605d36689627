# SPDX-License-Identifier: GPL-2.0-only
"""The journal: what a patcher has in flight in a process, on disk, so that
whoever comes after a patcher that died (SIGKILL, the OOM killer) can find
and undo it -- ``textpoke live recover PID`` and ``live sites --check``.

One file per target, ``$XDG_RUNTIME_DIR/textpoke/<pid>.json`` (else
``/tmp/textpoke-<uid>/<pid>.json``, a 0700 directory), written atomically
(a temporary file renamed over it) *before* each step that needs it:

``sites``    every site where an INT3 of ours is being written, with the
             first byte it replaced (``old_first``) and, once the tail is
             being written, the tail it replaced and the new tail.  A site
             whose first byte reads INT3 is put back whole from these
             (old tail, then old first byte, with every thread stopped);
             a site whose first byte is not INT3 is whole already (tails are
             only ever written under an INT3).
``guard``    the SIGTRAP handler injected into the target (see
             :mod:`._guard`): its mapping and the action it replaced.
``regions``  injected stub regions (``live count``) and the sites switched
             to CALLs into them, with their original bytes.

The file names the patcher (pid and start time) and the target (start
time).  A journal whose target is another process (pid reused) is stale
and is removed; one whose patcher is alive and is not us means another
textpoke is at work (refused); one whose patcher is dead is left for
``live recover`` (every other command refuses, saying so).  A clean close
removes it.  Writing costs one ``json.dump`` per batch phase (about 10 ms
for 10,000 sites); no fsync: the file must outlive the patcher, not the
machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._errors import LiveError
from ._process import start_time, state_of

__all__ = ["Journal", "JournalBusy", "JournalLeftover", "journal_dir", "journal_path",
           "start_time", "alive"]

VERSION = 1


class JournalBusy(LiveError):
    """Another textpoke process is patching this target."""


class JournalLeftover(LiveError):
    """A patcher died with work in flight: ``textpoke live recover PID`` first."""


def journal_dir() -> Path:
    rt = os.environ.get("XDG_RUNTIME_DIR")
    if rt and os.path.isdir(rt) and os.access(rt, os.W_OK):
        d = Path(rt) / "textpoke"
    else:
        d = Path(f"/tmp/textpoke-{os.getuid()}")
    return d


def journal_path(pid: int) -> Path:
    return journal_dir() / f"{pid}.json"


def alive(pid: int, started: int) -> bool:
    st = start_time(pid)
    return st >= 0 and st == started and state_of(pid) not in ("", "Z", "X")


class Journal:
    """The journal of one target (see the module doc)."""

    def __init__(self, pid: int, target_start: int, data: dict | None = None) -> None:
        self.pid = pid
        self.path = journal_path(pid)
        self.data = data if data is not None else {
            "version": VERSION, "pid": pid, "start": target_start,
            "patcher": os.getpid(), "patcher_start": start_time(os.getpid()),
            "sites": {}, "guard": None, "regions": []}
        self.on_disk = False

    # ------------------------------------------------------------- reading
    @classmethod
    def load(cls, pid: int) -> "Journal | None":
        """The journal of *pid* as it is on disk (None: none, or stale)."""
        path = journal_path(pid)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        st = start_time(pid)
        if data.get("version") != VERSION or data.get("start") != st:
            if st >= 0 or data.get("version") != VERSION:
                _unlink(path)              # another process now, or a format we do not know
            return None
        j = cls(pid, st, data)
        j.on_disk = True
        return j

    @classmethod
    def open(cls, pid: int, *, adopt: bool = False, name: str | None = None) -> "Journal":
        """The journal a patcher of *pid* writes to: a fresh one, or the one
        on disk when it is ours (a second session of the same command) or
        *adopt* is set (``live recover``)."""
        me = os.getpid()
        j = cls.load(pid)
        if j is None:
            return cls(pid, start_time(pid))
        d = j.data
        if d["patcher"] == me and d.get("patcher_start") == start_time(me):
            return j
        if alive(d["patcher"], d.get("patcher_start", -1)):
            raise JournalBusy(pid, f"textpoke pid {d['patcher']} is patching this process "
                                   f"({j.summary()})", name)
        if not adopt:
            raise JournalLeftover(pid, f"a textpoke patcher (pid {d['patcher']}) died leaving "
                                       f"{j.summary()}; run 'textpoke live recover --pid {pid}' "
                                       "first", name)
        d["patcher"], d["patcher_start"] = me, start_time(me)
        return j

    def summary(self) -> str:
        d = self.data
        parts = []
        if d["sites"]:
            parts.append(f"{len(d['sites'])} site(s) in flight")
        for r in d["regions"]:
            parts.append(f"a {r['kind']} stub region at {r['base']:#x} with "
                         f"{len(r['sites'])} site(s) calling into it")
        if d["guard"]:
            parts.append(f"its SIGTRAP guard at {d['guard']['base']:#x}")
        return ", ".join(parts) or "nothing in flight"

    @property
    def patcher_alive(self) -> bool:
        d = self.data
        return alive(d["patcher"], d.get("patcher_start", -1))

    def empty(self) -> bool:
        d = self.data
        return not d["sites"] and not d["regions"] and not d["guard"]

    # ------------------------------------------------------------- writing
    def flush(self) -> None:
        path = self.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with open(tmp, "w") as f:
            # dumps, not dump: dump streams through the pure-Python encoder
            # (80 ms for the journal of 1,000 count sites; dumps: C, ~2 ms)
            f.write(json.dumps(self.data, separators=(",", ":")))
        os.replace(tmp, path)
        self.on_disk = True

    def remove(self) -> None:
        if self.on_disk:
            _unlink(self.path)
            self.on_disk = False

    def close(self) -> None:
        """At a clean detach: remove the file when nothing is left in it."""
        if self.empty():
            self.remove()
        elif self.on_disk:
            self.flush()

    # sites in flight: {addr: [old_first, old_tail, new_tail]} (hex strings)
    def sites_int3(self, olds: dict[int, bytes]) -> None:
        s = self.data["sites"]
        for addr, first in olds.items():
            s[str(addr)] = [first.hex(), "", ""]
        self.flush()

    def sites_tails(self, tails: list[tuple[int, bytes, bytes]]) -> None:
        s = self.data["sites"]
        changed = False
        for site, old_tail, new_tail in tails:
            e = s.get(str(site))
            if e is not None and not e[1]:          # keep the tail first replaced
                e[1], e[2] = old_tail.hex(), new_tail.hex()
                changed = True
        if changed:
            self.flush()

    def clear_sites(self) -> None:
        if self.data["sites"]:
            self.data["sites"] = {}
            if self.on_disk:
                self.flush()

    def set_guard(self, guard: dict | None) -> None:
        self.data["guard"] = guard
        self.flush()

    def add_region(self, kind: str, base: int, code_size: int, data_size: int,
                   sites: list[tuple[int, bytes, bytes]]) -> None:
        self.data["regions"].append({"kind": kind, "base": base, "code_size": code_size,
                                     "data_size": data_size,
                                     "sites": [[a, o.hex(), n.hex()] for a, o, n in sites]})
        self.flush()

    def drop_region(self, base: int, flush: bool = True) -> None:
        self.data["regions"] = [r for r in self.data["regions"] if r["base"] != base]
        if flush:
            self.flush()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
