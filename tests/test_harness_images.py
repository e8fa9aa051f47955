"""The seeded test-image builders and plain-httpx pushers in tests/harness/images.py.

Structure and determinism are checked offline; real-registry checks push to distribution 2.8 and
read back with skopeo (which verifies every blob digest on copy).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.harness import images as im
from tests.harness.images import (
    build_artifact_referrer,
    build_cosign_signature,
    build_image,
    build_index,
    build_multiarch,
    cosign_signature_tag,
    make_layer,
    make_stream_layer,
    push_artifact_referrer,
    push_blob,
    push_cosign_signature,
    push_image,
    push_index,
    referrers_tag,
)
from tests.harness.servers import RegistryServer
from worker.registry import Descriptor, Digest, MediaType, Platform

SKOPEO = "/usr/bin/skopeo"


def sha(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def tar_members(tar_bytes: bytes) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            out[member.name] = f.read() if f else None
            assert member.mtime == 0 and member.uid == 0 and member.gid == 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Offline: layers


def test_layer_is_deterministic_per_seed() -> None:
    a, b = make_layer(7, 5000), make_layer("7", 5000)
    assert a.data == b.data and a.digest == b.digest and a.diff_id == b.diff_id
    c = make_layer(8, 5000)
    assert c.digest != a.digest and c.diff_id != a.diff_id
    assert make_layer(7, 5001).digest != a.digest


def test_gzip_layer_parts_are_consistent() -> None:
    layer = make_layer("parts", 10_000, files=3)
    assert layer.media_type == MediaType.OCI_LAYER_GZIP
    assert layer.size == len(layer.data)
    assert layer.digest == sha(layer.data)
    assert layer.data[:2] == b"\x1f\x8b" and layer.data[4:8] == b"\0\0\0\0"  # gzip magic, mtime 0
    tar_bytes = gzip.decompress(layer.data)
    assert layer.diff_id == sha(tar_bytes) == sha(layer.uncompressed())
    members = tar_members(tar_bytes)
    files = [v for v in members.values() if v is not None]
    assert len(files) == 3 and sum(len(f) for f in files) == 10_000
    assert layer.descriptor() == Descriptor(MediaType.OCI_LAYER_GZIP, layer.digest, layer.size)
    assert b"".join(layer.chunks(999)) == layer.data


def test_uncompressed_layer() -> None:
    layer = make_layer("plain", 3000, compressed=False)
    assert layer.media_type == MediaType.OCI_LAYER
    assert layer.digest == layer.diff_id == sha(layer.data)
    assert [len(v) for v in tar_members(layer.data).values() if v is not None] == [3000]
    assert make_layer("empty", 0).size > 0  # still a valid (gzipped) tar


def test_stream_layer_is_a_valid_reiterable_tar() -> None:
    size = 3 * im.MIB + 123
    layer = make_stream_layer("stream", size)
    whole = b"".join(layer.chunks())
    assert len(whole) == layer.size and sha(whole) == layer.digest == layer.diff_id
    assert layer.size % 512 == 0
    # Re-iterable, and any chunking gives the same bytes with exact chunk sizes.
    chunks = list(layer.chunks(1_000_000))
    assert all(len(c) == 1_000_000 for c in chunks[:-1]) and b"".join(chunks) == whole
    members = tar_members(whole)
    (content,) = [v for v in members.values() if v is not None]
    assert content is not None and len(content) == size
    assert len({content[i : i + 4096] for i in range(0, size, im.MIB)}) == 4  # blocks differ
    # Deterministic per seed; different seed differs.
    assert make_stream_layer("stream", size).digest == layer.digest
    assert make_stream_layer("stream2", size).digest != layer.digest


# ---------------------------------------------------------------------------------------------------------------------
# Offline: images and indexes


@pytest.mark.parametrize(
    ("fmt", "manifest_mt", "config_mt", "layer_mt"),
    [
        ("oci", MediaType.OCI_MANIFEST, MediaType.OCI_CONFIG, MediaType.OCI_LAYER_GZIP),
        ("v2s2", MediaType.DOCKER_MANIFEST, MediaType.DOCKER_CONFIG, MediaType.DOCKER_LAYER),
    ],
)
def test_image_structure(fmt: im.Format, manifest_mt: str, config_mt: str, layer_mt: str) -> None:
    img = build_image(
        "img",
        layers=[2000, 1000],
        fmt=fmt,
        platform="linux/arm/v7",
        labels={"org.example.name": "img"},
        env=["A=1"],
        created="2024-02-03T04:05:06Z",
    )
    assert img.media_type == manifest_mt and img.digest == sha(img.manifest) and img.size == len(img.manifest)
    assert img.config_digest == sha(img.config)
    man = img.manifest_json
    assert man["schemaVersion"] == 2 and man["mediaType"] == manifest_mt
    assert man["config"] == {"mediaType": config_mt, "digest": str(img.config_digest), "size": len(img.config)}
    assert man["layers"] == [{"mediaType": layer_mt, "digest": str(ly.digest), "size": ly.size} for ly in img.layers]
    assert [len(tar_members(ly.uncompressed())) for ly in img.layers if isinstance(ly, im.Layer)] == [2, 2]
    cfg = img.config_json
    assert (cfg["architecture"], cfg["os"], cfg["variant"]) == ("arm", "linux", "v7")
    assert cfg["created"] == "2024-02-03T04:05:06Z"
    assert cfg["config"] == {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"org.example.name": "img"}}
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [str(ly.diff_id) for ly in img.layers]}
    assert len([h for h in cfg["history"] if not h.get("empty_layer")]) == 2
    assert img.platform == Platform("linux", "arm", "v7")
    desc = img.descriptor()
    assert (desc.media_type, desc.digest, desc.size, desc.platform) == (manifest_mt, img.digest, img.size, img.platform)
    assert img.descriptor(platform=False).platform is None
    assert [d for d, _, _ in img.blobs()] == [*(ly.digest for ly in img.layers), img.config_digest]


def test_image_determinism() -> None:
    a, b = build_image(1, layers=[100, 200]), build_image("1", layers=[100, 200])
    assert (a.manifest, a.config, a.digest) == (b.manifest, b.config, b.digest)
    c = build_image(2, layers=[100, 200])
    assert c.digest != a.digest and c.config_digest != a.config_digest
    assert {ly.digest for ly in c.layers}.isdisjoint(ly.digest for ly in a.layers)
    # Shared layers: same layers, different seeds -> different images (seed is in the config history).
    shared = make_layer("shared", 500)
    x, y = build_image("x", layers=[shared]), build_image("y", layers=[shared])
    assert x.layers == y.layers and x.digest != y.digest
    assert build_image(1, layers=[100, 200], fmt="v2s2").digest != a.digest
    with pytest.raises(ValueError):
        build_image(1, fmt="v2s2", annotations={"a": "b"})


def test_image_with_annotations_and_stream_layer() -> None:
    big = make_stream_layer("s", 100_000)
    img = build_image("ann", layers=[big, 300], annotations={"org.opencontainers.image.title": "t"})
    man = img.manifest_json
    assert man["annotations"] == {"org.opencontainers.image.title": "t"}
    assert man["layers"][0] == {"mediaType": MediaType.OCI_LAYER, "digest": str(big.digest), "size": big.size}
    assert img.config_json["rootfs"]["diff_ids"][0] == str(big.digest)
    v2 = build_image("ann", layers=[big, make_layer("z", 10)], fmt="v2s2")
    assert [ly["mediaType"] for ly in v2.manifest_json["layers"]] == [
        im.DOCKER_LAYER_UNCOMPRESSED,
        MediaType.DOCKER_LAYER,
    ]


@pytest.mark.parametrize(
    ("fmt", "index_mt", "child_mt"),
    [
        ("oci", MediaType.OCI_INDEX, MediaType.OCI_MANIFEST),
        ("v2s2", MediaType.DOCKER_MANIFEST_LIST, MediaType.DOCKER_MANIFEST),
    ],
)
def test_index_structure(fmt: im.Format, index_mt: str, child_mt: str) -> None:
    idx = build_multiarch("multi", layers=[300], fmt=fmt)
    assert idx.media_type == index_mt and idx.digest == sha(idx.manifest)
    man = idx.manifest_json
    assert man["schemaVersion"] == 2 and man["mediaType"] == index_mt
    assert man["manifests"] == [
        {"mediaType": child_mt, "digest": str(c.digest), "size": c.size, "platform": plat}
        for c, plat in zip(
            idx.children,
            [
                {"architecture": "amd64", "os": "linux"},
                {"architecture": "arm64", "os": "linux"},
                {"architecture": "arm", "os": "linux", "variant": "v7"},
            ],
            strict=True,
        )
    ]
    assert len({c.digest for c in idx.children}) == 3
    assert len({ly.digest for c in idx.children for ly in c.layers}) == 3  # layers differ per platform
    assert idx.child("linux/arm64").platform == Platform("linux", "arm64")
    assert build_multiarch("multi", layers=[300], fmt=fmt).digest == idx.digest
    assert build_multiarch("multi2", layers=[300], fmt=fmt).digest != idx.digest
    assert build_index(list(reversed(idx.children)), fmt).digest != idx.digest


def test_artifact_and_signature_shapes() -> None:
    img = build_image("subject")
    art = build_artifact_referrer(img, artifact_type="application/vnd.example.sbom")
    man = art.manifest_json
    assert man["artifactType"] == "application/vnd.example.sbom"
    assert man["config"] == {"mediaType": MediaType.OCI_EMPTY, "digest": str(sha(b"{}")), "size": 2}
    assert man["subject"] == {"mediaType": img.media_type, "digest": str(img.digest), "size": img.size}
    assert art.digest == sha(art.manifest)
    assert all(d == sha(data) for d, data in art.blobs)
    assert build_artifact_referrer(img, artifact_type="application/vnd.example.sbom").digest == art.digest
    assert art.descriptor().artifact_type == "application/vnd.example.sbom"

    assert cosign_signature_tag(img.digest) == f"sha256-{img.digest.hex}.sig"
    assert referrers_tag(str(img.digest)) == f"sha256-{img.digest.hex}"
    sig = build_cosign_signature(img)
    payload = dict(sig.blobs)[Digest.parse(sig.manifest_json["layers"][0]["digest"])]
    assert json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == str(img.digest)


# ---------------------------------------------------------------------------------------------------------------------
# Against a real registry, read back with skopeo


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path


def skopeo(*args: str) -> str:
    proc = subprocess.run([SKOPEO, *args], capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed:\n{proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode()


def inspect_raw(reg: RegistryServer, ref: str, *extra: str) -> bytes:
    proc = subprocess.run(
        [SKOPEO, "inspect", "--raw", "--tls-verify=false", *extra, f"docker://{reg.host}/{ref}"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def inspect(reg: RegistryServer, ref: str, *extra: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(skopeo("inspect", "--tls-verify=false", *extra, f"docker://{reg.host}/{ref}"))
    return result


def copy_to_oci(reg: RegistryServer, ref: str, dest: Path, policy: Path, *extra: str) -> dict[str, Any]:
    skopeo("copy", "--quiet", "--policy", str(policy), "--src-tls-verify=false", *extra,
           f"docker://{reg.host}/{ref}", f"oci:{dest}:x")  # fmt: skip
    result: dict[str, Any] = json.loads((dest / "index.json").read_text())
    return result


@pytest.mark.parametrize("fmt", ["v2s2", "oci"])
def test_push_image_roundtrips_through_skopeo(
    registry: RegistryServer, unique_repo: str, policy: Path, tmp_path: Path, fmt: im.Format
) -> None:
    img = build_image(f"rt-{fmt}", layers=[3000, 1500], fmt=fmt, platform="linux/arm64", labels={"k": "v"})
    assert push_image(registry.url, unique_repo, "v1", img) == img.digest
    assert inspect_raw(registry, f"{unique_repo}:v1") == img.manifest
    info = inspect(registry, f"{unique_repo}:v1")
    assert (info["Architecture"], info["Os"], info["Digest"]) == ("arm64", "linux", str(img.digest))
    assert info["Labels"] == {"k": "v"} and info["Layers"] == [str(ly.digest) for ly in img.layers]
    index = copy_to_oci(registry, f"{unique_repo}:v1", tmp_path / "oci", policy)
    (entry,) = index["manifests"]
    if fmt == "oci":  # no conversion needed, so the bytes (and digest) survive
        assert entry["digest"] == str(img.digest)
    for ly in img.layers:  # copied as-is (no compression change)
        assert sha((tmp_path / "oci" / "blobs" / "sha256" / ly.digest.hex).read_bytes()) == ly.digest
    # Pushing again is idempotent (blobs are skipped as existing).
    assert push_image(registry.url, unique_repo, "v1", img) == img.digest


def test_push_by_digest_and_with_client(registry: RegistryServer, unique_repo: str) -> None:
    img = build_image("bydigest", layers=[100])
    with registry.client() as client:
        assert push_image(client, unique_repo, None, img) == img.digest
    assert inspect_raw(registry, f"{unique_repo}@{img.digest}") == img.manifest


def test_stream_layer_uses_chunked_upload(
    registry: RegistryServer, unique_repo: str, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(im, "PUSH_CHUNK_SIZE", 512 * 1024)
    big = make_stream_layer("chunked", 2 * im.MIB + 77)
    img = build_image("chunked", layers=[big, 200], fmt="v2s2")
    mark = registry.log_mark()
    push_image(registry.url, unique_repo, "big", img)
    assert registry.count("PATCH", r"/v2/.*/blobs/uploads/.*", since=mark) == 5
    # dir: keeps layers as they are (oci: would compress this uncompressed one); skopeo verifies digests on the way.
    skopeo("copy", "--quiet", "--policy", str(policy), "--src-tls-verify=false",
           f"docker://{registry.host}/{unique_repo}:big", f"dir:{tmp_path / 'dir'}")  # fmt: skip
    assert (tmp_path / "dir" / "manifest.json").read_bytes() == img.manifest
    assert sha((tmp_path / "dir" / big.digest.hex).read_bytes()) == big.digest


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_push_index_roundtrips_through_skopeo(
    registry: RegistryServer, unique_repo: str, policy: Path, tmp_path: Path, fmt: im.Format
) -> None:
    idx = build_multiarch(f"idx-{fmt}", layers=[800], fmt=fmt)
    assert push_index(registry.url, unique_repo, "multi", idx) == idx.digest
    assert inspect_raw(registry, f"{unique_repo}:multi") == idx.manifest
    for child in idx.children:
        assert inspect_raw(registry, f"{unique_repo}@{child.digest}") == child.manifest
    arm = inspect(registry, f"{unique_repo}:multi", "--override-arch", "arm", "--override-variant", "v7")
    assert (arm["Architecture"], arm["Os"]) == ("arm", "linux")
    assert arm["Layers"] == [str(ly.digest) for ly in idx.child("linux/arm/v7").layers]
    arm64 = inspect(registry, f"{unique_repo}:multi", "--override-arch", "arm64")
    assert (arm64["Architecture"], arm64["Os"]) == ("arm64", "linux")
    assert arm64["Layers"] == [str(ly.digest) for ly in idx.child("linux/arm64").layers]
    index = copy_to_oci(registry, f"{unique_repo}:multi", tmp_path / "oci", policy, "--all")
    (entry,) = index["manifests"]
    if fmt == "oci":
        assert entry["digest"] == str(idx.digest)
    blobs = {p.name for p in (tmp_path / "oci" / "blobs" / "sha256").iterdir()}
    assert {ly.digest.hex for c in idx.children for ly in c.layers} <= blobs


def test_push_blob_monolithic_and_chunked(registry: RegistryServer, unique_repo: str) -> None:
    data = b"x" * 5000
    d = sha(data)
    assert push_blob(registry.url, unique_repo, d, data, len(data)) is True
    assert push_blob(registry.url, unique_repo, d, data, len(data)) is False  # already there
    assert im.fetch_blob(registry.url, unique_repo, d) == data
    data2 = bytes(range(256)) * 40
    d2 = sha(data2)
    assert push_blob(
        registry.url, unique_repo, d2, (data2[i : i + 1000] for i in range(0, len(data2), 1000)), len(data2)
    )
    assert im.fetch_blob(registry.url, unique_repo, d2) == data2
    with pytest.raises(im.PushError):
        push_blob(registry.url, unique_repo, sha(b"other"), data, len(data))


def test_referrer_and_cosign_signature(registry: RegistryServer, unique_repo: str) -> None:
    img = build_image("signed", layers=[100])
    push_image(registry.url, unique_repo, "v1", img)
    sbom = push_artifact_referrer(registry.url, unique_repo, img, artifact_type="application/vnd.example.sbom")
    attest = push_artifact_referrer(registry.url, unique_repo, img, artifact_type="application/vnd.example.attest")
    assert inspect_raw(registry, f"{unique_repo}@{sbom.digest}") == sbom.manifest
    raw, content_type = im.fetch_manifest(registry.url, unique_repo, referrers_tag(img.digest))
    assert content_type == MediaType.OCI_INDEX
    listed = json.loads(raw)["manifests"]
    assert [(m["digest"], m["artifactType"]) for m in listed] == [
        (str(sbom.digest), "application/vnd.example.sbom"),
        (str(attest.digest), "application/vnd.example.attest"),
    ]
    sig = push_cosign_signature(registry.url, unique_repo, img)
    assert inspect_raw(registry, f"{unique_repo}:{cosign_signature_tag(img.digest)}") == sig.manifest


def test_push_to_authenticated_registries(
    auth_registry: RegistryServer, token_registry: RegistryServer, unique_repo: str
) -> None:
    img = build_image("auth", layers=[100])
    with pytest.raises(im.PushError):
        push_image(auth_registry.url, unique_repo, "v1", img)
    with auth_registry.client() as client:
        assert push_image(client, unique_repo, "v1", img) == img.digest
    assert auth_registry.username and auth_registry.password
    creds = (auth_registry.username, auth_registry.password)
    assert im.fetch_manifest(auth_registry.url, unique_repo, "v1", auth=creds)[0] == img.manifest

    assert token_registry.username is not None
    auth = im.RegistryAuth(token_registry.username, token_registry.password)
    assert push_image(token_registry.url, unique_repo, "v1", img, auth=auth) == img.digest
    assert im.fetch_manifest(token_registry.url, unique_repo, "v1", auth=auth)[0] == img.manifest
