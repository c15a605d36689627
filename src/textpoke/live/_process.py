# SPDX-License-Identifier: GPL-2.0-only
"""A running process seen through /proc: identity, threads, mappings, and
its memory through ``/proc/PID/mem``.

``/proc/PID/mem`` is the kernel's own alias path into a process's
read-only text: a write goes through ``access_remote_vm`` with
``FOLL_FORCE`` (breaking copy-on-write of a private file mapping into an
anonymous copy, as a debugger's breakpoint does), so no ``mprotect`` of
the target is ever needed.  The descriptor is opened once per session; it
is bound to the address space it was opened on, so after an ``exec`` it
cannot reach the new program by mistake.
"""

from __future__ import annotations

import errno
import os

from .._errors import BadAddressError, MachineError
from ._errors import ACCESS_HINT, AccessDenied, NoSuchProcess, ProcessChanged
from ._record import FrozenRecord

__all__ = ["Mapping", "ProcessIdentity", "read_maps", "list_tids", "ProcMem", "check_not_exited",
           "state_of", "start_time", "ppid_of", "tracer_of", "shares_memory"]


class Mapping(FrozenRecord):
    """One line of /proc/PID/maps (the one parser of it: the machine,
    symbols, injection and the checks all read maps through
    :func:`read_maps`).  Immutable, compared and hashed by its fields
    (see :mod:`._record`)."""

    __slots__ = ("start", "end", "perms", "offset", "dev", "inode", "path")
    __match_args__ = __slots__

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    def __init__(self, start: int, end: int, perms: str, offset: int, dev: str, inode: int,
                 path: str) -> None:
        st = object.__setattr__
        st(self, "start", start)
        st(self, "end", end)
        st(self, "perms", perms)
        st(self, "offset", offset)
        st(self, "dev", dev)
        st(self, "inode", inode)
        st(self, "path", path)

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def writable(self) -> bool:
        return "w" in self.perms

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of *pid*, in address order; :class:`NoSuchProcess` if it
    is gone or has exited, :class:`AccessDenied` if maps cannot be read."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise NoSuchProcess(pid, "process not found") from None
    except PermissionError:
        raise AccessDenied(pid, f"cannot read /proc/{pid}/maps; {ACCESS_HINT}") from None
    if not raw.strip():
        check_not_exited(pid)
    out = []
    for line in raw.splitlines():
        # start-end perms offset dev inode [path]; the path may hold spaces
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition(b"-")
        out.append(Mapping(int(lo, 16), int(hi, 16), parts[1].decode(), int(parts[2], 16),
                           parts[3].decode(), int(parts[4]),
                           parts[5].decode(errors="replace") if len(parts) > 5 else ""))
    return out


def _stat(path: str) -> list[bytes] | None:
    """The fields of a /proc stat file after the comm (state first); None
    if it cannot be read (the process or thread is gone)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw[raw.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def state_of(pid: int, tid: int | None = None) -> str:
    """The state letter of *pid* (or of its thread *tid*): R, S, D, t, T,
    Z, X ...; "" if it is gone."""
    f = _stat(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    return f[0].decode() if f else ""


def alive(pid: int) -> bool:
    """*pid* exists and is neither a zombie nor dead."""
    return state_of(pid) not in ("", "Z", "X")


def start_time(pid: int) -> int:
    """The process's start time (clock ticks since boot), -1 if it is gone."""
    f = _stat(f"/proc/{pid}/stat")
    try:
        return int(f[19]) if f else -1
    except (ValueError, IndexError):
        return -1


def ppid_of(pid: int) -> int:
    f = _stat(f"/proc/{pid}/stat")
    try:
        return int(f[1]) if f else 0
    except (ValueError, IndexError):
        return 0


def tracer_of(tid: int) -> int:
    """The pid tracing *tid* (0: none, or gone)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_SYS_KCMP, _KCMP_VM = 312, 1


def shares_memory(pid: int, other: int) -> bool:
    """Whether processes *pid* and *other* run on one address space
    (``kcmp(KCMP_VM)``: a vfork child, a ``clone(CLONE_VM)`` child); False
    if the kernel cannot say (no kcmp, no access, either gone)."""
    import ctypes

    from ._ptrace import _libc
    return _libc.syscall(ctypes.c_long(_SYS_KCMP), ctypes.c_long(pid), ctypes.c_long(other),
                         ctypes.c_long(_KCMP_VM), ctypes.c_long(0), ctypes.c_long(0)) == 0


def check_not_exited(pid: int) -> None:
    """Raise :class:`NoSuchProcess` if *pid* has exited (a zombie, or
    exiting: its memory is gone, it has no mappings)."""
    state = state_of(pid)
    if not state:
        raise NoSuchProcess(pid, "process not found") from None
    if state in ("Z", "X"):
        raise NoSuchProcess(pid, "the process has exited (a zombie: its parent has not reaped "
                                 "it yet); there is nothing left to patch") from None
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            empty = not f.read(1)
    except OSError:
        empty = True
    if empty:
        raise NoSuchProcess(pid, "the process is exiting (it has no memory left)") from None


def list_tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise NoSuchProcess(pid, "process not found") from None


def _stat_fields(raw: bytes) -> tuple[str, list[bytes]]:
    # comm is in parentheses and may itself hold spaces and parentheses
    lp, rp = raw.index(b"("), raw.rindex(b")")
    return raw[lp + 1:rp].decode(errors="replace"), raw[rp + 2:].split()


class ProcessIdentity:
    """(pid, start time) of a process, re-checkable cheaply: the
    /proc/PID/stat descriptor stays open and is re-read with one pread
    (it fails with ESRCH once that process is gone, even if the pid is
    reused), and the start time is compared."""

    def __init__(self, pid: int) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"pid must be a positive int, not {pid!r}")
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcess(pid, "process not found") from None
        try:
            self.name, fields = _stat_fields(os.pread(self._fd, 4096, 0))
        except ProcessLookupError:
            os.close(self._fd)
            raise NoSuchProcess(pid, "process not found") from None
        if fields[0] == b"Z":
            os.close(self._fd)
            raise NoSuchProcess(pid, "process is a zombie", self.name)
        self.start_time = int(fields[19])        # field 22: starttime
        try:
            self.exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            self.exe = ""

    def check(self) -> None:
        """Raise NoSuchProcess / ProcessChanged unless the process is the one
        we identified."""
        if self._fd < 0:
            raise NoSuchProcess(self.pid, "identity closed", self.name)
        try:
            raw = os.pread(self._fd, 4096, 0)
        except ProcessLookupError:
            raise NoSuchProcess(self.pid, "process is gone", self.name) from None
        name, fields = _stat_fields(raw)
        if int(fields[19]) != self.start_time:
            raise ProcessChanged(self.pid, "the pid now names another process", self.name)
        if fields[0] in (b"Z", b"X"):
            raise NoSuchProcess(self.pid, "process has exited", self.name)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ProcMem:
    """pread/pwrite on ``/proc/PID/mem``, kept open for the session.  Also
    the :class:`~textpoke.lowlevel.DataMemory` handed to trap handlers."""

    def __init__(self, pid: int, name: str | None = None) -> None:
        self.pid = pid
        self.name = name
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcess(pid, "process not found", name) from None
        except PermissionError:
            raise AccessDenied(pid, f"cannot open /proc/{pid}/mem; {ACCESS_HINT}", name) from None

    def _fail(self, e: OSError, what: str, addr: int, size: int) -> Exception:
        if e.errno == errno.ESRCH:
            return NoSuchProcess(self.pid, f"process gone while {what}", self.name)
        if e.errno in (errno.EIO, errno.EFAULT):
            return BadAddressError(f"cannot {what} [{addr:#x}, +{size}) in pid {self.pid}: "
                                   "not mapped")
        return MachineError(f"cannot {what} [{addr:#x}, +{size}) in pid {self.pid}: {e}")

    def read(self, addr: int, size: int) -> bytes:
        if self._fd < 0:
            raise MachineError("process memory is closed")
        try:
            data = os.pread(self._fd, size, addr)
        except OSError as e:
            raise self._fail(e, "read", addr, size) from None
        if len(data) != size:
            if not data:
                raise NoSuchProcess(self.pid, "address space is gone (exit or exec)", self.name)
            raise BadAddressError(f"short read at {addr:#x}: {len(data)} of {size} bytes")
        return data

    def write(self, addr: int, data: bytes) -> None:
        if self._fd < 0:
            raise MachineError("process memory is closed")
        try:
            n = os.pwrite(self._fd, data, addr)
        except OSError as e:
            raise self._fail(e, "write", addr, len(data)) from None
        if n != len(data):
            if n == 0:
                raise NoSuchProcess(self.pid, "address space is gone (exit or exec)", self.name)
            raise MachineError(f"short write at {addr:#x}: {n} of {len(data)} bytes")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


__all__ += ["ProcessChanged"]
