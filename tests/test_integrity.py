"""Everything read by digest is checked against that digest, for every transport (issue #8, "Integrity").

Each source below holds a two-platform image whose stored bytes were tampered with: a child manifest
file replaced by the other platform's manifest, or a layer replaced by other bytes of the same size.
``ferry copy`` must refuse with one ``Error:`` line naming the mismatch, exit 1, and write nothing at the
destination. The check lives in one place (``ImageSource.get_manifest`` / ``open_blob``), so every
transport goes through it; these tests hold each transport to it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.harness.cli import assert_one_error, run_ferry
from tests.harness.faulty import Fault, FaultyServer, serve
from tests.harness.images import Image, Index, build_image, build_multiarch, push_image, push_index
from tests.harness.servers import RegistryServer
from worker.engine.transports import ImageName, SideConfig, open_source
from worker.engine.transports.dir import DIR_VERSION
from worker.registry import Descriptor, Digest, IntegrityError

AMD64, ARM64 = "linux/amd64", "linux/arm64"


@pytest.fixture
def index() -> Index:
    return build_multiarch("integrity", platforms=[AMD64, ARM64], layers=(1500, 700))


# -- writing sources by hand (what a tampered copy on disk looks like) -----------------------------------------------


def blob_bytes(image: Image) -> dict[str, bytes]:
    return {d.hex: (b if isinstance(b, bytes) else b"".join(b.chunks())) for d, _size, b in image.blobs()}


def write_dir(path: Path, top: Index | Image) -> None:
    path.mkdir()
    (path / "version").write_text(DIR_VERSION)
    (path / "manifest.json").write_bytes(top.manifest)
    for child in top.children if isinstance(top, Index) else (top,):
        if isinstance(top, Index):
            (path / f"{child.digest.hex}.manifest.json").write_bytes(child.manifest)
        for hex_, data in blob_bytes(child).items():
            (path / hex_).write_bytes(data)


def write_oci(path: Path, top: Index) -> None:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry = {
        "mediaType": top.media_type,
        "digest": str(top.digest),
        "size": len(top.manifest),
        "annotations": {"org.opencontainers.image.ref.name": "x"},
    }
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (blobs / top.digest.hex).write_bytes(top.manifest)
    for child in top.children:
        (blobs / child.digest.hex).write_bytes(child.manifest)
        for hex_, data in blob_bytes(child).items():
            (blobs / hex_).write_bytes(data)


def tar_tree(root: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for p in sorted(root.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(root)), recursive=False)


def same_size_garbage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0x5A for b in data))


def nothing_written(path: Path) -> bool:
    """True when the destination is absent or holds no image (an empty dir left by opening is fine)."""
    if not path.exists():
        return True
    index = path / "index.json"
    if index.exists():
        return not json.loads(index.read_text()).get("manifests")
    return not (path / "manifest.json").exists()


# -- dir: the case from the issue -----------------------------------------------------------------------------------


def test_dir_child_manifest_swapped_is_refused_for_one_platform(
    index: Index, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    src = tmp_path / "d"
    write_dir(src, index)
    amd, arm = index.child(AMD64), index.child(ARM64)
    (src / f"{amd.digest.hex}.manifest.json").write_bytes(arm.manifest)

    proc = run_ferry(
        "--override-arch",
        "amd64",
        "--override-os",
        "linux",
        "copy",
        "-q",
        "--dest-tls-verify=false",
        f"dir:{src}",
        f"docker://{registry.host}/{unique_repo}:t",
        tmp_path=tmp_path,
    )
    assert_one_error(proc, "digest mismatch", str(amd.digest), f"dir:{src}")
    resp = httpx.get(f"{registry.url}/v2/{unique_repo}/manifests/t", headers={"Accept": amd.media_type})
    assert resp.status_code == 404, "no tag may point at the wrong image"


def test_dir_child_manifest_swapped_is_refused_for_all(index: Index, tmp_path: Path) -> None:
    src, out = tmp_path / "d", tmp_path / "out"
    write_dir(src, index)
    amd, arm = index.child(AMD64), index.child(ARM64)
    (src / f"{amd.digest.hex}.manifest.json").write_bytes(arm.manifest)

    proc = run_ferry("copy", "-q", "--all", f"dir:{src}", f"oci:{out}:x", tmp_path=tmp_path)
    assert_one_error(proc, "digest mismatch", str(amd.digest))
    assert nothing_written(out)


# -- every transport: a swapped child manifest and a garbled layer ---------------------------------------------------


def make_source(
    transport: str,
    fault: str,
    index: Index,
    tmp_path: Path,
    faulty: FaultyServer,
    registry: RegistryServer,
    repo: str,
) -> tuple[str, str]:
    """Write a tampered source; return ``(image name, the digest the error must name)``."""
    amd, arm = index.child(AMD64), index.child(ARM64)
    layer = amd.layer_descriptors[0].digest
    if transport == "docker":
        # the real registry holds the right image; the lying server in front of it serves other bytes
        push_index(registry.url, repo, "t", index)
        if fault == "manifest":
            faulty.add(
                Fault(f"/manifests/{amd.digest}$", serve(arm.manifest, amd.media_type), method="GET", times=None)
            )
        else:
            garbled = bytes(b ^ 0x5A for b in blob_bytes(amd)[layer.hex])
            faulty.add(Fault(f"/blobs/{layer}$", serve(garbled, "application/octet-stream"), method="GET", times=None))
        return f"docker://{faulty.host}/{repo}:t", str(amd.digest if fault == "manifest" else layer)
    if transport == "docker-archive":
        # one image: write it with Ferry from a pristine dir:, then garble a layer inside the tar
        pristine = tmp_path / "pristine"
        write_dir(pristine, amd)
        archive = tmp_path / "a.tar"
        proc = run_ferry("copy", f"dir:{pristine}", f"docker-archive:{archive}:ferry.test/a:1", tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
        unpacked = tmp_path / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        config = json.loads((unpacked / json.loads((unpacked / "manifest.json").read_text())[0]["Config"]).read_text())
        diff_id = config["rootfs"]["diff_ids"][0]
        member = json.loads((unpacked / "manifest.json").read_text())[0]["Layers"][0]
        same_size_garbage(unpacked / member)
        archive.unlink()
        tar_tree(unpacked, archive)
        return f"docker-archive:{archive}", diff_id
    root = tmp_path / "src"
    if transport == "dir":
        write_dir(root, index)
        manifest_file, layer_file = root / f"{amd.digest.hex}.manifest.json", root / layer.hex
    else:
        write_oci(root, index)
        manifest_file, layer_file = root / "blobs" / "sha256" / amd.digest.hex, root / "blobs" / "sha256" / layer.hex
    if fault == "manifest":
        manifest_file.write_bytes(arm.manifest)
    else:
        same_size_garbage(layer_file)
    wanted = str(amd.digest if fault == "manifest" else layer)
    if transport == "dir":
        return f"dir:{root}", wanted
    if transport == "oci":
        return f"oci:{root}:x", wanted
    archive = tmp_path / "src.tar"
    tar_tree(root, archive)
    return f"oci-archive:{archive}:x", wanted


CASES = [
    (t, f)
    for t in ("docker", "oci", "oci-archive", "dir", "docker-archive")
    for f in ("manifest", "blob")
    if not (t == "docker-archive" and f == "manifest")  # one image per archive: no child manifests
]


@pytest.mark.parametrize(("transport", "fault"), CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_tampered_source_is_refused(
    transport: str,
    fault: str,
    index: Index,
    faulty: FaultyServer,
    registry: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    name, digest = make_source(transport, fault, index, tmp_path, faulty, registry, unique_repo)
    out = tmp_path / "out"
    proc = run_ferry("copy", "-q", "--src-tls-verify=false", "--all", name, f"oci:{out}:x", tmp_path=tmp_path)
    assert_one_error(proc, "mismatch", digest)
    assert nothing_written(out)

    # the source itself refuses, before any destination sees a byte
    with open_source(ImageName.parse(name), SideConfig(tls_verify=False)) as src:
        if fault == "manifest":
            with pytest.raises(IntegrityError, match=digest):
                src.get_manifest(Digest.parse(digest))
            return
        top, _ = src.get_manifest(None)
        child = json.loads(top).get("manifests", [None])[0]
        raw = src.get_manifest(Digest.parse(child["digest"]))[0] if child else top
        layer = next(ly for ly in json.loads(raw)["layers"] if ly["digest"] == digest)
        with pytest.raises(IntegrityError, match=digest), src.open_blob(Descriptor.from_json(layer)) as chunks:
            for _ in chunks:
                pass


def test_manifest_by_digest_reference_is_verified(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    """``docker://HOST/REPO@DIGEST``: the bytes served must be the ones the user pinned."""
    good, other = build_image("pinned-good"), build_image("pinned-other")
    push_image(registry.url, unique_repo, None, good)
    push_image(registry.url, unique_repo, None, other)
    faulty.add(Fault(f"/manifests/{good.digest}$", serve(other.manifest, other.media_type), times=None))
    out = tmp_path / "out"
    name = f"docker://{faulty.host}/{unique_repo}@{good.digest}"
    proc = run_ferry("copy", "-q", "--src-tls-verify=false", name, f"oci:{out}:x", tmp_path=tmp_path)
    assert_one_error(proc, "digest mismatch", str(good.digest))
    assert nothing_written(out)
