"""The ``docker://`` transport: a repository in a registry, through ``RegistryClient``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

from worker.registry import Descriptor, Digest, Reference, RegistryClient

from .base import BlobUpload, ImageDestination, ImageSource, StoredManifest


class RegistryUpload(BlobUpload):
    """An upload session a registry opened for one blob (its location)."""

    def __init__(self, dest: RegistryDestination, location: str) -> None:
        self.dest = dest
        self.location = location
        self.used = False

    def cancel(self) -> None:
        if not self.used:
            self.used = True
            self.dest.client.cancel_upload(self.dest.repository, self.location)


def _ref(reference: Reference, ref: str | Digest | None) -> str | Digest:
    if ref is None:
        return reference.digest if reference.digest is not None else (reference.tag or "latest")
    return ref


class RegistrySource(ImageSource):
    def __init__(self, reference: Reference, client: RegistryClient) -> None:
        self.reference = reference
        self.client = client
        self.description = f"docker://{reference}"

    @property
    def repository(self) -> str:
        return self.reference.repository

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        wanted = _ref(self.reference, ref)
        m = self.client.get_manifest(self.repository, wanted)
        return StoredManifest(m.raw, m.media_type, wanted if isinstance(wanted, Digest) else None)

    def head_manifest(self, ref: str | Digest | None = None) -> Descriptor | None:
        return self.client.head_manifest(self.repository, _ref(self.reference, ref))

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        return self.client.open_blob(self.repository, desc.digest, desc.size)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.blob_exists(self.repository, desc.digest)

    def list_tags(self) -> list[str]:
        return self.client.list_tags(self.repository)


class RegistryDestination(ImageDestination):
    def __init__(self, reference: Reference, client: RegistryClient) -> None:
        self.reference = reference
        self.client = client
        self.description = f"docker://{reference}"
        #: called with the byte count of each piece uploaded
        self.progress: Callable[[int], None] | None = None

    @property
    def repository(self) -> str:
        return self.reference.repository

    def blob_exists(self, desc: Descriptor) -> bool:
        return self.client.blob_exists(self.repository, desc.digest)

    def put_blob(self, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        self.client.upload_blob(self.repository, desc, chunks, progress=self.progress)

    def prepare_blob(self, desc: Descriptor) -> BlobUpload | None:
        location = self.client.open_upload(self.repository, desc.digest)
        return None if location is None else RegistryUpload(self, location)

    def put_prepared_blob(self, desc: Descriptor, chunks: Iterable[bytes], upload: BlobUpload) -> None:
        if not isinstance(upload, RegistryUpload) or upload.used:
            self.put_blob(desc, chunks)
            return
        upload.used = True  # upload_blob cancels the session itself when it fails
        self.client.upload_blob(self.repository, desc, chunks, progress=self.progress, location=upload.location)

    def mount_blob(self, desc: Descriptor, from_repository: str) -> bool:
        return self.client.mount_blob(self.repository, desc.digest, from_repository)

    def has_manifest(self, digest: Digest) -> bool:
        return self.client.head_manifest(self.repository, digest) is not None

    def head_manifest(self, ref: str | None = None) -> Descriptor | None:
        return self.client.head_manifest(self.repository, _ref(self.reference, ref))

    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        self.client.put_manifest(self.repository, _ref(self.reference, ref), raw, media_type)
