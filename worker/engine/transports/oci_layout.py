"""The ``oci:`` transport: an OCI image layout directory.

On-disk format (what containers/image, and so skopeo, reads and writes)::

    PATH/oci-layout      {"imageLayoutVersion": "1.0.0"}
    PATH/index.json      {"schemaVersion":2,"manifests":[{"mediaType":...,"digest":...,"size":...,
                           "annotations":{"org.opencontainers.image.ref.name":"REF"}}]}
    PATH/blobs/ALG/HEX   every blob, manifests and indexes included

``oci:PATH:REF`` names the index.json entry whose ``org.opencontainers.image.ref.name``
annotation is REF. Without REF a source needs exactly one entry in index.json, and a
destination adds an entry without annotation. A multi-arch image is one entry pointing
at the image index; its children are plain blobs.

Writing follows containers/image's ``addManifest``: a named entry takes its name away
from the previous holder (which stays in index.json, unnamed), then replaces an unnamed
entry with the same digest or is appended. index.json is rewritten atomically (temp
file + rename) under an ``flock`` on the layout directory, re-read under the lock so
concurrent writers to one layout do not lose each other's entries. Blobs are written
to a temp file in ``blobs/`` and renamed into place only after size and digest were
verified, so a partial or wrong blob is never visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol

from worker.registry import (
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Descriptor,
    Digest,
    InvalidInput,
    InvalidReference,
    MalformedDocument,
    ManifestError,
    MediaType,
    NotFound,
    load_json,
    verify_bytes,
    verify_stream,
)
from worker.registry._fs import atomic_write
from worker.registry._mediatype import sniff_media_type

from .base import ImageDestination, ImageSource, StoredManifest

__all__ = [
    "BLOBS_DIR",
    "CHUNK_SIZE",
    "INDEX_FILE",
    "LAYOUT_FILE",
    "MAX_MANIFEST_SIZE",
    "REF_NAME_ANNOTATION",
    "LayoutReader",
    "OCILayoutDestination",
    "OCILayoutSource",
    "parse_oci_spec",
    "validate_ref_name",
]

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
#: What skopeo 1.9 writes into ``oci-layout`` (newer containers/image drop the space).
LAYOUT_CONTENT = b'{"imageLayoutVersion": "1.0.0"}'
CHUNK_SIZE = 1 << 20

# containers/image oci/internal: the OCI ref.name grammar.
_SEPARATOR = r"(?:[-._:@+]|--)"
_ALNUM = r"(?:[A-Za-z0-9]+)"
_COMPONENT = rf"(?:{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*)"
_REF_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")


def validate_ref_name(ref: str) -> None:
    """Raise ``InvalidReference`` unless ``ref`` is a valid ``org.opencontainers.image.ref.name``."""
    if not _REF_RE.match(ref):
        raise InvalidReference(
            f"invalid image name {ref!r} in OCI reference: use letters and digits, "
            "separated by one of - . _ : @ + or --, components joined by /"
        )


def parse_oci_spec(text: str) -> tuple[str, str | None]:
    """Split the part after ``oci:`` / ``oci-archive:`` into ``(path, ref or None)``.

    As containers/image does on Linux, the text is split at the *first* colon:
    ``/tmp/lay:app:1.0`` is path ``/tmp/lay`` with ref ``app:1.0`` (refs may contain
    colons), so a path containing ``:`` cannot be expressed. An empty ref
    (``oci:/tmp/lay:``) means no ref. The ref must match the OCI ref.name grammar;
    containers' ``@N`` source-index form is not supported.
    """
    path, sep, ref = text.partition(":")
    if not path:
        raise InvalidReference(f"invalid OCI reference {text!r}: empty path")
    if not sep or not ref:
        return path, None
    validate_ref_name(ref)
    return path, ref


def _spec(transport: str, path: str, ref: str | None) -> str:
    return f"{transport}:{path}:{ref}" if ref else f"{transport}:{path}"


def _ref_name(entry: dict[str, Any]) -> str:
    ann = entry.get("annotations")
    if isinstance(ann, dict):
        name = ann.get(REF_NAME_ANNOTATION)
        if isinstance(name, str):
            return name
    return ""


def _parse_index(raw: bytes, where: str) -> dict[str, Any]:
    try:
        index = load_json(raw, "index.json")
    except MalformedDocument as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    if not isinstance(index, dict):
        raise InvalidInput(f"{where}: index.json is not a JSON object")
    manifests = index.get("manifests")
    if manifests is None:
        index["manifests"] = []
    elif not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise InvalidInput(f"{where}: index.json has a malformed 'manifests' list")
    return index


def _iter_file(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_SIZE):
        yield chunk


class LayoutReader(Protocol):
    """Read access to one OCI layout, on disk or inside an archive (used by ``OCILayoutSource``)."""

    #: Human-readable location for error messages.
    where: str

    def read_index(self) -> bytes:
        """Raw index.json; ``NotFound`` when absent."""
        ...

    def read_blob(self, digest: Digest, max_size: int) -> bytes:
        """A small blob (a manifest); ``NotFound`` when absent, ``ManifestError`` above ``max_size``."""
        ...

    def stream_blob(self, digest: Digest) -> AbstractContextManager[Iterator[bytes]]:
        """A blob in chunks of at most ``CHUNK_SIZE``; ``NotFound`` when absent."""
        ...

    def close(self) -> None: ...


class _DirReader:
    def __init__(self, root: str, shared_blob_dir: str | None) -> None:
        self.root = root
        self.where = f"OCI layout {root}"
        self._blobs = shared_blob_dir or os.path.join(root, BLOBS_DIR)

    def blob_path(self, digest: Digest) -> str:
        return os.path.join(self._blobs, digest.algorithm, digest.hex)

    def read_index(self) -> bytes:
        path = os.path.join(self.root, INDEX_FILE)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"no OCI layout at {self.root}: {path} does not exist") from None
        except NotADirectoryError:
            raise InvalidInput(f"no OCI layout at {self.root}: not a directory") from None

    def read_blob(self, digest: Digest, max_size: int) -> bytes:
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_size:
                    raise ManifestError(f"manifest {digest} in {self.where} is {size} bytes, limit is {max_size}")
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"manifest {digest} not found in {self.where}: {path} does not exist") from None

    @contextlib.contextmanager
    def stream_blob(self, digest: Digest) -> Iterator[Iterator[bytes]]:
        path = self.blob_path(digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the caller is done
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in {self.where}: {path} does not exist") from None
        with f:
            yield _iter_file(f)

    def close(self) -> None:
        pass


def _check_location(path: str, ref: str | None) -> None:
    if not path:
        raise InvalidReference("invalid OCI reference: empty path")
    if ref is not None:
        validate_ref_name(ref)


class OCILayoutSource(ImageSource):
    """Read images from an OCI layout: ``oci:PATH[:REF]``.

    index.json is read once, when the source is opened. ``reader`` lets
    ``OCIArchiveSource`` serve a layout that lives inside a tar file.
    """

    def __init__(
        self,
        path: str,
        ref: str | None = None,
        *,
        shared_blob_dir: str | None = None,
        reader: LayoutReader | None = None,
        description: str | None = None,
    ) -> None:
        _check_location(path, ref)
        self.path = path
        self.ref = ref
        self.description = description or _spec("oci", path, ref)
        self._reader: LayoutReader = reader or _DirReader(path, shared_blob_dir)
        self._entries: list[dict[str, Any]] = _parse_index(self._reader.read_index(), self.description)["manifests"]

    # -- index lookups -------------------------------------------------------------------------

    def _names(self) -> list[str]:
        names: list[str] = []
        for entry in self._entries:
            name = _ref_name(entry)
            if name and name not in names:
                names.append(name)
        return names

    def _resolve(self, name: str | None) -> dict[str, Any]:
        if name is None:
            if len(self._entries) == 1:
                return self._entries[0]
            if not self._entries:
                raise NotFound(f"{self.description}: the layout holds no images (index.json has no manifests)")
            names = ", ".join(self._names()) or "none has a ref name"
            raise InvalidInput(
                f"{self.description}: the layout holds {len(self._entries)} images, choose one with "
                f"oci:PATH:REF (ref names: {names})"
            )
        unsupported: list[str] = []
        for entry in self._entries:
            if _ref_name(entry) != name:
                continue
            media_type = entry.get("mediaType") or ""
            if not media_type or media_type in MANIFEST_TYPES:
                return entry
            unsupported.append(str(media_type))
        if unsupported:
            raise ManifestError(f"{self.description}: ref {name!r} names unsupported media types {unsupported}")
        available = ", ".join(self._names()) or "none"
        raise NotFound(f"{self.description}: no image named {name!r} in index.json (ref names: {available})")

    # -- ImageSource ---------------------------------------------------------------------------

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        media_type = ""
        if isinstance(ref, Digest):
            digest = ref
            for entry in self._entries:
                if entry.get("digest") == str(digest):
                    media_type = str(entry.get("mediaType") or "")
                    break
        else:
            entry = self._resolve(self.ref if ref is None else ref)
            try:
                digest = Digest.parse(str(entry.get("digest", "")))
            except InvalidInput as exc:
                raise ManifestError(f"{self.description}: bad digest in index.json: {exc}") from None
            media_type = str(entry.get("mediaType") or "")
        raw = self._reader.read_blob(digest, MAX_MANIFEST_SIZE)
        return StoredManifest(
            raw, media_type or sniff_media_type(raw, f"{self.description}: manifest {digest}"), digest
        )

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        return self._reader.stream_blob(desc.digest)

    def list_tags(self) -> list[str]:
        return self._names()

    def close(self) -> None:
        self._reader.close()


class OCILayoutDestination(ImageDestination):
    """Write images into an OCI layout: ``oci:PATH[:REF]`` (created when missing)."""

    supported_manifest_types: frozenset[str] | None = frozenset({MediaType.OCI_MANIFEST, MediaType.OCI_INDEX})
    supports_index = True

    def __init__(
        self,
        path: str,
        ref: str | None = None,
        *,
        shared_blob_dir: str | None = None,
        description: str | None = None,
    ) -> None:
        _check_location(path, ref)
        self.path = path
        self.ref = ref
        self.description = description or _spec("oci", path, ref)
        self._blobs = shared_blob_dir or os.path.join(path, BLOBS_DIR)
        try:
            os.makedirs(path, exist_ok=True)
            os.makedirs(os.path.join(path, BLOBS_DIR), exist_ok=True)
            os.makedirs(self._blobs, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidInput(f"{self.description}: {path} exists and is not a directory") from None
        with self._locked():
            if not os.path.exists(os.path.join(path, LAYOUT_FILE)):
                self._write_atomic(os.path.join(path, LAYOUT_FILE), LAYOUT_CONTENT)
            if not os.path.exists(os.path.join(path, INDEX_FILE)):
                self._write_index({"schemaVersion": 2, "manifests": []})

    # -- files ---------------------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> str:
        return os.path.join(self._blobs, digest.algorithm, digest.hex)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock on the layout directory (flock, so it also excludes other threads and processes)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _write_atomic(final: str, data: bytes, tmp_dir: str | None = None) -> None:
        atomic_write(final, [data], tmp_dir=tmp_dir)

    def _load_index(self) -> dict[str, Any]:
        path = os.path.join(self.path, INDEX_FILE)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        return _parse_index(raw, self.description)

    def _write_index(self, index: dict[str, Any]) -> None:
        data = json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode()
        self._write_atomic(os.path.join(self.path, INDEX_FILE), data)

    def _write_blob_bytes(self, digest: Digest, data: bytes) -> None:
        final = self._blob_path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        # The temp file lives in blobs/, not blobs/ALG/, so nothing but complete blobs ever shows up there.
        self._write_atomic(final, data, tmp_dir=self._blobs)

    # -- ImageDestination ----------------------------------------------------------------------

    def blob_exists(self, desc: Descriptor) -> bool:
        try:
            st = os.stat(self._blob_path(desc.digest))
        except FileNotFoundError:
            return False
        return desc.size < 0 or st.st_size == desc.size

    def put_blob(self, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        final = self._blob_path(desc.digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        # The temp file lives in blobs/, not blobs/ALG/, so nothing but complete blobs ever shows up there.
        atomic_write(final, verify_stream(chunks, desc), tmp_dir=self._blobs)

    def has_manifest(self, digest: Digest) -> bool:
        return os.path.isfile(self._blob_path(digest))

    def head_manifest(self, ref: str | None = None) -> Descriptor | None:
        name = ref if ref is not None else self.ref
        entries: list[dict[str, Any]] = self._load_index()["manifests"]
        if name is None:
            found = entries[0] if len(entries) == 1 else None
        else:
            found = next((e for e in entries if _ref_name(e) == name), None)
        if found is None:
            return None
        desc = Descriptor.from_json(found)
        return desc if os.path.isfile(self._blob_path(desc.digest)) else None

    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        if len(raw) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"manifest is {len(raw)} bytes, limit is {MAX_MANIFEST_SIZE}")
        if isinstance(ref, Digest):
            verify_bytes(raw, ref, f"manifest {ref}")
            self._write_blob_bytes(ref, raw)
            return
        name = ref if ref is not None else self.ref
        if name is not None:
            validate_ref_name(name)
        digest = Digest.of(raw)
        self._write_blob_bytes(digest, raw)
        entry: dict[str, Any] = {
            "mediaType": media_type or sniff_media_type(raw, f"{self.description}: manifest"),
            "digest": str(digest),
            "size": len(raw),
        }
        if name:
            entry["annotations"] = {REF_NAME_ANNOTATION: name}
        with self._locked():
            index = self._load_index()
            _add_manifest(index["manifests"], entry)
            self._write_index(index)


def _add_manifest(manifests: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """containers/image ``addManifest``: move the name to ``entry``, reuse an unnamed same-digest slot or append."""
    name = _ref_name(entry)
    if name:
        for old in manifests:
            if _ref_name(old) == name:
                ann = old["annotations"]
                del ann[REF_NAME_ANNOTATION]
                if not ann:
                    del old["annotations"]
                break
    for i, old in enumerate(manifests):
        if old.get("digest") == entry["digest"] and not _ref_name(old):
            manifests[i] = entry
            return
    manifests.append(entry)
