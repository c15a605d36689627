# SPDX-License-Identifier: GPL-2.0-only
"""One QEMU guest under the harness's control, shared by the boot-time
reference (:mod:`._qemu`) and the run-time one (:mod:`._qemu_runtime`).

:func:`guest` starts ``qemu-system-x86_64`` (TCG, no KVM, ``-S``: stopped at
reset, serial console to a file, optionally an initramfs:
:func:`build_initramfs` makes a busybox one), attaches to its
gdbstub (a minimal gdb-remote client speaking over a unix socket, hardware
breakpoints only -- nothing is ever written to guest memory) and to QMP,
and always tears it down: QMP ``quit``, then SIGKILL if QEMU lingers, and
its work directory removed.  :class:`Guest` runs it to a breakpoint, reads
what both harnesses read (``phys_base``, the CPU's capability words,
``x86_return_thunk``) and dumps the kernel's text through QMP ``pmemsave``
(physical: with ``nokaslr`` ``phys = virt - __START_KERNEL_map +
phys_base``, checked by ``linux_banner``) or any virtual range through
``memsave``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ._lines import LINE_612
from ._vmlinux import START_KERNEL_MAP, RealKernelImage

__all__ = ["ReferenceError", "QEMU", "BASE_CMDLINE", "qemu_version", "Guest", "guest",
           "build_initramfs"]

QEMU = "qemu-system-x86_64"
BASE_CMDLINE = "console=ttyS0 nokaslr"


class ReferenceError(RuntimeError):
    """The reference boot did not reach its stops or its dumps do not check."""


def qemu_version() -> str:
    exe = shutil.which(QEMU)
    if exe is None:
        return ""
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return r.stdout.splitlines()[0] if r.stdout else ""


def _tail(path: Path, n: int = 300) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ------------------------------------------------------ gdb remote protocol
class _Gdb:
    """A minimal gdb-remote client: enough for Z1/z1, c, m, p and ?."""

    def __init__(self, sock: socket.socket) -> None:
        self.s = sock
        self.buf = b""
        self.noack = False

    def _recv(self, timeout: float) -> bytes:
        self.s.settimeout(timeout)
        chunk = self.s.recv(65536)
        if not chunk:
            raise ReferenceError("gdbstub closed the connection (QEMU exited?)")
        return chunk

    def send(self, payload: str) -> None:
        cs = sum(payload.encode()) & 0xff
        self.s.sendall(f"${payload}#{cs:02x}".encode())

    def packet(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            # drop acks / stray bytes before '$'
            i = self.buf.find(b"$")
            if i >= 0:
                j = self.buf.find(b"#", i)
                if j >= 0 and len(self.buf) >= j + 3:
                    payload = self.buf[i + 1:j]
                    self.buf = self.buf[j + 3:]
                    if not self.noack:
                        self.s.sendall(b"+")
                    return _unescape(payload).decode("latin-1")
            else:
                self.buf = b""
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                self.buf += self._recv(left)
            except socket.timeout:
                raise TimeoutError from None

    def cmd(self, payload: str, timeout: float = 30.0) -> str:
        self.send(payload)
        return self.packet(timeout)

    def start(self) -> None:
        self.cmd("qSupported:hwbreak+")
        if self.cmd("QStartNoAckMode") == "OK":
            self.noack = True
        self.cmd("?")

    def hbreak(self, addr: int, on: bool = True) -> None:
        r = self.cmd(f"{'Z' if on else 'z'}1,{addr:x},1")
        if r != "OK":
            raise ReferenceError(f"gdbstub refused hardware breakpoint at {addr:#x}: {r!r}")

    def cont(self, timeout: float) -> str:
        self.send("c")
        return self.packet(timeout)

    def interrupt(self) -> None:
        self.s.sendall(b"\x03")

    def read(self, addr: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            k = min(2048, n - len(out))
            r = self.cmd(f"m{addr + len(out):x},{k:x}")
            if not r or r.startswith("E"):
                raise ReferenceError(f"gdbstub cannot read {addr + len(out):#x}: {r!r}")
            out += bytes.fromhex(r)
        return bytes(out)

    def rip(self) -> int:
        """RIP from a 'g' packet (QEMU answers 'p' only to clients that read
        its target XML; in 64-bit mode 'g' is 16 GPRs of 8 bytes, then RIP)."""
        r = self.cmd("g")
        if len(r) < 2 * 136 or r.startswith("E"):
            raise ReferenceError(f"gdbstub cannot read registers: {r[:40]!r}")
        return int.from_bytes(bytes.fromhex(r[256:272]), "little")


def _unescape(p: bytes) -> bytes:
    if b"}" not in p:
        return p
    out = bytearray()
    it = iter(p)
    for c in it:
        out.append(next(it) ^ 0x20 if c == 0x7d else c)
    return bytes(out)


class _Qmp:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _connect(self.s, path, timeout)
        self.f = self.s.makefile("rwb")
        self.s.settimeout(timeout)
        json.loads(self.f.readline())           # greeting
        self.run("qmp_capabilities")

    def run(self, cmd: str, **args) -> object:
        self.f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise ReferenceError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                continue
            if "error" in msg:
                raise ReferenceError(f"QMP {cmd}: {msg['error'].get('desc')}")
            return msg.get("return")

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass


def _connect(s: socket.socket, path: str, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise ConnectionRefusedError(f"QEMU did not open {path}") from None
            time.sleep(0.02)


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when this process dies
    (a killed harness leaves no QEMU running)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)     # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------- initramfs
def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); char devices as
    (name, mode, b'major,minor')."""
    out = bytearray()

    def pad():
        out.extend(b"\0" * (-len(out) % 4))
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        rmaj = rmin = 0
        if mode & 0o170000 == 0o020000:
            rmaj, rmin = map(int, data.decode().split(","))
            data = b""
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(nb), 0]
        out += b"070701" + "".join(f"{f:08x}" for f in fields).encode() + nb
        pad()
        out += data
        pad()
    return bytes(out)


def build_initramfs(script: str, modules: dict[str, Path]) -> bytes:
    """A busybox initramfs: *script* as ``/init``, each module as
    ``/m/NAME.ko``."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise ReferenceError("busybox not found (apt-get install busybox-static)")
    bb = Path(busybox).read_bytes()
    ents: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in
                                           ("bin", "dev", "proc", "sys", "tmp", "m")]
    ents += [("dev/console", 0o020600, b"5,1"), ("bin/busybox", 0o100755, bb),
             ("init", 0o100755, script.encode())]
    ents += [(f"m/{n}.ko", 0o100644, p.read_bytes()) for n, p in modules.items()]
    return _cpio(ents)


# ---------------------------------------------------------------- the guest
class Guest:
    """A started QEMU, stopped at reset, with gdb and QMP attached."""

    def __init__(self, proc: subprocess.Popen, gdb: _Gdb, qmp: _Qmp, work: Path,
                 argv: list[str], shown: list[str]) -> None:
        self.proc, self.gdb, self.qmp, self.work = proc, gdb, qmp, work
        self.serial = work / "serial.log"
        self.argv = argv            # as run
        self.shown = shown          # as recorded: the initramfs by its name, not its path

    def tail(self, n: int = 300) -> str:
        """The end of the serial console."""
        return _tail(self.serial, n)

    def run_to(self, image: RealKernelImage, addr: int, what: str, deadline: float,
               late: str, tail: int = 300) -> None:
        """Continue until the next stop, which must be at *addr*; *late*
        (the error's start, "... within N s" follows) when none comes before
        *deadline* (``time.monotonic()``)."""
        try:
            r = self.gdb.cont(max(deadline - time.monotonic(), 1.0))
        except TimeoutError:
            self.gdb.interrupt()
            raise ReferenceError(f"{late}; serial: {self.tail(tail)}") from None
        if not r.startswith(("T", "S")):
            raise ReferenceError(f"unexpected stop reply {r!r} waiting for {what}; "
                                 f"serial: {self.tail(tail)}")
        pc = self.gdb.rip()
        if pc != addr:
            raise ReferenceError(f"stopped at {pc:#x} ({image.describe(pc)}), not at "
                                 f"{what} {addr:#x}")

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.gdb.read(addr, 8), "little")

    def caps(self, image: RealKernelImage) -> list[int]:
        """``boot_cpu_data.x86_capability`` (the kernel line says where)."""
        line = image.line or LINE_612
        raw = self.gdb.read(image.sym("boot_cpu_data") + line.caps_offset, 4 * line.ncaps)
        return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]

    def text(self, image: RealKernelImage, phys_base: int) -> bytes:
        """``_text.._end`` from guest-physical memory, checked by
        ``linux_banner`` being where *phys_base* says it is."""
        size = image.end - image.text_start
        f = self.work / "text.bin"
        self.qmp.run("pmemsave", val=image.text_start - START_KERNEL_MAP + phys_base,
                     size=size, filename=str(f))
        data = f.read_bytes()
        f.unlink()
        if len(data) != size:
            raise ReferenceError(f"pmemsave wrote {len(data)} bytes, wanted {size}")
        banner = image.sym("linux_banner")
        off = banner - image.text_start
        if data[off:off + 64] != image.read(banner, 64):
            raise ReferenceError(f"the physical dump does not hold linux_banner where "
                                 f"phys_base {phys_base:#x} says it should")
        return data

    def vdump(self, addr: int, n: int) -> bytes:
        """*n* bytes at virtual *addr* (CPU 0's page tables)."""
        f = self.work / "v.bin"
        # QMP's "int" is signed 64-bit: a kernel address is negative there
        sval = addr - (1 << 64) if addr >= 1 << 63 else addr
        self.qmp.run("memsave", val=sval, size=n, filename=str(f), **{"cpu-index": 0})
        data = f.read_bytes()
        f.unlink()
        if len(data) != n:
            raise ReferenceError(f"memsave wrote {len(data)} bytes at {addr:#x}, wanted {n}")
        return data

    def cpu_seconds(self) -> float:
        """QEMU's CPU time so far (user + system)."""
        try:
            f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


@contextlib.contextmanager
def guest(kernel: Path, *, cpu: str, smp: int, memory: str, append: str,
          initrd: bytes | None = None, prefix: str = "textpoke-qemu-",
          die_with_parent: bool = False) -> Iterator[Guest]:
    """A QEMU guest booting *kernel* with command line *append*, stopped at
    reset; torn down (and its work directory removed) on exit.  An
    ``OSError`` on the way (QEMU went away: a bad ``-cpu``, ``-m``...)
    becomes a :class:`ReferenceError` with QEMU's last line."""
    exe = shutil.which(QEMU)
    if exe is None:
        raise ReferenceError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    gdb_sock, qmp_sock, serial = work / "gdb.sock", work / "qmp.sock", work / "serial.log"
    rd: list[str] = []
    if initrd is not None:
        (work / "initrd.cpio").write_bytes(initrd)
        rd = ["-initrd", str(work / "initrd.cpio")]
    argv = [exe, "-machine", "pc,accel=tcg", "-cpu", cpu, "-smp", str(smp), "-m", memory,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), *rd, "-append", append,
            "-serial", f"file:{serial}",
            "-chardev", f"socket,id=gdb0,path={gdb_sock},server=on,wait=off",
            "-gdb", "chardev:gdb0",
            "-qmp", f"unix:{qmp_sock},server=on,wait=off",
            "-S"]
    shown = [a if a != str(work / "initrd.cpio") else "initrd.cpio" for a in argv]
    proc = None
    gsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qmp = None
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=work,
                                preexec_fn=_die_with_parent if die_with_parent else None)
        try:
            _connect(gsock, str(gdb_sock), 30, proc)
            gdb = _Gdb(gsock)
            gdb.start()
            qmp = _Qmp(str(qmp_sock))
            yield Guest(proc, gdb, qmp, work, argv, shown)
        except OSError as e:
            # QEMU went away (a bad -cpu, -m, ...): say what it said
            try:
                out = proc.communicate(timeout=10)[0].decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                out = ""
            last = out.splitlines()[-1] if out else f"{type(e).__name__}: {e}"
            raise ReferenceError(f"QEMU failed: {last}") from None
    finally:
        if qmp is not None:
            try:
                qmp.run("quit")
            except (ReferenceError, OSError, ValueError):
                pass
            qmp.close()
        gsock.close()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
