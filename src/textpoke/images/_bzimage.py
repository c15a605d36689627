# SPDX-License-Identifier: GPL-2.0-only
"""Reading an x86 bzImage (``/boot/vmlinuz-*``): the setup header and the
compressed payload that holds the kernel's ELF.

The boot protocol (Documentation/arch/x86/boot.rst) puts a header at
offset 0x1f1 of the file: ``setup_sects`` (the real-mode setup code's size
in 512-byte sectors, 0 meaning 4), the magic ``HdrS`` at 0x202, the
protocol version at 0x206 and, from version 2.08 on, ``payload_offset``
and ``payload_length`` at 0x248/0x24c: where the compressed kernel starts,
counted from the start of the protected-mode code (which begins right
after the setup sectors).  The payload's own magic says how it was
compressed; Debian's 6.12 uses zstd, its 6.1 the legacy lz4 format, other
kernels gzip or xz.

Everything that does not look like this -- an arm64 ``Image`` or EFI
zboot file, a random file, a truncated or corrupted payload -- is refused
with an :class:`ImageError` carrying one line.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass

from ._elf import ImageError

__all__ = ["SetupHeader", "parse_setup_header", "decompress_payload", "extract_elf",
           "is_bzimage", "compression_of"]

_HDR_MAGIC = b"HdrS"
#: largest decompressed kernel we accept (a 6.12 distro vmlinux is ~60 MB)
MAX_KERNEL_SIZE = 512 << 20

_MAGICS = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),
)


@dataclass(frozen=True, slots=True)
class SetupHeader:
    """The fields of the boot protocol's setup header that we use."""

    setup_sects: int            # as stored (0 means 4)
    version: int                # boot protocol, e.g. 0x20f
    syssize: int                # protected-mode code size in 16-byte units
    payload_offset: int         # from the start of the protected-mode code
    payload_length: int
    pref_address: int
    init_size: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    kernel_version: str         # the string kernel_version points at, if any

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode code (the boot sector + setup)."""
        return ((self.setup_sects or 4) + 1) * 512

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xff:02d}"


def is_bzimage(raw: bytes) -> bool:
    return len(raw) >= 0x250 and raw[0x202:0x206] == _HDR_MAGIC


def _foreign(raw: bytes) -> str | None:
    """A short description of a recognisably non-x86 kernel or non-kernel."""
    if raw[:4] == b"\x7fELF":
        return "an ELF file, not a bzImage (load it as a vmlinux)"
    if len(raw) >= 0x40 and raw[0x38:0x3c] == b"ARM\x64":
        return "an arm64 kernel Image (magic ARM\\x64 at 0x38), not an x86 bzImage"
    if raw[:2] == b"MZ" and raw[4:8] == b"zimg":
        return ("an EFI zboot image (arm64/riscv/loongarch compressed kernel), "
                "not an x86 bzImage")
    if len(raw) >= 0x34 and raw[0x24:0x28] == b"\x18\x28\x6f\x01":
        return "an arm32 zImage, not an x86 bzImage"
    if len(raw) >= 0x3c and raw[0x38:0x3c] == b"RSC\x05":
        return "a riscv kernel Image, not an x86 bzImage"
    return None


def parse_setup_header(raw: bytes, path: str = "<bytes>") -> SetupHeader:
    """The setup header of bzImage *raw*; refuses anything else."""
    if not is_bzimage(raw):
        what = _foreign(raw)
        if what is None:
            for magic, name in _MAGICS:
                if raw.startswith(magic):
                    what = f"a {name}-compressed file, not a bzImage"
                    break
        raise ImageError(f"{path}: {what or 'not an x86 bzImage (no HdrS boot-protocol header at 0x202)'}")
    (setup_sects,) = struct.unpack_from("<B", raw, 0x1f1)
    (syssize,) = struct.unpack_from("<I", raw, 0x1f4)
    (version,) = struct.unpack_from("<H", raw, 0x206)
    (kver_ptr,) = struct.unpack_from("<H", raw, 0x20e)
    if version < 0x208:
        raise ImageError(f"{path}: boot protocol {version >> 8}.{version & 0xff:02d} is older "
                         f"than 2.08 and has no payload fields")
    (kernel_alignment,) = struct.unpack_from("<I", raw, 0x230)
    (relocatable,) = struct.unpack_from("<B", raw, 0x234)
    (xloadflags,) = struct.unpack_from("<H", raw, 0x236)
    payload_offset, payload_length = struct.unpack_from("<II", raw, 0x248)
    (pref_address,) = struct.unpack_from("<Q", raw, 0x258) if len(raw) >= 0x264 else (0,)
    (init_size,) = struct.unpack_from("<I", raw, 0x260) if len(raw) >= 0x264 else (0,)
    kver = ""
    if kver_ptr and 0x200 + kver_ptr < len(raw):
        s = raw[0x200 + kver_ptr: 0x200 + kver_ptr + 256]
        kver = s.split(b"\0", 1)[0].decode("ascii", "replace")
    hdr = SetupHeader(setup_sects=setup_sects, version=version, syssize=syssize,
                      payload_offset=payload_offset, payload_length=payload_length,
                      pref_address=pref_address, init_size=init_size,
                      kernel_alignment=kernel_alignment, relocatable=bool(relocatable),
                      xloadflags=xloadflags, kernel_version=kver)
    start = hdr.setup_size + payload_offset
    if payload_length == 0 or start + payload_length > len(raw):
        raise ImageError(f"{path}: payload [{start:#x}, +{payload_length:#x}) runs past the end "
                         f"of the file ({len(raw):#x} bytes): truncated bzImage")
    return hdr


def compression_of(data: bytes) -> str | None:
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name
    return None


class _Capped:
    """Output collected under a cap: decompressors feed it piece by piece
    and it refuses as soon as the total passes *limit* -- a small payload
    that inflates to gigabytes (a decompression bomb) is refused after at
    most *limit* plus one piece, never held whole."""

    def __init__(self, path: str, kind: str, limit: int) -> None:
        self.path, self.kind, self.limit = path, kind, limit
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self.limit:
            self.parts.clear()
            raise ImageError(f"{self.path}: {self.kind} payload decompresses to more than "
                             f"{self.limit >> 20} MiB: not a kernel (or a decompression bomb)")
        if piece:
            self.parts.append(piece)

    def result(self) -> bytes:
        return b"".join(self.parts)


#: compressed bytes given to the zstd decompressor at a time: one zstd block
#: (<= 128 KiB) needs at least a few bytes, so one step inflates to at most
#: a few tens of MiB before the cap is checked again
_ZSTD_STEP = 2048


def _zstd(data: bytes, out: _Capped) -> None:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImageError("zstd payload, but 'zstandard' is not installed") from None
    # The kernel's payload is one frame (plus the 4-byte size trailer the
    # kernel build appends, which is not a frame): decompress the first
    # frame only, streaming and in small steps so the cap holds.
    dobj = zstandard.ZstdDecompressor().decompressobj()
    mv = memoryview(data)
    for off in range(0, len(data), _ZSTD_STEP):
        out.add(dobj.decompress(mv[off:off + _ZSTD_STEP]))
        if dobj.eof:
            break
    if not dobj.eof:
        raise EOFError("zstd frame ends early")


#: the legacy LZ4 format (``lz4 -l``), the one the kernel's unlz4 reads:
#: this magic, then blocks of (u32 compressed size, LZ4 block) that each
#: decompress to at most 8 MiB; a repeated magic starts another stream
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20


def _lz4_legacy(data: bytes, out: _Capped) -> None:
    try:
        import lz4.block
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImageError("lz4 payload, but the 'lz4' package is not installed") from None
    if int.from_bytes(data[:4], "little") != LZ4_LEGACY_MAGIC:
        raise ValueError("not the legacy lz4 format (magic 0x184c2102)")
    off, n = 4, len(data)
    while off < n:
        if n - off < 4:
            raise EOFError(f"{n - off} stray bytes after the last block")
        size = int.from_bytes(data[off:off + 4], "little")
        if size == LZ4_LEGACY_MAGIC:
            off += 4
            continue
        if n - off == 4:
            # the kernel build appends the decompressed size (u32): the end
            if size != out.size & 0xFFFFFFFF:
                raise ValueError(f"size trailer {size} does not match the {out.size} bytes "
                                 f"decompressed")
            return
        if size == 0 or off + 4 + size > n:
            raise EOFError(f"block of {size} bytes at {off:#x} runs past the end")
        block = data[off + 4:off + 4 + size]
        try:
            piece = lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"block at {off:#x}: {e}") from None
        out.add(piece)
        off += 4 + size


def decompress_payload(data: bytes, path: str = "<bytes>", *,
                       limit: int = MAX_KERNEL_SIZE) -> bytes:
    """Decompress a kernel payload, detecting the format by its magic;
    refused as soon as the output passes *limit* bytes (streamed: a bomb is
    never held whole)."""
    kind = compression_of(data)
    if kind is None:
        raise ImageError(f"{path}: payload has no known compression magic "
                         f"({data[:6].hex()}): corrupted or not a kernel payload")
    out = _Capped(path, kind, limit)
    try:
        if kind == "zstd":
            _zstd(data, out)
        elif kind == "lz4":
            _lz4_legacy(data, out)
        elif kind in ("xz", "lzma", "gzip", "bzip2"):
            _stdlib(kind, data, out)
        else:
            raise ImageError(f"{path}: {kind}-compressed payload is not supported "
                             f"(zstd, lz4, xz, gzip, bzip2 and lzma are)")
    except ImageError:
        raise
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, gzip.BadGzipFile) as e:
        raise ImageError(f"{path}: {kind} payload does not decompress "
                         f"({type(e).__name__}: {e}): corrupted or truncated bzImage") from None
    except Exception as e:  # zstandard.ZstdError and friends
        raise ImageError(f"{path}: {kind} payload does not decompress "
                         f"({type(e).__name__}: {e}): corrupted or truncated bzImage") from None
    return out.result()


_STEP = 1 << 20


def _stdlib(kind: str, data: bytes, out: _Capped) -> None:
    """xz, lzma, gzip, bzip2 through the standard library's incremental
    decompressors, at most 1 MiB of output per call."""
    if kind in ("xz", "lzma"):
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
    elif kind == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    else:
        d = bz2.BZ2Decompressor()
    if kind == "gzip":
        out.add(d.decompress(data, _STEP))
        while not d.eof:
            piece = d.decompress(d.unconsumed_tail, _STEP)
            if not piece and not d.unconsumed_tail:
                raise EOFError("gzip stream ends early")
            out.add(piece)
        return
    out.add(d.decompress(data, max_length=_STEP))
    while not d.eof and d.needs_input is False:
        out.add(d.decompress(b"", max_length=_STEP))
    if not d.eof and kind != "lzma":
        raise EOFError(f"{kind} stream ends early")


def extract_elf(raw: bytes, path: str = "<bytes>") -> tuple[SetupHeader, bytes, str]:
    """(setup header, the decompressed vmlinux ELF, compression name)."""
    hdr = parse_setup_header(raw, path)
    start = hdr.setup_size + hdr.payload_offset
    payload = raw[start:start + hdr.payload_length]
    kind = compression_of(payload) or "?"
    elf = decompress_payload(payload, path)
    if elf[:4] != b"\x7fELF":
        raise ImageError(f"{path}: decompressed payload is not an ELF file "
                         f"({elf[:4].hex()}): corrupted bzImage")
    return hdr, elf, kind
