"""``inspect``: the same JSON skopeo prints, from any transport."""

from __future__ import annotations

import json
import platform as _platform
from datetime import datetime
from typing import Any

from worker.registry import Descriptor, Digest, ManifestError, MediaType, Platform, check_config

from .manifest import parse_manifest, pick_platform
from .transports import ImageSource

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_platform(os_: str | None = None, arch: str | None = None, variant: str | None = None) -> Platform:
    """This machine's platform, or the ``--override-*`` values."""
    machine = _platform.machine().lower()
    default_arch = _ARCH.get(machine, machine)
    default_variant = "v7" if machine == "armv7l" else ""
    return Platform(os_ or "linux", arch or default_arch, variant if variant is not None else default_variant)


def go_time(text: str | None) -> str | None:
    """Format a timestamp like Go's ``time.Time`` JSON marshaller (RFC 3339, trailing zeros trimmed)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    out = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        out += ("." + f"{t.microsecond:06d}").rstrip("0")
    # keep sub-microsecond digits the source had
    if "." in text:
        frac = text.split(".", 1)[1]
        digits = "".join(ch for ch in frac if ch.isdigit())
        if len(digits) > 6 and digits.rstrip("0"):
            out = out.split(".")[0] + "." + digits.rstrip("0")
    offset = t.utcoffset()
    if offset is None or offset.total_seconds() == 0:
        out += "Z"
    else:
        out += t.strftime("%z")[:3] + ":" + t.strftime("%z")[3:]
    return out


def go_json(obj: Any) -> str:
    """``json.MarshalIndent(obj, "", "    ")`` as Go writes it (HTML characters escaped)."""
    text = json.dumps(obj, indent=4, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def resolve_image(src: ImageSource, wanted: Platform) -> tuple[bytes, str, bytes, str]:
    """Return (top raw, top media type, image raw, image media type), choosing a platform from an index."""
    raw, media_type = src.get_manifest(None)
    top_raw, top_type = raw, media_type
    if MediaType(media_type).is_index if media_type in MediaType._value2member_map_ else False:
        index = parse_manifest(raw, media_type)
        child = pick_platform(index.manifests, wanted)
        raw, media_type = src.get_manifest(child.digest)
    return top_raw, top_type, raw, media_type


def read_config(src: ImageSource, desc: Descriptor) -> bytes:
    buf = bytearray()
    with src.open_blob(desc) as chunks:
        for chunk in chunks:
            buf.extend(chunk)
            if len(buf) > 64 * 1024 * 1024:
                raise ManifestError(f"config blob {desc.digest} is too large")
    return bytes(buf)


def inspect_image(
    src: ImageSource,
    *,
    name: str | None,
    tags: list[str] | None,
    wanted: Platform,
) -> dict[str, Any]:
    """skopeo's ``inspect`` output for the image ``src`` points at."""
    top_raw, _top_type, raw, media_type = resolve_image(src, wanted)
    out: dict[str, Any] = {}
    if name:
        out["Name"] = name
    out["Digest"] = str(Digest.of(top_raw))
    out["RepoTags"] = tags if tags is not None else []
    m = parse_manifest(raw, media_type)
    if m.schema1 is not None:
        s1 = m.schema1
        history = s1.get("history") or []
        v1: dict[str, Any] = {}
        if history:
            v1 = check_config(str(history[0].get("v1Compatibility") or "{}").encode(), "schema 1 v1Compatibility")
        cfg = v1.get("config") or {}
        out["Created"] = go_time(v1.get("created"))
        out["DockerVersion"] = v1.get("docker_version", "")
        out["Labels"] = cfg.get("Labels")
        out["Architecture"] = s1.get("architecture") or v1.get("architecture", "")
        out["Os"] = v1.get("os", "")
        layers = [str(layer["blobSum"]) for layer in reversed(s1.get("fsLayers") or [])]
        out["Layers"] = layers
        out["LayersData"] = [
            {"MIMEType": MediaType.DOCKER_LAYER.value, "Digest": d, "Size": -1, "Annotations": None} for d in layers
        ]
        out["Env"] = cfg.get("Env")
        return out
    if m.config is None:
        raise ManifestError(f"{src.description}: manifest of type {media_type} has no config")
    config = check_config(read_config(src, m.config), f"image config {m.config.digest}")
    cfg = config.get("config") or {}
    out["Created"] = go_time(config.get("created"))
    out["DockerVersion"] = config.get("docker_version", "")
    labels = cfg.get("Labels")
    out["Labels"] = dict(sorted(labels.items())) if isinstance(labels, dict) else labels  # a Go map: sorted keys
    out["Architecture"] = config.get("architecture", "")
    if config.get("variant"):
        out["Variant"] = config["variant"]
    out["Os"] = config.get("os", "")
    out["Layers"] = [str(d.digest) for d in m.layers]
    out["LayersData"] = [
        {
            "MIMEType": d.media_type,
            "Digest": str(d.digest),
            "Size": d.size,
            "Annotations": dict(d.annotations) if d.annotations else None,
        }
        for d in m.layers
    ]
    out["Env"] = cfg.get("Env")
    return out


#: The OCI image-spec ``ImageConfig`` fields skopeo's ``inspect --config`` keeps, in Go struct order.
_OCI_IMAGE_CONFIG_FIELDS = (
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
    "ArgsEscaped",
)
_GO_SETS = ("ExposedPorts", "Volumes")  # map[string]struct{}
_OCI_HISTORY_FIELDS = ("created", "created_by", "author", "comment", "empty_layer")


def oci_config_view(config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``skopeo inspect --config`` prints it: decoded into the OCI ``Image`` struct and encoded
    again, so fields come in Go struct order, empty ``omitempty`` fields and Docker-only fields are dropped,
    and map keys are sorted."""
    out: dict[str, Any] = {}
    if config.get("created") is not None:
        out["created"] = go_time(config.get("created"))
    if config.get("author"):
        out["author"] = config["author"]
    out["architecture"] = config.get("architecture") or ""
    if config.get("variant"):
        out["variant"] = config["variant"]
    out["os"] = config.get("os") or ""
    if config.get("os.version"):
        out["os.version"] = config["os.version"]
    if config.get("os.features"):
        out["os.features"] = config["os.features"]
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    assert isinstance(inner, dict)
    view: dict[str, Any] = {}
    for key in _OCI_IMAGE_CONFIG_FIELDS:
        value = inner.get(key)
        if not value:
            continue
        if key in _GO_SETS and isinstance(value, dict):
            value = {k: {} for k in sorted(value)}
        elif isinstance(value, dict):
            value = dict(sorted(value.items()))
        view[key] = value
    out["config"] = view
    rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else {}
    assert isinstance(rootfs, dict)
    out["rootfs"] = {"type": rootfs.get("type") or "", "diff_ids": rootfs.get("diff_ids")}
    history = config.get("history")
    if history:
        entries = []
        for item in history:
            entry: dict[str, Any] = {}
            for key in _OCI_HISTORY_FIELDS:
                if isinstance(item, dict) and item.get(key):
                    entry[key] = go_time(item[key]) if key == "created" else item[key]
            entries.append(entry)
        out["history"] = entries
    return out


def image_config(src: ImageSource, wanted: Platform) -> bytes:
    """The raw config blob of the image (``inspect --config --raw``)."""
    _top, _tt, raw, media_type = resolve_image(src, wanted)
    m = parse_manifest(raw, media_type)
    if m.config is None:
        raise ManifestError(f"{src.description}: manifest of type {media_type} has no config")
    return read_config(src, m.config)
