"""Seeded, deterministic test images, and plain-httpx pushers to seed registries with them.

Everything here is a pure function of its seed: the same seed always gives the same layer,
config and manifest bytes (and so the same digests); a different seed gives different ones.
Seeds may be ints or strings; ``1`` and ``"1"`` are the same seed.

Pushing deliberately uses plain :mod:`httpx` and the distribution API directly, never
Ferry's own registry client, so that tests do not depend on the code under test to seed data.

Quick tour::

    img = build_image("base", layers=[4096, 1024], fmt="v2s2")
    push_image(registry.url, "library/base", "v1", img)

    idx = build_multiarch("multi", layers=[2048])           # OCI index of three platforms
    push_index(registry.url, "library/multi", "latest", idx)

    big = make_stream_layer("bench", 1 << 30)               # 1 GiB, never whole in memory
    img = build_image("bench", layers=[big])
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import re
import ssl
import tarfile
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from worker.registry import Descriptor, Digest, MediaType, Platform

Seed = int | str
Format = Literal["oci", "v2s2"]

MIB = 1 << 20
#: Inline :class:`Layer` objects are meant for small data; use :func:`make_stream_layer` above this.
SMALL_LAYER_LIMIT = 64 * MIB
#: Default chunk size for streamed (PATCH) blob uploads.
PUSH_CHUNK_SIZE = 8 * MIB

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
DEFAULT_CMD = ("/bin/sh",)
DEFAULT_CREATED = "2024-01-01T00:00:00Z"
DEFAULT_PLATFORM = Platform("linux", "amd64")
DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")

EMPTY_JSON = b"{}"
EMPTY_DESCRIPTOR = Descriptor(MediaType.OCI_EMPTY, Digest.of(EMPTY_JSON), len(EMPTY_JSON))

#: Docker's (rarely used) type for an uncompressed layer; v2s2 images use it for uncompressed layers.
DOCKER_LAYER_UNCOMPRESSED = "application/vnd.docker.image.rootfs.diff.tar"
COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"


def _seed(seed: Seed) -> str:
    return str(seed)


def _tag(seed: Seed) -> str:
    """A short, path-safe token identifying a seed (used for file names inside layers)."""
    return hashlib.sha256(_seed(seed).encode()).hexdigest()[:12]


def _json(obj: Any, *, pretty: bool) -> bytes:
    """Deterministic JSON: insertion-ordered keys; manifests pretty (indent 3, like docker), configs compact."""
    if pretty:
        return json.dumps(obj, indent=3).encode()
    return json.dumps(obj, separators=(",", ":")).encode()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _rechunk(pieces: Iterable[bytes], chunk_size: int) -> Iterator[bytes]:
    """Re-slice ``pieces`` into chunks of exactly ``chunk_size`` bytes (the last one may be shorter)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    buf = bytearray()
    for piece in pieces:
        if not buf and len(piece) == chunk_size:
            yield piece
            continue
        buf += piece
        while len(buf) >= chunk_size:
            yield bytes(buf[:chunk_size])
            del buf[:chunk_size]
    if buf:
        yield bytes(buf)


def descriptor_json(desc: Descriptor) -> dict[str, Any]:
    """The JSON form of a descriptor, keys in the conventional order."""
    out: dict[str, Any] = {"mediaType": desc.media_type, "digest": str(desc.digest), "size": desc.size}
    if desc.urls:
        out["urls"] = list(desc.urls)
    if desc.artifact_type:
        out["artifactType"] = desc.artifact_type
    if desc.annotations:
        out["annotations"] = dict(desc.annotations)
    if desc.platform is not None:
        out["platform"] = platform_json(desc.platform)
    return out


def platform_json(platform: Platform) -> dict[str, str]:
    out = {"architecture": platform.architecture, "os": platform.os}
    if platform.os_version:
        out["os.version"] = platform.os_version
    if platform.variant:
        out["variant"] = platform.variant
    return out


def _as_platform(p: Platform | str) -> Platform:
    return p if isinstance(p, Platform) else Platform.parse(p)


# --------------------------------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class Layer:
    """A small layer held in memory. ``digest``/``size`` describe ``data`` (the blob as pushed)."""

    data: bytes
    digest: Digest
    diff_id: Digest
    size: int
    media_type: str
    seed: str = ""
    compressed: bool = True

    def chunks(self, chunk_size: int = PUSH_CHUNK_SIZE) -> Iterator[bytes]:
        for i in range(0, len(self.data), chunk_size):
            yield self.data[i : i + chunk_size]

    def uncompressed(self) -> bytes:
        """The tar archive itself (decompressing if needed)."""
        return gzip.decompress(self.data) if self.compressed else self.data

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


def make_layer(seed: Seed, size: int, *, compressed: bool = True, files: int = 1) -> Layer:
    """A real tar archive of ``files`` regular files holding ``size`` pseudo-random bytes in total.

    Content comes from ``random.Random(str(seed))``. The tar uses fixed metadata (mtime 0, uid/gid 0,
    mode 0644) and, when ``compressed``, is gzipped with mtime 0 and no file name, so the result is
    byte-for-byte reproducible. ``media_type`` is the OCI type (``tar+gzip`` or ``tar``); images in
    v2s2 format describe it with the Docker type instead.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if size > SMALL_LAYER_LIMIT:
        raise ValueError(f"make_layer is for small layers (<= {SMALL_LAYER_LIMIT} bytes); use make_stream_layer")
    if files < 1:
        raise ValueError("files must be >= 1")
    rng = random.Random(_seed(seed))
    content = rng.randbytes(size)
    top = f"ferry-{_tag(seed)}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_tarinfo(f"{top}/", 0, directory=True))
        per = -(-size // files) if size else 0
        for n in range(files):
            part = content[n * per : (n + 1) * per]
            tar.addfile(_tarinfo(f"{top}/file-{n}.bin", len(part)), io.BytesIO(part))
    tar_bytes = buf.getvalue()
    data = _gzip(tar_bytes) if compressed else tar_bytes
    return Layer(
        data=data,
        digest=Digest.of(data),
        diff_id=Digest.of(tar_bytes),
        size=len(data),
        media_type=MediaType.OCI_LAYER_GZIP if compressed else MediaType.OCI_LAYER,
        seed=_seed(seed),
        compressed=compressed,
    )


def _tarinfo(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.rstrip("/"))
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = 0 if directory else size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _keystream_block(key: bytes, index: int, block_size: int) -> bytes:
    """Block ``index`` of a seeded pseudo-random stream: AES-256-CTR keystream, ~3 GB/s."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    counter = (index * (block_size // 16)).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return enc.update(bytes(block_size)) + enc.finalize()


@dataclass(frozen=True)
class StreamLayer:
    """A large uncompressed tar layer whose bytes are regenerated on demand by :meth:`chunks`.

    It never sits whole in memory. ``digest`` (== ``diff_id``, since it is uncompressed) and ``size``
    were computed by a first pass over the generator in :func:`make_stream_layer`.
    """

    seed: str
    content_size: int
    digest: Digest
    diff_id: Digest
    size: int
    media_type: str = MediaType.OCI_LAYER
    block_size: int = MIB
    compressed: bool = field(default=False, init=False)

    def _pieces(self) -> Iterator[bytes]:
        yield from _stream_pieces(self.seed, self.content_size, self.block_size)

    def chunks(self, chunk_size: int = PUSH_CHUNK_SIZE) -> Iterator[bytes]:
        """The layer's bytes, freshly generated, in chunks of exactly ``chunk_size`` (last may be short)."""
        return _rechunk(self._pieces(), chunk_size)

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


def _stream_pieces(seed: str, content_size: int, block_size: int) -> Iterator[bytes]:
    header = _tarinfo(f"ferry-{_tag(seed)}/data.bin", content_size).tobuf(format=tarfile.GNU_FORMAT)
    yield header
    key = hashlib.sha256(f"ferry-stream-layer:{seed}".encode()).digest()
    full, rest = divmod(content_size, block_size)
    for i in range(full):
        yield _keystream_block(key, i, block_size)
    if rest:
        yield _keystream_block(key, full, block_size)[:rest]
    pad = -content_size % _TAR_BLOCK
    total = len(header) + content_size + pad + 2 * _TAR_BLOCK
    yield bytes(pad + 2 * _TAR_BLOCK + (-total % _TAR_RECORD))


def make_stream_layer(
    seed: Seed, size: int, *, media_type: str = MediaType.OCI_LAYER, block_size: int = MIB
) -> StreamLayer:
    """A tar layer with one file of ``size`` pseudo-random bytes, produced in ``block_size`` blocks.

    Content is an AES-CTR keystream keyed by the seed (needs ``cryptography``; 1 GiB takes ~1 s to
    digest). The blob is uncompressed; in v2s2 images it is described as
    ``application/vnd.docker.image.rootfs.diff.tar`` unless ``media_type`` says otherwise (registries
    do not check, but skopeo re-compresses a "gzip" layer that is not gzip when converting formats).
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if block_size <= 0 or block_size % 16:
        raise ValueError("block_size must be a positive multiple of 16")
    s = _seed(seed)
    h = hashlib.sha256()
    total = 0
    for piece in _stream_pieces(s, size, block_size):
        h.update(piece)
        total += len(piece)
    digest = Digest("sha256", h.hexdigest())
    return StreamLayer(
        seed=s,
        content_size=size,
        digest=digest,
        diff_id=digest,
        size=total,
        media_type=media_type,
        block_size=block_size,
    )


AnyLayer = Layer | StreamLayer


def _layer_media_type(layer: AnyLayer, fmt: Format) -> str:
    """The type a manifest of ``fmt`` uses for ``layer``: the OCI/Docker twin of its own type, truthful about gzip."""
    if fmt == "v2s2" and layer.media_type == MediaType.OCI_LAYER_GZIP:
        return MediaType.DOCKER_LAYER
    if fmt == "v2s2" and layer.media_type == MediaType.OCI_LAYER:
        return DOCKER_LAYER_UNCOMPRESSED
    if fmt == "oci" and layer.media_type == MediaType.DOCKER_LAYER:
        return MediaType.OCI_LAYER_GZIP
    if fmt == "oci" and layer.media_type == DOCKER_LAYER_UNCOMPRESSED:
        return MediaType.OCI_LAYER
    return layer.media_type


# --------------------------------------------------------------------------------------------------------------------
# Images and indexes


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest + config + layers, all bytes final."""

    manifest: bytes
    media_type: str
    digest: Digest
    config: bytes
    config_digest: Digest
    config_media_type: str
    layers: tuple[AnyLayer, ...]
    layer_descriptors: tuple[Descriptor, ...]
    platform: Platform
    fmt: Format
    seed: str

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def manifest_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.manifest)
        return result

    @property
    def config_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.config)
        return result

    def config_descriptor(self) -> Descriptor:
        return Descriptor(self.config_media_type, self.config_digest, len(self.config))

    def descriptor(self, platform: bool = True) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, platform=self.platform if platform else None)

    def blobs(self) -> list[tuple[Digest, int, AnyLayer | bytes]]:
        """Every blob the manifest references, as ``(digest, size, layer-or-bytes)``; layers first, config last."""
        out: list[tuple[Digest, int, AnyLayer | bytes]] = [(ly.digest, ly.size, ly) for ly in self.layers]
        out.append((self.config_digest, len(self.config), self.config))
        return out


def build_image(
    seed: Seed,
    *,
    layers: Sequence[int | AnyLayer] = (1024,),
    fmt: Format = "oci",
    platform: Platform | str = DEFAULT_PLATFORM,
    labels: Mapping[str, str] | None = None,
    env: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    created: str = DEFAULT_CREATED,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """Build an image. ``layers`` entries are sizes (a gzipped layer seeded ``"{seed}/layer{i}"`` is made)
    or ready-made layers (to share layers between images). ``annotations`` are manifest annotations
    (OCI only). The seed is also recorded in the config history, so two seeds never collide.
    """
    if fmt not in ("oci", "v2s2"):
        raise ValueError(f"unknown format {fmt!r}")
    if annotations and fmt != "oci":
        raise ValueError("manifest annotations need fmt='oci'")
    s = _seed(seed)
    plat = _as_platform(platform)
    built: list[AnyLayer] = [
        make_layer(f"{s}/layer{i}", ly) if isinstance(ly, int) else ly for i, ly in enumerate(layers)
    ]

    container_config: dict[str, Any] = {
        "Env": list(DEFAULT_ENV if env is None else env),
        "Cmd": list(DEFAULT_CMD if cmd is None else cmd),
        "Labels": dict(labels or {}),
    }
    history: list[dict[str, Any]] = [
        {"created": created, "created_by": f"ferry-test seed={s} layer={i} size={ly.size}"}
        for i, ly in enumerate(built)
    ]
    history.append(
        {
            "created": created,
            "created_by": f"/bin/sh -c #(nop) CMD {json.dumps(container_config['Cmd'])}",
            "empty_layer": True,
        }
    )
    cfg: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os}
    if plat.variant:
        cfg["variant"] = plat.variant
    if plat.os_version:
        cfg["os.version"] = plat.os_version
    cfg["created"] = created
    cfg["config"] = container_config
    cfg["rootfs"] = {"type": "layers", "diff_ids": [str(ly.diff_id) for ly in built]}
    cfg["history"] = history
    config = _json(cfg, pretty=False)

    if fmt == "oci":
        media_type, config_mt = MediaType.OCI_MANIFEST, MediaType.OCI_CONFIG
    else:
        media_type, config_mt = MediaType.DOCKER_MANIFEST, MediaType.DOCKER_CONFIG
    config_digest = Digest.of(config)
    layer_descs = tuple(Descriptor(_layer_media_type(ly, fmt), ly.digest, ly.size) for ly in built)
    man: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor_json(Descriptor(config_mt, config_digest, len(config))),
        "layers": [descriptor_json(d) for d in layer_descs],
    }
    if annotations:
        man["annotations"] = dict(annotations)
    manifest = _json(man, pretty=True)
    return Image(
        manifest=manifest,
        media_type=media_type,
        digest=Digest.of(manifest),
        config=config,
        config_digest=config_digest,
        config_media_type=config_mt,
        layers=tuple(built),
        layer_descriptors=layer_descs,
        platform=plat,
        fmt=fmt,
        seed=s,
    )


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list over :class:`Image` children."""

    manifest: bytes
    media_type: str
    digest: Digest
    children: tuple[Image, ...]
    fmt: Format

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def manifest_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.manifest)
        return result

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)

    def child(self, platform: Platform | str) -> Image:
        want = _as_platform(platform)
        for c in self.children:
            if c.platform == want:
                return c
        raise KeyError(str(want))


def build_index(
    children: Sequence[Image], fmt: Format = "oci", *, annotations: Mapping[str, str] | None = None
) -> Index:
    """An index listing ``children`` (with their platforms) in the given order."""
    if fmt not in ("oci", "v2s2"):
        raise ValueError(f"unknown format {fmt!r}")
    if annotations and fmt != "oci":
        raise ValueError("index annotations need fmt='oci'")
    media_type = MediaType.OCI_INDEX if fmt == "oci" else MediaType.DOCKER_MANIFEST_LIST
    idx: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [descriptor_json(c.descriptor(platform=True)) for c in children],
    }
    if annotations:
        idx["annotations"] = dict(annotations)
    manifest = _json(idx, pretty=True)
    return Index(
        manifest=manifest, media_type=media_type, digest=Digest.of(manifest), children=tuple(children), fmt=fmt
    )


def build_multiarch(
    seed: Seed,
    platforms: Sequence[Platform | str] = DEFAULT_PLATFORMS,
    layers: Sequence[int | AnyLayer] = (1024,),
    fmt: Format = "oci",
    **image_kwargs: Any,
) -> Index:
    """One image per platform (seeded ``"{seed}/{platform}"``, so layers differ per platform) in an index."""
    children = [
        build_image(f"{_seed(seed)}/{_as_platform(p)}", layers=layers, fmt=fmt, platform=p, **image_kwargs)
        for p in platforms
    ]
    return build_index(children, fmt)


# --------------------------------------------------------------------------------------------------------------------
# Artifacts (OCI 1.1 referrers) and cosign-style signatures


@dataclass(frozen=True)
class Artifact:
    """An OCI manifest that is not a runnable image: a referrer (``subject`` set) or a cosign signature."""

    manifest: bytes
    media_type: str
    digest: Digest
    artifact_type: str
    subject: Descriptor | None
    blobs: tuple[tuple[Digest, bytes], ...]
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def manifest_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.manifest)
        return result

    def descriptor(self) -> Descriptor:
        """The descriptor a referrers index lists for this artifact (with artifactType and annotations)."""
        return Descriptor(
            self.media_type, self.digest, self.size, annotations=self.annotations, artifact_type=self.artifact_type
        )


def _subject_descriptor(subject: Image | Index | Artifact | Descriptor) -> Descriptor:
    """Just mediaType, digest and size: what a ``subject`` field carries."""
    return Descriptor(subject.media_type, subject.digest, subject.size)


def build_artifact_referrer(
    subject: Image | Index | Artifact | Descriptor,
    *,
    artifact_type: str = "application/vnd.ferry.test.sbom",
    payload: bytes | None = None,
    payload_media_type: str = "application/vnd.ferry.test.sbom+json",
    annotations: Mapping[str, str] | None = None,
    created: str = DEFAULT_CREATED,
) -> Artifact:
    """An OCI image manifest with ``artifactType``, the empty config ``{}`` and a ``subject``.

    The default payload is a small JSON document naming the subject, so it is deterministic.
    """
    subj = _subject_descriptor(subject)
    if payload is None:
        payload = _json({"subject": str(subj.digest), "artifactType": artifact_type}, pretty=False)
    ann = {"org.opencontainers.image.created": created, **(annotations or {})}
    layer = Descriptor(payload_media_type, Digest.of(payload), len(payload))
    man: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MediaType.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor_json(EMPTY_DESCRIPTOR),
        "layers": [descriptor_json(layer)],
        "subject": descriptor_json(subj),
        "annotations": ann,
    }
    manifest = _json(man, pretty=True)
    return Artifact(
        manifest=manifest,
        media_type=MediaType.OCI_MANIFEST,
        digest=Digest.of(manifest),
        artifact_type=artifact_type,
        subject=subj,
        blobs=((layer.digest, payload), (EMPTY_DESCRIPTOR.digest, EMPTY_JSON)),
        annotations=tuple(sorted(ann.items())),
    )


def referrers_tag(digest: Digest | str) -> str:
    """The OCI referrers tag-schema fallback tag for a subject: ``sha256-<hex>``."""
    d = digest if isinstance(digest, Digest) else Digest.parse(digest)
    return f"{d.algorithm}-{d.hex}"


def cosign_signature_tag(digest: Digest | str) -> str:
    """The tag cosign stores an image's signature under: ``sha256-<hex>.sig``."""
    return referrers_tag(digest) + ".sig"


def build_cosign_signature(
    subject: Image | Index | Descriptor, *, docker_reference: str = "example.test/repo", seed: Seed = "sig"
) -> Artifact:
    """A cosign-shaped signature image (simple-signing payload layer + fake signature annotation).

    Not cryptographically valid; it has the shape sync/copy code must carry across unchanged.
    """
    subj = _subject_descriptor(subject)
    payload = _json(
        {
            "critical": {
                "identity": {"docker-reference": docker_reference},
                "image": {"docker-manifest-digest": str(subj.digest)},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        pretty=False,
    )
    fake_sig = base64.b64encode(hashlib.sha512(f"{_seed(seed)}:{subj.digest}".encode()).digest()).decode()
    config = _json(
        {
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(payload))]},
            "config": {},
        },
        pretty=False,
    )
    layer = Descriptor(
        COSIGN_SIMPLESIGNING, Digest.of(payload), len(payload), annotations=((COSIGN_SIGNATURE_ANNOTATION, fake_sig),)
    )
    man = {
        "schemaVersion": 2,
        "mediaType": MediaType.OCI_MANIFEST,
        "config": descriptor_json(Descriptor(MediaType.OCI_CONFIG, Digest.of(config), len(config))),
        "layers": [descriptor_json(layer)],
    }
    manifest = _json(man, pretty=True)
    return Artifact(
        manifest=manifest,
        media_type=MediaType.OCI_MANIFEST,
        digest=Digest.of(manifest),
        artifact_type="",
        subject=None,
        blobs=((layer.digest, payload), (Digest.of(config), config)),
    )


# --------------------------------------------------------------------------------------------------------------------
# Pushing with plain httpx


class PushError(RuntimeError):
    def __init__(self, what: str, response: httpx.Response) -> None:
        try:
            body = response.text[:500]
        except httpx.ResponseNotRead:
            body = ""
        super().__init__(f"{what}: HTTP {response.status_code} {body}".rstrip())
        self.status_code = response.status_code


Target = str | httpx.Client
AuthArg = httpx.Auth | tuple[str, str] | None
Verify = bool | str | ssl.SSLContext


class RegistryAuth(httpx.Auth):
    """Basic or Bearer-token auth driven by the registry's ``WWW-Authenticate`` challenge.

    Anonymous first; on 401 answers a Basic challenge directly or fetches a token from the Bearer
    realm (with Basic credentials if given), then reuses the last token until the next 401.
    """

    requires_response_body = True

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self._basic: str | None = None
        if username is not None:
            self._basic = "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        self._token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code != 401:
            return
        scheme, _, rest = response.headers.get("www-authenticate", "").partition(" ")
        params = dict(re.findall(r'([a-zA-Z]+)="([^"]*)"', rest))
        if scheme.lower() == "basic":
            if self._basic is None:
                return
            request.headers["Authorization"] = self._basic
        elif scheme.lower() == "bearer" and "realm" in params:
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            token_req = httpx.Request("GET", params["realm"], params=query)
            if self._basic is not None:
                token_req.headers["Authorization"] = self._basic
            token_resp = yield token_req
            if token_resp.status_code != 200:
                return
            body = token_resp.json()
            self._token = body.get("token") or body.get("access_token")
            request.headers["Authorization"] = f"Bearer {self._token}"
        else:
            return
        yield request


def normalize_url(url: str) -> str:
    """``127.0.0.1:5000`` -> ``http://127.0.0.1:5000``; trailing slashes dropped."""
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


@contextmanager
def registry_client(
    target: Target, *, auth: AuthArg = None, verify: Verify = True
) -> Iterator[tuple[httpx.Client, str]]:
    """Yield ``(client, base_url)``. A passed client must have ``base_url`` set and is not closed."""
    if isinstance(target, httpx.Client):
        base = str(target.base_url).rstrip("/")
        if not base:
            raise ValueError("an httpx.Client target needs base_url set to the registry URL")
        yield target, base
        return
    base = normalize_url(target)
    timeout = httpx.Timeout(120.0, connect=10.0)
    with httpx.Client(base_url=base, auth=auth, verify=verify, timeout=timeout) as client:
        yield client, base


def _expect(resp: httpx.Response, what: str, *codes: int) -> httpx.Response:
    if resp.status_code not in codes:
        resp.read()
        raise PushError(what, resp)
    return resp


def _location(resp: httpx.Response, what: str) -> httpx.URL:
    loc = resp.headers.get("location")
    if not loc:
        raise PushError(f"{what}: no Location header", resp)
    return resp.request.url.join(loc)


def blob_exists(target: Target, repo: str, digest: Digest, **kw: Any) -> bool:
    with registry_client(target, **kw) as (client, base):
        resp = client.head(f"{base}/v2/{repo}/blobs/{digest}")
        return resp.status_code == 200


def push_blob(
    target: Target,
    repo: str,
    digest: Digest,
    data: bytes | Iterable[bytes],
    size: int,
    *,
    skip_existing: bool = True,
    auth: AuthArg = None,
    verify: Verify = True,
) -> bool:
    """Upload one blob; returns False if it was already there (and ``skip_existing``).

    ``bytes`` go up monolithically (POST, then PUT ``?digest=`` with the body); an iterable of chunks
    goes up as a chunked upload (POST, one PATCH per chunk with ``Content-Range``, then PUT ``?digest=``).
    """
    with registry_client(target, auth=auth, verify=verify) as (client, base):
        if skip_existing and client.head(f"{base}/v2/{repo}/blobs/{digest}").status_code == 200:
            return False
        what = f"upload {digest} to {repo}"
        resp = _expect(client.post(f"{base}/v2/{repo}/blobs/uploads/"), f"{what} (POST)", 202)
        loc = _location(resp, what)
        octet = {"Content-Type": "application/octet-stream"}
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data)
            if len(body) != size:
                raise ValueError(f"{what}: {len(body)} bytes given, size says {size}")
            resp = client.put(loc.copy_merge_params({"digest": str(digest)}), content=body, headers=octet)
        else:
            offset = 0
            for chunk in data:
                if not chunk:
                    continue
                headers = {**octet, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
                resp = _expect(client.patch(loc, content=chunk, headers=headers), f"{what} (PATCH @{offset})", 202)
                loc = _location(resp, what)
                offset += len(chunk)
            if offset != size:
                raise ValueError(f"{what}: {offset} bytes streamed, size says {size}")
            resp = client.put(loc.copy_merge_params({"digest": str(digest)}), headers={**octet, "Content-Length": "0"})
        _expect(resp, f"{what} (PUT)", 201)
        got = resp.headers.get("docker-content-digest")
        if got and got != str(digest):
            raise PushError(f"{what}: registry computed {got}", resp)
        return True


def _push_layer_or_bytes(client: httpx.Client, repo: str, digest: Digest, size: int, blob: AnyLayer | bytes) -> None:
    if isinstance(blob, bytes):
        push_blob(client, repo, digest, blob, size)
    elif isinstance(blob, Layer):
        push_blob(client, repo, digest, blob.data, size)
    else:
        push_blob(client, repo, digest, blob.chunks(PUSH_CHUNK_SIZE), size)


def put_manifest(
    target: Target,
    repo: str,
    ref: str | Digest,
    manifest: bytes,
    media_type: str,
    *,
    auth: AuthArg = None,
    verify: Verify = True,
) -> Digest:
    """PUT manifest bytes as-is under ``ref`` (a tag or digest) with the given Content-Type."""
    digest = Digest.of(manifest)
    with registry_client(target, auth=auth, verify=verify) as (client, base):
        resp = client.put(f"{base}/v2/{repo}/manifests/{ref}", content=manifest, headers={"Content-Type": media_type})
        _expect(resp, f"put manifest {repo}:{ref}", 201)
        got = resp.headers.get("docker-content-digest")
        if got and got != str(digest):
            raise PushError(f"put manifest {repo}:{ref}: registry computed {got}, expected {digest}", resp)
    return digest


def push_image(
    target: Target,
    repo: str,
    ref: str | None,
    image: Image,
    *,
    auth: AuthArg = None,
    verify: Verify = True,
) -> Digest:
    """Push layers, config, then the manifest (by tag, or by digest when ``ref`` is None)."""
    with registry_client(target, auth=auth, verify=verify) as (client, _base):
        for digest, size, blob in image.blobs():
            _push_layer_or_bytes(client, repo, digest, size, blob)
        return put_manifest(client, repo, ref or image.digest, image.manifest, image.media_type)


def push_index(
    target: Target,
    repo: str,
    tag: str | None,
    index: Index,
    *,
    auth: AuthArg = None,
    verify: Verify = True,
) -> Digest:
    """Push every child by digest, then the index (by tag, or by digest when ``tag`` is None)."""
    with registry_client(target, auth=auth, verify=verify) as (client, _base):
        for child in index.children:
            push_image(client, repo, None, child)
        return put_manifest(client, repo, tag or index.digest, index.manifest, index.media_type)


def push_artifact(
    target: Target,
    repo: str,
    ref: str | None,
    artifact: Artifact,
    *,
    auth: AuthArg = None,
    verify: Verify = True,
) -> Digest:
    with registry_client(target, auth=auth, verify=verify) as (client, _base):
        for digest, data in artifact.blobs:
            push_blob(client, repo, digest, data, len(data))
        return put_manifest(client, repo, ref or artifact.digest, artifact.manifest, artifact.media_type)


def push_artifact_referrer(
    target: Target,
    repo: str,
    subject: Image | Index | Artifact | Descriptor,
    *,
    artifact_type: str = "application/vnd.ferry.test.sbom",
    payload: bytes | None = None,
    payload_media_type: str = "application/vnd.ferry.test.sbom+json",
    annotations: Mapping[str, str] | None = None,
    tag: str | None = None,
    fallback_tag: bool = True,
    auth: AuthArg = None,
    verify: Verify = True,
) -> Artifact:
    """Build and push an artifact referring to ``subject`` (which should already be in ``repo``).

    The manifest goes up by digest (or ``tag``). With ``fallback_tag`` (for registries without the
    referrers API, like distribution 2.8) the OCI tag-schema index ``sha256-<hex>`` is fetched,
    extended with this artifact's descriptor and pushed back.
    """
    art = build_artifact_referrer(
        subject,
        artifact_type=artifact_type,
        payload=payload,
        payload_media_type=payload_media_type,
        annotations=annotations,
    )
    with registry_client(target, auth=auth, verify=verify) as (client, base):
        push_artifact(client, repo, tag, art)
        if fallback_tag:
            assert art.subject is not None
            ftag = referrers_tag(art.subject.digest)
            resp = client.get(f"{base}/v2/{repo}/manifests/{ftag}", headers={"Accept": MediaType.OCI_INDEX})
            if resp.status_code == 200:
                idx = resp.json()
            else:
                _expect(resp, f"get referrers fallback {repo}:{ftag}", 404)
                idx = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": []}
            entry = descriptor_json(art.descriptor())
            if all(m.get("digest") != entry["digest"] for m in idx["manifests"]):
                idx["manifests"].append(entry)
            put_manifest(client, repo, ftag, _json(idx, pretty=True), MediaType.OCI_INDEX)
    return art


def push_cosign_signature(
    target: Target,
    repo: str,
    subject: Image | Index | Descriptor,
    *,
    auth: AuthArg = None,
    verify: Verify = True,
    **kwargs: Any,
) -> Artifact:
    """Push a cosign-shaped signature for ``subject`` under the ``sha256-<hex>.sig`` tag."""
    sig = build_cosign_signature(subject, **kwargs)
    subj = _subject_descriptor(subject)
    push_artifact(target, repo, cosign_signature_tag(subj.digest), sig, auth=auth, verify=verify)
    return sig


def fetch_manifest(
    target: Target,
    repo: str,
    ref: str | Digest,
    *,
    accept: Sequence[str] = (
        MediaType.OCI_INDEX,
        MediaType.OCI_MANIFEST,
        MediaType.DOCKER_MANIFEST_LIST,
        MediaType.DOCKER_MANIFEST,
    ),
    auth: AuthArg = None,
    verify: Verify = True,
) -> tuple[bytes, str]:
    """GET a manifest with plain httpx; returns ``(raw bytes, Content-Type)`` (for assertions in tests)."""
    with registry_client(target, auth=auth, verify=verify) as (client, base):
        resp = client.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": ", ".join(accept)})
        _expect(resp, f"get manifest {repo}:{ref}", 200)
        return resp.content, resp.headers.get("content-type", "")


def fetch_blob(
    target: Target,
    repo: str,
    digest: Digest,
    *,
    auth: AuthArg = None,
    verify: Verify = True,
) -> bytes:
    """GET a (small) blob with plain httpx, following redirects."""
    with registry_client(target, auth=auth, verify=verify) as (client, base):
        resp = client.get(f"{base}/v2/{repo}/blobs/{digest}", follow_redirects=True)
        _expect(resp, f"get blob {repo}@{digest}", 200)
        return resp.content
