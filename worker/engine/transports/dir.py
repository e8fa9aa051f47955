"""The ``dir:PATH`` transport: one image (or one multi-arch copy) as plain files in a directory.

The layout is the one containers/image writes (and skopeo reads)::

    PATH/version                       "Directory Transport Version: 1.1\\n"
    PATH/manifest.json                 the top-level manifest, raw bytes
    PATH/<hex>                         every blob, named by its digest's hex part only
                                       (for sha512 too: containers uses ``Digest.Encoded()``)
    PATH/<hex>.manifest.json           child manifests of a multi-arch copy (``--all``)
    PATH/signature-N, <hex>.signature-N  signatures (ignored here)

Destination semantics follow containers/image: a missing PATH is created; an existing
empty directory is used; an existing non-empty directory is replaced only when it holds a
previous ``dir:`` image (its ``version`` file matches), otherwise it is refused so unrelated
data is never deleted; a PATH that is not a directory is refused.

Unlike containers/image (which erases the old image when the destination is opened), Ferry
writes the new image into a hidden directory beside PATH (``.ferry-staging-NAME-*``) and swaps it in
at ``commit()`` (``worker.registry._fs.swap_in_dir``). What is guaranteed:

- a copy that fails, or is closed without commit, leaves PATH exactly as it was;
- a crash (or kill -9) during commit leaves PATH either the whole previous image or the whole new one:
  on Linux file systems that can exchange two names (ext4, xfs, btrfs, tmpfs) in one
  ``renameat2(RENAME_EXCHANGE)``; elsewhere with two renames, between which PATH is briefly absent and
  the previous image is intact as ``.ferry-old-NAME-*`` beside it;
- the one exception: when PATH is a mount point, or its parent cannot be written, nothing can be
  renamed over PATH, so the image is staged inside PATH and its entries are replaced one by one at
  commit (old entries removed, then blobs, children, ``version`` and ``manifest.json`` last): a crash
  in that commit leaves a mix, and the missing ``manifest.json`` (written last) shows it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager

from worker.registry import (
    Descriptor,
    Digest,
    InvalidInput,
    ManifestError,
    NotFound,
    verify_bytes,
    verify_stream,
)
from worker.registry._fs import atomic_write, fsync_dir, swap_in_dir, umask
from worker.registry._mediatype import guess_media_type

from .base import ImageDestination, ImageSource, StoredManifest

__all__ = ["DIR_VERSION", "DirDestination", "DirSource"]

#: Content of ``PATH/version`` (containers/image ``directory.version``).
DIR_VERSION = "Directory Transport Version: 1.1\n"

_CHUNK = 1 << 20
_STAGING_PREFIX = ".ferry-staging-"
_MANIFEST = "manifest.json"
_VERSION = "version"


@contextlib.contextmanager
def _open_chunks(path: str, what: str) -> Iterator[Iterator[bytes]]:
    """``with _open_chunks(p, w) as chunks``: the file's bytes in 1 MiB chunks, closed when the block ends."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFound(f"{what} not found") from None
    with f:
        yield iter(lambda: f.read(_CHUNK), b"")


def _blob_name(digest: Digest) -> str:
    return digest.hex


def _child_manifest_name(digest: Digest) -> str:
    return f"{digest.hex}.manifest.json"


class DirSource(ImageSource):
    """Read an image written by ``skopeo copy ... dir:PATH`` (or by :class:`DirDestination`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"dir:{path}"
        if not os.path.isdir(path):
            raise NotFound(f"dir:{path}: no such directory")
        if not os.path.isfile(os.path.join(path, _MANIFEST)):
            raise NotFound(f"dir:{path}: no {_MANIFEST} (not a dir: image)")

    def _read(self, name: str) -> bytes | None:
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        if isinstance(ref, str):
            try:
                ref = Digest.parse(ref)
            except InvalidInput:
                raise NotFound(f"{self.description}: no manifest tagged {ref!r} (dir: has no tags)") from None
        if ref is None:
            raw = self._read(_MANIFEST)
            if raw is None:
                raise NotFound(f"{self.description}: {_MANIFEST} not found")
            return StoredManifest(raw, guess_media_type(raw))
        raw = self._read(_child_manifest_name(ref))
        if raw is None:
            top = self._read(_MANIFEST)
            if top is not None and Digest.of(top, ref.algorithm) == ref:
                raw = top
        if raw is None:
            raise NotFound(f"{self.description}: manifest {ref} not found")
        return StoredManifest(raw, guess_media_type(raw), ref)

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        path = os.path.join(self.path, _blob_name(desc.digest))
        if not os.path.isfile(path):
            raise NotFound(f"{self.description}: blob {desc.digest} not found")
        return _open_chunks(path, f"{self.description}: blob {desc.digest}")


def _is_staging(name: str) -> bool:
    return name.startswith(_STAGING_PREFIX)


class DirDestination(ImageDestination):
    """Write one image (or a multi-arch copy: top manifest plus ``<hex>.manifest.json`` children) to ``dir:PATH``."""

    supported_manifest_types = None
    supports_index = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"dir:{path}"
        self._created: list[str] = []
        self._committed = False
        self._closed = False
        #: the directory that commit replaces (a symlink's target: the link itself stays)
        self._target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
        parent = os.path.dirname(self._target)
        exists = os.path.lexists(path)
        if exists:
            if not os.path.isdir(path):
                raise InvalidInput(f"{self.description}: exists and is not a directory")
            entries = [e for e in os.listdir(path) if not _is_staging(e)]
            if entries and not self._holds_dir_image():
                raise InvalidInput(
                    f"{self.description}: not a containers image directory, don't want to overwrite important data"
                )
        else:
            self._created = self._make_dirs(parent)
        #: staged inside PATH (entries replaced one by one) only where PATH cannot be renamed over
        self._in_place = exists and os.path.ismount(self._target)
        try:
            if not self._in_place:
                try:
                    name = os.path.basename(self._target)
                    self._staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{name}-", dir=parent)
                except PermissionError:
                    if not exists:
                        raise
                    self._in_place = True
            if self._in_place:
                self._staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self._target)
        except OSError:
            self._remove_created()
            raise

    def _holds_dir_image(self) -> bool:
        try:
            with open(os.path.join(self.path, _VERSION), "rb") as f:
                return f.read() == DIR_VERSION.encode()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False

    @staticmethod
    def _make_dirs(path: str) -> list[str]:
        """``mkdir -p path``; returns the directories created, deepest first (to undo)."""
        missing: list[str] = []
        p = os.path.abspath(path)
        while not os.path.lexists(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        os.makedirs(path, exist_ok=True)
        return missing

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                os.rmdir(d)
            except OSError:
                break
        self._created = []

    def _check_open(self) -> None:
        if self._closed or self._committed:
            raise RuntimeError(f"{self.description}: destination already committed or closed")

    def _staged(self, name: str) -> str:
        return os.path.join(self._staging, name)

    def _write_staged(self, name: str, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` to ``name`` in staging (only if iterating them succeeds)."""
        atomic_write(self._staged(name), chunks)

    def blob_exists(self, desc: Descriptor) -> bool:
        try:
            return os.stat(self._staged(_blob_name(desc.digest))).st_size == desc.size
        except FileNotFoundError:
            return False

    def put_blob(self, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        self._check_open()
        self._write_staged(_blob_name(desc.digest), verify_stream(chunks, desc))

    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        self._check_open()
        if isinstance(ref, Digest):
            verify_bytes(raw, ref, f"manifest {ref}")
            name = _child_manifest_name(ref)
        else:
            name = _MANIFEST
        self._write_staged(name, [raw])

    def _staged_manifest(self) -> bytes | None:
        try:
            with open(self._staged(_MANIFEST), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def has_manifest(self, digest: Digest) -> bool:
        if os.path.exists(self._staged(_child_manifest_name(digest))):
            return True
        top = self._staged_manifest()
        return top is not None and Digest.of(top, digest.algorithm) == digest

    def head_manifest(self, ref: str | None = None) -> Descriptor | None:
        top = self._staged_manifest()
        if top is None:
            return None
        return Descriptor.of(guess_media_type(top), top)

    def commit(self) -> None:
        """Put the staged image at PATH in one swap (see the module docstring for what is guaranteed)."""
        self._check_open()
        if not os.path.exists(self._staged(_MANIFEST)):
            raise ManifestError(f"{self.description}: nothing to commit, no manifest was written")
        atomic_write(self._staged(_VERSION), [DIR_VERSION.encode()])
        if self._in_place:
            self._commit_in_place()
        else:
            try:
                mode = os.stat(self._target).st_mode & 0o7777  # an existing PATH keeps its mode
            except FileNotFoundError:
                mode = 0o777 & ~umask()
            os.chmod(self._staging, mode)
            swap_in_dir(self._staging, self._target)
        self._committed = True
        self._created = []

    def _commit_in_place(self) -> None:
        staging_name = os.path.basename(self._staging)
        for entry in os.listdir(self._target):
            if entry == staging_name:
                continue
            full = os.path.join(self._target, entry)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
        names = sorted(os.listdir(self._staging), key=lambda n: (n == _MANIFEST, n == _VERSION, n))
        for name in names:
            if not name.startswith(".ferry-"):
                os.replace(self._staged(name), os.path.join(self._target, name))
        shutil.rmtree(self._staging, ignore_errors=True)
        fsync_dir(self._target)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._committed:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._remove_created()
