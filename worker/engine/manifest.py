"""Reading manifests and indexes, choosing platforms, and converting Docker v2s2 <-> OCI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from worker.registry import Descriptor, Digest, InvalidInput, ManifestError, MediaType, Platform, load_object

_DOCKER_TO_OCI = {
    MediaType.DOCKER_MANIFEST: MediaType.OCI_MANIFEST,
    MediaType.DOCKER_MANIFEST_LIST: MediaType.OCI_INDEX,
    MediaType.DOCKER_CONFIG: MediaType.OCI_CONFIG,
    MediaType.DOCKER_LAYER: MediaType.OCI_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": MediaType.OCI_LAYER,
    MediaType.DOCKER_FOREIGN_LAYER: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
_OCI_TO_DOCKER = {
    MediaType.OCI_MANIFEST: MediaType.DOCKER_MANIFEST,
    MediaType.OCI_INDEX: MediaType.DOCKER_MANIFEST_LIST,
    MediaType.OCI_CONFIG: MediaType.DOCKER_CONFIG,
    MediaType.OCI_LAYER_GZIP: MediaType.DOCKER_LAYER,
    MediaType.OCI_LAYER: "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": MediaType.DOCKER_FOREIGN_LAYER,
}

INDEX_TYPES = frozenset({MediaType.OCI_INDEX.value, MediaType.DOCKER_MANIFEST_LIST.value})
IMAGE_TYPES = frozenset({MediaType.OCI_MANIFEST.value, MediaType.DOCKER_MANIFEST.value})
SCHEMA1_TYPES = frozenset({MediaType.DOCKER_MANIFEST_V1.value, MediaType.DOCKER_MANIFEST_V1_SIGNED.value})


@dataclass
class ParsedManifest:
    media_type: str
    obj: dict[str, Any]
    manifests: list[Descriptor] = field(default_factory=list)
    config: Descriptor | None = None
    layers: list[Descriptor] = field(default_factory=list)
    subject: Descriptor | None = None
    schema1: dict[str, Any] | None = None

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def blobs(self) -> list[Descriptor]:
        """Config and layers: what must exist before this manifest is pushed."""
        out = [self.config] if self.config is not None else []
        out.extend(self.layers)
        return out


def parse_manifest(raw: bytes, media_type: str) -> ParsedManifest:
    """Parse and check a manifest or index: every field Ferry reads has its type, or ``MalformedDocument``."""
    f = load_object(raw, "manifest")
    f.whole("schemaVersion")
    declared = f.text("mediaType")
    media_type = media_type or declared
    f.text_map("annotations")
    f.text("artifactType")
    subject_f = f.child("subject")
    subject = Descriptor.from_json(subject_f) if subject_f is not None else None
    if media_type in SCHEMA1_TYPES or f.obj.get("schemaVersion") == 1:
        for layer in f.objects("fsLayers"):
            layer.parse("blobSum", Digest.parse, required=True)
        for entry in f.objects("history"):
            entry.text("v1Compatibility")
        f.text("architecture")
        return ParsedManifest(media_type or MediaType.DOCKER_MANIFEST_V1_SIGNED.value, f.obj, schema1=f.obj)
    if media_type in INDEX_TYPES or (f.has("manifests") and not f.has("layers")):
        return ParsedManifest(
            media_type or MediaType.OCI_INDEX.value,
            f.obj,
            manifests=[Descriptor.from_json(d) for d in f.objects("manifests")],
            subject=subject,
        )
    media_type = media_type or MediaType.OCI_MANIFEST.value
    # an image manifest must name its config; other (artifact) types may not have one
    config = f.child("config", required=media_type in IMAGE_TYPES)
    return ParsedManifest(
        media_type,
        f.obj,
        config=Descriptor.from_json(config) if config is not None else None,
        layers=[Descriptor.from_json(d) for d in f.objects("layers")],
        subject=subject,
    )


def _variant_rank(arch: str, variant: str) -> str:
    if arch == "arm64" and variant in ("", "v8"):
        return "v8"
    return variant


def pick_platform(manifests: list[Descriptor], wanted: Platform) -> Descriptor:
    """Choose the index entry for ``wanted`` the way containers/image does; error when none fits."""
    candidates = [d for d in manifests if d.platform is not None]
    for d in candidates:
        p = d.platform
        assert p is not None
        if (
            p.os == wanted.os
            and p.architecture == wanted.architecture
            and _variant_rank(p.architecture, p.variant) == _variant_rank(wanted.architecture, wanted.variant)
        ):
            return d
    if not wanted.variant:
        for d in candidates:
            p = d.platform
            assert p is not None
            if p.os == wanted.os and p.architecture == wanted.architecture:
                return d
    available = ", ".join(str(d.platform) for d in candidates) or "none"
    raise InvalidInput(f"no image found in manifest list for architecture {wanted} (available: {available})")


def platform_of(d: Descriptor) -> Platform | None:
    return d.platform


def _json(obj: dict[str, Any]) -> bytes:
    """Go's ``json.Marshal``: compact, UTF-8 kept, ``<``, ``>``, ``&``, U+2028/2029 escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for raw, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, esc)
    return text.encode()


#: field order of containers/image's structs, so a conversion serialises as skopeo's does (same digest)
_DESCRIPTOR_ORDER = {
    "v2s2": ["mediaType", "size", "digest", "urls", "annotations", "platform"],
    "oci": ["mediaType", "digest", "size", "urls", "annotations", "data", "platform", "artifactType"],
}
_PLATFORM_ORDER = ["architecture", "os", "os.version", "os.features", "variant", "features"]


def _ordered(obj: dict[str, Any], order: list[str]) -> dict[str, Any]:
    out = {k: obj[k] for k in order if k in obj}
    out.update({k: v for k, v in obj.items() if k not in out})
    return out


def _descriptor(d: dict[str, Any], target: str) -> dict[str, Any]:
    out = _ordered(d, _DESCRIPTOR_ORDER[target])
    if isinstance(out.get("platform"), dict):
        out["platform"] = _ordered(out["platform"], _PLATFORM_ORDER)
    return out


def convert_manifest(raw: bytes, media_type: str, target: str, child_map: dict[str, Descriptor] | None = None) -> bytes:
    """Convert an image manifest or an index between Docker v2s2 and OCI.

    ``target`` is ``"oci"`` or ``"v2s2"``. For an index, ``child_map`` maps each
    old child digest to its converted descriptor. Layers keep their bytes
    (gzip tar is gzip tar in both formats), so only the JSON changes.
    """
    m = parse_manifest(raw, media_type)
    table: dict[Any, Any] = _DOCKER_TO_OCI if target == "oci" else _OCI_TO_DOCKER
    obj = dict(m.obj)
    if m.schema1 is not None:
        raise ManifestError("cannot convert a Docker schema 1 manifest")
    if not m.is_index and m.config is None:
        raise ManifestError(f"cannot convert a manifest of type {media_type} without a config")
    new_type = table.get(media_type, media_type)
    if target == "v2s2":
        for d in m.layers:
            if d.media_type not in table and d.media_type not in _DOCKER_TO_OCI:
                raise InvalidInput(f"cannot convert layer of type {d.media_type} to Docker v2s2")
        if obj.get("annotations") or obj.get("subject") or obj.get("artifactType"):
            raise InvalidInput(
                "cannot convert to Docker v2s2: the manifest has annotations, a subject or an artifactType"
            )
    obj["mediaType"] = str(new_type)
    if m.is_index:
        entries = []
        for e in obj.get("manifests") or []:
            e = dict(e)
            if child_map and e["digest"] in child_map:
                nd = child_map[e["digest"]]
                e["digest"], e["size"], e["mediaType"] = str(nd.digest), nd.size, nd.media_type
            else:
                e["mediaType"] = str(table.get(e.get("mediaType") or "", e.get("mediaType") or ""))
            entries.append(_descriptor(e, target))
        obj["manifests"] = entries
    else:
        cfg = dict(obj["config"])
        cfg["mediaType"] = str(table.get(cfg.get("mediaType") or "", cfg.get("mediaType") or ""))
        obj["config"] = _descriptor(cfg, target)
        obj["layers"] = [
            _descriptor(
                {**layer, "mediaType": str(table.get(layer.get("mediaType") or "", layer.get("mediaType") or ""))},
                target,
            )
            for layer in obj.get("layers") or []
        ]
    order = ["schemaVersion", "mediaType", "artifactType", "config", "layers", "manifests", "subject", "annotations"]
    ordered = {k: obj[k] for k in order if k in obj}
    ordered.update({k: v for k, v in obj.items() if k not in ordered})
    return _json(ordered)
