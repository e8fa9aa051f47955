"""Gzip for uncompressed layers pushed to a registry, as containers/image does for a registry destination.

A layer whose media type says "plain tar" (``…rootfs.diff.tar``, ``…layer.v1.tar``) is gzipped on its way
to a registry; the manifest names the gzip layer (digest, size, media type), the config's ``diff_ids``
stay as they are (they are the plain tar's digests). The compression is deterministic (zlib level 6, no
name, mtime 0), so the planner learns the digest with one streamed pass that keeps nothing, and the copy
compresses again on the fly; the destination verifies that the bytes match. Never a whole layer in memory.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Iterator

from worker.registry import Descriptor, Digest, MediaType

#: plain-tar layer media type -> its gzip counterpart
GZIP_OF = {
    "application/vnd.docker.image.rootfs.diff.tar": MediaType.DOCKER_LAYER.value,
    MediaType.OCI_LAYER.value: MediaType.OCI_LAYER_GZIP.value,
}
_LEVEL = 6


def gzip_stream(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The gzip stream of ``chunks``, piece by piece (the same bytes every time for the same input)."""
    z = zlib.compressobj(_LEVEL, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def measure(chunks: Iterable[bytes]) -> tuple[Digest, int]:
    """Digest and size of what :func:`gzip_stream` makes of ``chunks``, keeping none of it."""
    h = hashlib.sha256()
    size = 0
    for piece in gzip_stream(chunks):
        h.update(piece)
        size += len(piece)
    return Digest("sha256", h.hexdigest()), size


def compressible_layers(raw: bytes) -> list[Descriptor]:
    """The plain-tar layers of an image manifest (none for an index or a malformed manifest)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(obj, dict) or not isinstance(obj.get("layers"), list):
        return []
    out = []
    for layer in obj["layers"]:
        if isinstance(layer, dict) and layer.get("mediaType") in GZIP_OF:
            out.append(Descriptor.from_json(layer))
    return out


def rewrite_layers(raw: bytes, replaced: dict[Digest, Descriptor]) -> bytes:
    """The manifest with each replaced layer's digest, size and media type swapped (compact JSON)."""
    obj = json.loads(raw)
    for layer in obj.get("layers") or []:
        new = replaced.get(Digest.parse(layer["digest"]))
        if new is not None:
            layer.update(mediaType=new.media_type, digest=str(new.digest), size=new.size)
    return json.dumps(obj, separators=(",", ":")).encode()
