"""Layer (re)compression on the way, as containers/image's copy pipeline does (copy/compression.go).

What a destination wants (:func:`desired`): a registry wants compressed layers; ``dir:`` keeps layers as they
are unless ``--dest-compress``/``--dest-decompress``; ``oci:``/``oci-archive:`` keep them unless a format is
asked for (``--dest-compress-format``); ``docker-archive:`` decompresses by itself. Then per layer
(:func:`plan_layer`), in containers/image's order:

* encrypted, foreign or unknown layer types: kept as they are;
* "compress" and a plain tar: compressed with the asked format (gzip when none is asked);
* "compress", a compressed layer and an explicitly asked other format: decompressed and compressed again
  (without ``--dest-force-compress-format`` a layer the destination already holds is reused as it is);
* "decompress" and a compressed layer: decompressed.

A changed layer's descriptor is ``{mediaType, digest, size}`` (containers/image drops its annotations and
URLs too). The compressors are deterministic (zlib with no name and mtime 0; zstd single-threaded, no
content size, no checksum), so the planner learns a changed layer's digest with one streamed pass that
keeps nothing (:func:`measure`), and the copy runs the same transform again on the fly (:func:`transform`)
while the destination verifies the digest. Never a whole layer in memory. From a local source (``dir:``,
``oci:``, archives) the planning pass keeps what it made in a staging file instead (:func:`stage`), and the
copy sends that file: one compression, not two. From a registry nothing is staged on disk.

gzip is zlib-ng (the ``zlib-ng`` package bundles it: 2.5x less CPU than the system zlib at level 6, the same
0-9 levels), or the standard library's zlib where that package is missing. The two make different bytes, and
so does another library version: a step names the engine that measured it (``gzip:6@zlib-ng 2.3.3``), and a
process with another engine refuses the step with one line rather than push bytes the digest does not match.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from worker.registry import Descriptor, Digest, InvalidInput, MediaType

Kind = Literal["plain", "gzip", "zstd"]
Desired = Literal["compress", "decompress", "preserve"]

DOCKER_PLAIN = "application/vnd.docker.image.rootfs.diff.tar"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

#: layer media type -> (family, compression)
_KINDS: dict[str, tuple[str, Kind]] = {
    DOCKER_PLAIN: ("docker", "plain"),
    MediaType.DOCKER_LAYER.value: ("docker", "gzip"),
    MediaType.OCI_LAYER.value: ("oci", "plain"),
    MediaType.OCI_LAYER_GZIP.value: ("oci", "gzip"),
    OCI_ZSTD: ("oci", "zstd"),
}
#: (family, compression) -> media type; Docker v2s2 has no zstd layer type
_TYPES: dict[tuple[str, Kind], str] = {v: k for k, v in _KINDS.items()}

#: plain-tar layer media type -> its gzip counterpart
GZIP_OF = {
    DOCKER_PLAIN: MediaType.DOCKER_LAYER.value,
    MediaType.OCI_LAYER.value: MediaType.OCI_LAYER_GZIP.value,
}

FORMATS = ("gzip", "zstd", "zstd:chunked")
#: the levels accepted: zlib's 0-9; libzstd's 1-19 (its "ultra" levels 20-22 take 200-750 MiB per layer in
#: flight, where level 19 takes about 90 MiB and level 3 a few)
LEVELS: dict[str, tuple[int, int]] = {"gzip": (0, 9), "zstd": (1, 19)}
#: containers/image's defaults: pgzip's default (6), klauspost zstd's SpeedDefault (about level 3)
DEFAULT_LEVEL = {"gzip": 6, "zstd": 3}

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CompressionOptions:
    """The skopeo flags: ``--dest-compress-format``/``-level``, ``--dest-force-compress-format``, the dir ones."""

    #: ``--dest-compress-format`` (``None``: not asked; a destination that compresses uses gzip)
    format: Kind | None = None
    level: int | None = None
    force: bool = False
    #: ``--dest-compress`` / ``--dest-decompress`` (``dir:`` destinations only, as in skopeo)
    dir_compress: bool = False
    dir_decompress: bool = False
    #: ``--dest-oci-accept-uncompressed-layers``: an ``oci:`` destination keeps every layer as it is
    oci_accept_uncompressed: bool = False

    @classmethod
    def parse(
        cls,
        fmt: str | None,
        level: str | None,
        *,
        force: bool = False,
        dir_compress: bool = False,
        dir_decompress: bool = False,
        oci_accept_uncompressed: bool = False,
    ) -> CompressionOptions:
        """Check the flag values (one-line errors naming the flag and the value)."""
        if fmt is not None and fmt not in FORMATS:
            raise InvalidInput(f"--dest-compress-format {fmt!r}: unknown compression format (gzip, zstd)")
        if fmt == "zstd:chunked":
            raise InvalidInput(
                "--dest-compress-format 'zstd:chunked': not supported (Ferry does not build the zstd:chunked"
                " table of contents); use zstd"
            )
        if force and fmt is None:
            raise InvalidInput("--dest-force-compress-format needs --dest-compress-format")
        if dir_compress and dir_decompress:
            raise InvalidInput("--dest-compress and --dest-decompress cannot be used together")
        lvl: int | None = None
        if level is not None:
            low, high = LEVELS[fmt or "gzip"]
            try:
                lvl = int(level)
            except ValueError:
                lvl = None
            if lvl is None or not low <= lvl <= high:
                raise InvalidInput(
                    f"--dest-compress-level {level!r}: {fmt or 'gzip'} takes a level from {low} to {high}"
                )
        kind: Kind | None = "gzip" if fmt == "gzip" else "zstd" if fmt == "zstd" else None
        return cls(kind, lvl, force, dir_compress, dir_decompress, oci_accept_uncompressed)

    @property
    def explicit(self) -> bool:
        """A flag that asks for a change was given (the default gzip for a registry is not one)."""
        return self.format is not None or self.level is not None or self.dir_compress or self.dir_decompress

    def desired(self, transport: str) -> Desired:
        """containers/image's ``DesiredLayerCompression`` of a destination transport."""
        if transport == "docker":
            return "compress"
        if transport == "dir":
            return "compress" if self.dir_compress else "decompress" if self.dir_decompress else "preserve"
        if transport in ("oci", "oci-archive") and self.format is not None and not self.oci_accept_uncompressed:
            return "compress"
        return "preserve"  # docker-archive stores plain tars by itself


def kind_of(media_type: str) -> tuple[str, Kind] | None:
    """(family, compression) of a layer type Ferry may recompress; ``None`` for any other type."""
    return _KINDS.get(media_type)


@dataclass(frozen=True)
class LayerChange:
    """What happens to one layer: read ``source`` (of kind ``src``), write ``target`` (an ``op``)."""

    source: Descriptor
    #: ``gzip:LEVEL@ENGINE``, ``zstd:LEVEL@ENGINE`` or ``plain`` (decompress only)
    op: str
    #: the destination media type before any manifest conversion (OCI zstd in a v2s2 manifest: needs OCI)
    media_type: str


def plan_layer(layer: Descriptor, desired: Desired, opts: CompressionOptions) -> LayerChange | None:
    """containers/image's choice for one layer, or ``None`` to keep it as it is."""
    known = kind_of(layer.media_type)
    if known is None or desired == "preserve":
        return None
    family, kind = known
    target: Kind | None = None
    if desired == "compress":
        if kind == "plain":
            target = opts.format or "gzip"
        elif opts.format is not None and opts.format != kind:
            target = opts.format
    elif kind != "plain":
        target = "plain"
    if target is None:
        return None
    if target == "plain":
        op = "plain"
    else:
        op = f"{target}:{opts.level if opts.level is not None else DEFAULT_LEVEL[target]}@{engine(target)}"
    media_type = _TYPES.get((family, target)) or _TYPES[("oci", target)]
    return LayerChange(layer, op, media_type)


# -- streams -------------------------------------------------------------------------------------------------------


@functools.cache
def _gzip_module() -> tuple[Any, str]:
    """zlib-ng when installed, else the standard library's zlib; with its name and version."""
    try:
        mod: Any = importlib.import_module("zlib_ng.zlib_ng")
        return mod, f"zlib-ng {mod.ZLIBNG_VERSION}"
    except ImportError:
        return zlib, f"zlib {zlib.ZLIB_RUNTIME_VERSION}"


@functools.cache
def engine(fmt: str) -> str:
    """The library (and version) this process compresses ``fmt`` with: the same bytes wherever it is the same."""
    if fmt == "gzip":
        return _gzip_module()[1]
    if fmt == "zstd":
        import zstandard

        return "libzstd " + ".".join(str(n) for n in zstandard.ZSTD_VERSION)
    return ""


#: compressors are fed pieces of exactly this size (the last one shorter)
_FEED = 1 << 16


def _fixed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` cut into pieces of :data:`_FEED` bytes. zlib-ng's output depends on how its input is cut
    (the measuring pass and the copy read other chunk sizes), so a compressor always sees the same pieces."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) >= _FEED:
            view = memoryview(buf)
            n = len(buf) - len(buf) % _FEED
            for i in range(0, n, _FEED):
                yield bytes(view[i : i + _FEED])
            view.release()
            del buf[:n]
    if buf:
        yield bytes(buf)


def gzip_stream(chunks: Iterable[bytes], level: int = 6) -> Iterator[bytes]:
    """The gzip stream of ``chunks``, piece by piece (the same bytes every time for the same input)."""
    mod = _gzip_module()[0]
    z = mod.compressobj(level, mod.DEFLATED, 31)
    for chunk in _fixed(chunks):
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def zstd_stream(chunks: Iterable[bytes], level: int = 3) -> Iterator[bytes]:
    """One zstd frame of ``chunks`` (single-threaded, no content size, no checksum: deterministic)."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(level, threads=0, write_content_size=False)
    z = zstandard.ZstdCompressor(compression_params=params).compressobj(size=-1)
    for chunk in _fixed(chunks):
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def transform(chunks: Iterable[bytes], op: str, what: str) -> Iterator[bytes]:
    """Apply ``op`` to a layer stream: decompress whatever it is (by its magic bytes), then compress.

    The source's own reader still verifies the bytes read against the source digest: every chunk is read.
    """
    from .transports._archive import decompress, detect_compression, peek

    spec, _, made_by = op.partition("@")
    fmt, _, level = spec.partition(":")
    if made_by and made_by != engine(fmt):
        raise InvalidInput(
            f"{what}: planned with {fmt} from {made_by}, but this process has {engine(fmt)}, which makes other"
            " bytes (run the same Ferry build here)"
        )
    head, stream = peek(chunks)
    kind = detect_compression(head)
    plain: Iterator[bytes] = stream
    if kind in ("gzip", "zstd"):
        plain = decompress(stream, kind, what)
    elif kind is not None:
        raise InvalidInput(f"{what}: a {kind} layer cannot be recompressed (gzip and zstd only)")
    if fmt == "gzip":
        return gzip_stream(plain, int(level))
    if fmt == "zstd":
        return zstd_stream(plain, int(level))
    return plain


_staging_lock = threading.Lock()
_staging_dir: list[str] = []


def _staging() -> str:
    """This process's directory for layers compressed while planning (removed when the process exits)."""
    with _staging_lock:
        if not _staging_dir:
            path = tempfile.mkdtemp(prefix="ferry-layers-", dir=os.environ.get("FERRY_STAGING_DIR") or None)
            atexit.register(shutil.rmtree, path, True)
            _staging_dir.append(path)
        return _staging_dir[0]


def stage(chunks: Iterable[bytes]) -> tuple[Digest, int, str]:
    """Like :func:`measure`, and keep the bytes in a staging file for the copy to send (a local source only:
    the planning pass then does the only compression). Returns digest, size and the file's path."""
    h = hashlib.sha256()
    size = 0
    fd, path = tempfile.mkstemp(dir=_staging(), suffix=".layer")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in chunks:
                h.update(piece)
                size += len(piece)
                f.write(piece)
    except BaseException:
        os.unlink(path)
        raise
    return Digest("sha256", h.hexdigest()), size, path


def staged_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(_CHUNK):
            yield piece


def measure(chunks: Iterable[bytes]) -> tuple[Digest, int]:
    """Digest and size of ``chunks``, keeping none of them."""
    h = hashlib.sha256()
    size = 0
    for piece in chunks:
        h.update(piece)
        size += len(piece)
    return Digest("sha256", h.hexdigest()), size


def image_layers(raw: bytes) -> list[Descriptor]:
    """The layers of an image manifest (none for an index or a malformed manifest)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(obj, dict) or not isinstance(obj.get("layers"), list):
        return []
    return [Descriptor.from_json(layer) for layer in obj["layers"] if isinstance(layer, dict)]


def rewrite_layers(raw: bytes, replaced: dict[Digest, Descriptor]) -> bytes:
    """The manifest with each replaced layer's descriptor swapped for ``{mediaType, digest, size}``."""
    obj = json.loads(raw)
    layers = []
    for layer in obj.get("layers") or []:
        new = replaced.get(Digest.parse(layer["digest"]))
        if new is not None:
            # Go's field order: Docker's descriptor has size before digest, OCI's digest before size
            if new.media_type.startswith("application/vnd.docker."):
                layer = {"mediaType": new.media_type, "size": new.size, "digest": str(new.digest)}
            else:
                layer = {"mediaType": new.media_type, "digest": str(new.digest), "size": new.size}
        layers.append(layer)
    obj["layers"] = layers
    return json.dumps(obj, separators=(",", ":")).encode()
