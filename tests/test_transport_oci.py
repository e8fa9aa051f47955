"""The ``oci:`` and ``oci-archive:`` transports, checked against skopeo 1.9 in both directions.

Images come from the seeded builders in tests/harness/images.py. They are written with Ferry's
destinations through a tiny copy loop (blobs, then child manifests by digest, then the top manifest
by tag) and read back by skopeo (``inspect --raw`` must return our bytes; ``copy`` verifies every
blob); in the other direction skopeo writes layouts and archives and Ferry's sources must read the
same manifest bytes and blobs whose digests match.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import Image, Index, build_image, build_multiarch, make_stream_layer
from tests.harness.peer import skopeo
from worker.engine.transports.base import ImageDestination, ImageSource, StoredManifest
from worker.engine.transports.oci_archive import OCIArchiveDestination, OCIArchiveSource, parse_oci_archive_spec
from worker.engine.transports.oci_layout import (
    CHUNK_SIZE,
    REF_NAME_ANNOTATION,
    OCILayoutDestination,
    OCILayoutSource,
    parse_oci_spec,
)
from worker.registry import (
    Descriptor,
    Digest,
    DigestMismatch,
    InvalidInput,
    InvalidReference,
    MediaType,
    NotFound,
    SizeMismatch,
)

INDEX_TYPES = (MediaType.OCI_INDEX, MediaType.DOCKER_MANIFEST_LIST)


# --------------------------------------------------------------------------------------------------------------------
# helpers


class BuiltSource(ImageSource):
    """An ImageSource over harness-built images (manifests by digest, blobs streamed in small chunks)."""

    def __init__(self, top: Image | Index) -> None:
        self.top = top
        self.manifests: dict[Digest, tuple[bytes, str]] = {top.digest: (top.manifest, top.media_type)}
        self.blobs: dict[Digest, Any] = {}
        images = top.children if isinstance(top, Index) else (top,)
        for img in images:
            self.manifests[img.digest] = (img.manifest, img.media_type)
            for digest, _size, blob in img.blobs():
                self.blobs[digest] = blob

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        if isinstance(ref, Digest):
            if ref not in self.manifests:
                raise NotFound(str(ref))
            return StoredManifest(*self.manifests[ref])
        return StoredManifest(self.top.manifest, self.top.media_type)

    @contextmanager
    def _open(self, desc: Descriptor) -> Iterator[Iterator[bytes]]:
        blob = self.blobs[desc.digest]
        if isinstance(blob, bytes):
            yield iter([blob[i : i + 700] for i in range(0, len(blob), 700)])
        else:
            yield blob.chunks(300_000)

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        return self._open(desc)


def copy_tree(src: ImageSource, dst: ImageDestination, raw: bytes, media_type: str) -> None:
    """Put everything ``raw`` points to (blobs, child manifests by digest), not ``raw`` itself."""
    obj = json.loads(raw)
    if media_type in INDEX_TYPES:
        for entry in obj["manifests"]:
            child = Descriptor.from_json(entry)
            craw, cmt = src.get_manifest(child.digest)
            copy_tree(src, dst, craw, cmt)
            dst.put_manifest(craw, cmt, child.digest)
        return
    for entry in [obj["config"], *obj["layers"]]:
        desc = Descriptor.from_json(entry)
        if not dst.blob_exists(desc):
            with src.open_blob(desc) as chunks:
                dst.put_blob(desc, chunks)


def copy_image(src: ImageSource, dst: ImageDestination, tag: str | None = None) -> bytes:
    raw, media_type = src.get_manifest(None)
    copy_tree(src, dst, raw, media_type)
    dst.put_manifest(raw, media_type, tag)
    dst.commit()
    return raw


def write_with_ferry(top: Image | Index, path: Path, ref: str | None) -> None:
    with OCILayoutDestination(str(path), ref) as dst:
        copy_image(BuiltSource(top), dst)


def write_by_hand(path: Path, entries: list[tuple[Image | Index, str | None]]) -> None:
    """An OCI layout written without any Ferry code (for the skopeo -> Ferry direction)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(digest: Digest, data: bytes) -> None:
        (blobs / digest.hex).write_bytes(data)

    index: list[dict[str, Any]] = []
    for top, name in entries:
        put(top.digest, top.manifest)
        for img in top.children if isinstance(top, Index) else (top,):
            put(img.digest, img.manifest)
            for digest, _size, blob in img.blobs():
                put(digest, blob if isinstance(blob, bytes) else b"".join(blob.chunks()))
        entry: dict[str, Any] = {"mediaType": top.media_type, "digest": str(top.digest), "size": top.size}
        if name:
            entry["annotations"] = {REF_NAME_ANNOTATION: name}
        index.append(entry)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": index}))


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def read_all(src: ImageSource, desc: Descriptor) -> bytes:
    with src.open_blob(desc) as chunks:
        return b"".join(chunks)


def check_source_reads(src: ImageSource, top: Image | Index) -> None:
    """Every manifest byte-identical, every blob's sha256 equal to its descriptor's."""
    raw, media_type = src.get_manifest(None)
    assert raw == top.manifest
    assert media_type == top.media_type
    for img in top.children if isinstance(top, Index) else (top,):
        craw, cmt = src.get_manifest(img.digest)
        assert craw == img.manifest
        assert cmt == img.media_type
        for desc in (img.config_descriptor(), *img.layer_descriptors):
            data = read_all(src, desc)
            assert len(data) == desc.size
            assert "sha256:" + hashlib.sha256(data).hexdigest() == str(desc.digest)


@pytest.fixture(scope="module")
def single() -> Image:
    return build_image("oci-transport-single", layers=[4096, 1500])


@pytest.fixture(scope="module")
def multi() -> Index:
    return build_multiarch("oci-transport-multi", platforms=("linux/amd64", "linux/arm64"), layers=[2048])


# --------------------------------------------------------------------------------------------------------------------
# reference parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/tmp/lay", ("/tmp/lay", None)),
        ("/tmp/lay:app", ("/tmp/lay", "app")),
        ("/tmp/lay:app:1.0", ("/tmp/lay", "app:1.0")),  # split at the first colon, refs may contain ':'
        ("rel/dir:example.com/team/app:v1", ("rel/dir", "example.com/team/app:v1")),
        ("/tmp/lay:", ("/tmp/lay", None)),
    ],
)
def test_parse_oci_spec(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_oci_spec(text) == expected
    assert parse_oci_archive_spec(text) == expected


@pytest.mark.parametrize("text", [":app", "", "/tmp/lay:bad ref", "/tmp/lay:@0", "/tmp/lay:-x", "/tmp/lay:a//b"])
def test_parse_oci_spec_rejects(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_oci_spec(text)


def test_ref_grammar_matches_skopeo(tmp_path: Path, single: Image) -> None:
    """A ref we accept is one skopeo accepts, and the one we reject skopeo rejects too."""
    write_with_ferry(single, tmp_path / "lay", "a.b_c-d:e@f+g/h--i")
    out = skopeo("inspect", "--raw", f"oci:{tmp_path / 'lay'}:a.b_c-d:e@f+g/h--i")
    assert out.stdout.encode() == single.manifest
    bad = skopeo("inspect", "--raw", f"oci:{tmp_path / 'lay'}:a..b", check=False)
    assert bad.returncode != 0
    assert "Invalid image" in bad.stderr
    with pytest.raises(InvalidReference):
        parse_oci_spec(f"{tmp_path / 'lay'}:a..b")


# --------------------------------------------------------------------------------------------------------------------
# Ferry writes, skopeo reads


def test_single_image_written_by_ferry_is_read_by_skopeo(tmp_path: Path, single: Image) -> None:
    lay = tmp_path / "lay"
    write_with_ferry(single, lay, "app")

    assert json.loads((lay / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((lay / "index.json").read_bytes())
    assert index == {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MediaType.OCI_MANIFEST,
                "digest": str(single.digest),
                "size": single.size,
                "annotations": {REF_NAME_ANNOTATION: "app"},
            }
        ],
    }
    assert skopeo("inspect", "--raw", f"oci:{lay}:app").stdout.encode() == single.manifest
    cfg = json.loads(skopeo("inspect", "--config", "--raw", f"oci:{lay}:app").stdout)
    assert cfg == single.config_json

    # skopeo copies it (verifying every blob) and writes exactly the layout we wrote.
    other = tmp_path / "other"
    skopeo("copy", f"oci:{lay}:app", f"oci:{other}:app")
    assert files_under(other) == files_under(lay)


def test_multiarch_written_by_ferry_is_read_by_skopeo(tmp_path: Path, multi: Index) -> None:
    lay = tmp_path / "lay"
    write_with_ferry(multi, lay, "multi")

    index = json.loads((lay / "index.json").read_bytes())
    # One entry, for the index; the children are only blobs (as skopeo copy --all writes it).
    assert [(e["mediaType"], e["digest"]) for e in index["manifests"]] == [(MediaType.OCI_INDEX, str(multi.digest))]
    assert skopeo("inspect", "--raw", f"oci:{lay}:multi").stdout.encode() == multi.manifest

    other = tmp_path / "other"
    skopeo("copy", "--all", f"oci:{lay}:multi", f"oci:{other}:multi")
    assert files_under(other) == files_under(lay)
    for child in multi.children:
        assert (other / "blobs" / "sha256" / child.digest.hex).read_bytes() == child.manifest


def test_index_json_updates_match_skopeo(tmp_path: Path, single: Image, multi: Index) -> None:
    """The same sequence of writes gives the same index.json as skopeo (names move; unnamed same-digest reuse)."""
    amd64 = multi.child("linux/amd64")
    src = tmp_path / "src"
    write_by_hand(src, [(multi, "multi"), (single, "single")])

    theirs = tmp_path / "theirs"
    skopeo("copy", "--all", f"oci:{src}:multi", f"oci:{theirs}:x")
    skopeo("copy", f"oci:{src}:single", f"oci:{theirs}:y")
    skopeo("copy", f"oci:{src}:single", f"oci:{theirs}")
    skopeo("copy", "--override-arch", "amd64", f"oci:{src}:multi", f"oci:{theirs}:x")

    ours = tmp_path / "ours"
    for top, ref in ((multi, "x"), (single, "y"), (single, None), (amd64, "x")):
        write_with_ferry(top, ours, ref)

    assert (ours / "index.json").read_bytes() == (theirs / "index.json").read_bytes()
    assert files_under(ours) == files_under(theirs)
    entries = json.loads((ours / "index.json").read_bytes())["manifests"]
    # x moved from the index to the amd64 image; the index and the unnamed copy of single stay, unnamed.
    assert [(e["digest"], e.get("annotations", {}).get(REF_NAME_ANNOTATION)) for e in entries] == [
        (str(multi.digest), None),
        (str(single.digest), "y"),
        (str(single.digest), None),
        (str(amd64.digest), "x"),
    ]


def test_oci_archive_written_by_ferry_is_read_by_skopeo(tmp_path: Path, single: Image, multi: Index) -> None:
    ours = tmp_path / "ours.tar"
    with OCIArchiveDestination(str(ours), "multi", tmp_dir=str(tmp_path)) as dst:
        copy_image(BuiltSource(multi), dst)
    assert skopeo("inspect", "--raw", f"oci-archive:{ours}:multi").stdout.encode() == multi.manifest
    skopeo("copy", "--all", f"oci-archive:{ours}:multi", f"oci:{tmp_path / 'out'}:m")

    # Same member list and order as the archive skopeo writes for the same image.
    theirs = tmp_path / "theirs.tar"
    skopeo("copy", "--all", f"oci:{tmp_path / 'out'}:m", f"oci-archive:{theirs}:multi")
    with tarfile.open(ours) as a, tarfile.open(theirs) as b:
        assert a.getnames() == b.getnames()
        assert a.getnames()[:2] == ["blobs", "blobs/sha256"]
        assert a.getnames()[-2:] == ["index.json", "oci-layout"]
        for ma, mb in zip(a.getmembers(), b.getmembers(), strict=True):
            assert (ma.type, ma.size, ma.uid, ma.gid) == (mb.type, mb.size, mb.uid, mb.gid)
            if ma.isfile():
                fa, fb = a.extractfile(ma), b.extractfile(mb)
                assert fa is not None and fb is not None
                assert fa.read() == fb.read()
    # Like Go's archive/tar: no padding to a 10 KiB record after the two end blocks.
    assert ours.stat().st_size == theirs.stat().st_size
    # No staging directory or temp tar left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.tar", "out", "theirs.tar"]


# --------------------------------------------------------------------------------------------------------------------
# skopeo writes, Ferry reads


def test_ferry_reads_layout_written_by_skopeo(tmp_path: Path, single: Image, multi: Index) -> None:
    src = tmp_path / "src"
    write_by_hand(src, [(multi, "multi"), (single, "single")])
    lay = tmp_path / "lay"
    skopeo("copy", "--all", f"oci:{src}:multi", f"oci:{lay}:multi")
    skopeo("copy", f"oci:{src}:single", f"oci:{lay}:single:1.0")

    with OCILayoutSource(str(lay), "multi") as s:
        check_source_reads(s, multi)
        assert s.list_tags() == ["multi", "single:1.0"]
        assert s.get_manifest("single:1.0") == (single.manifest, MediaType.OCI_MANIFEST)
        head = s.head_manifest(None)
        assert head is not None
        assert (head.digest, head.size) == (multi.digest, multi.size)
    with OCILayoutSource(str(lay), "single:1.0") as s:
        check_source_reads(s, single)


def test_ferry_reads_archive_written_by_skopeo(tmp_path: Path, multi: Index) -> None:
    src = tmp_path / "src"
    write_by_hand(src, [(multi, None)])
    arch = tmp_path / "a.tar"
    skopeo("copy", "--all", f"oci:{src}", f"oci-archive:{arch}:img")
    with OCIArchiveSource(str(arch), "img") as s:
        check_source_reads(s, multi)
        assert s.list_tags() == ["img"]
        with pytest.raises(NotFound, match="nope"):
            s.get_manifest("nope")
    with OCIArchiveSource(str(arch)) as s:  # the only image, no ref needed
        assert s.get_manifest(None)[0] == multi.manifest


def test_v2s2_in_layout_is_converted_by_skopeo_and_read_by_ferry(tmp_path: Path) -> None:
    img = build_image("oci-transport-v2s2", layers=[1024], fmt="v2s2")
    src = tmp_path / "src"
    write_by_hand(src, [(img, "d")])
    with OCILayoutSource(str(src), "d") as s:  # Ferry reads docker manifests in a layout as-is
        check_source_reads(s, img)
    # skopeo 1.9 only resolves a ref name to OCI types (newer containers/image also take Docker
    # ones, as Ferry does), so hand it the layout's only image without a ref.
    assert skopeo("inspect", "--raw", f"oci:{src}:d", check=False).returncode != 0
    lay = tmp_path / "lay"
    skopeo("copy", f"oci:{src}", f"oci:{lay}:o")  # oci: only stores OCI types: skopeo converts
    want = skopeo("inspect", "--raw", f"oci:{lay}:o").stdout.encode()
    with OCILayoutSource(str(lay), "o") as s:
        raw, media_type = s.get_manifest(None)
        assert raw == want
        assert media_type == MediaType.OCI_MANIFEST
        for entry in [json.loads(raw)["config"], *json.loads(raw)["layers"]]:
            desc = Descriptor.from_json(entry)
            assert Digest.of(read_all(s, desc)) == desc.digest


def test_gzip_compressed_archive(tmp_path: Path, single: Image) -> None:
    src = tmp_path / "src"
    write_by_hand(src, [(single, "s")])
    skopeo("copy", f"oci:{src}:s", f"oci-archive:{tmp_path / 'a.tar'}:s")
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    s = OCIArchiveSource(str(tmp_path / "a.tar.gz"), "s", tmp_dir=str(scratch))
    assert len(list(scratch.iterdir())) == 1  # the decompressed tar
    check_source_reads(s, single)
    s.close()
    assert list(scratch.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# source errors


def test_missing_ref_and_ambiguous_layout(tmp_path: Path, single: Image, multi: Index) -> None:
    lay = tmp_path / "lay"
    write_by_hand(lay, [(multi, "multi"), (single, "single")])
    with pytest.raises(NotFound) as exc:
        OCILayoutSource(str(lay), "latest").get_manifest(None)
    assert "'latest'" in str(exc.value) and "multi, single" in str(exc.value)
    with pytest.raises(InvalidInput) as exc2:
        OCILayoutSource(str(lay)).get_manifest(None)
    assert "2 images" in str(exc2.value)
    assert OCILayoutSource(str(lay), "latest").head_manifest(None) is None

    with pytest.raises(NotFound, match=r"index\.json"):
        OCILayoutSource(str(tmp_path / "nowhere"), "x")
    with pytest.raises(NotFound, match="does not exist"):
        OCIArchiveSource(str(tmp_path / "nowhere.tar"), "x")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidInput):
        OCIArchiveSource(str(tmp_path / "junk.tar"))


def test_missing_and_corrupt_blobs(tmp_path: Path, single: Image) -> None:
    lay = tmp_path / "lay"
    write_by_hand(lay, [(single, "s")])
    layer = single.layer_descriptors[0]
    (lay / "blobs" / "sha256" / layer.digest.hex).unlink()
    with OCILayoutSource(str(lay), "s") as s, pytest.raises(NotFound) as exc:
        read_all(s, layer)
    assert str(layer.digest) in str(exc.value)

    (lay / "blobs" / "sha256" / single.digest.hex).write_bytes(single.manifest + b" ")
    with OCILayoutSource(str(lay), "s") as s, pytest.raises(DigestMismatch):
        s.get_manifest(None)


def test_open_blob_streams_in_bounded_chunks(tmp_path: Path) -> None:
    big = make_stream_layer("oci-transport-big", 5 * CHUNK_SIZE + 123)
    img = build_image("oci-transport-bigimg", layers=[big])
    lay = tmp_path / "lay"
    write_with_ferry(img, lay, "big")
    for src in (OCILayoutSource(str(lay), "big"), _archive_of(lay, tmp_path)):
        with src, src.open_blob(big.descriptor()) as chunks:
            h = hashlib.sha256()
            n = 0
            for chunk in chunks:
                assert len(chunk) <= CHUNK_SIZE
                h.update(chunk)
                n += 1
            assert "sha256:" + h.hexdigest() == str(big.digest)
            assert n >= 6


def _archive_of(lay: Path, tmp_path: Path) -> OCIArchiveSource:
    arch = tmp_path / "big.tar"
    # Without the flag skopeo gzips uncompressed layers on the way into oci:/oci-archive:.
    skopeo("copy", "--dest-oci-accept-uncompressed-layers", f"oci:{lay}:big", f"oci-archive:{arch}:big")
    return OCIArchiveSource(str(arch), "big")


# --------------------------------------------------------------------------------------------------------------------
# destination integrity


@pytest.mark.parametrize("bad", ["digest", "size-short", "size-long"])
def test_put_blob_mismatch_commits_nothing(tmp_path: Path, bad: str) -> None:
    lay = tmp_path / "lay"
    data = os.urandom(3 * 1024 * 1024)
    desc = Descriptor(MediaType.OCI_LAYER, Digest.of(data), len(data))
    sent = {
        "digest": data[:-1] + bytes([data[-1] ^ 1]),
        "size-short": data[:-10],
        "size-long": data + b"x",
    }[bad]
    with OCILayoutDestination(str(lay), "x") as dst:
        with pytest.raises(DigestMismatch if bad == "digest" else SizeMismatch):
            dst.put_blob(desc, (sent[i : i + 65536] for i in range(0, len(sent), 65536)))
        assert not dst.blob_exists(desc)
    assert [p for p in (lay / "blobs").rglob("*") if p.is_file()] == []

    with OCILayoutDestination(str(lay), "x") as dst:
        dst.put_blob(desc, iter([data]))
        assert dst.blob_exists(desc)
        assert not dst.blob_exists(Descriptor(desc.media_type, desc.digest, desc.size + 1))
    assert (lay / "blobs" / "sha256" / desc.digest.hex).read_bytes() == data
    assert [p.name for p in (lay / "blobs").iterdir()] == ["sha256"]  # no temp files left


def test_put_manifest_by_digest_checks_and_does_not_touch_index(tmp_path: Path, single: Image) -> None:
    lay = tmp_path / "lay"
    with OCILayoutDestination(str(lay), "x") as dst:
        with pytest.raises(DigestMismatch):
            dst.put_manifest(single.manifest + b"\n", single.media_type, single.digest)
        assert not dst.has_manifest(single.digest)
        dst.put_manifest(single.manifest, single.media_type, single.digest)
        assert dst.has_manifest(single.digest)
        assert dst.head_manifest(None) is None
    assert json.loads((lay / "index.json").read_bytes()) == {"schemaVersion": 2, "manifests": []}


def test_destination_head_manifest(tmp_path: Path, single: Image) -> None:
    lay = tmp_path / "lay"
    write_with_ferry(single, lay, "app")
    with OCILayoutDestination(str(lay), "app") as dst:
        head = dst.head_manifest(None)
        assert head is not None
        assert (head.media_type, head.digest, head.size) == (single.media_type, single.digest, single.size)
        assert dst.head_manifest("other") is None


def test_concurrent_writers_keep_every_entry(tmp_path: Path, single: Image) -> None:
    lay = tmp_path / "lay"
    write_with_ferry(single, lay, "t0")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with OCILayoutDestination(str(lay), f"t{n}") as dst:
                dst.put_manifest(single.manifest, single.media_type, None)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with OCILayoutSource(str(lay), "t5") as s:
        assert sorted(s.list_tags()) == sorted(f"t{n}" for n in range(9))
    assert skopeo("inspect", "--raw", f"oci:{lay}:t7").stdout.encode() == single.manifest


def test_archive_close_without_commit_leaves_existing_archive(tmp_path: Path, single: Image, multi: Index) -> None:
    arch = tmp_path / "a.tar"
    (tmp_path / "stage").mkdir()
    with OCIArchiveDestination(str(arch), "one", tmp_dir=str(tmp_path / "stage")) as dst:
        pass  # close() without commit: nothing created
    assert not arch.exists()
    assert list((tmp_path / "stage").iterdir()) == []

    with OCIArchiveDestination(str(arch), "one", tmp_dir=str(tmp_path / "stage")) as dst:
        copy_image(BuiltSource(single), dst)
    before = arch.read_bytes()

    dst2 = OCIArchiveDestination(str(arch), "two", tmp_dir=str(tmp_path / "stage"))
    copy_tree(BuiltSource(multi), dst2, multi.manifest, multi.media_type)
    dst2.put_manifest(multi.manifest, multi.media_type, None)
    assert list((tmp_path / "stage").iterdir())  # staging in use
    dst2.close()  # no commit
    assert arch.read_bytes() == before
    assert list((tmp_path / "stage").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "stage"]

    # Committing replaces the archive whole (skopeo never merges into an existing archive either).
    with OCIArchiveDestination(str(arch), "two", tmp_dir=str(tmp_path / "stage")) as dst:
        copy_image(BuiltSource(multi), dst)
    with OCIArchiveSource(str(arch)) as s:
        assert s.list_tags() == ["two"]
        check_source_reads(s, multi)


def test_archive_commit_failure_leaves_existing_archive(
    tmp_path: Path, single: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine.transports import oci_archive

    arch = tmp_path / "a.tar"
    arch.write_bytes(b"precious")
    stage = tmp_path / "stage"
    stage.mkdir()

    def failing_tar(root: str, out: Any) -> None:
        out.write(b"half a tar")
        raise OSError("disk full")

    monkeypatch.setattr(oci_archive, "write_layout_tar", failing_tar)
    dst = OCIArchiveDestination(str(arch), "x", tmp_dir=str(stage))
    copy_tree(BuiltSource(single), dst, single.manifest, single.media_type)
    dst.put_manifest(single.manifest, single.media_type, None)
    with pytest.raises(OSError, match="disk full"):
        dst.commit()
    dst.close()
    assert arch.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "stage"]
    assert list(stage.iterdir()) == []
