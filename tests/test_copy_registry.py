"""``ferry copy`` between real registries (issue #3), checked at the registry and with skopeo 1.9.

Sources are seeded with the plain-httpx pushers of tests/harness/images.py. After each copy, skopeo
reads the destination back: ``inspect --raw`` equals the source bytes when digests are preserved and
``skopeo copy`` of the destination into an ``oci:`` directory succeeds (it verifies every blob).
Requests are counted in the destination registry's access log: a layer shared by two images is
uploaded once and mounted for the other repository (in one plan, and across two runs through the
blob-location cache), and a second copy of the same image only HEADs.

Every CLI run gets its own ``FERRY_CACHE_DIR`` so runs only share the blob cache when a test says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from tests.harness.images import (
    Image,
    build_image,
    build_multiarch,
    fetch_manifest,
    make_layer,
    make_stream_layer,
    push_image,
    push_index,
)
from tests.harness.peer import skopeo
from tests.harness.servers import AccessLogEntry, RegistryServer, start_registry
from worker.engine.copy import CopyJob, build_plan
from worker.engine.executor import EmbeddedExecutor
from worker.engine.plan import CopyOptions
from worker.engine.steps import EngineContext, MemoryBlobLocations
from worker.engine.transports import ImageName, SideConfig
from worker.registry import Digest, MediaType

FERRY = str(Path(sys.executable).with_name("ferry"))
INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")


# --------------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ferry-cache"
    d.mkdir()
    return d


def ferry(*args: str, cache: Path, timeout: float = 60, check: bool | None = True) -> subprocess.CompletedProcess[str]:
    """Run ``ferry ARGS`` with a private blob cache; ``check=True`` wants exit 0, ``False`` non-zero."""
    env = {**os.environ, "FERRY_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [FERRY, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    if check is True:
        assert proc.returncode == 0, f"ferry {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    elif check is False:
        assert proc.returncode != 0, f"ferry {' '.join(args)} should have failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy(src: str, dst: str, *flags: str, cache: Path, check: bool | None = True) -> subprocess.CompletedProcess[str]:
    return ferry("copy", *INSECURE, *flags, src, dst, cache=cache, check=check)


def docker(reg: RegistryServer, repo: str, ref: str | Digest = "latest") -> str:
    sep = "@" if isinstance(ref, Digest) or str(ref).startswith("sha256:") else ":"
    return f"docker://{reg.host}/{repo}{sep}{ref}"


def inspect_raw(name: str) -> bytes:
    return skopeo("inspect", "--raw", "--tls-verify=false", name).stdout.encode()


def verify_with_skopeo(name: str, tmp_path: Path, *, all_images: bool = False) -> Path:
    """``skopeo copy`` the image into a fresh ``oci:`` layout: it checks every blob's digest."""
    out = tmp_path / f"verify-{len(list(tmp_path.glob('verify-*')))}"
    flags = ["--all"] if all_images else []
    skopeo("copy", "--src-tls-verify=false", *flags, name, f"oci:{out}:img")
    assert (out / "index.json").is_file()
    return out


def head_manifest(reg: RegistryServer, repo: str, ref: str | Digest) -> httpx.Response:
    accept = ", ".join(
        [MediaType.OCI_INDEX, MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST_LIST, MediaType.DOCKER_MANIFEST]
    )
    with reg.client() as c:
        return c.head(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})


def blob_status(reg: RegistryServer, repo: str, digest: Digest | str) -> int:
    with reg.client() as c:
        return c.head(f"/v2/{repo}/blobs/{digest}").status_code


def uploads_of(log: list[AccessLogEntry], digest: Digest | str) -> list[AccessLogEntry]:
    """Blob uploads that committed ``digest`` (the closing PUT carries ``?digest=``)."""
    return [
        e for e in log if e.method == "PUT" and "/blobs/uploads/" in e.path and f"digest={digest}" in unquote(e.query)
    ]


def mounts_of(log: list[AccessLogEntry], digest: Digest | str) -> list[AccessLogEntry]:
    """Mounts of ``digest`` from another repository (a mount from the repository itself is an existence check)."""
    return [
        e for e in log if _mount_from(e, digest) not in (None, e.path.removeprefix("/v2/").rpartition("/blobs/")[0])
    ]


def checks_of(log: list[AccessLogEntry], digest: Digest | str) -> list[AccessLogEntry]:
    """Existence checks of ``digest`` that also open its upload: a mount from the repository into itself."""
    return [e for e in log if _mount_from(e, digest) == e.path.removeprefix("/v2/").rpartition("/blobs/")[0]]


def _mount_from(e: AccessLogEntry, digest: Digest | str) -> str | None:
    if e.method != "POST" or "/blobs/uploads/" not in e.path:
        return None
    query = dict(p.partition("=")[::2] for p in unquote(e.query).split("&"))
    return query.get("from") if query.get("mount") == str(digest) else None


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("Error:")]


def blob_data_path(reg: RegistryServer, digest: Digest) -> Path:
    return reg.storage_dir / "docker/registry/v2/blobs/sha256" / digest.hex[:2] / digest.hex / "data"


def corrupt_blob(reg: RegistryServer, digest: Digest) -> Digest:
    """Overwrite a blob's stored bytes with different bytes of the same length; return their digest."""
    path = blob_data_path(reg, digest)
    data = path.read_bytes()
    bad = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
    assert len(bad) == len(data) and bad != data
    path.write_bytes(bad)
    return Digest("sha256", hashlib.sha256(bad).hexdigest())


def summary(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# --------------------------------------------------------------------------------------------------------------------
# single images, indexes, platforms, conversion


@pytest.mark.parametrize("fmt", ["v2s2", "oci"])
def test_copy_single_image(
    fmt: str, registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    img = build_image(f"copy/single/{unique_repo}", layers=[2048, 1024], fmt=fmt)  # type: ignore[arg-type]
    push_image(registry.url, unique_repo, "v1", img)
    digestfile, summary_json = tmp_path / "digest", tmp_path / "summary.json"
    mark = registry2.log_mark()
    proc = copy(
        docker(registry, unique_repo, "v1"),
        docker(registry2, unique_repo, "v1"),
        "--digestfile",
        str(digestfile),
        "--summary-json",
        str(summary_json),
        cache=cache_dir,
    )
    assert "Traceback" not in proc.stderr

    raw, ctype = fetch_manifest(registry2.url, unique_repo, "v1")
    assert raw == img.manifest and ctype == img.media_type
    assert inspect_raw(docker(registry2, unique_repo, "v1")) == img.manifest
    verify_with_skopeo(docker(registry2, unique_repo, "v1"), tmp_path)

    assert digestfile.read_text() == str(img.digest)
    s = summary(summary_json)
    assert (s["blobs_transferred"], s["blobs_mounted"], s["blobs_skipped"]) == (3, 0, 0)
    assert s["bytes_transferred"] == sum(size for _d, size, _b in img.blobs())
    assert (s["images_copied"], s["images_skipped"], s["images_failed"]) == (1, 0, 0)
    assert s["manifests_pushed"] == 1
    log = registry2.access_log(since=mark)
    for digest, _size, _blob in img.blobs():
        assert len(uploads_of(log, digest)) == 1
    assert sum(1 for e in log if e.method == "PUT" and "/manifests/" in e.path) == 1


def test_copy_all_multiarch(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    idx = build_multiarch(f"copy/all/{unique_repo}", layers=[1024])
    push_index(registry.url, unique_repo, "multi", idx)
    digestfile = tmp_path / "digest"
    copy(
        docker(registry, unique_repo, "multi"),
        docker(registry2, unique_repo, "multi"),
        "--all",
        "--digestfile",
        str(digestfile),
        cache=cache_dir,
    )
    dest = docker(registry2, unique_repo, "multi")
    assert inspect_raw(dest) == idx.manifest
    assert digestfile.read_text() == str(idx.digest)
    for child in idx.children:
        raw, _ = fetch_manifest(registry2.url, unique_repo, child.digest)
        assert raw == child.manifest
        for digest, _size, _blob in child.blobs():
            assert blob_status(registry2, unique_repo, digest) == 200
    out = verify_with_skopeo(dest, tmp_path, all_images=True)
    # skopeo --all preserved the index: the copy at the destination was complete
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == str(idx.digest)


def test_copy_all_preserve_digests(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    idx = build_multiarch(f"copy/preserve/{unique_repo}", platforms=("linux/amd64", "linux/arm64"), fmt="v2s2")
    push_index(registry.url, unique_repo, "p", idx)
    copy(
        docker(registry, unique_repo, "p"),
        docker(registry2, unique_repo, "p"),
        "--all",
        "--preserve-digests",
        cache=cache_dir,
    )
    assert head_manifest(registry2, unique_repo, "p").headers["docker-content-digest"] == str(idx.digest)
    assert inspect_raw(docker(registry2, unique_repo, "p")) == idx.manifest

    # a conversion would change digests: refused before anything is written
    mark = registry2.log_mark()
    proc = copy(
        docker(registry, unique_repo, "p"),
        docker(registry2, unique_repo, "p-oci"),
        "--all",
        "--preserve-digests",
        "--format",
        "oci",
        cache=cache_dir,
        check=False,
    )
    (line,) = error_lines(proc)
    assert "--preserve-digests" in line and "conversion" in line
    assert head_manifest(registry2, unique_repo, "p-oci").status_code == 404
    assert not [e for e in registry2.access_log(since=mark) if e.method in ("POST", "PUT", "PATCH")]


def test_copy_platform_subset(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    idx = build_multiarch(f"copy/subset/{unique_repo}", layers=[1024])
    push_index(registry.url, unique_repo, "multi", idx)
    digestfile = tmp_path / "digest"
    copy(
        docker(registry, unique_repo, "multi"),
        docker(registry2, unique_repo, "sub"),
        "--platform",
        "linux/arm64",
        "--platform",
        "linux/arm/v7",
        "--digestfile",
        str(digestfile),
        cache=cache_dir,
    )
    dest = docker(registry2, unique_repo, "sub")
    raw = inspect_raw(dest)
    new = json.loads(raw)
    kept = [idx.child("linux/arm64"), idx.child("linux/arm/v7")]
    assert [m["digest"] for m in new["manifests"]] == [str(c.digest) for c in kept]
    assert new["mediaType"] == MediaType.OCI_INDEX
    assert digestfile.read_text() == str(Digest.of(raw))
    amd64 = idx.child("linux/amd64")
    assert head_manifest(registry2, unique_repo, amd64.digest).status_code == 404
    assert blob_status(registry2, unique_repo, amd64.layers[0].digest) == 404
    verify_with_skopeo(dest, tmp_path, all_images=True)

    # --preserve-digests forbids rewriting the index
    proc = copy(
        docker(registry, unique_repo, "multi"),
        docker(registry2, unique_repo, "sub2"),
        "--platform",
        "linux/arm64",
        "--preserve-digests",
        cache=cache_dir,
        check=False,
    )
    (line,) = error_lines(proc)
    assert "platform subset" in line and "--preserve-digests" in line
    assert head_manifest(registry2, unique_repo, "sub2").status_code == 404


@pytest.mark.parametrize(("src_fmt", "target"), [("v2s2", "oci"), ("oci", "v2s2")])
def test_copy_format_conversion(
    src_fmt: str,
    target: str,
    registry: RegistryServer,
    registry2: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
    cache_dir: Path,
) -> None:
    img = build_image(f"copy/convert/{unique_repo}", layers=[1024, 512], fmt=src_fmt)  # type: ignore[arg-type]
    push_image(registry.url, unique_repo, "src", img)
    digestfile = tmp_path / "digest"
    copy(
        docker(registry, unique_repo, "src"),
        docker(registry2, unique_repo, "dst"),
        "--format",
        target,
        "--digestfile",
        str(digestfile),
        cache=cache_dir,
    )
    dest = docker(registry2, unique_repo, "dst")
    want = MediaType.OCI_MANIFEST if target == "oci" else MediaType.DOCKER_MANIFEST
    want_layer = MediaType.OCI_LAYER_GZIP if target == "oci" else MediaType.DOCKER_LAYER
    raw = inspect_raw(dest)
    manifest = json.loads(raw)
    assert manifest["mediaType"] == want
    assert [ly["mediaType"] for ly in manifest["layers"]] == [want_layer, want_layer]
    assert digestfile.read_text() == str(Digest.of(raw)) != str(img.digest)
    # skopeo 1.9's inspect has no media types (no LayersData): it must parse the image, same digest and layers
    info = json.loads(skopeo("inspect", "--tls-verify=false", dest).stdout)
    assert info["Digest"] == str(Digest.of(raw))
    assert info["Layers"] == [str(ly.digest) for ly in img.layers]
    assert info["Architecture"] == "amd64"
    _raw, ctype = fetch_manifest(registry2.url, unique_repo, "dst")
    assert ctype == want
    verify_with_skopeo(dest, tmp_path)


def test_copy_index_format_conversion(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    idx = build_multiarch(f"copy/convert-idx/{unique_repo}", platforms=("linux/amd64", "linux/arm64"))
    push_index(registry.url, unique_repo, "oci", idx)
    copy(
        docker(registry, unique_repo, "oci"),
        docker(registry2, unique_repo, "v2"),
        "--all",
        "--format",
        "v2s2",
        cache=cache_dir,
    )
    dest = docker(registry2, unique_repo, "v2")
    top = json.loads(inspect_raw(dest))
    assert top["mediaType"] == MediaType.DOCKER_MANIFEST_LIST
    for m in top["manifests"]:
        assert m["mediaType"] == MediaType.DOCKER_MANIFEST
        raw, ctype = fetch_manifest(registry2.url, unique_repo, m["digest"])
        assert ctype == MediaType.DOCKER_MANIFEST and str(Digest.of(raw)) == m["digest"] and len(raw) == m["size"]
    verify_with_skopeo(dest, tmp_path, all_images=True)


# --------------------------------------------------------------------------------------------------------------------
# mounts, the blob cache, skipping


def _shared_pair(seed: str) -> tuple[Image, Image, Digest]:
    shared = make_layer(f"{seed}/shared", 4096)
    a = build_image(f"{seed}/a", layers=[shared, 256])
    b = build_image(f"{seed}/b", layers=[shared, 512])
    return a, b, shared.digest


def test_cross_repo_mount_in_one_plan(registry: RegistryServer, registry2: RegistryServer, unique_repo: str) -> None:
    a, b, shared = _shared_pair(f"copy/mount-plan/{unique_repo}")
    push_image(registry.url, f"{unique_repo}/src-a", "1", a)
    push_image(registry.url, f"{unique_repo}/src-b", "1", b)
    repo_a, repo_b = f"{unique_repo}/a", f"{unique_repo}/b"
    jobs = [
        CopyJob(
            ImageName.parse(docker(registry, f"{unique_repo}/src-{x}", "1")), ImageName.parse(docker(registry2, r, "1"))
        )
        for x, r in (("a", repo_a), ("b", repo_b))
    ]
    ctx = EngineContext(
        source_side=SideConfig(tls_verify=False),
        dest_side=SideConfig(tls_verify=False),
        locations=MemoryBlobLocations(),
    )
    mark = registry2.log_mark()
    try:
        plan, failures = build_plan(ctx, jobs, CopyOptions())
        assert failures == []
        assert [s.mount_from for s in plan.blob_steps if s.digest == shared] == [None, repo_a]
        report = EmbeddedExecutor(ctx, parallel=4).run(plan)
    finally:
        ctx.close()
    assert report.ok, report
    assert (report.blobs_transferred, report.blobs_mounted, report.blobs_skipped) == (5, 1, 0)
    shared_size = a.layers[0].size
    assert report.bytes_transferred == sum(size for _d, size, _b in [*a.blobs(), *b.blobs()]) - shared_size

    log = registry2.access_log(since=mark)
    ups = uploads_of(log, shared)
    assert len(ups) == 1 and ups[0].path.startswith(f"/v2/{repo_a}/")
    mounts = mounts_of(log, shared)
    assert len(mounts) == 1 and mounts[0].path == f"/v2/{repo_b}/blobs/uploads/"
    assert f"from={repo_a}" in unquote(mounts[0].query) and mounts[0].status == 201
    for img, repo in ((a, repo_a), (b, repo_b)):
        raw, _ = fetch_manifest(registry2.url, repo, "1")
        assert raw == img.manifest
        assert blob_status(registry2, repo, shared) == 200


def test_cross_repo_mount_across_runs_blob_cache(
    registry: RegistryServer,
    registry2: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
    cache_dir: Path,
) -> None:
    a, b, shared = _shared_pair(f"copy/mount-cache/{unique_repo}")
    push_image(registry.url, f"{unique_repo}/src", "a", a)
    push_image(registry.url, f"{unique_repo}/src", "b", b)
    repo_a, repo_b, repo_c = f"{unique_repo}/a", f"{unique_repo}/b", f"{unique_repo}/c"
    copy(docker(registry, f"{unique_repo}/src", "a"), docker(registry2, repo_a, "1"), "-q", cache=cache_dir)

    # second run, same cache: the shared layer is mounted from repo_a, not uploaded
    mark = registry2.log_mark()
    summary_json = tmp_path / "summary.json"
    proc = copy(
        docker(registry, f"{unique_repo}/src", "b"),
        docker(registry2, repo_b, "1"),
        "--summary-json",
        str(summary_json),
        cache=cache_dir,
    )
    assert "1 mounted" in proc.stderr
    log = registry2.access_log(since=mark)
    assert uploads_of(log, shared) == []
    mounts = [m for m in mounts_of(log, shared) if m.status == 201]
    assert len(mounts) == 1 and mounts[0].path == f"/v2/{repo_b}/blobs/uploads/"
    assert f"from={repo_a}" in unquote(mounts[0].query)
    s = summary(summary_json)
    assert (s["blobs_transferred"], s["blobs_mounted"], s["blobs_skipped"]) == (2, 1, 0)
    assert inspect_raw(docker(registry2, repo_b, "1")) == b.manifest
    verify_with_skopeo(docker(registry2, repo_b, "1"), tmp_path)

    # control: with an empty cache the same copy uploads the layer again
    mark = registry2.log_mark()
    copy(docker(registry, f"{unique_repo}/src", "b"), docker(registry2, repo_c, "1"), "-q", cache=tmp_path / "fresh")
    log = registry2.access_log(since=mark)
    assert len(uploads_of(log, shared)) == 1 and mounts_of(log, shared) == []


def test_copy_within_one_registry_mounts_everything(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    img = build_image(f"copy/same-registry/{unique_repo}", layers=[1024, 1024])
    push_image(registry.url, f"{unique_repo}/from", "1", img)
    summary_json = tmp_path / "summary.json"
    mark = registry.log_mark()
    copy(
        docker(registry, f"{unique_repo}/from", img.digest),
        docker(registry, f"{unique_repo}/to", "1"),
        "--summary-json",
        str(summary_json),
        cache=cache_dir,
    )
    s = summary(summary_json)
    assert (s["blobs_transferred"], s["blobs_mounted"], s["bytes_transferred"]) == (0, 3, 0)
    log = registry.access_log(since=mark)
    assert not [e for e in log if e.method in ("PATCH", "PUT") and "/blobs/" in e.path]
    assert not [e for e in log if e.method == "GET" and "/blobs/" in e.path]
    assert inspect_raw(docker(registry, f"{unique_repo}/to", "1")) == img.manifest


def test_second_copy_only_heads(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    idx = build_multiarch(f"copy/skip/{unique_repo}", platforms=("linux/amd64", "linux/arm64"))
    push_index(registry.url, unique_repo, "1", idx)
    src, dst = docker(registry, unique_repo, "1"), docker(registry2, unique_repo, "1")
    copy(src, dst, "--all", "-q", cache=cache_dir)

    mark = registry2.log_mark()
    summary_json, digestfile = tmp_path / "summary.json", tmp_path / "digest"
    proc = copy(
        src, dst, "--all", "--summary-json", str(summary_json), "--digestfile", str(digestfile), cache=cache_dir
    )
    log = registry2.access_log(since=mark)
    assert log, "the destination was not even checked"
    assert {e.method for e in log if e.path != "/v2/"} == {"HEAD"}
    assert not [e for e in log if e.method in ("POST", "PUT", "PATCH", "DELETE")]
    s = summary(summary_json)
    assert (s["images_copied"], s["images_skipped"]) == (0, 1)
    assert (s["blobs_transferred"], s["blobs_mounted"], s["manifests_pushed"]) == (0, 0, 0)
    assert digestfile.read_text() == str(idx.digest)
    assert "up to date" in proc.stdout + proc.stderr


def test_shared_blobs_in_same_repo_are_skipped(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    a, b, shared = _shared_pair(f"copy/skip-blob/{unique_repo}")
    push_image(registry.url, unique_repo, "a", a)
    push_image(registry.url, unique_repo, "b", b)
    copy(docker(registry, unique_repo, "a"), docker(registry2, unique_repo, "a"), "-q", cache=cache_dir)
    summary_json = tmp_path / "summary.json"
    mark = registry2.log_mark()
    copy(
        docker(registry, unique_repo, "b"),
        docker(registry2, unique_repo, "b"),
        "--summary-json",
        str(summary_json),
        cache=cache_dir,
    )
    s = summary(summary_json)
    assert (s["blobs_transferred"], s["blobs_mounted"], s["blobs_skipped"]) == (2, 0, 1)
    log = registry2.access_log(since=mark)
    assert uploads_of(log, shared) == [] and mounts_of(log, shared) == []
    # one request found it there: the check that would have opened its upload answered 201
    assert [e.status for e in checks_of(log, shared)] == [201]
    assert inspect_raw(docker(registry2, unique_repo, "b")) == b.manifest


def test_additional_tags(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache_dir: Path
) -> None:
    img = build_image(f"copy/tags/{unique_repo}")
    push_image(registry.url, unique_repo, "1", img)
    src, dst = docker(registry, unique_repo, "1"), docker(registry2, unique_repo, "1")
    copy(src, dst, "--additional-tag", "extra", "-q", cache=cache_dir)
    for tag in ("1", "extra"):
        assert head_manifest(registry2, unique_repo, tag).headers["docker-content-digest"] == str(img.digest)
    # already up to date: the new additional tag is still written
    copy(src, dst, "--additional-tag", "more", "-q", cache=cache_dir)
    assert head_manifest(registry2, unique_repo, "more").headers["docker-content-digest"] == str(img.digest)


# --------------------------------------------------------------------------------------------------------------------
# failures


def test_corrupt_source_blob_fails_cleanly(
    registry_factory: Any, registry2: RegistryServer, unique_repo: str, cache_dir: Path
) -> None:
    src_reg: RegistryServer = registry_factory()
    # above the client's one-PUT limit: the layer streams up in PATCHes before the mismatch shows at its end
    img = build_image(f"copy/corrupt/{unique_repo}", layers=[5 << 20, 1024])
    push_image(src_reg.url, unique_repo, "1", img)
    layer = img.layers[0].digest
    actual = corrupt_blob(src_reg, layer)

    proc = copy(docker(src_reg, unique_repo, "1"), docker(registry2, unique_repo, "1"), cache=cache_dir, check=False)
    (line,) = error_lines(proc)
    assert str(layer) in line and str(actual) in line
    assert head_manifest(registry2, unique_repo, "1").status_code == 404
    assert head_manifest(registry2, unique_repo, img.digest).status_code == 404
    assert blob_status(registry2, unique_repo, layer) == 404
    assert not blob_data_path(registry2, layer).exists()


def test_failed_copy_keeps_existing_tag(
    registry_factory: Any, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    src_reg: RegistryServer = registry_factory()
    old = build_image(f"copy/keep-old/{unique_repo}")
    new = build_image(f"copy/keep-new/{unique_repo}", layers=[4096])
    push_image(registry2.url, unique_repo, "1", old)
    push_image(src_reg.url, unique_repo, "1", new)
    corrupt_blob(src_reg, new.layers[0].digest)

    proc = copy(docker(src_reg, unique_repo, "1"), docker(registry2, unique_repo, "1"), cache=cache_dir, check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert str(new.layers[0].digest) in line
    assert head_manifest(registry2, unique_repo, "1").headers["docker-content-digest"] == str(old.digest)
    raw, _ = fetch_manifest(registry2.url, unique_repo, "1")
    assert raw == old.manifest

    # the same into an OCI layout holding another image: the layout is left as it was
    layout = tmp_path / "layout"
    copy(docker(registry2, unique_repo, "1"), f"oci:{layout}:old", "-q", cache=cache_dir)
    before = (layout / "index.json").read_bytes()
    proc = copy(docker(src_reg, unique_repo, "1"), f"oci:{layout}:new", cache=cache_dir, check=False)
    (line,) = error_lines(proc)
    assert str(new.layers[0].digest) in line
    assert (layout / "index.json").read_bytes() == before
    assert not (layout / "blobs/sha256" / new.layers[0].digest.hex).exists()
    assert inspect_raw(f"oci:{layout}:old") == old.manifest


def test_failed_image_does_not_stop_the_others(
    registry_factory: Any, registry2: RegistryServer, unique_repo: str
) -> None:
    src_reg: RegistryServer = registry_factory()
    good = build_image(f"copy/others-good/{unique_repo}", layers=[1024])
    bad = build_image(f"copy/others-bad/{unique_repo}", layers=[1024])
    push_image(src_reg.url, f"{unique_repo}/good", "1", good)
    push_image(src_reg.url, f"{unique_repo}/bad", "1", bad)
    corrupt_blob(src_reg, bad.layers[0].digest)
    jobs = [
        CopyJob(
            ImageName.parse(docker(src_reg, f"{unique_repo}/{x}", "1")),
            ImageName.parse(docker(registry2, f"{unique_repo}/{x}", "1")),
        )
        for x in ("bad", "good")
    ]
    ctx = EngineContext(source_side=SideConfig(tls_verify=False), dest_side=SideConfig(tls_verify=False))
    try:
        plan, _ = build_plan(ctx, jobs, CopyOptions())
        report = EmbeddedExecutor(ctx, parallel=2).run(plan)
    finally:
        ctx.close()
    assert not report.ok and not report.cancelled
    outcome = {o.destination.split("/")[-1]: o for o in report.images}
    assert outcome["bad:1"].status == "failed" and str(bad.layers[0].digest) in outcome["bad:1"].error
    assert outcome["good:1"].status == "done" and outcome["good:1"].digest == str(good.digest)
    assert head_manifest(registry2, f"{unique_repo}/bad", "1").status_code == 404
    assert inspect_raw(docker(registry2, f"{unique_repo}/good", "1")) == good.manifest


def test_bad_source_reference(registry2: RegistryServer, unique_repo: str, cache_dir: Path) -> None:
    for bad in ("docker://Bad_Host:xx/UPPER:tag", "nosuch:thing", "docker:missing-slashes"):
        proc = copy(bad, docker(registry2, unique_repo, "1"), cache=cache_dir, check=False)
        (line,) = error_lines(proc)
        assert "invalid" in line.lower() and bad.removeprefix("docker://") in line
    assert head_manifest(registry2, unique_repo, "1").status_code == 404


def test_missing_source_image(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache_dir: Path
) -> None:
    old = build_image(f"copy/missing-old/{unique_repo}")
    push_image(registry2.url, unique_repo, "1", old)
    mark = registry2.log_mark()
    proc = copy(
        docker(registry, unique_repo, "nope"), docker(registry2, unique_repo, "1"), cache=cache_dir, check=False
    )
    assert proc.returncode == 2  # the source image does not exist: skopeo >= 1.10's exit code
    (line,) = error_lines(proc)
    assert unique_repo in line and ("not found" in line.lower() or "unknown" in line.lower())
    assert not [e for e in registry2.access_log(since=mark) if e.method in ("POST", "PUT", "PATCH", "DELETE")]
    assert head_manifest(registry2, unique_repo, "1").headers["docker-content-digest"] == str(old.digest)


def test_unwritable_destination_registry(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    # a registry in read-only mode holding an older image at the tag
    root = tmp_path / "readonly-registry"
    dest = start_registry(root)
    old = build_image(f"copy/readonly-old/{unique_repo}")
    try:
        push_image(dest.url, unique_repo, "1", old)
    finally:
        dest.stop()
    dest = start_registry(root, extra_config={"storage": {"maintenance": {"readonly": {"enabled": True}}}})
    try:
        img = build_image(f"copy/readonly/{unique_repo}")
        push_image(registry.url, unique_repo, "1", img)
        proc = copy(docker(registry, unique_repo, "1"), docker(dest, unique_repo, "1"), cache=cache_dir, check=False)
        assert proc.returncode == 1
        (line,) = error_lines(proc)
        assert dest.host in line or unique_repo in line
        assert head_manifest(dest, unique_repo, "1").headers["docker-content-digest"] == str(old.digest)
    finally:
        dest.stop()


def test_unwritable_destination_path(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache_dir: Path
) -> None:
    img = build_image(f"copy/unwritable/{unique_repo}")
    push_image(registry.url, unique_repo, "1", img)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"keep me")
    for dest in (f"dir:{blocker}/sub", f"oci:{blocker}/layout:x", f"docker-archive:{blocker}/sub/x.tar"):
        proc = copy(docker(registry, unique_repo, "1"), dest, cache=cache_dir, check=False)
        assert proc.returncode == 1, proc.stderr
        assert len(error_lines(proc)) == 1, proc.stderr
    assert blocker.read_bytes() == b"keep me"


# --------------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_stops_copy_without_tag(
    registry_factory: Any, registry2: RegistryServer, unique_repo: str, cache_dir: Path
) -> None:
    src_reg: RegistryServer = registry_factory()
    big = make_stream_layer(f"copy/ctrl-c/{unique_repo}", 300 << 20)
    img = build_image(f"copy/ctrl-c/{unique_repo}", layers=[big])
    push_image(src_reg.url, unique_repo, "1", img)

    uploads = registry2.storage_dir / "docker/registry/v2/repositories" / unique_repo / "_uploads"
    env = {**os.environ, "FERRY_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen(
        [FERRY, "copy", *INSECURE, docker(src_reg, unique_repo, "1"), docker(registry2, unique_repo, "1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        flowing = False
        while time.monotonic() < deadline and proc.poll() is None:
            sizes = [p.stat().st_size for p in uploads.glob("*/data")] if uploads.exists() else []
            if any(s > 0 for s in sizes):
                flowing = True
                break
            time.sleep(0.02)
        assert flowing, "no upload started"
        assert proc.poll() is None, "the copy ended before it could be interrupted"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err
    assert stopped_in < 10
    assert head_manifest(registry2, unique_repo, "1").status_code == 404
    assert blob_status(registry2, unique_repo, big.digest) == 404
