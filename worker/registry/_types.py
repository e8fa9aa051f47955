"""Plain value types shared by the registry client and everything above it.

References are parsed once at the edge (``Reference.parse``) and travel as
frozen values from then on; digests are validated on construction so a
``Digest`` in hand is always well formed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._documents import Fields
from ._errors import InvalidDigest


class MediaType(StrEnum):
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
    DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_EMPTY = "application/vnd.oci.empty.v1+json"

    @property
    def is_index(self) -> bool:
        return self in (MediaType.OCI_INDEX, MediaType.DOCKER_MANIFEST_LIST)

    @property
    def is_manifest(self) -> bool:
        return self in MANIFEST_TYPES

    @property
    def is_schema1(self) -> bool:
        return self in (MediaType.DOCKER_MANIFEST_V1, MediaType.DOCKER_MANIFEST_V1_SIGNED)


MANIFEST_TYPES: frozenset[MediaType] = frozenset(
    {
        MediaType.DOCKER_MANIFEST,
        MediaType.DOCKER_MANIFEST_LIST,
        MediaType.DOCKER_MANIFEST_V1,
        MediaType.DOCKER_MANIFEST_V1_SIGNED,
        MediaType.OCI_MANIFEST,
        MediaType.OCI_INDEX,
    }
)

#: Accept header for manifest requests, in order of preference.
MANIFEST_ACCEPT: tuple[str, ...] = (
    MediaType.OCI_INDEX,
    MediaType.OCI_MANIFEST,
    MediaType.DOCKER_MANIFEST_LIST,
    MediaType.DOCKER_MANIFEST,
    MediaType.DOCKER_MANIFEST_V1_SIGNED,
    MediaType.DOCKER_MANIFEST_V1,
)

_ALGOS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_LOWER_HEX = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True, order=True)
class Digest:
    """A content digest such as ``sha256:e3b0...``; sha256 and sha512 only."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        want = _ALGOS.get(self.algorithm)
        if want is None:
            raise InvalidDigest(f"unsupported digest algorithm {self.algorithm!r} (sha256 and sha512 only)")
        if len(self.hex) != want or not _LOWER_HEX.fullmatch(self.hex):
            raise InvalidDigest(f"malformed {self.algorithm} digest {self.algorithm}:{self.hex}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _DIGEST_RE.fullmatch(text)
        if not m:
            raise InvalidDigest(f"malformed digest {text!r}")
        return cls(m.group(1), m.group(2))

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    @property
    def encoded(self) -> str:
        return self.hex

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            from ._errors import InvalidInput

            raise InvalidInput(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def from_json(cls, obj: object, what: str = "platform") -> Platform:
        f = obj if isinstance(obj, Fields) else Fields(obj, what)
        return cls(f.text("os"), f.text("architecture"), f.text("variant"), f.text("os.version"))

    def matches(self, other: Platform) -> bool:
        """True when ``other`` (a wanted platform) selects this one; an empty variant matches any."""
        if self.os != other.os or self.architecture != other.architecture:
            return False
        return not other.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()
    artifact_type: str = ""
    urls: tuple[str, ...] = field(default=())

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        """A descriptor from JSON, every field checked (``MalformedDocument`` names the one that is wrong)."""
        f = obj if isinstance(obj, Fields) else Fields(obj, what)
        plat = f.child("platform")
        digest = f.parse("digest", Digest.parse, required=True)
        assert digest is not None
        return cls(
            media_type=f.text("mediaType"),
            digest=digest,
            size=f.whole("size", required=True),
            platform=Platform.from_json(plat) if plat is not None else None,
            annotations=tuple(sorted(f.text_map("annotations").items())),
            artifact_type=f.text("artifactType"),
            urls=tuple(f.texts("urls")),
        )

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Descriptor:
        return cls(media_type, Digest.of(data), len(data))
