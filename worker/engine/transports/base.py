"""The one interface every transport implements (registry, OCI layout, dir, archives).

The copier holds an ``ImageSource`` and an ``ImageDestination`` and never asks
which transport it has. Both are bound to one image location (a repository in
a registry, an OCI layout plus a ref name, a ``dir:`` folder, an archive plus
an optional reference), so manifest calls take a tag or digest *within* that
location and ``None`` means "the reference the user named".

Rules every implementation keeps:

* ``put_blob`` consumes an iterator of chunks and never holds the whole blob
  in memory. It verifies size and digest while the bytes pass and raises
  ``DigestMismatch``/``SizeMismatch`` *without committing* the blob when they
  differ (for files: write to a temp name, rename only after verification).
* ``put_manifest`` with a tag is only called after every blob and child
  manifest it points to was put; transports that write a file at the end
  (archives) do so in ``commit()``.
* ``close()`` releases resources; for a destination, ``commit()`` makes the
  result durable and visible (archives are written then); a destination that
  was closed without commit leaves nothing half-written at the target path.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from worker.registry import MAX_MANIFEST_SIZE, Descriptor, Digest, ManifestError, verify_manifest, verify_stream


class StoredManifest(NamedTuple):
    """A manifest as a transport read it, before the shared checks."""

    raw: bytes
    media_type: str
    #: the digest the transport found it under (an index entry, a digest reference), or ``None``
    digest: Digest | None = None


class ImageSource(abc.ABC):
    """Read side of a transport.

    Transports implement ``_read_manifest`` and ``_open_blob``; callers use ``get_manifest`` and
    ``open_blob``, which check what was read against the digest it was read by, here, once for
    every transport: a manifest read by digest (or found under one) must hash to it, and a blob
    is verified while it streams (the error comes before its last chunk is handed on).
    """

    #: e.g. ``docker://localhost:5000/app:1`` or ``oci:/tmp/layout:app``
    description: str = ""

    @abc.abstractmethod
    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        """Read the manifest at ``ref`` (a tag, a digest, or ``None`` for the location's own reference).

        Raw bytes exactly as stored; raises ``NotFound`` when absent.
        """

    @abc.abstractmethod
    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        """Open a blob's stored bytes for streaming (unverified: ``open_blob`` verifies)."""

    def get_manifest(self, ref: str | Digest | None = None) -> tuple[bytes, str]:
        """Return ``(raw bytes, media type)`` of the manifest at ``ref``, checked against its digest.

        ``ref`` is a tag, a digest, or ``None`` for the location's own reference. Raises
        ``NotFound`` when absent, ``ManifestError`` when over the size limit and
        ``DigestMismatch`` when the bytes are not the ones the digest names.
        """
        found = self._read_manifest(ref)
        if len(found.raw) > MAX_MANIFEST_SIZE:
            raise ManifestError(
                f"{self.description}: manifest is {len(found.raw)} bytes, over the {MAX_MANIFEST_SIZE} byte limit"
            )
        for digest in {d for d in (ref, found.digest) if isinstance(d, Digest)}:
            verify_manifest(found.raw, digest, self.description)
        return found.raw, found.media_type

    def head_manifest(self, ref: str | Digest | None = None) -> Descriptor | None:
        """Descriptor of the manifest at ``ref``, or ``None`` when absent (cheap where possible)."""
        from worker.registry import NotFound

        try:
            raw, media_type = self.get_manifest(ref)
        except NotFound:
            return None
        return Descriptor.of(media_type, raw)

    def open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        """Open a blob for streaming: ``with src.open_blob(d) as chunks: for c in chunks: ...``.

        The chunks are verified against ``desc`` (size and digest) as they pass: a bad blob
        raises ``DigestMismatch``/``SizeMismatch`` before its last chunk is yielded.
        """
        return _verified(self._open_blob(desc), desc, f"blob {desc.digest} read from {self.description}")

    def has_blob(self, desc: Descriptor) -> bool:
        """True when this location holds the blob (opened and closed unread; a registry answers a HEAD)."""
        from worker.registry import NotFound

        try:
            with self.open_blob(desc):
                return True
        except NotFound:
            return False

    def list_tags(self) -> list[str]:
        """Tags in this location (repository); transports without tags return ``[]``."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _verified(
    opened: AbstractContextManager[Iterator[bytes]], desc: Descriptor, what: str
) -> Iterator[Iterator[bytes]]:
    with opened as chunks:
        yield iter(verify_stream(chunks, desc, what))


class BlobUpload:
    """An upload ``ImageDestination.prepare_blob`` started; ``cancel()`` gives it up unused."""

    def cancel(self) -> None:
        """Release what the upload holds (nothing, unless a transport says otherwise)."""


class ImageDestination(abc.ABC):
    """Write side of a transport."""

    description: str = ""

    #: Manifest media types the destination accepts; the copier converts otherwise.
    supported_manifest_types: frozenset[str] | None = None

    #: True when the destination can store several images (an index with
    #: children); dir: and docker-archive: hold one image only.
    supports_index: bool = True

    @abc.abstractmethod
    def blob_exists(self, desc: Descriptor) -> bool:
        """True when the destination already has this blob (HEAD / stat)."""

    @abc.abstractmethod
    def put_blob(self, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        """Store a blob from a stream of chunks, verifying size and digest before commit."""

    def prepare_blob(self, desc: Descriptor) -> BlobUpload | None:
        """``None`` when the destination has the blob; else a ``BlobUpload`` for ``put_prepared_blob``.

        A registry answers both in one request (and has the upload started); elsewhere this is
        ``blob_exists``. The caller either puts the blob with the upload or calls its ``cancel()``.
        """
        return None if self.blob_exists(desc) else BlobUpload()

    def put_prepared_blob(self, desc: Descriptor, chunks: Iterable[bytes], upload: BlobUpload) -> None:
        """``put_blob`` into an upload ``prepare_blob`` started (used once; on failure it is given up)."""
        self.put_blob(desc, chunks)

    def mount_blob(self, desc: Descriptor, from_repository: str) -> bool:
        """Cross-repository mount from ``from_repository`` in the same registry.

        Returns ``True`` when mounted, ``False`` when the destination cannot mount
        (the caller then uploads).
        """
        return False

    def has_manifest(self, digest: Digest) -> bool:
        """True when a manifest with ``digest`` exists at the destination."""
        return False

    def head_manifest(self, ref: str | None = None) -> Descriptor | None:
        """Descriptor of the manifest at ``ref`` (``None``: the location's reference), or ``None``."""
        return None

    @abc.abstractmethod
    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        """Store a manifest by digest (``ref`` a Digest) or under a tag (``ref`` a str or ``None``).

        ``None`` means the location's own reference (its tag, or for a
        digest-only reference, by digest).
        """

    def commit(self) -> None:  # noqa: B027 - optional hook
        """Make everything put so far durable and visible (archives write here)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; without a prior ``commit()`` leave the target untouched."""

    def __enter__(self) -> ImageDestination:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
