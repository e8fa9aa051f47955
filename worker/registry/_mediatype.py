"""The one manifest media-type sniffer: what a manifest is, from its bytes (and a Content-Type, if any).

Every transport and the registry client ask here, so a ``dir:`` copy, an OCI layout and a registry agree on
what the same bytes are.
"""

from __future__ import annotations

from ._documents import load_json, load_object
from ._errors import MalformedDocument, ManifestError
from ._types import MediaType

#: Content-Types that say nothing about which manifest this is
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream"})


def guess_media_type(raw: bytes, header_type: str = "") -> str:
    """The manifest's media type, decided like containers/image ``manifest.GuessMIMEType``; ``""`` when unknown.

    Its own ``mediaType`` field wins (any value: artifact manifests carry their own); then schema 1 (signed or
    not); then a specific ``header_type`` (a registry's Content-Type); then the shape: a config of the OCI or
    Docker config type, a ``manifests`` list (an index), any other schema 2 document or one with ``config`` and
    ``layers`` (an OCI manifest).
    """
    try:
        obj = load_json(raw, "manifest")
    except MalformedDocument:
        return ""
    if not isinstance(obj, dict):
        return ""
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    version = obj.get("schemaVersion")
    if version == 1:
        return MediaType.DOCKER_MANIFEST_V1_SIGNED if "signatures" in obj else MediaType.DOCKER_MANIFEST_V1
    header_type = header_type.split(";")[0].strip()
    if header_type not in _GENERIC_TYPES:
        return header_type
    config = obj.get("config")
    config_type = config.get("mediaType", "") if isinstance(config, dict) else ""
    if config_type == MediaType.OCI_CONFIG:
        return MediaType.OCI_MANIFEST
    if config_type == MediaType.DOCKER_CONFIG:
        return MediaType.DOCKER_MANIFEST
    manifests = obj.get("manifests")
    if isinstance(manifests, list) and manifests:
        return MediaType.OCI_INDEX if not config_type else str(config_type)
    if "manifests" in obj:
        return MediaType.OCI_INDEX
    if version == 2 or ("config" in obj and "layers" in obj):
        return MediaType.OCI_MANIFEST
    return ""


def sniff_media_type(raw: bytes, what: str, header_type: str = "") -> str:
    """:func:`guess_media_type`, or a ``ManifestError`` naming ``what`` when the bytes do not say."""
    media_type = guess_media_type(raw, header_type)
    if media_type:
        return media_type
    load_object(raw, f"manifest ({what})")  # says why when the bytes are no JSON object
    raise ManifestError(f"{what}: cannot tell the manifest's media type")


__all__ = ["guess_media_type", "sniff_media_type"]
