"""Check bytes against a descriptor while they stream past."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ._errors import DigestMismatch, SizeMismatch
from ._types import Descriptor, Digest


class VerifyingStream:
    """Iterate ``chunks``, hashing and counting; raise on the last chunk if they differ.

    The error is raised *before* the final chunk is handed on, so a consumer
    that commits only after the iterator is exhausted never commits bad bytes.
    A size overrun is caught as soon as it happens.
    """

    def __init__(self, chunks: Iterable[bytes], digest: Digest, size: int | None, what: str) -> None:
        self._chunks = iter(chunks)
        self._digest = digest
        self._size = size
        self._what = what
        self._hasher = digest.hasher()
        self.bytes_seen = 0

    def __iter__(self) -> Iterator[bytes]:
        pending: bytes | None = None
        for chunk in self._chunks:
            if not chunk:
                continue
            self._hasher.update(chunk)
            self.bytes_seen += len(chunk)
            if self._size is not None and self._size >= 0 and self.bytes_seen > self._size:
                raise SizeMismatch(self._what, self._size, self.bytes_seen)
            if pending is not None:
                yield pending
            pending = chunk
        self.check()
        if pending is not None:
            yield pending

    def check(self) -> None:
        if self._size is not None and self._size >= 0 and self.bytes_seen != self._size:
            raise SizeMismatch(self._what, self._size, self.bytes_seen)
        actual = Digest(self._digest.algorithm, self._hasher.hexdigest())
        if actual != self._digest:
            raise DigestMismatch(self._what, self._digest, actual)


def verify_stream(chunks: Iterable[bytes], desc: Descriptor, what: str | None = None) -> VerifyingStream:
    return VerifyingStream(chunks, desc.digest, desc.size, what or f"blob {desc.digest}")


def verify_bytes(data: bytes, digest: Digest, what: str) -> None:
    actual = Digest.of(data, digest.algorithm)
    if actual != digest:
        raise DigestMismatch(what, digest, actual)


def verify_manifest(raw: bytes, digest: Digest, where: str) -> None:
    """A manifest read by ``digest`` from ``where`` must be the bytes the digest names (skopeo refuses too)."""
    actual = Digest.of(raw, digest.algorithm)
    if actual != digest:
        raise DigestMismatch(f"manifest {digest} read from {where}", digest, actual)
