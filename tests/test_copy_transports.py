"""``ferry copy`` with every transport as source and destination, interoperating with skopeo 1.9 (issue #3).

For each of ``oci:``, ``oci-archive:``, ``dir:``, ``docker-archive:`` (and ``docker://``):

* Ferry writes, skopeo reads: ``ferry copy docker://… T:…``, then ``skopeo inspect --raw T:…`` equals the
  source manifest where the transport keeps it, and ``skopeo copy T:… oci:…`` succeeds (it verifies blobs);
* skopeo writes, Ferry reads: ``skopeo copy docker://… T:…``, then ``ferry copy T:… docker://…`` and the
  result at the registry verifies (``skopeo copy`` of it succeeds; same manifest bytes where preserved).

Each CLI run gets a private ``FERRY_CACHE_DIR``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import Image, build_image, build_multiarch, fetch_manifest, push_image, push_index
from tests.harness.peer import skopeo
from tests.harness.servers import RegistryServer
from worker.registry import Digest, MediaType

FERRY = str(Path(sys.executable).with_name("ferry"))
INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")

#: transport -> source image format used for it (docker-archive and dir are Docker-flavoured, oci ones OCI)
LOCAL = {"oci": "oci", "oci-archive": "oci", "dir": "v2s2", "docker-archive": "v2s2"}
#: transports that keep the manifest bytes as they are
KEEPS_MANIFEST = {"oci", "oci-archive", "dir"}


def ferry_copy(src: str, dst: str, *flags: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cache = tmp_path / "ferry-cache"
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "FERRY_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [FERRY, "copy", *INSECURE, "-q", *flags, src, dst],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"ferry copy {src} {dst} failed ({proc.returncode}):\n{proc.stderr}"
    assert proc.stderr == "" and proc.stdout == "", "-q prints nothing on success"
    return proc


def local_name(transport: str, path: Path, ref: str = "img") -> str:
    if transport in ("oci", "oci-archive"):
        return f"{transport}:{path}:{ref}"
    if transport == "docker-archive":
        return f"{transport}:{path}:ferry.test/{ref}:latest"
    return f"{transport}:{path}"


def local_path(transport: str, tmp_path: Path, what: str) -> Path:
    return tmp_path / (f"{what}.tar" if transport.endswith("archive") else what)


def inspect_raw(name: str) -> bytes:
    return skopeo("inspect", "--raw", "--tls-verify=false", name).stdout.encode()


def skopeo_verify(name: str, tmp_path: Path, *, all_images: bool = False) -> dict[str, Any]:
    """``skopeo copy`` into a fresh OCI layout (every blob verified); return that layout's index.json."""
    out = tmp_path / f"verify-{len(list(tmp_path.glob('verify-*')))}"
    skopeo("copy", "--src-tls-verify=false", *(["--all"] if all_images else []), name, f"oci:{out}:v")
    index: dict[str, Any] = json.loads((out / "index.json").read_text())
    return index


def config_digest(raw: bytes) -> str:
    digest: str = json.loads(raw)["config"]["digest"]
    return digest


@pytest.fixture
def source(registry: RegistryServer, unique_repo: str, request: pytest.FixtureRequest) -> tuple[str, Image]:
    """An image at the source registry in the format the test's transport prefers."""
    transport = request.node.callspec.params["transport"]
    img = build_image(f"transports/{unique_repo}", layers=[3000, 1500], fmt=LOCAL[transport])  # type: ignore[arg-type]
    push_image(registry.url, unique_repo, "1", img)
    return f"docker://{registry.host}/{unique_repo}:1", img


# --------------------------------------------------------------------------------------------------------------------
# Ferry writes, skopeo reads


@pytest.mark.parametrize("transport", list(LOCAL))
def test_ferry_writes_skopeo_reads(transport: str, source: tuple[str, Image], tmp_path: Path) -> None:
    src, img = source
    name = local_name(transport, local_path(transport, tmp_path, "ferry-out"))
    ferry_copy(src, name, tmp_path=tmp_path)

    raw = inspect_raw(name)
    if transport in KEEPS_MANIFEST:
        assert raw == img.manifest
    else:
        # docker-archive has no manifest: skopeo builds one; the config is kept, layers are the plain tars
        assert config_digest(raw) == str(img.config_digest)
        assert [ly["digest"] for ly in json.loads(raw)["layers"]] == [str(ly.diff_id) for ly in img.layers]
    info = json.loads(skopeo("inspect", name).stdout)
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    index = skopeo_verify(name, tmp_path)
    assert index["manifests"][0]["mediaType"] == MediaType.OCI_MANIFEST
    # (Ferry reading what Ferry wrote: test_local_to_local)


def test_ferry_writes_oci_layout_converts_v2s2(registry: RegistryServer, unique_repo: str, tmp_path: Path) -> None:
    img = build_image(f"transports/v2s2-to-oci/{unique_repo}", fmt="v2s2")
    push_image(registry.url, unique_repo, "1", img)
    name = f"oci:{tmp_path / 'layout'}:img"
    ferry_copy(f"docker://{registry.host}/{unique_repo}:1", name, tmp_path=tmp_path)
    raw = json.loads(inspect_raw(name))
    assert raw["mediaType"] == MediaType.OCI_MANIFEST
    assert raw["config"]["mediaType"] == MediaType.OCI_CONFIG
    assert raw["config"]["digest"] == str(img.config_digest)
    assert [ly["mediaType"] for ly in raw["layers"]] == [MediaType.OCI_LAYER_GZIP]
    skopeo_verify(name, tmp_path)


@pytest.mark.parametrize(
    ("transport", "fmt"), [("oci", "oci"), ("oci-archive", "oci"), ("dir", "oci"), ("oci", "v2s2")]
)
def test_ferry_writes_multiarch(
    transport: str, fmt: str, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    idx = build_multiarch(
        f"transports/multi/{transport}/{unique_repo}",
        platforms=("linux/amd64", "linux/arm64"),
        fmt=fmt,  # type: ignore[arg-type]
    )
    push_index(registry.url, unique_repo, "m", idx)
    name = local_name(transport, local_path(transport, tmp_path, "multi"))
    ferry_copy(f"docker://{registry.host}/{unique_repo}:m", name, "--all", tmp_path=tmp_path)
    raw = inspect_raw(name)
    index = skopeo_verify(name, tmp_path, all_images=True)
    assert index["manifests"][0]["digest"] == str(Digest.of(raw))
    if fmt == "oci" or transport == "dir":
        assert raw == idx.manifest
        return
    # a Docker manifest list into an OCI layout: index and children converted, platforms kept
    top = json.loads(raw)
    assert top["mediaType"] == MediaType.OCI_INDEX
    assert [m["mediaType"] for m in top["manifests"]] == [MediaType.OCI_MANIFEST] * 2
    assert [m["platform"]["architecture"] for m in top["manifests"]] == ["amd64", "arm64"]
    for m, child in zip(top["manifests"], idx.children, strict=True):
        converted = json.loads((tmp_path / "multi/blobs/sha256" / m["digest"].split(":")[1]).read_bytes())
        assert converted["config"]["digest"] == str(child.config_digest)
        assert converted["mediaType"] == MediaType.OCI_MANIFEST


def test_ferry_writes_docker_archive_refuses_all(registry: RegistryServer, unique_repo: str, tmp_path: Path) -> None:
    idx = build_multiarch(f"transports/multi-archive/{unique_repo}", platforms=("linux/amd64", "linux/arm64"))
    push_index(registry.url, unique_repo, "m", idx)
    path = tmp_path / "multi.tar"
    proc = subprocess.run(
        [FERRY, "copy", *INSECURE, "--all", f"docker://{registry.host}/{unique_repo}:m", f"docker-archive:{path}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FERRY_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "single image" in errors[0] and "Traceback" not in proc.stderr
    assert not path.exists()


# --------------------------------------------------------------------------------------------------------------------
# skopeo writes, Ferry reads


@pytest.mark.parametrize("transport", list(LOCAL))
def test_skopeo_writes_ferry_reads(
    transport: str,
    source: tuple[str, Image],
    registry2: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    src, img = source
    name = local_name(transport, local_path(transport, tmp_path, "skopeo-out"))
    skopeo("copy", "--src-tls-verify=false", src, name)
    written = inspect_raw(name)

    dest = f"docker://{registry2.host}/{unique_repo}:from-{transport}"
    digestfile = tmp_path / "digest"
    ferry_copy(name, dest, "--digestfile", str(digestfile), tmp_path=tmp_path)
    raw, _ = fetch_manifest(registry2.url, unique_repo, f"from-{transport}")
    assert digestfile.read_text() == str(Digest.of(raw))
    if transport in KEEPS_MANIFEST:
        assert written == img.manifest  # skopeo kept it ...
        assert raw == written  # ... and so did Ferry
    else:
        assert config_digest(raw) == config_digest(written) == str(img.config_digest)
        assert len(json.loads(raw)["layers"]) == len(img.layers)
    skopeo_verify(dest, tmp_path)
    info = json.loads(skopeo("inspect", "--tls-verify=false", dest).stdout)
    assert info["Digest"] == str(Digest.of(raw))


@pytest.mark.parametrize("transport", ["oci", "dir"])
def test_skopeo_writes_multiarch_ferry_reads(
    transport: str, registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    idx = build_multiarch(
        f"transports/skopeo-multi/{transport}/{unique_repo}", platforms=("linux/amd64", "linux/arm64")
    )
    push_index(registry.url, unique_repo, "m", idx)
    name = local_name(transport, local_path(transport, tmp_path, "multi"))
    skopeo("copy", "--src-tls-verify=false", "--all", f"docker://{registry.host}/{unique_repo}:m", name)
    dest = f"docker://{registry2.host}/{unique_repo}:m"
    ferry_copy(name, dest, "--all", tmp_path=tmp_path)
    assert inspect_raw(dest) == idx.manifest
    for child in idx.children:
        raw, _ = fetch_manifest(registry2.url, unique_repo, child.digest)
        assert raw == child.manifest
    skopeo_verify(dest, tmp_path, all_images=True)


def test_docker_transport_both_ways_with_skopeo(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    img = build_image(f"transports/docker/{unique_repo}", layers=[2000])
    # skopeo writes a registry, Ferry reads it
    layout = tmp_path / "seed"
    push_image(registry.url, unique_repo, "seed", img)
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{unique_repo}:seed", f"oci:{layout}:x")
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:x", f"docker://{registry2.host}/{unique_repo}:by-skopeo")
    out = tmp_path / "ferry-dir"
    ferry_copy(f"docker://{registry2.host}/{unique_repo}:by-skopeo", f"dir:{out}", tmp_path=tmp_path)
    assert (out / "manifest.json").read_bytes() == inspect_raw(f"docker://{registry2.host}/{unique_repo}:by-skopeo")
    # Ferry writes a registry, skopeo reads it
    ferry_copy(f"dir:{out}", f"docker://{registry2.host}/{unique_repo}:by-ferry", tmp_path=tmp_path)
    assert inspect_raw(f"docker://{registry2.host}/{unique_repo}:by-ferry") == img.manifest
    skopeo_verify(f"docker://{registry2.host}/{unique_repo}:by-ferry", tmp_path)


def test_local_to_local(registry: RegistryServer, unique_repo: str, tmp_path: Path) -> None:
    """No registry in the copy: oci: -> dir: -> oci-archive: -> docker-archive: -> oci:, Ferry reading what it
    wrote at each hop and skopeo reading each result."""
    img = build_image(f"transports/local/{unique_repo}", layers=[1200, 800])
    push_image(registry.url, unique_repo, "1", img)
    first = f"oci:{tmp_path / 'a'}:img"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{unique_repo}:1", first)
    chain = [
        first,
        f"dir:{tmp_path / 'b'}",
        f"oci-archive:{tmp_path / 'c.tar'}:img",
        f"docker-archive:{tmp_path / 'd.tar'}",
        f"oci:{tmp_path / 'e'}:img",
    ]
    for src, dst in itertools.pairwise(chain):
        ferry_copy(src, dst, tmp_path=tmp_path)
    for name in chain[:3]:
        assert inspect_raw(name) == img.manifest
    with tarfile.open(tmp_path / "d.tar") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["Config"].removesuffix(".json").split("/")[-1] == img.config_digest.hex
    last = json.loads(inspect_raw(chain[-1]))
    assert last["mediaType"] == MediaType.OCI_MANIFEST and last["config"]["digest"] == str(img.config_digest)
    # out of the archive the layers are the plain tars
    assert [ly["digest"] for ly in last["layers"]] == [str(ly.diff_id) for ly in img.layers]
    skopeo_verify(chain[-1], tmp_path)
