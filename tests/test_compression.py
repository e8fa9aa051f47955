"""Layer compression flags (skopeo's ``--dest-compress-format``, ``--dest-compress-level``,
``--dest-force-compress-format``, ``--dest-compress``, ``--dest-decompress``), each run with ferry and
Debian's skopeo 1.9 side by side where skopeo has the flag: exit codes, the destination's media types,
layer counts and the uncompressed content (diff_ids) are compared. Compressed digests differ between the two
tools (Go's pgzip and klauspost zstd vs zlib and libzstd), so they are never compared with skopeo's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.harness.images import Image, build_image, build_index, push_image, push_index
from tests.harness.peer import skopeo
from tests.harness.servers import RegistryServer
from tests.test_distributed import (  # noqa: F401 (the Celery fixtures)
    Workers,
    dist_dir,
    producer_env,
    queue,
    worker_auth_file,
    worker_pool,
    workers,
)
from tests.test_distributed import ferry as ferry_env
from tests.test_skopeo_flags import both, ferry
from worker.engine.compression import (
    CompressionOptions,
    engine,
    gzip_stream,
    measure,
    plan_layer,
    transform,
    zstd_stream,
)
from worker.registry import Descriptor, Digest, InvalidInput

INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")
GZIP_V2S2 = "application/vnd.docker.image.rootfs.diff.tar.gzip"
PLAIN_V2S2 = "application/vnd.docker.image.rootfs.diff.tar"
ZSTD_OCI = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def unpack(data: bytes) -> bytes:
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pull_dir(ref: str, out: Path) -> dict[str, Any]:
    """The image at ``ref`` as a dir: (skopeo keeps layers as they are); its manifest."""
    skopeo("copy", "--src-tls-verify=false", ref, f"dir:{out}")
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return manifest


def blob(image: Path, digest: str) -> bytes:
    return (image / digest.split(":", 1)[1]).read_bytes()


def content(image: Path, manifest: dict[str, Any]) -> list[str]:
    """The uncompressed digest of every layer, checked against the config's diff_ids."""
    config = json.loads(blob(image, manifest["config"]["digest"]))
    out = [sha(unpack(blob(image, layer["digest"]))) for layer in manifest["layers"]]
    assert out == config["rootfs"]["diff_ids"]
    return out


@pytest.fixture(scope="module")
def gz_image(registry: RegistryServer) -> str:
    """A Docker v2s2 image with two gzip layers in ``registry``."""
    repo = f"test/comp-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v1", build_image(f"comp-{repo}", layers=[3000, 700], fmt="v2s2"))
    return f"docker://{registry.host}/{repo}:v1"


# -- units ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["gzip:6", "gzip:1", "zstd:3", "zstd:19", "plain"])
def test_transform_is_deterministic_whatever_the_chunking(op: str) -> None:
    """The planner's measuring pass and the copy's pass see other chunk sizes: same bytes, same digest."""
    data = b"".join(hashlib.sha256(str(i).encode()).digest() * (i % 7 + 1) for i in range(20000))
    src = gzip.compress(data)
    one = b"".join(transform([src], op, "x"))
    many = b"".join(transform([src[i : i + 977] for i in range(0, len(src), 977)], op, "x"))
    assert one == many
    assert unpack(one) == data
    assert measure(transform(iter([src]), op, "x")) == (Digest.parse(sha(one)), len(one))
    if op.startswith("zstd"):
        assert b"".join(zstd_stream([data], int(op[5:]))) == one
    if op.startswith("gzip"):
        assert b"".join(gzip_stream([data], int(op[5:]))) == one


def test_another_compressor_refuses_the_step() -> None:
    """A step measured with another library (or version) would push bytes its digest does not match: refused."""
    assert b"".join(transform([b"x" * 1000], f"gzip:6@{engine('gzip')}", "blob x"))
    with pytest.raises(InvalidInput, match=r"blob x: planned with gzip from zlib 0\.0, but this process has"):
        b"".join(transform([b"x" * 1000], "gzip:6@zlib 0.0", "blob x"))


def test_plan_layer_follows_containers_image() -> None:
    gz = Descriptor(GZIP_V2S2, Digest.of(b"a"), 1)
    plain = Descriptor(PLAIN_V2S2, Digest.of(b"b"), 1)
    zst = Descriptor(ZSTD_OCI, Digest.of(b"c"), 1)
    foreign = Descriptor("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Digest.of(b"d"), 1)
    default = CompressionOptions()
    zstd = CompressionOptions.parse("zstd", None)
    # a registry: plain layers gzipped by default, compressed ones kept unless another format is asked for
    assert plan_layer(plain, "compress", default) is not None
    assert plan_layer(plain, "compress", default).op == f"gzip:6@{engine('gzip')}"  # type: ignore[union-attr]
    assert plan_layer(gz, "compress", default) is None
    change = plan_layer(gz, "compress", zstd)
    assert change is not None and change.op == f"zstd:3@{engine('zstd')}" and change.media_type == ZSTD_OCI
    assert plan_layer(zst, "compress", zstd) is None
    assert plan_layer(foreign, "compress", zstd) is None
    # dir --dest-decompress; preserve touches nothing
    change = plan_layer(zst, "decompress", default)
    assert change is not None and change.op == "plain" and change.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert plan_layer(plain, "decompress", default) is None
    assert plan_layer(gz, "preserve", zstd) is None
    assert CompressionOptions.parse("gzip", "1").level == 1
    with pytest.raises(InvalidInput):
        CompressionOptions.parse("zstd", "0")


# -- bad values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle", "skopeo_fails"),
    [
        (["--dest-compress-format", "lz4"], "--dest-compress-format 'lz4'", True),
        (["--dest-compress-level", "99"], "--dest-compress-level '99'", False),
        (["--dest-compress-format", "zstd", "--dest-compress-level", "x"], "--dest-compress-level 'x'", True),
        (["--dest-compress-format", "zstd", "--dest-compress-level", "20"], "zstd takes a level from 1 to 19", False),
        (["--dest-compress-format", "zstd:chunked"], "'zstd:chunked': not supported", False),
        (["--dest-force-compress-format"], "--dest-force-compress-format needs", None),
        (["--dest-compress", "--dest-decompress"], "cannot be used together", None),
    ],
)
def test_bad_values_are_one_line_and_write_nothing(
    registry: RegistryServer, gz_image: str, tmp_path: Path, flags: list[str], needle: str, skopeo_fails: bool | None
) -> None:
    repo = gz_image.rsplit(":", 1)[0].replace("test/comp-", "test/bad-")
    dest = f"docker://{registry.host}/{repo.rsplit('/', 1)[-1]}-{secrets.token_hex(2)}:v1"
    run = ferry("copy", *INSECURE, *flags, gz_image, dest)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("Error: ") and needle in run.stderr and len(run.stderr.splitlines()) == 1
    tags = ferry("list-tags", "--tls-verify=false", dest.rsplit(":", 1)[0])
    assert '"v1"' not in tags.stdout
    run = ferry("copy", "--src-tls-verify=false", *flags, gz_image, f"dir:{tmp_path}/out")
    assert run.returncode == 1 and needle in run.stderr and not (tmp_path / "out").exists()
    if skopeo_fails is not None:
        # skopeo 1.9 fails too (a gzip level out of range only once it compresses something); its zstd:chunked
        # builds the table of contents, which Ferry refuses
        s = skopeo("copy", *INSECURE, *flags, gz_image, f"dir:{tmp_path}/s", check=False)
        assert (s.returncode != 0) == skopeo_fails, s.stderr


# -- registry to registry --------------------------------------------------------------------------------------------


def test_zstd_registry_to_registry_like_skopeo(
    registry: RegistryServer, registry2: RegistryServer, gz_image: str, tmp_path: Path
) -> None:
    """gzip layers recompressed to zstd; v2s2 has no zstd type, so the manifest becomes OCI (both tools)."""
    repo = f"test/zstd-{secrets.token_hex(3)}"
    dest = f"docker://{registry2.host}/{repo}-{{tool}}:v1"
    f, s = both("copy", *INSECURE, "--dest-compress-format", "zstd", gz_image, dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    source = pull_dir(gz_image, tmp_path / "src")
    src_content = content(tmp_path / "src", source)
    out: dict[str, dict[str, Any]] = {}
    for tool in ("ferry", "skopeo"):
        m = out[tool] = pull_dir(dest.replace("{tool}", tool), tmp_path / tool)
        assert m["mediaType"] == OCI_MANIFEST, tool
        assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI] * 2, tool
        assert all(blob(tmp_path / tool, x["digest"]).startswith(b"\x28\xb5\x2f\xfd") for x in m["layers"])
        assert content(tmp_path / tool, m) == src_content, tool
    # libzstd and klauspost's zstd make other bytes: the layer digests differ, the layer count does not
    assert len(out["ferry"]["layers"]) == len(out["skopeo"]["layers"])
    assert out["ferry"]["layers"] != out["skopeo"]["layers"]
    # deterministic: the same copy again finds the image up to date
    again = ferry("copy", *INSECURE, "--dest-compress-format", "zstd", gz_image, dest.replace("{tool}", "ferry"))
    assert again.returncode == 0 and "1 up to date" in again.stderr, again.stderr
    # a level changes the bytes, not the content
    lvl = ferry(
        "copy", *INSECURE, "--dest-compress-format", "zstd", "--dest-compress-level", "19", gz_image,
        f"docker://{registry2.host}/{repo}-l19:v1",
    )  # fmt: skip
    assert lvl.returncode == 0, lvl.stderr
    m19 = pull_dir(f"docker://{registry2.host}/{repo}-l19:v1", tmp_path / "l19")
    assert content(tmp_path / "l19", m19) == src_content
    assert [x["digest"] for x in m19["layers"]] != [x["digest"] for x in out["ferry"]["layers"]]
    # --format v2s2 cannot name zstd layers: both tools fail; Ferry before writing anything
    f, s = both(
        "copy", *INSECURE, "--format", "v2s2", "--dest-compress-format", "zstd", gz_image,
        f"docker://{registry2.host}/{repo}-v2s2-{{tool}}:v1",
    )  # fmt: skip
    assert f.returncode == 1 and s.returncode != 0, (f.stderr, s.stderr)
    assert len(f.stderr.splitlines()) == 1 and "--format oci" in f.stderr
    assert "v1" not in ferry("list-tags", "--tls-verify=false", f"docker://{registry2.host}/{repo}-v2s2-ferry").stdout
    # --preserve-digests: Ferry refuses the asked-for change before writing (skopeo changes nothing silently)
    run = ferry(
        "copy", *INSECURE, "--preserve-digests", "--dest-compress-format", "zstd", gz_image,
        f"docker://{registry2.host}/{repo}-p:v1",
    )  # fmt: skip
    assert run.returncode == 1 and "--preserve-digests" in run.stderr and len(run.stderr.splitlines()) == 1


def test_gzip_to_gzip_is_byte_for_byte(registry: RegistryServer, registry2: RegistryServer, gz_image: str) -> None:
    """Asking for the format the layers already have changes nothing (same manifest digest, both tools)."""
    repo = f"test/same-{secrets.token_hex(3)}"
    dest = f"docker://{registry2.host}/{repo}-{{tool}}:v1"
    f, s = both("copy", *INSECURE, "--dest-compress-format", "gzip", gz_image, dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    digests = {
        tool: skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}", dest.replace("{tool}", tool)).stdout
        for tool in ("ferry", "skopeo")
    }
    source = skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}", gz_image).stdout
    assert digests["ferry"] == digests["skopeo"] == source


def test_force_compress_format(
    registry: RegistryServer, registry2: RegistryServer, gz_image: str, tmp_path: Path
) -> None:
    """Without --dest-force-compress-format a layer the destination repository holds is reused as it is
    (skopeo 1.9 too); with it, every layer is recompressed (skopeo 1.9 has no such flag)."""
    repo = f"test/force-{secrets.token_hex(3)}"
    for tool in ("ferry", "skopeo"):
        pre = ferry("copy", *INSECURE, gz_image, f"docker://{registry2.host}/{repo}-{tool}:gz")
        assert pre.returncode == 0, pre.stderr
    f, s = both(
        "copy", *INSECURE, "--dest-compress-format", "zstd", gz_image, f"docker://{registry2.host}/{repo}-{{tool}}:z"
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    for tool in ("ferry", "skopeo"):
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry2.host}/{repo}-{tool}:z").stdout
        assert [x["mediaType"] for x in json.loads(raw)["layers"]] == [GZIP_V2S2] * 2, tool
    forced = ferry(
        "copy", *INSECURE, "--dest-compress-format", "zstd", "--dest-force-compress-format", gz_image,
        f"docker://{registry2.host}/{repo}-ferry:f",
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    m = pull_dir(f"docker://{registry2.host}/{repo}-ferry:f", tmp_path / "f")
    assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI] * 2
    assert content(tmp_path / "f", m) == content(tmp_path / "f", m)
    s = skopeo("copy", "--dest-force-compress-format", gz_image, f"dir:{tmp_path}/s", check=False)
    assert s.returncode != 0 and "unknown flag" in s.stderr


# -- dir: ------------------------------------------------------------------------------------------------------------


def test_dir_decompress_then_compress_like_skopeo(gz_image: str, tmp_path: Path) -> None:
    f, s = both("copy", "--src-tls-verify=false", "--dest-decompress", gz_image, f"dir:{tmp_path}/plain-{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    plain = {
        tool: json.loads((tmp_path / f"plain-{tool}" / "manifest.json").read_text()) for tool in ("ferry", "skopeo")
    }
    for tool, m in plain.items():
        assert [x["mediaType"] for x in m["layers"]] == [PLAIN_V2S2] * 2, tool
    # plain tars have one digest whoever writes them: the same layers and config, byte for byte
    assert plain["ferry"]["layers"] == plain["skopeo"]["layers"]
    assert plain["ferry"]["config"] == plain["skopeo"]["config"]
    for layer in plain["ferry"]["layers"]:
        assert blob(tmp_path / "plain-ferry", layer["digest"]) == blob(tmp_path / "plain-skopeo", layer["digest"])
    diff_ids = content(tmp_path / "plain-ferry", plain["ferry"])
    assert [x["digest"] for x in plain["ferry"]["layers"]] == diff_ids
    # and --dest-compress gzips them again
    f, s = both("copy", "--dest-compress", f"dir:{tmp_path}/plain-ferry", f"dir:{tmp_path}/gz-{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    for tool in ("ferry", "skopeo"):
        m = json.loads((tmp_path / f"gz-{tool}" / "manifest.json").read_text())
        assert [x["mediaType"] for x in m["layers"]] == [GZIP_V2S2] * 2, tool
        assert content(tmp_path / f"gz-{tool}", m) == diff_ids, tool
    # --dest-compress-format zstd into dir: with --dest-compress: Ferry converts v2s2 -> OCI as current
    # containers/image does (and skopeo 1.9 does for a registry); skopeo 1.9 fails for dir: (no other type to try)
    f, s = both(
        "copy", "--dest-compress", "--dest-compress-format", "zstd", f"dir:{tmp_path}/plain-ferry",
        f"dir:{tmp_path}/z-{{tool}}",
    )  # fmt: skip
    assert (f.returncode, s.returncode) == (0, 1), (f.stderr, s.stderr)
    assert "zstd compression is not supported for type" in s.stderr
    m = json.loads((tmp_path / "z-ferry" / "manifest.json").read_text())
    assert m["mediaType"] == OCI_MANIFEST
    assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI] * 2
    assert content(tmp_path / "z-ferry", m) == diff_ids


# -- index children --------------------------------------------------------------------------------------------------


def _copy_index_to_zstd_both_ways(
    registry: RegistryServer, registry2: RegistryServer, repo: str, children: list[Image], fmt: str
) -> tuple[str, dict[str, Any]]:
    """Push an index of ``children``, copy it with ``--all --dest-compress-format zstd`` by both tools; the
    destination (with ``{tool}``) and each tool's raw index."""
    push_index(registry.url, repo, "v1", build_index(children, fmt=fmt))
    src = f"docker://{registry.host}/{repo}:v1"
    dest = f"docker://{registry2.host}/{repo}-{{tool}}:v1"
    f, s = both("copy", *INSECURE, "--all", "--dest-compress-format", "zstd", src, dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    indexes = {
        tool: json.loads(skopeo("inspect", "--raw", "--tls-verify=false", dest.replace("{tool}", tool)).stdout)
        for tool in ("ferry", "skopeo")
    }
    return dest, indexes


def test_index_children_recompressed_like_skopeo(
    registry: RegistryServer, registry2: RegistryServer, tmp_path: Path
) -> None:
    repo = f"test/cidx-{secrets.token_hex(3)}"
    children = [
        build_image(f"{repo}-{arch}", layers=[900, 300], fmt="oci", platform=f"linux/{arch}")
        for arch in ("amd64", "arm64")
    ]
    dest, indexes = _copy_index_to_zstd_both_ways(registry, registry2, repo, children, "oci")
    assert indexes["ferry"]["mediaType"] == indexes["skopeo"]["mediaType"]
    assert [c["platform"] for c in indexes["ferry"]["manifests"]] == [
        c["platform"] for c in indexes["skopeo"]["manifests"]
    ]
    for tool, index in indexes.items():
        for n, child in enumerate(index["manifests"]):
            ref = dest.replace("{tool}", tool).rsplit(":", 1)[0] + "@" + child["digest"]
            out = tmp_path / f"{tool}-{n}"
            m = pull_dir(ref, out)
            assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI] * 2, tool
            assert content(out, m) == [str(layer.diff_id) for layer in children[n].layers], tool


# -- --queue ---------------------------------------------------------------------------------------------------------


def test_queue_workers_recompress(
    registry: RegistryServer,
    registry2: RegistryServer,
    gz_image: str,
    workers: Workers,  # noqa: F811
    queue: str,  # noqa: F811
    producer_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The step carries what to do; the workers decompress and compress, the registry verifies the digest."""
    repo = f"test/qz-{secrets.token_hex(3)}"
    dest = f"docker://{registry2.host}/{repo}:v1"
    embedded = f"docker://{registry2.host}/{repo}-here:v1"
    proc = ferry_env(
        "copy", *INSECURE, "--queue", queue, "--wait", "--dest-compress-format", "zstd", gz_image, dest,
        env=producer_env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stderr}\n{workers.logs()}"
    here = ferry("copy", *INSECURE, "--dest-compress-format", "zstd", gz_image, embedded)
    assert here.returncode == 0, here.stderr
    queued = pull_dir(dest, tmp_path / "q")
    local = pull_dir(embedded, tmp_path / "e")
    assert [x["mediaType"] for x in queued["layers"]] == [ZSTD_OCI] * 2
    # the same deterministic transform on a worker and here: the same image
    assert queued == local
    assert content(tmp_path / "q", queued) == content(tmp_path / "e", local)


def test_oci_layout_recompressed_like_skopeo(gz_image: str, tmp_path: Path) -> None:
    f, s = both(
        "copy", "--src-tls-verify=false", "--dest-compress-format", "zstd", gz_image, f"oci:{tmp_path}/{{tool}}:v1"
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    for tool in ("ferry", "skopeo"):
        index = json.loads((tmp_path / tool / "index.json").read_text())
        top = index["manifests"][0]
        assert top["mediaType"] == OCI_MANIFEST, tool
        blobs = tmp_path / tool / "blobs" / "sha256"
        m = json.loads(blob(blobs, top["digest"]))
        assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI] * 2, tool
        assert [sha(unpack(blob(blobs, x["digest"]))) for x in m["layers"]] == json.loads(
            blob(blobs, m["config"]["digest"])
        )["rootfs"]["diff_ids"], tool
    # --dest-oci-accept-uncompressed-layers: oci: keeps the layers as they are (skopeo too)
    f, s = both(
        "copy", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers", "--dest-compress-format", "zstd",
        gz_image, f"oci:{tmp_path}/keep-{{tool}}:v1",
    )  # fmt: skip
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    for tool in ("ferry", "skopeo"):
        index = json.loads((tmp_path / f"keep-{tool}" / "index.json").read_text())
        m = json.loads(blob(tmp_path / f"keep-{tool}" / "blobs" / "sha256", index["manifests"][0]["digest"]))
        assert {x["mediaType"] for x in m["layers"]} <= {GZIP_V2S2, "application/vnd.oci.image.layer.v1.tar+gzip"}, tool


def test_v2s2_list_children_to_zstd_like_skopeo(
    registry: RegistryServer, registry2: RegistryServer, tmp_path: Path
) -> None:
    """A Docker manifest list whose children get zstd layers: the children become OCI images, the list keeps
    its type and lists them as OCI (both tools; containers/image edits the list's entries, it converts no list)."""
    repo = f"test/v2list-{secrets.token_hex(3)}"
    children = [
        build_image(f"{repo}-{arch}", layers=[500], fmt="v2s2", platform=f"linux/{arch}") for arch in ("amd64", "arm64")
    ]
    dest, indexes = _copy_index_to_zstd_both_ways(registry, registry2, repo, children, "v2s2")
    for tool, index in indexes.items():
        assert index["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json", tool
        assert [c["mediaType"] for c in index["manifests"]] == [OCI_MANIFEST] * 2, tool
        assert [c["platform"] for c in index["manifests"]] == [c["platform"] for c in indexes["skopeo"]["manifests"]]
        for n, child in enumerate(index["manifests"]):
            out = tmp_path / f"{tool}-{n}"
            m = pull_dir(dest.replace("{tool}", tool).rsplit(":", 1)[0] + "@" + child["digest"], out)
            assert m["mediaType"] == OCI_MANIFEST, tool
            assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI], tool
            assert content(out, m) == [str(layer.diff_id) for layer in children[n].layers], tool


def test_destination_by_digest_keeps_layers_like_skopeo(
    registry: RegistryServer, registry2: RegistryServer, gz_image: str, tmp_path: Path
) -> None:
    """Writing to ``repo@sha256:…`` changes no layer (containers/image: "Destination specifies a digest"):
    a plain layer goes as it is; a compression flag that would change one is refused before writing."""
    from tests.test_skopeo_rest import plain_layer_image

    pull_dir(gz_image, tmp_path / "src")
    plain_digest, _ = plain_layer_image(tmp_path / "src", tmp_path / "plain")
    manifest_digest = sha((tmp_path / "plain" / "manifest.json").read_bytes())
    repo = f"test/bydigest-{secrets.token_hex(3)}"
    dest = f"docker://{registry2.host}/{repo}-{{tool}}@{manifest_digest}"
    f, s = both("copy", "--dest-tls-verify=false", f"dir:{tmp_path}/plain", dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    for tool in ("ferry", "skopeo"):
        raw = skopeo("inspect", "--raw", "--tls-verify=false", dest.replace("{tool}", tool)).stdout
        assert json.loads(raw)["layers"][0]["digest"] == plain_digest, tool
    run = ferry(
        "copy", "--dest-tls-verify=false", "--dest-compress-format", "zstd", f"dir:{tmp_path}/plain",
        f"docker://{registry2.host}/{repo}-z@{manifest_digest}",
    )  # fmt: skip
    assert run.returncode == 1 and "the destination names a digest" in run.stderr, run.stderr
    assert len(run.stderr.splitlines()) == 1


def test_sync_recompresses(registry: RegistryServer, registry2: RegistryServer, gz_image: str, tmp_path: Path) -> None:
    """``sync`` takes the same flags (a Ferry extension: skopeo sync has no --dest-compress-format)."""
    source = gz_image.removeprefix("docker://")
    ns = f"sync-z-{secrets.token_hex(3)}"
    argv = ["sync", *INSECURE, "--src", "docker", "--dest", "docker", "--dest-compress-format", "zstd", source]
    run = ferry(*argv, f"{registry2.host}/{ns}")
    assert run.returncode == 0, run.stderr
    name = source.rsplit("/", 1)[-1]
    m = pull_dir(f"docker://{registry2.host}/{ns}/{name}", tmp_path / "z")
    assert [x["mediaType"] for x in m["layers"]] == [ZSTD_OCI] * 2
    content(tmp_path / "z", m)
    again = ferry(*argv, f"{registry2.host}/{ns}")
    assert again.returncode == 0 and "1 up to date" in again.stderr, again.stderr
    s = skopeo(*argv, f"{registry2.host}/{ns}-s", check=False)
    assert s.returncode != 0 and "unknown flag: --dest-compress-format" in s.stderr


def test_source_bytes_still_verified(registry2: RegistryServer, gz_image: str, tmp_path: Path) -> None:
    """A recompressed layer whose source bytes do not match their digest fails the copy; no tag is written."""
    m = pull_dir(gz_image, tmp_path / "src")
    path = tmp_path / "src" / m["layers"][0]["digest"].split(":", 1)[1]
    data = bytearray(path.read_bytes())
    data[-12] ^= 0xFF  # inside the deflate data's tail: still a plausible stream, wrong digest
    path.write_bytes(bytes(data))
    dest = f"docker://{registry2.host}/test/verify-z-{secrets.token_hex(3)}:v1"
    run = ferry("copy", "--dest-tls-verify=false", "--dest-compress-format", "zstd", f"dir:{tmp_path}/src", dest)
    assert run.returncode == 1, run.stderr
    assert "digest mismatch for blob " + m["layers"][0]["digest"] in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "v1" not in ferry("list-tags", "--tls-verify=false", dest.rsplit(":", 1)[0]).stdout


def test_local_source_compresses_once_and_cleans_up(registry2: RegistryServer, gz_image: str, tmp_path: Path) -> None:
    """From a local source the planning pass keeps what it made in a staging file, which the copy sends and
    then removes; the result is the image the on-the-fly path makes (the transform is deterministic)."""
    from tests.test_skopeo_rest import plain_layer_image

    pull_dir(gz_image, tmp_path / "src")
    plain_layer_image(tmp_path / "src", tmp_path / "plain")
    staging = tmp_path / "staging"
    staging.mkdir()
    dest = f"docker://{registry2.host}/test/staged-{secrets.token_hex(3)}"
    run = ferry(
        "copy", "--dest-tls-verify=false", "--dest-compress-format", "zstd", f"dir:{tmp_path}/plain", f"{dest}:a",
        env={"FERRY_STAGING_DIR": str(staging)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert list(staging.iterdir()) == []  # every staged layer sent and removed, the directory gone at exit
    # the same image as a registry source makes on the fly (nothing staged there): the plain image pushed as
    # it is (--preserve-digests), then recompressed registry to registry
    kept = ferry("copy", "--dest-tls-verify=false", "--preserve-digests", f"dir:{tmp_path}/plain", f"{dest}-p:a")
    assert kept.returncode == 0, kept.stderr
    again = ferry("copy", *INSECURE, "--dest-compress-format", "zstd", f"{dest}-p:a", f"{dest}-2:a")
    assert again.returncode == 0, again.stderr
    a = skopeo("inspect", "--raw", "--tls-verify=false", f"{dest}:a").stdout
    b = skopeo("inspect", "--raw", "--tls-verify=false", f"{dest}-2:a").stdout
    assert json.loads(a)["layers"] == json.loads(b)["layers"]
    assert [x["mediaType"] for x in json.loads(a)["layers"]] == [ZSTD_OCI] * 2
