"""The ``docker-archive:PATH[:REF]`` transport: the ``docker save`` tarball, read and written like containers/image.

Archive layout (as skopeo 1.9 / containers/image 5.23 writes it, member order included)::

    <diffid-hex>.tar                   each layer, UNCOMPRESSED, named by its diff_id, in manifest order
    <config-hex>.json                  the image config
    <layer-id>/layer.tar -> ../<diffid-hex>.tar   legacy (docker < 1.10) metadata, one directory per layer:
    <layer-id>/VERSION                 "1.0"
    <layer-id>/json                    legacy layer config (the last one carries the image's attributes)
    manifest.json                      [{"Config": ..., "RepoTags": [...], "Layers": [...]}]
    repositories                       {"name": {"tag": "<last layer-id>"}} (``{}`` without a reference)

Every member has a Go ``archive/tar`` USTAR header (mode 0444, mtime 0, uid/gid 0, no owner names) and
the archive ends with two zero blocks and no record padding, so Ferry's archives are byte-identical to
skopeo's for the same image.

Reading follows containers/image too: the manifest is *synthesised* as Docker schema 2 with the config
descriptor (sha256 of the config file) and one layer per ``rootfs.diff_ids`` entry whose digest is the
diff_id, size the uncompressed size and media type ``...rootfs.diff.tar.gzip`` (containers' constant,
although the bytes are served uncompressed). Layer members may be stored compressed (gzip, bzip2, xz);
they are decompressed on the fly. A whole archive compressed with one of those is decompressed to a
temporary file first.

REF is a docker reference with a tag (``name:tag``; ``name`` means ``name:latest``) or, for a source
only, ``@N``: the N-th entry of ``manifest.json``. Digest references are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO

from worker.registry import (
    Descriptor,
    Digest,
    IntegrityError,
    InvalidInput,
    InvalidReference,
    MalformedDocument,
    ManifestError,
    MediaType,
    NotFound,
    Reference,
    load_json,
    verify_stream,
)
from worker.registry._fs import atomic_file

from ._archive import TarWriter, decompress, detect_compression, file_chunks, peek
from .base import ImageDestination, ImageSource, StoredManifest

__all__ = [
    "DockerArchiveDestination",
    "DockerArchiveSource",
    "parse_docker_archive_spec",
]

_CHUNK = 1 << 20
_MANIFEST = "manifest.json"
_REPOSITORIES = "repositories"
_LEGACY_LAYER = "layer.tar"
_LEGACY_VERSION = "VERSION"
_LEGACY_CONFIG = "json"
_MAX_MANIFEST = 20 << 20  # containers: iolimits.MaxTarFileManifestSize
_MAX_CONFIG = 4 << 20  # containers: iolimits.MaxConfigBodySize
#: containers' ``manifest.DockerV2Schema2LayerMediaType``, used for every synthesised layer
_SYNTH_LAYER_TYPE = MediaType.DOCKER_LAYER
#: the attributes copied from the image config into the last legacy layer's ``json`` (containers' list)
_LEGACY_ATTRS = ("architecture", "config", "container", "container_config", "created", "docker_version", "os")
_CONFIG_TYPES = frozenset({MediaType.DOCKER_CONFIG, MediaType.OCI_CONFIG})


# --------------------------------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class _Ref:
    reference: Reference | None = None
    index: int | None = None


def _parse_ref(ref: str | None) -> _Ref:
    if ref is None:
        return _Ref()
    if ref.startswith("@"):
        try:
            i = int(ref[1:], 10)
        except ValueError:
            raise InvalidReference(f"docker-archive: invalid source index {ref!r}") from None
        if i < 0:
            raise InvalidReference(f"docker-archive: invalid source index {ref!r}: must not be negative")
        return _Ref(index=i)
    try:
        parsed = Reference.parse(ref)
    except InvalidInput as exc:
        raise InvalidReference(f"docker-archive: parsing reference {ref!r}: {exc}") from None
    if parsed.digest is not None:
        raise InvalidReference(f"docker-archive doesn't support digest references: {ref}")
    return _Ref(reference=parsed)


def parse_docker_archive_spec(text: str) -> tuple[str, str | None]:
    """Split what follows ``docker-archive:`` into ``(path, ref)``, validating ``ref`` like containers/image.

    ``ref`` is ``None``, a docker reference (``name:tag``) or a source index ``@N``, returned as written.
    The path may not contain ``:`` (containers splits at the first colon).
    """
    if not text:
        raise InvalidReference("docker-archive reference '' isn't of the form <path>[:<reference>]")
    path, sep, ref = text.partition(":")
    if not path:
        raise InvalidReference(f"docker-archive reference {text!r}: empty path")
    if not sep:
        return path, None
    _parse_ref(ref)
    return path, ref


def _describe(path: str, ref: str | None) -> str:
    return f"docker-archive:{path}" + (f":{ref}" if ref is not None else "")


# --------------------------------------------------------------------------------------------------------------------
# Go-compatible JSON bits (for the legacy layer IDs, which hash Go's json.Marshal output)


def _go_compact(raw: str) -> str:
    """``encoding/json`` compaction of a raw JSON value with HTML escaping, as ``json.Marshal`` emits RawMessage."""
    out: list[str] = []
    in_str = False
    esc = False
    for ch in raw:
        if in_str:
            if esc:
                esc = False
                out.append(ch)
            elif ch == "\\":
                esc = True
                out.append(ch)
            elif ch == '"':
                in_str = False
                out.append(ch)
            elif ch in "<>&\u2028\u2029":
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        elif ch in " \t\r\n":
            continue
        else:
            if ch == '"':
                in_str = True
            out.append(ch)
    return "".join(out)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _raw_members(text: str) -> dict[str, str]:
    """The raw JSON text of each top-level member of a JSON object (last duplicate wins, as in Go)."""
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if not text.startswith("{", i):
        raise ValueError("not a JSON object")
    i = _skip_ws(text, i + 1)
    out: dict[str, str] = {}
    if text.startswith("}", i):
        return out
    while True:
        key, i = dec.raw_decode(text, i)
        if not isinstance(key, str):
            raise ValueError("object key is not a string")
        i = _skip_ws(text, i)
        if not text.startswith(":", i):
            raise ValueError("expected ':'")
        i = _skip_ws(text, i + 1)
        _, j = dec.raw_decode(text, i)
        out[key] = text[i:j]
        i = _skip_ws(text, j)
        if text.startswith(",", i):
            i = _skip_ws(text, i + 1)
            continue
        if text.startswith("}", i):
            return out
        raise ValueError("expected ',' or '}'")


def _go_object(members: dict[str, str]) -> str:
    """Marshal a map of already-encoded JSON values like Go: keys sorted, no spaces."""
    return "{" + ",".join(f"{json.dumps(k)}:{members[k]}" for k in sorted(members)) + "}"


def _legacy_layers(diff_ids: list[Digest], config: bytes) -> list[tuple[str, bytes]]:
    """``(layer_id, json bytes)`` per layer, computed exactly like containers' ``writeLegacyMetadataLocked``."""
    try:
        attrs = _raw_members(config.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise ManifestError(f"docker-archive: image config is not a JSON object: {exc}") from None
    out: list[tuple[str, bytes]] = []
    chain = ""
    last_id = ""
    for i, diff in enumerate(diff_ids):
        members: dict[str, str] = {}
        if last_id:
            members["parent"] = json.dumps(last_id)
        if i == len(diff_ids) - 1:
            for attr in _LEGACY_ATTRS:
                members[attr] = _go_compact(attrs[attr]) if attr in attrs else "null"
        chain = str(diff) if not chain else "sha256:" + hashlib.sha256(f"{chain} {diff}".encode()).hexdigest()
        members["layer_id"] = json.dumps(chain)
        layer_id = hashlib.sha256(_go_object(members).encode("utf-8", "surrogateescape")).hexdigest()
        del members["layer_id"]
        members["id"] = json.dumps(layer_id)
        out.append((layer_id, _go_object(members).encode("utf-8", "surrogateescape")))
        last_id = layer_id
    return out


def _go_json(obj: Any) -> bytes:
    """``json.Marshal`` of plain data with ASCII-safe strings (struct field order kept, no spaces)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return _go_compact(text).encode()


# --------------------------------------------------------------------------------------------------------------------
# Source


@dataclass(frozen=True)
class _Layer:
    member: tarfile.TarInfo
    size: int
    compression: str | None


class DockerArchiveSource(ImageSource):
    """Read one image from a ``docker save`` / ``skopeo copy ... docker-archive:`` tarball."""

    def __init__(self, path: str, ref: str | None = None) -> None:
        self.path = path
        self.description = _describe(path, ref)
        self._ref = _parse_ref(ref)
        self._tmp: str | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._manifest: bytes | None = None
        self._config = b""
        self._config_digest: Digest | None = None
        self._layers: dict[Digest, _Layer] = {}
        self._load_lock = threading.Lock()
        try:
            self._tar_path = self._open_archive()
            self._index_members()
            raw = self._read_member(_MANIFEST, _MAX_MANIFEST)
            try:
                items = load_json(raw, "manifest.json")
            except MalformedDocument as exc:
                raise ManifestError(f"{self.description}: {exc}") from None
            if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
                raise ManifestError(f"{self.description}: manifest.json is not a list of objects")
            self.items: list[dict[str, Any]] = items
            self._item = self._choose_item()
        except BaseException:
            self.close()
            raise

    # -- archive access

    def _open_archive(self) -> str:
        try:
            with open(self.path, "rb") as f:
                kind = detect_compression(f.read(6))
        except FileNotFoundError:
            raise NotFound(f"{self.description}: no such file") from None
        except IsADirectoryError:
            raise InvalidInput(f"{self.description}: is a directory, not an archive") from None
        if kind is None:
            return self.path
        fd, tmp = tempfile.mkstemp(prefix="ferry-docker-tar-")
        self._tmp = tmp
        with os.fdopen(fd, "wb") as out, open(self.path, "rb") as f:
            for piece in decompress(file_chunks(f), kind, self.description):
                out.write(piece)
        return tmp

    def _index_members(self) -> None:
        try:
            with tarfile.open(self._tar_path, "r:") as tf:
                for info in tf:
                    self._members.setdefault(posixpath.normpath(info.name), info)
        except tarfile.TarError as exc:
            raise InvalidInput(f"{self.description}: not a tar archive: {exc}") from None

    def _member(self, name: str) -> tarfile.TarInfo:
        name = posixpath.normpath(name)
        info = self._members.get(name)
        if info is not None and info.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
            info = self._members.get(target)
        elif info is not None and info.islnk():
            info = self._members.get(posixpath.normpath(info.linkname))
        if info is None:
            raise NotFound(f"{self.description}: archive has no member {name}")
        if not info.isreg() or info.issparse():
            raise InvalidInput(f"{self.description}: archive member {name} is not a regular file")
        return info

    @contextlib.contextmanager
    def _raw_chunks(self, info: tarfile.TarInfo) -> Iterator[Iterator[bytes]]:
        with open(self._tar_path, "rb") as f:
            f.seek(info.offset_data)

            def gen() -> Iterator[bytes]:
                left = info.size
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        raise IntegrityError(f"{self.description}: archive truncated inside {info.name}")
                    left -= len(chunk)
                    yield chunk

            yield gen()

    def _read_member(self, name: str, limit: int) -> bytes:
        info = self._member(name)
        if info.size > limit:
            raise ManifestError(f"{self.description}: {name} is larger than {limit} bytes")
        with self._raw_chunks(info) as chunks:
            return b"".join(chunks)

    def _compression_of(self, info: tarfile.TarInfo) -> str | None:
        with open(self._tar_path, "rb") as f:
            f.seek(info.offset_data)
            return detect_compression(f.read(min(6, info.size)))

    # -- image selection and the synthesised manifest

    def _choose_item(self) -> dict[str, Any]:
        items = self.items
        if self._ref.reference is not None:
            want = str(self._ref.reference)
            for i, item in enumerate(items):
                for tag in item.get("RepoTags") or []:
                    try:
                        parsed = Reference.parse(str(tag), default_tag=False)
                    except InvalidInput as exc:
                        raise ManifestError(
                            f"{self.description}: invalid tag {tag!r} in manifest.json item @{i}: {exc}"
                        ) from None
                    if str(parsed) == want:
                        return item
            raise NotFound(f"{self.description}: tag {want!r} not found")
        if self._ref.index is not None:
            if self._ref.index >= len(items):
                raise NotFound(
                    f"{self.description}: invalid source index @{self._ref.index}, "
                    f"only {len(items)} manifest items available"
                )
            return items[self._ref.index]
        if len(items) != 1:
            raise InvalidInput(
                f"{self.description}: unexpected tar manifest.json: expected 1 item, got {len(items)} "
                "(name one with :NAME:TAG or :@N)"
            )
        return items[0]

    def _ensure_loaded(self) -> bytes:
        if self._manifest is not None:
            return self._manifest
        with self._load_lock:
            if self._manifest is None:
                self._load()
            assert self._manifest is not None
            return self._manifest

    def _load(self) -> None:
        item = self._item
        config_name = item.get("Config")
        layer_names = item.get("Layers") or []
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ManifestError(f"{self.description}: malformed manifest.json item")
        config = self._read_member(config_name, _MAX_CONFIG)
        try:
            parsed = load_json(config, f"config {config_name}")
        except MalformedDocument as exc:
            raise ManifestError(f"{self.description}: {exc}") from None
        rootfs = parsed.get("rootfs") if isinstance(parsed, dict) else None
        if not isinstance(rootfs, dict):
            raise ManifestError(f"{self.description}: invalid image config (rootfs is not set): {config_name}")
        diff_ids = [Digest.parse(str(d)) for d in rootfs.get("diff_ids") or []]
        if len(layer_names) != len(diff_ids):
            raise ManifestError(
                f"{self.description}: inconsistent layer count: {len(layer_names)} in manifest, "
                f"{len(diff_ids)} in config"
            )
        layers: dict[Digest, _Layer] = {}
        used: dict[str, Digest] = {}
        for diff_id, name in zip(diff_ids, layer_names, strict=True):
            if diff_id in layers:
                continue
            clean = posixpath.normpath(str(name))
            if clean in used:
                raise ManifestError(f"{self.description}: layer tarfile {clean} used for two different DiffID values")
            used[clean] = diff_id
            info = self._member(clean)
            kind = self._compression_of(info)
            size = info.size
            if kind is not None:
                size = 0
                with self._raw_chunks(info) as chunks:
                    for piece in decompress(chunks, kind, f"{self.description}: {clean}"):
                        size += len(piece)
            layers[diff_id] = _Layer(info, size, kind)
        config_digest = Digest.of(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MediaType.DOCKER_MANIFEST.value,
            "config": {"mediaType": MediaType.DOCKER_CONFIG.value, "size": len(config), "digest": str(config_digest)},
            "layers": [
                {"mediaType": _SYNTH_LAYER_TYPE.value, "size": layers[d].size, "digest": str(d)} for d in diff_ids
            ],
        }
        self._config = config
        self._config_digest = config_digest
        self._layers = layers
        self._manifest = _go_json(manifest)

    # -- ImageSource

    @property
    def repo_tags(self) -> list[str]:
        """``RepoTags`` of the selected ``manifest.json`` entry."""
        return [str(t) for t in self._item.get("RepoTags") or []]

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        raw = self._ensure_loaded()
        if ref is None:
            return StoredManifest(raw, MediaType.DOCKER_MANIFEST)
        if isinstance(ref, str):
            try:
                ref = Digest.parse(ref)
            except InvalidInput:
                raise NotFound(f"{self.description}: no manifest {ref!r} (docker-archive has no tags inside)") from None
        if Digest.of(raw, ref.algorithm) == ref:
            return StoredManifest(raw, MediaType.DOCKER_MANIFEST, ref)
        raise NotFound(f"{self.description}: manifest {ref} not found (docker-archive holds no manifest lists)")

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        self._ensure_loaded()
        if desc.digest == self._config_digest:
            return contextlib.nullcontext(iter([self._config]))
        layer = self._layers.get(desc.digest)
        if layer is None:
            raise NotFound(f"{self.description}: unknown blob {desc.digest}")
        return self._open_layer(layer, desc)

    @contextlib.contextmanager
    def _open_layer(self, layer: _Layer, desc: Descriptor) -> Iterator[Iterator[bytes]]:
        with self._raw_chunks(layer.member) as chunks:
            if layer.compression is None:
                yield chunks
            else:
                yield decompress(chunks, layer.compression, f"{self.description}: blob {desc.digest}")

    def close(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


# --------------------------------------------------------------------------------------------------------------------
# Destination


class DockerArchiveDestination(ImageDestination):
    """Write one image as a ``docker save`` tarball at PATH, tagged with REF when given.

    Layers are stored uncompressed (containers: ``DesiredLayerCompression = Decompress``): ``put_blob``
    verifies the blob as received and writes its decompressed bytes to a staging file named by the
    uncompressed digest (the diff_id). ``put_manifest`` (Docker schema 2 or OCI, referring to the blobs
    as they were put) records the image; ``commit()`` writes the archive to a temp file next to PATH and
    renames it onto PATH. Like containers/image, an existing non-empty regular file at PATH is refused
    ("docker-archive doesn't support modifying existing images"); a FIFO or device is written in place.
    """

    supported_manifest_types = frozenset({MediaType.DOCKER_MANIFEST.value, MediaType.OCI_MANIFEST.value})
    supports_index = False

    def __init__(self, path: str, ref: str | None = None) -> None:
        self.path = path
        self.description = _describe(path, ref)
        parsed = _parse_ref(ref)
        if parsed.index is not None:
            raise InvalidReference(
                f"{self.description}: destination reference must not contain a manifest index @{parsed.index}"
            )
        self._reference = parsed.reference
        self._extra_tags: list[Reference] = []
        special = self._check_target()
        self._committed = False
        self._closed = False
        #: blob digest as put (compressed or not) -> (uncompressed sha256 digest, uncompressed size)
        self._blobs: dict[Digest, tuple[Digest, int]] = {}
        self._image: tuple[Digest, tuple[Digest, ...]] | None = None
        parent = tempfile.gettempdir() if special else os.path.dirname(os.path.abspath(path))
        try:
            self._staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.ferry-", dir=parent)
        except FileNotFoundError:
            raise InvalidInput(f"{self.description}: directory {parent} does not exist") from None

    def _check_target(self) -> bool:
        """Refuse what containers refuses; returns True when PATH is a special file (FIFO, device) to write in place."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"{self.description}: {self.path} is a directory")
        if stat.S_ISREG(st.st_mode):
            if st.st_size != 0:
                raise InvalidInput(f"{self.description}: docker-archive doesn't support modifying existing images")
            return False
        return True

    def _check_open(self) -> None:
        if self._closed or self._committed:
            raise RuntimeError(f"{self.description}: destination already committed or closed")

    def _staged(self, digest: Digest) -> str:
        return os.path.join(self._staging, digest.hex)

    def blob_exists(self, desc: Descriptor) -> bool:
        known = self._blobs.get(desc.digest)
        return known is not None and os.path.exists(self._staged(known[0]))

    def put_blob(self, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        self._check_open()
        what = f"{self.description}: blob {desc.digest}"
        head, stream = peek(verify_stream(chunks, desc))
        kind = None if desc.media_type in _CONFIG_TYPES else detect_compression(head)
        plain = stream if kind is None else decompress(stream, kind, what)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._staging)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for piece in plain:
                    h.update(piece)
                    size += len(piece)
                    f.write(piece)
            diff_id = Digest("sha256", h.hexdigest())
            os.replace(tmp, self._staged(diff_id))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._blobs[desc.digest] = (diff_id, size)
        self._blobs[diff_id] = (diff_id, size)

    @property
    def diff_ids(self) -> dict[Digest, tuple[Digest, int]]:
        """Blob digest as put -> (uncompressed digest, uncompressed size), for every blob put so far."""
        return dict(self._blobs)

    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        self._check_open()
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"{self.description}: parsing manifest: {exc}") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{self.description}: manifest is not a JSON object")
        mt = media_type or str(obj.get("mediaType", ""))
        if mt in (MediaType.OCI_INDEX, MediaType.DOCKER_MANIFEST_LIST) or "manifests" in obj:
            raise ManifestError(f"{self.description}: manifest lists are not supported for docker tar files")
        if obj.get("schemaVersion") != 2 or not isinstance(obj.get("config"), dict):
            raise ManifestError(
                f"{self.description}: unsupported manifest type {mt or '?'}, need Docker schema 2 or OCI"
            )
        try:
            config_desc = Descriptor.from_json(obj["config"])
            layer_descs = [Descriptor.from_json(x) for x in obj.get("layers") or []]
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise ManifestError(f"{self.description}: malformed manifest: {exc}") from None
        config = self._blobs.get(config_desc.digest)
        if config is None:
            raise ManifestError(f"{self.description}: config {config_desc.digest} was not put before the manifest")
        diffs: list[Digest] = []
        for d in layer_descs:
            known = self._blobs.get(d.digest)
            if known is None:
                raise ManifestError(f"{self.description}: layer {d.digest} was not put before the manifest")
            diffs.append(known[0])
        with open(self._staged(config[0]), "rb") as f:
            config_bytes = f.read()
        try:
            cfg = load_json(config_bytes, "image config")
        except MalformedDocument as exc:
            raise ManifestError(f"{self.description}: {exc}") from None
        want = (cfg.get("rootfs") or {}).get("diff_ids") if isinstance(cfg, dict) else None
        if isinstance(want, list) and [str(x) for x in want] != [str(x) for x in diffs]:
            raise ManifestError(
                f"{self.description}: the layers' uncompressed digests {[str(x) for x in diffs]} "
                f"do not match the config's rootfs.diff_ids {want}"
            )
        image = (config[0], tuple(diffs))
        if self._image is not None and self._image != image:
            raise ManifestError(f"{self.description}: a docker-archive destination holds one image")
        self._image = image
        if isinstance(ref, str) and ref:
            # an additional NAME:TAG (skopeo's --additional-tag): another RepoTags entry for the same image
            extra = _parse_ref(ref).reference
            if extra is None or extra.tag is None:
                raise InvalidReference(f"{self.description}: additional tag {ref!r} must be NAME:TAG")
            if extra not in self._extra_tags and extra != self._reference:
                self._extra_tags.append(extra)

    def commit(self) -> None:
        self._check_open()
        if self._image is None:
            raise ManifestError(f"{self.description}: nothing to commit, no manifest was written")
        special = self._check_target()
        if special:
            with open(self.path, "wb") as f:
                self._write_archive(f)
        else:
            with atomic_file(self.path) as f:
                self._write_archive(f)
        self._committed = True
        shutil.rmtree(self._staging, ignore_errors=True)

    def _write_archive(self, f: BinaryIO) -> None:
        assert self._image is not None
        config_digest, diffs = self._image
        w = TarWriter(f)
        sent: set[Digest] = set()
        for d in diffs:
            if d in sent:
                continue
            sent.add(d)
            path = self._staged(d)
            size = os.path.getsize(path)
            with open(path, "rb") as lf:
                w.add_file(f"{d.hex}.tar", size, file_chunks(lf))
        with open(self._staged(config_digest), "rb") as cf:
            config = cf.read()
        w.add_bytes(f"{config_digest.hex}.json", config)
        legacy = _legacy_layers(list(diffs), config)
        done: set[str] = set()
        for (layer_id, layer_json), d in zip(legacy, diffs, strict=True):
            if layer_id in done:
                continue
            done.add(layer_id)
            w.add_symlink(f"{layer_id}/{_LEGACY_LAYER}", f"../{d.hex}.tar")
            w.add_bytes(f"{layer_id}/{_LEGACY_VERSION}", b"1.0")
            w.add_bytes(f"{layer_id}/{_LEGACY_CONFIG}", layer_json)
        refs = ([] if self._reference is None else [self._reference]) + self._extra_tags
        tags = [f"{r.name}:{r.tag}" for r in refs]
        item = {"Config": f"{config_digest.hex}.json", "RepoTags": tags, "Layers": [f"{d.hex}.tar" for d in diffs]}
        w.add_bytes(_MANIFEST, _go_json([item]))
        repositories: dict[str, dict[str, str]] = {}
        for r in refs if legacy else []:
            repositories.setdefault(r.name, {})[str(r.tag)] = legacy[-1][0]
        # Go marshals a map with its keys sorted
        repositories = {k: dict(sorted(v.items())) for k, v in sorted(repositories.items())}
        w.add_bytes(_REPOSITORIES, _go_json(repositories))
        w.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shutil.rmtree(self._staging, ignore_errors=True)
