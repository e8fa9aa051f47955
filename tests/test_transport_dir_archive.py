"""``dir:`` and ``docker-archive:`` transports, checked against skopeo 1.9 in both directions.

Source images come from :mod:`tests.harness.images`; skopeo gets them from an OCI layout written by hand
here (no registry needed: skopeo copies between local transports). Ferry-side copies use a tiny
blobs-then-manifest loop over the transport classes (the real copier lives elsewhere).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import tarfile
import tracemalloc
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import Image, Index, Layer, build_image, build_multiarch, make_layer, make_stream_layer
from tests.harness.peer import skopeo
from worker.engine.transports.base import ImageDestination, ImageSource, StoredManifest
from worker.engine.transports.dir import DIR_VERSION, DirDestination, DirSource
from worker.engine.transports.docker_archive import (
    DockerArchiveDestination,
    DockerArchiveSource,
    parse_docker_archive_spec,
)
from worker.registry import (
    Descriptor,
    Digest,
    DigestMismatch,
    IntegrityError,
    InvalidInput,
    InvalidReference,
    ManifestError,
    MediaType,
    NotFound,
    SizeMismatch,
)
from worker.registry._mediatype import guess_media_type, sniff_media_type

# --------------------------------------------------------------------------------------------------------------------
# Test-side image bundles, a memory source, an OCI layout writer and a tiny copy loop


@dataclass
class Bundle:
    """A top manifest, its children (for an index) and every blob, all in memory."""

    manifest: bytes
    media_type: str
    children: dict[Digest, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[Digest, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> Digest:
        return Digest.of(self.manifest)


def _image_blobs(img: Image) -> dict[Digest, bytes]:
    out: dict[Digest, bytes] = {}
    for digest, _size, blob in img.blobs():
        if isinstance(blob, bytes):
            out[digest] = blob
        elif isinstance(blob, Layer):
            out[digest] = blob.data
        else:
            out[digest] = b"".join(blob.chunks())
    return out


def bundle(obj: Image | Index) -> Bundle:
    if isinstance(obj, Image):
        return Bundle(obj.manifest, obj.media_type, blobs=_image_blobs(obj))
    b = Bundle(obj.manifest, obj.media_type)
    for child in obj.children:
        b.children[child.digest] = (child.manifest, child.media_type)
        b.blobs.update(_image_blobs(child))
    return b


def custom_image(config: dict[str, Any] | bytes, layers: list[Layer], *, fmt: str = "v2s2") -> Bundle:
    """An image with exactly the given config bytes (pretty, unicode, HTML characters ...)."""
    cfg = config if isinstance(config, bytes) else json.dumps(config, indent=2, ensure_ascii=False).encode()
    mt, cmt, lmt = (
        (MediaType.DOCKER_MANIFEST, MediaType.DOCKER_CONFIG, MediaType.DOCKER_LAYER)
        if fmt == "v2s2"
        else (MediaType.OCI_MANIFEST, MediaType.OCI_CONFIG, MediaType.OCI_LAYER_GZIP)
    )
    man = {
        "schemaVersion": 2,
        "mediaType": mt.value,
        "config": {"mediaType": cmt.value, "digest": str(Digest.of(cfg)), "size": len(cfg)},
        "layers": [{"mediaType": lmt.value, "digest": str(ly.digest), "size": ly.size} for ly in layers],
    }
    blobs = {ly.digest: ly.data for ly in layers}
    blobs[Digest.of(cfg)] = cfg
    return Bundle(json.dumps(man, indent=3).encode(), mt.value, blobs=blobs)


class MemorySource(ImageSource):
    def __init__(self, b: Bundle, chunk: int = 4096) -> None:
        self.b = b
        self.chunk = chunk

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        if ref is None or ref == self.b.digest:
            return StoredManifest(self.b.manifest, self.b.media_type)
        assert isinstance(ref, Digest)
        return StoredManifest(*self.b.children[ref])

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        data = self.b.blobs[desc.digest]
        return nullcontext(iter([data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]))


def _copy_image(src: ImageSource, dst: ImageDestination, raw: bytes) -> None:
    man = json.loads(raw)
    for d in [*man.get("layers", []), man["config"]]:
        desc = Descriptor.from_json(d)
        if not dst.blob_exists(desc):
            with src.open_blob(desc) as chunks:
                dst.put_blob(desc, chunks)


def copy(src: ImageSource, dst: ImageDestination, *, all_images: bool = False, platform: str = "linux/amd64") -> None:
    """Blobs, then child manifests, then the top manifest; then commit."""
    raw, mt = src.get_manifest()
    if mt in (MediaType.OCI_INDEX, MediaType.DOCKER_MANIFEST_LIST):
        entries = json.loads(raw)["manifests"]
        if all_images and dst.supports_index:
            for e in entries:
                d = Descriptor.from_json(e)
                child, cmt = src.get_manifest(d.digest)
                _copy_image(src, dst, child)
                dst.put_manifest(child, cmt, d.digest)
        else:
            want = platform.split("/")
            e = next(e for e in entries if [e["platform"]["os"], e["platform"]["architecture"]] == want)
            raw, mt = src.get_manifest(Digest.parse(e["digest"]))
            _copy_image(src, dst, raw)
    else:
        _copy_image(src, dst, raw)
    dst.put_manifest(raw, mt, None)
    dst.commit()


def write_oci_layout(root: Path, refs: dict[str, Bundle]) -> None:
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> Digest:
        d = Digest.of(data)
        (root / "blobs" / "sha256" / d.hex).write_bytes(data)
        return d

    entries = []
    for name, b in refs.items():
        for d, data in b.blobs.items():
            assert put(data) == d
        for child, _mt in b.children.values():
            put(child)
        put(b.manifest)
        entries.append(
            {
                "mediaType": b.media_type,
                "digest": str(b.digest),
                "size": len(b.manifest),
                "annotations": {"org.opencontainers.image.ref.name": name},
            }
        )
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), hidden ones included."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_blob(src: ImageSource, desc: Descriptor) -> bytes:
    with src.open_blob(desc) as chunks:
        return b"".join(chunks)


def inspect_raw(name: str) -> bytes:
    return skopeo("inspect", "--raw", name).stdout.encode()


def inspect(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(skopeo("inspect", name).stdout)
    return result


@pytest.fixture(scope="module")
def images() -> dict[str, Bundle]:
    return {
        "v2s2": bundle(build_image("dir-archive-v2s2", layers=[3000, 1500], fmt="v2s2")),
        "oci": bundle(
            build_image("dir-archive-oci", layers=[2000, 500, 100], fmt="oci", labels={"html": "<a&b>", "u": "é"})
        ),
        "empty": bundle(build_image("dir-archive-empty", layers=[], fmt="v2s2")),
        "multi": bundle(build_multiarch("dir-archive-multi", platforms=["linux/amd64", "linux/arm64"], layers=[800])),
        "weird": custom_image(
            {
                "architecture": "arm64",
                "os": "linux",
                "created": "2024-05-06T07:08:09.123456789Z",
                "docker_version": "24.0.7",
                "config": {"Labels": {"x": "<tag> & \u2028 ünïcödé"}, "Env": ["A=1"]},
                "container_config": {"Cmd": ["/bin/sh", "-c", "echo 'a > b'"]},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [str(make_layer("weird0", 700).diff_id), str(make_layer("weird1", 300).diff_id)],
                },
            },
            [make_layer("weird0", 700), make_layer("weird1", 300)],
        ),
    }


def write_dir_by_hand(root: Path, b: Bundle) -> None:
    """The dir: layout written independently of Ferry (skopeo's oci: source ignores Docker-typed index entries)."""
    root.mkdir(parents=True)
    (root / "version").write_text("Directory Transport Version: 1.1\n")
    (root / "manifest.json").write_bytes(b.manifest)
    for d, data in b.blobs.items():
        (root / d.hex).write_bytes(data)
    for d, (child, _mt) in b.children.items():
        (root / f"{d.hex}.manifest.json").write_bytes(child)


@pytest.fixture(scope="module")
def peer_src(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Bundle]) -> dict[str, str]:
    """skopeo source names for every test image: an OCI layout for OCI ones, a hand-made dir: for Docker ones."""
    root = tmp_path_factory.mktemp("peer-src")
    oci = {n: b for n, b in images.items() if b.media_type in (MediaType.OCI_MANIFEST, MediaType.OCI_INDEX)}
    write_oci_layout(root / "oci", oci)
    out = {n: f"oci:{root / 'oci'}:{n}" for n in oci}
    for n, b in images.items():
        if n not in oci:
            write_dir_by_hand(root / n, b)
            out[n] = f"dir:{root / n}"
    return out


# --------------------------------------------------------------------------------------------------------------------
# dir:


@pytest.mark.parametrize("name", ["v2s2", "oci", "weird"])
def test_dir_destination_writes_what_skopeo_writes(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle], name: str
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    dst = DirDestination(str(ours))
    with dst:
        copy(MemorySource(images[name]), dst)
    skopeo("copy", peer_src[name], f"dir:{theirs}")

    assert tree(ours) == tree(theirs)  # same names, same bytes, no staging left behind
    assert (ours / "version").read_text() == DIR_VERSION
    assert inspect_raw(f"dir:{ours}") == images[name].manifest
    skopeo("copy", f"dir:{ours}", f"oci:{tmp_path / 'back'}:t")  # skopeo verifies every blob
    back = inspect_raw(f"oci:{tmp_path / 'back'}:t")
    if images[name].media_type == MediaType.OCI_MANIFEST:
        assert back == images[name].manifest
    else:  # converted to OCI on the way (skopeo rewrites the config then); layers are carried unchanged
        layer_digests = [x["digest"] for x in json.loads(images[name].manifest)["layers"]]
        assert [x["digest"] for x in json.loads(back)["layers"]] == layer_digests


def test_dir_destination_multiarch_all(tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle]) -> None:
    multi = images["multi"]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    dst = DirDestination(str(ours))
    with dst:
        copy(MemorySource(multi), dst, all_images=True)
    skopeo("copy", "--all", peer_src["multi"], f"dir:{theirs}")

    files = tree(ours)
    assert files == tree(theirs)
    for digest, (child, _mt) in multi.children.items():
        assert files[f"{digest.hex}.manifest.json"] == child
    assert files["manifest.json"] == multi.manifest
    assert inspect_raw(f"dir:{ours}") == multi.manifest
    skopeo("copy", "--all", f"dir:{ours}", f"oci:{tmp_path / 'back'}:t")
    assert inspect_raw(f"oci:{tmp_path / 'back'}:t") == multi.manifest


def test_dir_source_reads_skopeo_output(tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle]) -> None:
    d = tmp_path / "d"
    skopeo("copy", "--all", peer_src["multi"], f"dir:{d}")
    src = DirSource(str(d))
    with src:
        raw, mt = src.get_manifest()
        assert raw == inspect_raw(f"dir:{d}")
        assert mt == MediaType.OCI_INDEX
        assert src.get_manifest(Digest.of(raw)) == (raw, mt)
        n_blobs = 0
        for entry in json.loads(raw)["manifests"]:
            child, cmt = src.get_manifest(Digest.parse(entry["digest"]))
            assert sha256(child) == entry["digest"] and cmt == MediaType.OCI_MANIFEST
            man = json.loads(child)
            for b in [man["config"], *man["layers"]]:
                data = read_blob(src, Descriptor.from_json(b))
                assert sha256(data) == b["digest"] and len(data) == b["size"]
                n_blobs += 1
        assert n_blobs == 4
        with pytest.raises(NotFound):
            src.get_manifest(Digest.of(b"nope"))
        with pytest.raises(NotFound):
            src.get_manifest("latest")
        with pytest.raises(NotFound):
            src.open_blob(Descriptor("x", Digest.of(b"missing"), 7))

    # and a full round trip: skopeo's dir -> Ferry's dir -> skopeo
    with DirSource(str(d)) as rsrc, DirDestination(str(tmp_path / "again")) as rdst:
        copy(rsrc, rdst, all_images=True)
    assert tree(tmp_path / "again") == tree(d)


def test_dir_destination_refuses_foreign_content(tmp_path: Path, peer_src: dict[str, str]) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "important.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="not a containers image directory"):
        DirDestination(str(junk))
    assert tree(junk) == {"important.txt": b"keep me"}
    # skopeo refuses too
    assert skopeo("copy", peer_src["v2s2"], f"dir:{junk}", check=False).returncode != 0

    wrong_version = tmp_path / "wrongv"
    wrong_version.mkdir()
    (wrong_version / "version").write_text("Directory Transport Version: 1.0\n")
    with pytest.raises(InvalidInput):
        DirDestination(str(wrong_version))

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        DirDestination(str(afile))
    assert afile.read_text() == "x"


def test_dir_destination_replaces_previous_image(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle]
) -> None:
    d = tmp_path / "d"
    skopeo("copy", peer_src["oci"], f"dir:{d}")
    old = tree(d)
    (d / "signature-1").write_bytes(b"old signature")
    dst = DirDestination(str(d))
    with dst:
        copy(MemorySource(images["v2s2"]), dst)
    new = tree(d)
    expected = {"version", "manifest.json", *(dg.hex for dg in images["v2s2"].blobs)}
    assert set(new) == expected
    old_blobs = set(old) - {"version", "manifest.json"}
    assert old_blobs and not old_blobs & set(new)  # every blob of the previous image is gone
    assert inspect_raw(f"dir:{d}") == images["v2s2"].manifest


def test_dir_close_without_commit_leaves_previous_image(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle]
) -> None:
    d = tmp_path / "d"
    skopeo("copy", peer_src["oci"], f"dir:{d}")
    before = tree(d)
    b = images["v2s2"]
    man = json.loads(b.manifest)
    dst = DirDestination(str(d))
    with dst:
        desc = Descriptor.from_json(man["layers"][0])
        dst.put_blob(desc, [b.blobs[desc.digest]])
        assert dst.blob_exists(desc)
        dst.put_manifest(b.manifest, b.media_type)
        # no commit
    assert tree(d) == before
    assert sorted(os.listdir(d)) == sorted(before)  # staging directory removed too

    fresh = tmp_path / "new" / "deeper"
    dst = DirDestination(str(fresh))
    with dst:
        desc = Descriptor.from_json(man["config"])
        dst.put_blob(desc, [b.blobs[desc.digest]])
    assert not (tmp_path / "new").exists()


def test_dir_commit_without_manifest_fails(tmp_path: Path) -> None:
    with DirDestination(str(tmp_path / "d")) as dst, pytest.raises(ManifestError):
        dst.commit()
    assert not (tmp_path / "d").exists()


def test_dir_put_blob_verifies(tmp_path: Path) -> None:
    data = b"hello world" * 1000
    good = Descriptor(MediaType.OCI_LAYER, Digest.of(data), len(data))
    bad_digest = Descriptor(MediaType.OCI_LAYER, Digest.of(b"other"), len(data))
    bad_size = Descriptor(MediaType.OCI_LAYER, Digest.of(data), len(data) - 1)
    dst = DirDestination(str(tmp_path / "d"))
    with dst:
        with pytest.raises(DigestMismatch):
            dst.put_blob(bad_digest, [data[:5000], data[5000:]])
        with pytest.raises(SizeMismatch):
            dst.put_blob(bad_size, [data])
        assert not dst.blob_exists(bad_digest) and not dst.blob_exists(good)
        assert not (tmp_path / "d").exists()  # nothing committed: the image is staged beside it
        staging = [p for p in tmp_path.iterdir()]
        assert len(staging) == 1 and staging[0].name.startswith(".ferry-staging-d-")
        assert list(staging[0].iterdir()) == []  # no temp files
        dst.put_blob(good, iter([data[:3], data[3:]]))
        assert dst.blob_exists(good)
        sha512 = Descriptor(MediaType.OCI_LAYER, Digest.of(data, "sha512"), len(data))
        dst.put_blob(sha512, [data])
        dst.put_manifest(b'{"schemaVersion":2}', MediaType.OCI_MANIFEST)
        with pytest.raises(DigestMismatch):
            dst.put_manifest(b"{}", MediaType.OCI_MANIFEST, Digest.of(b"[]"))
        dst.commit()
    assert (tmp_path / "d" / good.digest.hex).read_bytes() == data
    assert (tmp_path / "d" / sha512.digest.hex).read_bytes() == data  # containers names sha512 blobs by hex too


def test_guess_media_type() -> None:
    assert guess_media_type(b'{"schemaVersion":2,"mediaType":"%s"}' % MediaType.DOCKER_MANIFEST.encode()) == (
        MediaType.DOCKER_MANIFEST
    )
    assert guess_media_type(b'{"schemaVersion":2,"config":{"mediaType":"%s"}}' % b"x/y") == (MediaType.OCI_MANIFEST)
    assert guess_media_type(b'{"schemaVersion":2,"manifests":[{"digest":"x"}]}') == MediaType.OCI_INDEX
    assert guess_media_type(b'{"schemaVersion":1,"signatures":[]}') == MediaType.DOCKER_MANIFEST_V1_SIGNED
    assert guess_media_type(b'{"schemaVersion":1}') == MediaType.DOCKER_MANIFEST_V1
    assert guess_media_type(b"not json") == ""
    # one sniffer for every transport and the registry client: its own field wins (artifacts too), then a
    # specific Content-Type, then the shape
    artifact = "application/vnd.example.artifact.v1+json"
    assert guess_media_type(b'{"schemaVersion":2,"mediaType":"%s"}' % artifact.encode()) == artifact
    assert (
        guess_media_type(b'{"layers":[]}', MediaType.DOCKER_MANIFEST + "; charset=utf-8") == MediaType.DOCKER_MANIFEST
    )
    assert guess_media_type(b'{"schemaVersion":2}', "application/json") == MediaType.OCI_MANIFEST
    assert guess_media_type(b'{"config":{},"layers":[]}') == MediaType.OCI_MANIFEST
    assert guess_media_type(b'{"manifests":[]}') == MediaType.OCI_INDEX
    assert guess_media_type(b'{"x":1}') == "" and guess_media_type(b"[]") == ""
    with pytest.raises(ManifestError, match="m: cannot tell"):
        sniff_media_type(b'{"x":1}', "m")
    with pytest.raises(ManifestError, match=r"malformed manifest \(m\): not valid JSON"):
        sniff_media_type(b"{", "m")
    with pytest.raises(ManifestError, match=r"malformed manifest \(m\): JSON nested too deeply"):
        sniff_media_type(b"[" * 100_000 + b"]" * 100_000, "m")
    assert guess_media_type(b"[" * 100_000 + b"]" * 100_000) == ""


# --------------------------------------------------------------------------------------------------------------------
# docker-archive:


def test_parse_docker_archive_spec() -> None:
    assert parse_docker_archive_spec("a.tar") == ("a.tar", None)
    assert parse_docker_archive_spec("/x/a.tar:busybox:1.36") == ("/x/a.tar", "busybox:1.36")
    assert parse_docker_archive_spec("a.tar:busybox") == ("a.tar", "busybox")
    assert parse_docker_archive_spec("a.tar:@2") == ("a.tar", "@2")
    assert parse_docker_archive_spec("a.tar:localhost:5000/x/y:t") == ("a.tar", "localhost:5000/x/y:t")
    for bad in ["", "a.tar:", "a.tar:@x", "a.tar:@-1", "a.tar:Upper:t", f"a.tar:busybox@{Digest.of(b'')}", ":x"]:
        with pytest.raises(InvalidReference):
            parse_docker_archive_spec(bad)
    with pytest.raises(InvalidReference):
        DockerArchiveDestination("x.tar", "@0")


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("v2s2", "example.com/team/app:1.0"),
        ("oci", None),
        ("weird", "weird"),
        ("v2s2", "busybox:t"),
        ("empty", "empty:0"),
    ],
)
def test_archive_destination_is_byte_identical_to_skopeo(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle], name: str, ref: str | None
) -> None:
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    dst = DockerArchiveDestination(str(ours), ref)
    with dst:
        copy(MemorySource(images[name]), dst)
    suffix = f":{ref}" if ref else ""
    skopeo("copy", peer_src[name], f"docker-archive:{theirs}{suffix}")
    assert ours.read_bytes() == theirs.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ours.tar", "theirs.tar"]  # no staging or temp files left

    with tarfile.open(ours) as tf:
        items = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    config = json.loads(images[name].blobs[Digest.parse(json.loads(images[name].manifest)["config"]["digest"])])
    assert items[0]["Layers"] == [f"{Digest.parse(d).hex}.tar" for d in config["rootfs"]["diff_ids"]]
    info = inspect(f"docker-archive:{ours}")
    assert info["Architecture"] == config["architecture"]
    assert info["Layers"] == config["rootfs"]["diff_ids"]
    skopeo("copy", f"docker-archive:{ours}", f"oci:{tmp_path / 'back'}:t")
    if ref:
        assert inspect(f"docker-archive:{ours}:{ref}")["Layers"] == config["rootfs"]["diff_ids"]


def test_archive_multiarch_source_picks_one_image(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle]
) -> None:
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    dst = DockerArchiveDestination(str(ours), "multi:arm")
    assert dst.supports_index is False
    with dst:
        copy(MemorySource(images["multi"]), dst, platform="linux/arm64")
    skopeo("--override-arch", "arm64", "copy", peer_src["multi"], f"docker-archive:{theirs}:multi:arm")
    assert ours.read_bytes() == theirs.read_bytes()
    assert inspect(f"docker-archive:{ours}")["Architecture"] == "arm64"


@pytest.mark.parametrize(("name", "ref"), [("v2s2", "app:1"), ("weird", None), ("oci", "@0")])
def test_archive_source_reads_skopeo_archive(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle], name: str, ref: str | None
) -> None:
    a = tmp_path / "a.tar"
    skopeo("copy", peer_src[name], f"docker-archive:{a}" + (":app:1" if ref == "app:1" else ""))
    suffix = f":{ref}" if ref else ""
    src = DockerArchiveSource(str(a), ref)
    with src:
        raw, mt = src.get_manifest()
        assert raw == inspect_raw(f"docker-archive:{a}{suffix}")
        assert mt == MediaType.DOCKER_MANIFEST
        assert src.get_manifest(Digest.of(raw))[0] == raw
        man = json.loads(raw)
        config = read_blob(src, Descriptor.from_json(man["config"]))
        assert sha256(config) == man["config"]["digest"]
        assert [x["digest"] for x in man["layers"]] == json.loads(config)["rootfs"]["diff_ids"]
        for layer in man["layers"]:
            data = read_blob(src, Descriptor.from_json(layer))
            assert sha256(data) == layer["digest"] and len(data) == layer["size"]
        with pytest.raises(NotFound):
            src.open_blob(Descriptor("x", Digest.of(b"unknown"), 1))
        if ref == "app:1":
            assert src.repo_tags == ["docker.io/library/app:1"]

    # round trip through Ferry's own archive writer gives skopeo's bytes back
    with DockerArchiveSource(str(a), ref) as rsrc, DockerArchiveDestination(str(tmp_path / "b.tar"), "app:1") as rdst:
        copy(rsrc, rdst)
    skopeo("copy", f"docker-archive:{a}{suffix}", f"docker-archive:{tmp_path / 'c.tar'}:app:1")
    assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "c.tar").read_bytes()


def _docker_save_archive(path: Path, images: list[tuple[list[str], Bundle]], *, gzip_layers: bool) -> None:
    """A ``docker save``-style tarball: layers as ``<id>/layer.tar`` (optionally gzip-compressed members)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        items = []
        done: set[str] = set()
        for tags, b in images:
            man = json.loads(b.manifest)
            config = b.blobs[Digest.parse(man["config"]["digest"])]
            cfg_name = f"{Digest.of(config).hex}.json"
            if cfg_name not in done:
                add(cfg_name, config)
            layers = []
            for i, ly in enumerate(man["layers"]):
                blob = b.blobs[Digest.parse(ly["digest"])]
                plain = gzip.decompress(blob)
                member = gzip.compress(plain, mtime=0) if gzip_layers and i == 0 else plain
                name = f"{hashlib.sha256(member).hexdigest()}/layer.tar"
                if name not in done:
                    add(name, member)
                    done.add(name)
                layers.append(name)
            items.append({"Config": cfg_name, "RepoTags": tags, "Layers": layers})
        add("manifest.json", json.dumps(items).encode())


@pytest.mark.parametrize("gzip_layers", [False, True])
def test_archive_source_docker_save_layout(tmp_path: Path, images: dict[str, Bundle], gzip_layers: bool) -> None:
    a = tmp_path / "save.tar"
    _docker_save_archive(
        a, [(["one:1"], images["v2s2"]), (["two:2", "quay.io/x/two:b"], images["weird"])], gzip_layers=gzip_layers
    )

    with pytest.raises(InvalidInput, match="expected 1 item, got 2"):
        DockerArchiveSource(str(a)).get_manifest()
    assert skopeo("inspect", "--raw", f"docker-archive:{a}", check=False).returncode != 0
    with pytest.raises(NotFound):
        DockerArchiveSource(str(a), "three:3")
    with pytest.raises(NotFound):
        DockerArchiveSource(str(a), "@2")

    for ref in ["one:1", "@1", "two:2", "quay.io/x/two:b", "docker.io/library/one:1"]:
        src = DockerArchiveSource(str(a), ref)
        with src:
            raw, _ = src.get_manifest()
            assert raw == inspect_raw(f"docker-archive:{a}:{ref}"), ref
            man = json.loads(raw)
            for layer in man["layers"]:
                data = read_blob(src, Descriptor.from_json(layer))
                assert sha256(data) == layer["digest"] and len(data) == layer["size"]

    # Ferry reads it, writes dir:, skopeo verifies everything
    with DockerArchiveSource(str(a), "two:2") as rsrc, DirDestination(str(tmp_path / "d")) as rdst:
        copy(rsrc, rdst)
    skopeo("copy", f"dir:{tmp_path / 'd'}", f"oci:{tmp_path / 'o'}:t")
    assert inspect_raw(f"dir:{tmp_path / 'd'}") == inspect_raw(f"docker-archive:{a}:two:2")


def test_archive_source_whole_file_gzipped(tmp_path: Path, peer_src: dict[str, str]) -> None:
    a = tmp_path / "a.tar"
    skopeo("copy", peer_src["v2s2"], f"docker-archive:{a}")
    expected = inspect_raw(f"docker-archive:{a}")
    bz = tmp_path / "a.tar.bz2"
    bz.write_bytes(bz2.compress(a.read_bytes()))
    assert inspect_raw(f"docker-archive:{bz}") == expected  # skopeo 1.9 reads bzip2 archives (gzip ones fail there)
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(a.read_bytes()))
    for packed in (gz, bz):
        src = DockerArchiveSource(str(packed))
        with src:
            raw, _ = src.get_manifest()
            assert raw == expected
            for layer in json.loads(raw)["layers"]:
                assert sha256(read_blob(src, Descriptor.from_json(layer))) == layer["digest"]
            tmp = src._tmp
            assert tmp is not None and os.path.exists(tmp)
        assert not os.path.exists(tmp)


def test_archive_destination_refuses_existing_archive(
    tmp_path: Path, peer_src: dict[str, str], images: dict[str, Bundle]
) -> None:
    a = tmp_path / "a.tar"
    skopeo("copy", peer_src["v2s2"], f"docker-archive:{a}")
    before = a.read_bytes()
    with pytest.raises(InvalidInput, match="doesn't support modifying existing images"):
        DockerArchiveDestination(str(a))
    assert skopeo("copy", peer_src["oci"], f"docker-archive:{a}", check=False).returncode != 0
    assert a.read_bytes() == before

    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with DockerArchiveDestination(str(empty)) as dst:  # an empty file is fine (and untouched without commit)
        b = images["v2s2"]
        man = json.loads(b.manifest)
        desc = Descriptor.from_json(man["layers"][0])
        dst.put_blob(desc, [b.blobs[desc.digest]])
        assert dst.blob_exists(desc)
    assert empty.read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "empty.tar"]

    with pytest.raises(InvalidInput):
        DockerArchiveDestination(str(tmp_path))  # a directory
    with pytest.raises(InvalidInput):
        DockerArchiveDestination(str(tmp_path / "missing" / "x.tar"))


def test_archive_destination_close_without_commit(tmp_path: Path, images: dict[str, Bundle]) -> None:
    a = tmp_path / "a.tar"
    b = images["oci"]
    dst = DockerArchiveDestination(str(a), "x:y")
    with dst:
        man = json.loads(b.manifest)
        for d in [*man["layers"], man["config"]]:
            desc = Descriptor.from_json(d)
            dst.put_blob(desc, [b.blobs[desc.digest]])
        dst.put_manifest(b.manifest, b.media_type)
    assert not a.exists()
    assert os.listdir(tmp_path) == []


def test_archive_put_blob_verifies_and_decompresses(tmp_path: Path) -> None:
    layer = make_layer("verify", 5000)
    a = tmp_path / "a.tar"
    dst = DockerArchiveDestination(str(a))
    with dst:
        bad = Descriptor(MediaType.OCI_LAYER_GZIP, Digest.of(b"x"), layer.size)
        with pytest.raises(DigestMismatch):
            dst.put_blob(bad, [layer.data[:100], layer.data[100:]])
        corrupt = layer.data[:50] + bytes(len(layer.data) - 50)
        with pytest.raises(DigestMismatch):  # corrupt gzip: the digest verdict wins over the gzip error
            dst.put_blob(bad, [corrupt[:100], corrupt[100:]])
        with pytest.raises(IntegrityError, match="invalid gzip"):  # digest right, data not gzip after all
            dst.put_blob(Descriptor(MediaType.OCI_LAYER_GZIP, Digest.of(corrupt), len(corrupt)), [corrupt])
        truncated = layer.data[:-20]
        with pytest.raises(IntegrityError):
            dst.put_blob(Descriptor(MediaType.OCI_LAYER_GZIP, Digest.of(truncated), len(truncated)), [truncated])
        assert not dst.blob_exists(bad) and not dst.blob_exists(layer.descriptor())
        staging = [p for p in tmp_path.iterdir()]
        assert len(staging) == 1 and list(staging[0].iterdir()) == []

        zstd = b"\x28\xb5\x2f\xfd" + b"rest of frame"
        with pytest.raises(IntegrityError, match="invalid zstd"):
            dst.put_blob(Descriptor(MediaType.OCI_LAYER_ZSTD, Digest.of(zstd), len(zstd)), [zstd])
        # a real zstd layer is stored as its plain tar, like a gzip one
        import zstandard

        packed = zstandard.ZstdCompressor().compress(layer.uncompressed())
        zdesc = Descriptor(MediaType.OCI_LAYER_ZSTD, Digest.of(packed), len(packed))
        dst.put_blob(zdesc, [packed[:100], packed[100:]])
        assert dst.blob_exists(zdesc)

        dst.put_blob(layer.descriptor(), [layer.data[i : i + 333] for i in range(0, len(layer.data), 333)])
        assert dst.blob_exists(layer.descriptor())
        plain = Descriptor(MediaType.OCI_LAYER, layer.diff_id, len(layer.uncompressed()))
        assert dst.blob_exists(plain)  # known under its diff_id as well
        assert dst.diff_ids[layer.digest] == (layer.diff_id, len(layer.uncompressed()))
        staged = [p for p in staging[0].iterdir()]
        assert [p.name for p in staged] == [layer.diff_id.hex]
        assert staged[0].read_bytes() == layer.uncompressed()
        with pytest.raises(ManifestError):
            dst.commit()  # no manifest yet
    assert not a.exists()


def test_archive_multi_member_gzip_and_other_compressions(tmp_path: Path) -> None:
    import lzma

    layer = make_layer("multi-member", 4000, compressed=False)
    raw = layer.data
    variants = {
        "two-member gzip": gzip.compress(raw[:1000], mtime=0) + gzip.compress(raw[1000:], mtime=0),
        "bzip2": bz2.compress(raw),
        "xz": lzma.compress(raw),
        "plain": raw,
    }
    for what, blob in variants.items():
        dst = DockerArchiveDestination(str(tmp_path / "x.tar"))
        with dst:
            dst.put_blob(Descriptor(MediaType.OCI_LAYER_GZIP, Digest.of(blob), len(blob)), [blob])
            assert dst.diff_ids[Digest.of(blob)] == (layer.diff_id, len(raw)), what

    # highly compressible: a few KiB of input expand to many output pieces (output is capped per call)
    zeros = bytes(9 << 20) + b"end"
    for name, packed in {
        "gzip": gzip.compress(zeros, mtime=0),
        "bzip2": bz2.compress(zeros),
        "xz": lzma.compress(zeros),
    }.items():
        pieces = [packed[i : i + 1000] for i in range(0, len(packed), 1000)]
        for chunking in ([packed], pieces):
            dst = DockerArchiveDestination(str(tmp_path / "x.tar"))
            with dst:
                dst.put_blob(Descriptor(MediaType.OCI_LAYER_GZIP, Digest.of(packed), len(packed)), chunking)
                assert dst.diff_ids[Digest.of(packed)] == (Digest.of(zeros), len(zeros)), name


def test_archive_put_manifest_checks(tmp_path: Path, images: dict[str, Bundle]) -> None:
    b = images["v2s2"]
    man = json.loads(b.manifest)
    dst = DockerArchiveDestination(str(tmp_path / "a.tar"))
    with dst:
        with pytest.raises(ManifestError, match="not put"):
            dst.put_manifest(b.manifest, b.media_type)
        for d in [*man["layers"], man["config"]]:
            desc = Descriptor.from_json(d)
            dst.put_blob(desc, [b.blobs[desc.digest]])
        multi = images["multi"]
        with pytest.raises(ManifestError, match="manifest lists"):
            dst.put_manifest(multi.manifest, multi.media_type)
        swapped = dict(man, layers=list(reversed(man["layers"])))
        with pytest.raises(ManifestError, match="diff_ids"):
            dst.put_manifest(json.dumps(swapped).encode(), b.media_type)
        dst.put_manifest(b.manifest, b.media_type)
        dst.put_manifest(b.manifest, b.media_type, Digest.of(b.manifest))  # same image again: fine
        other = images["weird"]
        oman = json.loads(other.manifest)
        for d in [*oman["layers"], oman["config"]]:
            desc = Descriptor.from_json(d)
            dst.put_blob(desc, [other.blobs[desc.digest]])
        with pytest.raises(ManifestError, match="one image"):
            dst.put_manifest(other.manifest, other.media_type)
        dst.commit()
    assert inspect_raw(f"docker-archive:{tmp_path / 'a.tar'}")


def test_archive_streams_large_layers(tmp_path: Path) -> None:
    """A 48 MiB layer goes through put_blob, commit and open_blob without being held in memory."""
    big = make_stream_layer("archive-big", 48 << 20)

    def gz_chunks() -> Iterator[bytes]:
        co = __import__("zlib").compressobj(1, 8, 31)
        for chunk in big.chunks(1 << 20):
            if out := co.compress(chunk):
                yield out
        yield co.flush()

    h = hashlib.sha256()
    size = 0
    for c in gz_chunks():
        h.update(c)
        size += len(c)
    gz_desc = Descriptor(MediaType.OCI_LAYER_GZIP, Digest("sha256", h.hexdigest()), size)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [str(big.diff_id)]}}
    ).encode()
    cdesc = Descriptor(MediaType.OCI_CONFIG, Digest.of(config), len(config))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MediaType.OCI_MANIFEST.value,
            "config": {"mediaType": cdesc.media_type, "digest": str(cdesc.digest), "size": cdesc.size},
            "layers": [{"mediaType": gz_desc.media_type, "digest": str(gz_desc.digest), "size": gz_desc.size}],
        }
    ).encode()
    a = tmp_path / "big.tar"
    tracemalloc.start()
    try:
        dst = DockerArchiveDestination(str(a), "big:1")
        with dst:
            dst.put_blob(gz_desc, gz_chunks())
            dst.put_blob(cdesc, [config])
            dst.put_manifest(manifest, MediaType.OCI_MANIFEST)
            dst.commit()
        src = DockerArchiveSource(str(a))
        with src:
            raw, _ = src.get_manifest()
            layer = Descriptor.from_json(json.loads(raw)["layers"][0])
            h2 = hashlib.sha256()
            with src.open_blob(layer) as chunks:
                for c in chunks:
                    h2.update(c)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert layer.digest == big.diff_id and layer.size == big.size
    assert "sha256:" + h2.hexdigest() == str(big.diff_id)
    assert peak < 16 << 20, f"peak traced memory {peak} bytes"
    assert inspect(f"docker-archive:{a}")["Layers"] == [str(big.diff_id)]


def test_archive_destination_writes_into_a_fifo(tmp_path: Path, images: dict[str, Bundle]) -> None:
    """A non-regular target (pipe, /dev/stdout) is written in place, not replaced by a rename."""
    import threading

    regular = tmp_path / "regular.tar"
    with DockerArchiveDestination(str(regular), "app:1") as dst:
        copy(MemorySource(images["v2s2"]), dst)

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    try:
        with DockerArchiveDestination(str(fifo), "app:1") as dst:
            assert sorted(os.listdir(tmp_path)) == ["pipe", "regular.tar"]  # staging lives elsewhere
            copy(MemorySource(images["v2s2"]), dst)
    finally:
        if reader.is_alive():  # unblock the reader if the destination never opened the pipe
            with open(fifo, "wb"):
                pass
        reader.join(10)
    assert got == [regular.read_bytes()]
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
