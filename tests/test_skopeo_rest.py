"""The rest of skopeo's surface, each run with ferry and skopeo 1.9 side by side: docker-archive tags
(``--additional-tag``, ``list-tags``), ``sync --dest dir`` over an existing directory, zstd layers, and
the flags Ferry refuses by name rather than accept and ignore.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tarfile
from pathlib import Path

import pytest

from tests.harness.images import build_image, push_image
from tests.harness.servers import RegistryServer
from tests.test_skopeo_flags import both, ferry, skopeo


def member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


@pytest.fixture(scope="module")
def image_dir(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = f"test/rest-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v1", build_image("rest", layers=[400, 200], fmt="v2s2"))
    out = tmp_path_factory.mktemp("rest") / "img"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo}:v1", f"dir:{out}")
    return out


def test_additional_tag_reaches_repotags(image_dir: Path, tmp_path: Path) -> None:
    f, s = both(
        "copy",
        "--additional-tag",
        "example.com/x/y:2",
        "--additional-tag",
        "other:3",
        f"dir:{image_dir}",
        f"docker-archive:{tmp_path}/{{tool}}.tar:foo:1",
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    ferry_tar, skopeo_tar = tmp_path / "ferry.tar", tmp_path / "skopeo.tar"
    tags = json.loads(member(ferry_tar, "manifest.json"))[0]["RepoTags"]
    assert tags == ["docker.io/library/foo:1", "example.com/x/y:2", "docker.io/library/other:3"]
    assert member(ferry_tar, "manifest.json") == member(skopeo_tar, "manifest.json")
    assert member(ferry_tar, "repositories") == member(skopeo_tar, "repositories")
    assert hashlib.sha256(ferry_tar.read_bytes()).digest() == hashlib.sha256(skopeo_tar.read_bytes()).digest()
    # list-tags reads them back, as skopeo does
    f, s = both("list-tags", f"docker-archive:{ferry_tar}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert f.stdout == s.stdout
    assert json.loads(f.stdout)["Tags"] == tags


def test_bare_additional_tag_is_refused_like_skopeo(image_dir: Path, tmp_path: Path) -> None:
    f, s = both("copy", "--additional-tag", "foo", f"dir:{image_dir}", f"docker-archive:{tmp_path}/{{tool}}.tar")
    assert f.returncode == s.returncode == 1
    assert "additional-tag 'foo' must be a tagged reference" in s.stderr
    assert f.stderr == "Error: additional-tag 'foo' must be a tagged reference\n"
    assert not (tmp_path / "ferry.tar").exists()


def test_list_tags_untagged_archive(image_dir: Path, tmp_path: Path) -> None:
    assert ferry("copy", f"dir:{image_dir}", f"docker-archive:{tmp_path}/plain.tar").returncode == 0
    f, s = both("list-tags", f"docker-archive:{tmp_path}/plain.tar")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert f.stdout == s.stdout and json.loads(f.stdout) == {"Tags": ["@0"]}


def test_sync_refuses_to_overwrite_a_directory(registry: RegistryServer, image_dir: Path, tmp_path: Path) -> None:
    repo = f"test/rest-sync-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v1", build_image("rest-sync", layers=[100]))
    for tool in ("ferry", "skopeo"):
        (tmp_path / tool / repo.rsplit("/", 1)[1] / "..").resolve().mkdir(parents=True, exist_ok=True)
        existing = tmp_path / tool / f"{repo.rsplit('/', 1)[1]}:v1"
        existing.mkdir()
        (existing / "keep").write_text("mine")
    args = ["sync", "--src", "docker", "--dest", "dir", "--src-tls-verify=false", f"{registry.host}/{repo}"]
    f, s = both(*args, f"{tmp_path}/{{tool}}")
    assert f.returncode == s.returncode == 1
    want = f'Refusing to overwrite destination directory \\"{tmp_path}/skopeo/{repo.rsplit("/", 1)[1]}:v1\\"'
    assert want in s.stderr
    assert f.stderr.strip().endswith(
        f'Refusing to overwrite destination directory "{tmp_path}/ferry/{repo.rsplit("/", 1)[1]}:v1"'
    )
    assert (tmp_path / "ferry" / f"{repo.rsplit('/', 1)[1]}:v1" / "keep").read_text() == "mine"


def test_zstd_layer_is_readable(image_dir: Path, tmp_path: Path) -> None:
    """A dir: image with a zstd layer goes into a docker-archive (which stores plain tars)."""
    import shutil

    import zstandard

    src = tmp_path / "zimg"
    shutil.copytree(image_dir, src)
    manifest = json.loads((src / "manifest.json").read_text())
    layer = manifest["layers"][0]
    old = src / layer["digest"].split(":", 1)[1]
    import gzip

    packed = zstandard.ZstdCompressor().compress(gzip.decompress(old.read_bytes()))
    digest = hashlib.sha256(packed).hexdigest()
    old.unlink()
    (src / digest).write_bytes(packed)
    layer.update(digest=f"sha256:{digest}", size=len(packed), mediaType="application/vnd.oci.image.layer.v1.tar+zstd")
    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    manifest["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    for other in manifest["layers"][1:]:
        other["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    (src / "manifest.json").write_text(json.dumps(manifest))
    # skopeo 1.9 refuses zstd for docker-archive; the same image with its original gzip layer is the reference
    run = ferry("copy", f"dir:{src}", f"docker-archive:{tmp_path}/ferry.tar:z:1")
    assert run.returncode == 0, run.stderr
    skopeo("copy", f"dir:{image_dir}", f"docker-archive:{tmp_path}/skopeo.tar:z:1")
    assert member(tmp_path / "ferry.tar", "manifest.json") == member(tmp_path / "skopeo.tar", "manifest.json")
    plain = json.loads(member(tmp_path / "ferry.tar", "manifest.json"))[0]["Layers"][0]
    assert member(tmp_path / "ferry.tar", plain) == member(tmp_path / "skopeo.tar", plain)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--format", "v2s1"], "schema 1"),
        (["--encryption-key", "jwe:/k.pem"], "encrypt"),
        (["--decryption-key", "/k.pem"], "decrypt"),
    ],
)
def test_refused_flags_name_the_feature(image_dir: Path, tmp_path: Path, flags: list[str], needle: str) -> None:
    run = ferry("copy", *flags, f"dir:{image_dir}", f"dir:{tmp_path}/out")
    assert run.returncode == 1
    assert run.stderr.startswith("Error: ") and needle in run.stderr and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_other_transports_refused_by_name() -> None:
    run = ferry("copy", "sif:/x.sif", "dir:/y")
    assert run.returncode == 1 and "sif: transport (Singularity image files)" in run.stderr


def plain_layer_image(image_dir: Path, dest: Path) -> tuple[str, bytes]:
    """``image_dir`` with its first layer stored as a plain tar (as ``--dest-decompress`` would)."""
    import gzip
    import shutil

    shutil.copytree(image_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    layer = manifest["layers"][0]
    old = dest / layer["digest"].split(":", 1)[1]
    plain = gzip.decompress(old.read_bytes())
    old.unlink()
    digest = hashlib.sha256(plain).hexdigest()
    (dest / digest).write_bytes(plain)
    layer.update(digest=f"sha256:{digest}", size=len(plain), mediaType="application/vnd.docker.image.rootfs.diff.tar")
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return f"sha256:{digest}", plain


def test_plain_layer_is_gzipped_for_a_registry(registry: RegistryServer, image_dir: Path, tmp_path: Path) -> None:
    import gzip

    plain_digest, plain = plain_layer_image(image_dir, tmp_path / "plain")
    repo = f"test/rest-gzip-{secrets.token_hex(3)}"
    f, s = both(
        "copy", "--dest-tls-verify=false", f"dir:{tmp_path}/plain", f"docker://{registry.host}/{repo}-{{tool}}:v1"
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    raws = {
        tool: json.loads(
            skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repo}-{tool}:v1").stdout
        )
        for tool in ("ferry", "skopeo")
    }
    for tool, m in raws.items():
        assert [x["mediaType"] for x in m["layers"]] == ["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 2, tool
        assert m["layers"][0]["digest"] != plain_digest
    # same config (diff_ids unchanged), same second layer; the gzip bytes differ between implementations
    assert raws["ferry"]["config"] == raws["skopeo"]["config"]
    assert raws["ferry"]["layers"][1] == raws["skopeo"]["layers"][1]
    # skopeo reads Ferry's push back (verifying every blob) and the layer unpacks to the same tar
    back = tmp_path / "back"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo}-ferry:v1", f"dir:{back}")
    gz = back / raws["ferry"]["layers"][0]["digest"].split(":", 1)[1]
    assert gzip.decompress(gz.read_bytes()) == plain
    # deterministic: a second copy finds the image already there
    again = ferry(
        "copy", "--dest-tls-verify=false", f"dir:{tmp_path}/plain", f"docker://{registry.host}/{repo}-ferry:v1"
    )
    assert again.returncode == 0 and "1 up to date" in again.stderr
    # --preserve-digests: the plain layer is pushed as it is (containers/image changes no layer then), both tools
    f, s = both(
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"dir:{tmp_path}/plain",
        f"docker://{registry.host}/{repo}-p-{{tool}}:v1",
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    for tool in ("ferry", "skopeo"):
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repo}-p-{tool}:v1").stdout
        assert json.loads(raw)["layers"][0] == {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar",
            "size": len(plain),
            "digest": plain_digest,
        }, tool
    # to a local layout the plain layer stays plain (skopeo: dir keeps, Ferry: every local transport keeps)
    f, s = both("copy", f"dir:{tmp_path}/plain", f"dir:{tmp_path}/local-{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0)
    assert (tmp_path / "local-ferry" / plain_digest.split(":", 1)[1]).read_bytes() == plain


@pytest.mark.parametrize(("fmt", "target"), [("oci", "v2s2")])
def test_conversion_serialises_like_skopeo(registry: RegistryServer, tmp_path: Path, fmt: str, target: str) -> None:
    """A converted manifest has skopeo's bytes (containers/image's field order), so the same digest.

    (v2s2 -> OCI differs on purpose: skopeo also re-serialises the config blob as an OCI config, Ferry keeps
    the config blob, so the config digest and hence the manifest differ.)
    """
    repo = f"test/rest-conv-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v1", build_image(f"rest-conv-{fmt}", layers=[300, 100], fmt=fmt))  # type: ignore[arg-type]
    src = f"docker://{registry.host}/{repo}:v1"
    f, s = both("copy", "--src-tls-verify=false", "--format", target, src, f"dir:{tmp_path}/{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert (tmp_path / "ferry" / "manifest.json").read_bytes() == (tmp_path / "skopeo" / "manifest.json").read_bytes()


def test_index_conversion_serialises_like_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    from tests.harness.images import build_multiarch, push_index

    repo = f"test/rest-iconv-{secrets.token_hex(3)}"
    idx = build_multiarch("rest-iconv", platforms=["linux/amd64", "linux/arm64/v8"], layers=[200], fmt="oci")
    push_index(registry.url, repo, "v1", idx)
    src = f"docker://{registry.host}/{repo}:v1"
    dest = f"docker://{registry.host}/{repo}-{{tool}}:v2s2"
    f, s = both("copy", "--all", "--format", "v2s2", "--src-tls-verify=false", "--dest-tls-verify=false", src, dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    raws = [
        skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repo}-{t}:v2s2").stdout
        for t in ("ferry", "skopeo")
    ]
    assert raws[0] == raws[1]
