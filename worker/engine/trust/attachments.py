"""Sigstore signatures stored as attachments in a registry, as cosign and skopeo store them.

The signatures of manifest ``sha256:HEX`` live in the same repository under the tag ``sha256-HEX.sig``: an
OCI image manifest whose layers are the signed payloads (media type
``application/vnd.dev.cosign.simplesigning.v1+json``), each with its signature in the annotation
``dev.cosignproject.cosign/signature``. The config lists the layers' digests as ``rootfs.diff_ids``.
Writing appends to that manifest (skopeo and cosign do the same), so earlier signatures stay.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from worker.registry import Descriptor, Digest, ManifestError, MediaType, NotFound, RegistryClient

SIGNATURE_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
#: containers/image's limit for one signature (iolimits.MaxSignatureBodySize)
MAX_PAYLOAD = 4 * 1024 * 1024


@dataclass(frozen=True)
class Attachment:
    """One stored signature: its payload, media type and annotations (all untrusted until verified)."""

    media_type: str
    payload: bytes
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def signature(self) -> bytes | None:
        text = self.annotations.get(SIGNATURE_ANNOTATION)
        if text is None:
            return None
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:
            return None


def attachment_tag(digest: Digest) -> str:
    return f"{digest.algorithm}-{digest.hex}.sig"


def _get(client: RegistryClient, repo: str, digest: Digest) -> dict[str, Any] | None:
    try:
        m = client.get_manifest(repo, attachment_tag(digest), accept=[MediaType.OCI_MANIFEST.value])
    except NotFound:
        return None
    if m.media_type != MediaType.OCI_MANIFEST.value:
        raise ManifestError(f"signature manifest {attachment_tag(digest)} in {repo} has media type {m.media_type!r}")
    obj = m.json()
    if not isinstance(obj.get("layers", []), list):
        raise ManifestError(f"signature manifest {attachment_tag(digest)} in {repo}: malformed layers")
    return obj


def read_signatures(client: RegistryClient, repo: str, digest: Digest) -> tuple[list[Attachment], int]:
    """The signatures stored for ``digest``, and how many other attachments the manifest holds."""
    manifest = _get(client, repo, digest)
    if manifest is None:
        return [], 0
    out: list[Attachment] = []
    others = 0
    for layer in manifest.get("layers") or []:
        desc = Descriptor.from_json(layer)
        if desc.media_type != SIGNATURE_MEDIA_TYPE:
            others += 1
            continue
        if desc.size > MAX_PAYLOAD:
            raise ManifestError(f"signature payload {desc.digest} in {repo} is over {MAX_PAYLOAD} bytes")
        payload = client.read_blob(repo, desc.digest, limit=MAX_PAYLOAD)
        annotations = layer.get("annotations") or {}
        if not isinstance(annotations, dict):
            annotations = {}
        out.append(Attachment(desc.media_type, payload, {str(k): str(v) for k, v in annotations.items()}))
    return out, others


def _put_bytes(client: RegistryClient, repo: str, media_type: str, data: bytes) -> dict[str, Any]:
    desc = Descriptor.of(media_type, data)
    if not client.blob_exists(repo, desc.digest):
        client.upload_blob(repo, desc, [data])
    return {"mediaType": media_type, "digest": str(desc.digest), "size": desc.size}


def append_signature(client: RegistryClient, repo: str, digest: Digest, attachment: Attachment) -> bool:
    """Add ``attachment`` to the signatures of ``digest``; False when an identical one is already there."""
    manifest = _get(client, repo, digest)
    config: dict[str, Any]
    if manifest is None:
        manifest = {"schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST.value, "config": {}, "layers": []}
        config = {"architecture": "", "os": "", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}
    else:
        cfg_desc = Descriptor.from_json(manifest["config"])
        try:
            config = json.loads(client.read_blob(repo, cfg_desc.digest))
        except ValueError:
            raise ManifestError(f"signature manifest {attachment_tag(digest)} in {repo}: malformed config") from None
        if not isinstance(config, dict):
            raise ManifestError(f"signature manifest {attachment_tag(digest)} in {repo}: malformed config")
    payload_digest = str(Digest.of(attachment.payload))
    for layer in manifest["layers"]:
        if (
            layer.get("mediaType") == attachment.media_type
            and layer.get("digest") == payload_digest
            and (layer.get("annotations") or {}) == attachment.annotations
        ):
            return False
    layer = _put_bytes(client, repo, attachment.media_type, attachment.payload)
    layer["annotations"] = dict(attachment.annotations)
    manifest["layers"] = [*manifest["layers"], layer]
    rootfs = config.setdefault("rootfs", {"type": "layers"})
    rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), layer["digest"]]
    config_raw = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"] = _put_bytes(client, repo, MediaType.OCI_CONFIG.value, config_raw)
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    client.put_manifest(repo, attachment_tag(digest), raw, MediaType.OCI_MANIFEST.value)
    return True
