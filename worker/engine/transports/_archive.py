"""The one tar writer and the one compression detector/decompressor of the archive transports.

- :class:`TarWriter` writes members with the headers Go's ``archive/tar`` writes (USTAR, PAX only for what
  does not fit), never padding to a 10 KiB record: ``docker-archive:`` (fixed modes, mtime 0) and
  ``oci-archive:`` (the layout's own modes and mtimes, owner root) both go through it.
- :func:`detect_compression` tells gzip, bzip2, xz and zstd apart by their magic bytes (as containers/image
  does); :func:`decompress` inflates gzip/bzip2/xz in bounded pieces (multi-member streams too).
"""

from __future__ import annotations

import bz2
import itertools
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from worker.registry import IntegrityError

_CHUNK = 1 << 20


def _octal(value: int, width: int) -> bytes:
    s = format(value, "o")
    if len(s) >= width:
        raise ValueError("value does not fit a USTAR field")
    return s.rjust(width - 1, "0").encode() + b"\0"


def _field(text: str, width: int) -> bytes:
    b = text.encode()
    if len(b) > width:
        raise ValueError("string does not fit a USTAR field")
    return b.ljust(width, b"\0")


FILE, SYMLINK, DIRECTORY = b"0", b"2", b"5"


def tar_header(
    name: str,
    size: int,
    *,
    kind: bytes = FILE,
    mode: int = 0o444,
    mtime: int = 0,
    linkname: str = "",
    owner: str = "",
) -> bytes:
    """One member's header as Go's ``tar.FileInfoHeader`` + ``Writer.WriteHeader`` produce it (uid/gid 0;
    ``owner`` as user and group name); PAX when a name or number does not fit USTAR, as Go does."""
    try:
        block = bytearray(512)
        block[0:100] = _field(name, 100)
        block[100:108] = _octal(mode, 8)
        block[108:116] = _octal(0, 8)
        block[116:124] = _octal(0, 8)
        block[124:136] = _octal(size, 12)
        block[136:148] = _octal(mtime, 12)
        block[148:156] = b" " * 8
        block[156:157] = kind
        block[157:257] = _field(linkname, 100)
        block[257:263] = b"ustar\0"
        block[263:265] = b"00"
        block[265:297] = _field(owner, 32)
        block[297:329] = _field(owner, 32)
        block[329:337] = _octal(0, 8)
        block[337:345] = _octal(0, 8)
    except ValueError:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = mtime
        info.mode = mode
        info.uname = info.gname = owner
        info.type = {FILE: tarfile.REGTYPE, SYMLINK: tarfile.SYMTYPE, DIRECTORY: tarfile.DIRTYPE}[kind]
        info.linkname = linkname
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    block[148:156] = format(sum(block), "06o").encode() + b"\0 "
    return bytes(block)


class TarWriter:
    """Members in the order given; :meth:`close` ends the archive with two zero blocks and no record padding."""

    def __init__(self, f: BinaryIO, *, owner: str = "") -> None:
        self._f = f
        self.owner = owner

    def add_bytes(self, name: str, data: bytes, *, mode: int = 0o444, mtime: int = 0) -> None:
        self.add_file(name, len(data), [data], mode=mode, mtime=mtime)

    def add_file(self, name: str, size: int, chunks: Iterable[bytes], *, mode: int = 0o444, mtime: int = 0) -> None:
        self._f.write(tar_header(name, size, mode=mode, mtime=mtime, owner=self.owner))
        written = 0
        for chunk in chunks:
            self._f.write(chunk)
            written += len(chunk)
        if written != size:
            raise IntegrityError(f"{name} changed while writing the archive: expected {size} bytes, got {written}")
        self._f.write(b"\0" * (-size % 512))

    def add_dir(self, name: str, *, mode: int = 0o755, mtime: int = 0) -> None:
        self._f.write(tar_header(name.rstrip("/") + "/", 0, kind=DIRECTORY, mode=mode, mtime=mtime, owner=self.owner))

    def add_symlink(self, name: str, target: str) -> None:
        self._f.write(tar_header(name, 0, kind=SYMLINK, mode=0, linkname=target, owner=self.owner))

    def close(self) -> None:
        self._f.write(b"\0" * 1024)


def detect_compression(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


def file_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def peek(chunks: Iterable[bytes], n: int = 6) -> tuple[bytes, Iterator[bytes]]:
    """First ``n`` bytes of ``chunks`` and an iterator over all of them (nothing lost)."""
    it = iter(chunks)
    seen: list[bytes] = []
    have = 0
    for chunk in it:
        seen.append(chunk)
        have += len(chunk)
        if have >= n:
            break
    return b"".join(seen)[:n], itertools.chain(seen, it)


class _Zlib:
    """Adapter giving zlib's gzip decompressor the bz2/lzma interface (eof, unused_data, needs_input)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(31)

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if not data:
            data = self._d.unconsumed_tail
        return self._d.decompress(data, max_length)


_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "gzip": _Zlib,
    "bzip2": bz2.BZ2Decompressor,
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
}


#: zstd input is fed in slices this small: one slice of run-length blocks expands to at most ~64 MiB
_ZSTD_SLICE = 2048


def _unzstd(chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """zstd, every frame, output in bounded pieces; a stream that ends inside a frame is an error."""
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj(write_size=_CHUNK)
    started = False
    try:
        for chunk in chunks:
            for i in range(0, len(chunk), _ZSTD_SLICE):
                data = chunk[i : i + _ZSTD_SLICE]
                while data:
                    out = d.decompress(data)
                    started = True
                    data = b""
                    if out:
                        yield out
                    if d.eof:
                        data = d.unused_data
                        d = zstandard.ZstdDecompressor().decompressobj(write_size=_CHUNK)
                        started = False
        if started and not d.eof:
            raise EOFError("compressed data ends before the end of its frame")
    except (zstandard.ZstdError, EOFError) as exc:
        for _ in chunks:
            pass
        raise IntegrityError(f"{what}: invalid zstd data: {exc}") from None


def decompress(chunks: Iterator[bytes], kind: str, what: str) -> Iterator[bytes]:
    """Decompress a (possibly multi-member) gzip/bzip2/xz stream in bounded pieces.

    On corrupt data the rest of ``chunks`` is drained first, so a verifying source raises its
    ``DigestMismatch`` in preference to the decompression error.
    """
    if kind == "zstd":
        yield from _unzstd(chunks, what)
        return
    new = _DECOMPRESSORS[kind]
    d = new()
    started = False
    try:
        for chunk in chunks:
            data = chunk
            while data:
                out = d.decompress(data, _CHUNK)
                started = True
                data = b""
                if out:
                    yield out
                # Output is capped at _CHUNK per call; keep pulling while input or pending output remains.
                while not d.eof and (not d.needs_input or len(out) >= _CHUNK):
                    out = d.decompress(b"", _CHUNK)
                    if out:
                        yield out
                    elif d.needs_input:
                        break
                if d.eof:
                    data = d.unused_data
                    d = new()
                    started = False
        while started and not d.eof:
            out = d.decompress(b"", _CHUNK)
            if not out:
                raise EOFError("compressed data ends before the end-of-stream marker")
            yield out
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
        for _ in chunks:
            pass
        raise IntegrityError(f"{what}: invalid {kind} data: {exc}") from None
