"""The ``oci-archive:`` transport: an OCI image layout in a tar file.

``oci-archive:PATH[:REF]`` parses like ``oci:`` (see ``parse_oci_spec``).

The archive skopeo writes is an uncompressed tar of the layout directory with
no ``./`` entry and members in lexical walk order, directories first::

    blobs/  blobs/sha256/  blobs/sha256/<hex>...  index.json  oci-layout

(ustar headers, uid/gid 0, real file mtimes). A destination builds the layout in
a private staging directory and on ``commit()`` writes the tar to a temp file next
to PATH, fsyncs it and renames it onto PATH, so an existing archive is replaced
whole or not at all; like skopeo, it never merges into an existing archive.

A source does not unpack: it indexes the tar's members once and reads blobs in
place with ``pread`` (thread safe, no temp space). A gzip/bzip2/xz-compressed
archive, which containers/image also accepts, is first decompressed to a temp file.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO

from worker.registry import (
    Descriptor,
    Digest,
    IntegrityError,
    InvalidInput,
    InvalidReference,
    ManifestError,
    NotFound,
)
from worker.registry._fs import atomic_file, umask

from ._archive import TarWriter, decompress, detect_compression, file_chunks
from .base import ImageDestination, ImageSource, StoredManifest
from .oci_layout import (
    BLOBS_DIR,
    CHUNK_SIZE,
    INDEX_FILE,
    OCILayoutDestination,
    OCILayoutSource,
    parse_oci_spec,
    validate_ref_name,
)

__all__ = [
    "OCIArchiveDestination",
    "OCIArchiveSource",
    "big_files_tmp_dir",
    "parse_oci_archive_spec",
    "write_layout_tar",
]

#: Same grammar as ``oci:`` (containers/image shares the code).
parse_oci_archive_spec = parse_oci_spec


def _spec(path: str, ref: str | None) -> str:
    return f"oci-archive:{path}:{ref}" if ref else f"oci-archive:{path}"


def big_files_tmp_dir() -> str:
    """Where to stage whole images: ``$TMPDIR``, else ``/var/tmp`` (like containers/image), else the system temp dir."""
    env = os.environ.get("TMPDIR")
    if env:
        return env
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK):
        return "/var/tmp"
    return tempfile.gettempdir()


# -- reading ---------------------------------------------------------------------------------------


class _TarReader:
    """``LayoutReader`` over the members of an (uncompressed) tar file."""

    def __init__(self, archive: str, tmp_dir: str | None) -> None:
        self.where = f"OCI archive {archive}"
        self._decompressed: str | None = None
        try:
            with open(archive, "rb") as f:
                magic = f.read(6)
        except FileNotFoundError:
            raise NotFound(f"OCI archive {archive} does not exist") from None
        except IsADirectoryError:
            raise InvalidInput(f"OCI archive {archive} is a directory (use oci:{archive} for a layout)") from None
        path = archive
        kind = detect_compression(magic)
        if kind is not None:
            path = self._decompressed = self._decompress(archive, kind, tmp_dir)
        try:
            self._fd = os.open(path, os.O_RDONLY)
            try:
                self._members = self._index(path)
            except BaseException:
                os.close(self._fd)
                raise
        except BaseException:
            self._drop_temp()
            raise

    def _decompress(self, archive: str, kind: str, tmp_dir: str | None) -> str:
        fd, tmp = tempfile.mkstemp(prefix="ferry-oci-archive-", suffix=".tar", dir=tmp_dir or big_files_tmp_dir())
        try:
            with os.fdopen(fd, "wb") as out, open(archive, "rb") as src:
                for piece in decompress(file_chunks(src), kind, self.where):
                    out.write(piece)
        except IntegrityError as exc:
            os.unlink(tmp)
            raise InvalidInput(f"{self.where}: cannot decompress ({kind}): {exc}") from None
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _index(self, path: str) -> dict[str, tuple[int, int]]:
        """Member name -> (data offset, size). A later member of the same name wins, as when unpacking."""
        members: dict[str, tuple[int, int]] = {}
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    name = _member_name(m.name)
                    if m.isreg() and not m.issparse():
                        members[name] = (m.offset_data, m.size)
                    elif m.islnk():
                        target = members.get(_member_name(m.linkname))
                        if target is not None:
                            members[name] = target
                    else:
                        members.pop(name, None)
        except tarfile.TarError as exc:
            raise InvalidInput(f"{self.where} is not a tar archive: {exc}") from None
        return members

    def _range(self, name: str, what: str) -> tuple[int, int]:
        found = self._members.get(name)
        if found is None:
            raise NotFound(f"{what} not found in {self.where}: no member {name}")
        return found

    def _read_range(self, offset: int, size: int) -> Iterator[bytes]:
        pos, end = offset, offset + size
        while pos < end:
            chunk = os.pread(self._fd, min(CHUNK_SIZE, end - pos), pos)
            if not chunk:
                raise InvalidInput(f"{self.where} is truncated")
            pos += len(chunk)
            yield chunk

    def read_index(self) -> bytes:
        offset, size = self._range(INDEX_FILE, "index.json (is this an OCI archive?)")
        return b"".join(self._read_range(offset, size))

    def read_blob(self, digest: Digest, max_size: int) -> bytes:
        offset, size = self._range(f"{BLOBS_DIR}/{digest.algorithm}/{digest.hex}", f"manifest {digest}")
        if size > max_size:
            raise ManifestError(f"manifest {digest} in {self.where} is {size} bytes, limit is {max_size}")
        return b"".join(self._read_range(offset, size))

    @contextlib.contextmanager
    def stream_blob(self, digest: Digest) -> Iterator[Iterator[bytes]]:
        offset, size = self._range(f"{BLOBS_DIR}/{digest.algorithm}/{digest.hex}", f"blob {digest}")
        yield self._read_range(offset, size)

    def _drop_temp(self) -> None:
        if self._decompressed is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._decompressed)
            self._decompressed = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._drop_temp()


def _member_name(name: str) -> str:
    return posixpath.normpath(name).lstrip("/")


class OCIArchiveSource(ImageSource):
    """Read images from ``oci-archive:PATH[:REF]``; same lookup rules as ``OCILayoutSource``."""

    def __init__(self, path: str, ref: str | None = None, *, tmp_dir: str | None = None) -> None:
        if not path:
            raise InvalidReference("invalid oci-archive reference: empty path")
        if ref is not None:
            validate_ref_name(ref)
        self.path = path
        self.ref = ref
        self.description = _spec(path, ref)
        reader = _TarReader(path, tmp_dir)
        try:
            self._layout = OCILayoutSource(path, ref, reader=reader, description=self.description)
        except BaseException:
            reader.close()
            raise

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        return self._layout._read_manifest(ref)

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        return self._layout._open_blob(desc)

    def list_tags(self) -> list[str]:
        return self._layout.list_tags()

    def close(self) -> None:
        self._layout.close()


# -- writing ---------------------------------------------------------------------------------------


def write_layout_tar(root: str, out: BinaryIO) -> None:
    """Tar the layout at ``root`` into ``out`` the way skopeo does (see the module docstring)."""
    tar = TarWriter(out, owner="root")
    _add_tree(tar, root, "")
    tar.close()


def _add_tree(tar: TarWriter, directory: str, prefix: str) -> None:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith(".ferry-"):
            continue  # a temp file of an interrupted write, never part of the layout
        st = entry.stat(follow_symlinks=False)
        mode, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
        if entry.is_dir(follow_symlinks=False):
            tar.add_dir(prefix + entry.name, mode=mode, mtime=mtime)
            _add_tree(tar, entry.path, prefix + entry.name + "/")
        elif entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                tar.add_file(prefix + entry.name, st.st_size, file_chunks(f), mode=mode, mtime=mtime)


class OCIArchiveDestination(ImageDestination):
    """Write one layout into ``oci-archive:PATH[:REF]``; PATH is replaced atomically on ``commit()``."""

    supported_manifest_types = OCILayoutDestination.supported_manifest_types
    supports_index = True

    def __init__(self, path: str, ref: str | None = None, *, tmp_dir: str | None = None) -> None:
        if not path:
            raise InvalidReference("invalid oci-archive reference: empty path")
        if ref is not None:
            validate_ref_name(ref)
        self.path = path
        self.ref = ref
        self.description = _spec(path, ref)
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise InvalidInput(f"{self.description}: {path} is a directory (use oci:{path} for a layout)")
        if not os.path.isdir(parent):
            raise NotFound(f"{self.description}: directory {parent} does not exist")
        self._staging = tempfile.mkdtemp(prefix="ferry-oci-archive-", dir=tmp_dir or big_files_tmp_dir())
        self._closed = False
        try:
            self._layout = OCILayoutDestination(self._staging, ref, description=self.description)
        except BaseException:
            shutil.rmtree(self._staging, ignore_errors=True)
            raise

    def blob_exists(self, desc: Descriptor) -> bool:
        return self._layout.blob_exists(desc)

    def put_blob(self, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        self._layout.put_blob(desc, chunks)

    def has_manifest(self, digest: Digest) -> bool:
        return self._layout.has_manifest(digest)

    def head_manifest(self, ref: str | None = None) -> Descriptor | None:
        return self._layout.head_manifest(ref)

    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        self._layout.put_manifest(raw, media_type, ref)

    def commit(self) -> None:
        if self._closed:
            raise InvalidInput(f"{self.description}: commit after close")
        self._layout.commit()
        target = os.path.abspath(self.path)
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~umask()
        with atomic_file(target, mode=mode) as out:
            write_layout_tar(self._staging, out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._layout.close()
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
