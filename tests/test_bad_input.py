"""Bad input gives one clear ``Error:`` line through the real CLI, never a traceback or "internal error" (issue #8).

Malformed documents are served by the harness's faulty server in front of the real registry (distribution
validates manifests on push, so it cannot hold them); everything else about each run is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.cli import assert_one_error, run_ferry
from tests.harness.faulty import Fault, FaultyServer, answer, serve
from tests.harness.images import build_image, build_multiarch, push_blob, push_image, put_manifest
from tests.harness.servers import RegistryServer
from worker.registry import Digest, MediaType

IMAGE = build_image("bad-input", layers=(200,))
INDEX = build_multiarch("bad-input-index", platforms=["linux/amd64", "linux/arm64"], layers=(100,))
OCI, OCI_INDEX = MediaType.OCI_MANIFEST.value, MediaType.OCI_INDEX.value


def _image(**changes: Any) -> bytes:
    return json.dumps({**IMAGE.manifest_json, **changes}).encode()


CONFIG = IMAGE.manifest_json["config"]
MALFORMED: dict[str, tuple[bytes, str, str]] = {
    "null-layer": (_image(layers=[None]), OCI, "layers[0]: expected an object, got null"),
    "layers-string": (_image(layers="sha256:0"), OCI, "layers: expected a list, got a string"),
    "annotations-list": (_image(annotations=["a"]), OCI, "annotations: expected an object of strings, got a list"),
    "size-1e400": (
        _image(config={**CONFIG, "size": 7e77}).replace(b"7e+77", b"1e400"),
        OCI,
        "config.size: expected a whole number",
    ),
    "null-index-entry": (
        json.dumps({**INDEX.manifest_json, "manifests": [None]}).encode(),
        OCI_INDEX,
        "manifests[0]: expected an object, got null",
    ),
    "deep-nesting": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, OCI, "nested too deeply"),
    "config-list": (_image(config=[]), OCI, "config: expected an object, got a list"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_one_error_line(
    case: str, faulty: FaultyServer, unique_repo: str, tmp_path: Path
) -> None:
    raw, media_type, message = MALFORMED[case]
    faulty.add(Fault(f"/v2/{unique_repo}/manifests/t$", serve(raw, media_type), times=None))
    out = tmp_path / "out"
    proc = run_ferry(
        "copy", "-q", "--src-tls-verify=false", f"docker://{faulty.host}/{unique_repo}:t", f"oci:{out}:x",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert_one_error(proc, "malformed manifest", message)
    assert not (out / "index.json").exists() or not json.loads((out / "index.json").read_text())["manifests"]

    proc = run_ferry("inspect", "--tls-verify=false", f"docker://{faulty.host}/{unique_repo}:t", tmp_path=tmp_path)
    assert_one_error(proc, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "x", "tags": [1, "v1"]}, "tags[0]: expected a string, got a number"),
        (["v1"], "expected an object, got a list"),
        ({"tags": "v1"}, "tags: expected a list, got a string"),
    ],
)
def test_malformed_tag_list(body: Any, message: str, faulty: FaultyServer, unique_repo: str, tmp_path: Path) -> None:
    faulty.add(Fault(f"/v2/{unique_repo}/tags/list", serve(body), times=None))
    proc = run_ferry("list-tags", "--tls-verify=false", f"docker://{faulty.host}/{unique_repo}", tmp_path=tmp_path)
    assert_one_error(proc, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"token": "t", "expires_in": "soon"}, "expires_in: expected a finite number >= 0, got a string"),
        ({"token": "t", "expires_in": []}, "expires_in: expected a finite number >= 0, got a list"),
        ({"token": None}, "no token"),
    ],
)
def test_malformed_token_answer(
    body: Any, message: str, faulty: FaultyServer, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    push_image(registry.url, unique_repo, "t", IMAGE)
    challenge = {"WWW-Authenticate": f'Bearer realm="http://{faulty.host}/token",service="faulty"'}
    faulty.add(Fault(r"^/v2/", answer(401, "UNAUTHORIZED", challenge), times=None))
    faulty.add(Fault(r"^/token", serve(body), times=None))
    proc = run_ferry("inspect", "--tls-verify=false", f"docker://{faulty.host}/{unique_repo}:t", tmp_path=tmp_path)
    assert_one_error(proc, "token answer", message)


def test_malformed_config_blob(registry: RegistryServer, unique_repo: str, tmp_path: Path) -> None:
    """distribution stores any config blob: a real registry can hold this one."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": ["not", "a", "map"]}}).encode()
    digest = Digest.of(config)
    push_blob(registry.url, unique_repo, digest, config, len(config))
    for d, size, blob in IMAGE.blobs()[:-1]:
        push_blob(registry.url, unique_repo, d, blob if isinstance(blob, bytes) else blob.chunks(), size)
    manifest = _image(config={**CONFIG, "digest": str(digest), "size": len(config)})
    put_manifest(registry.url, unique_repo, "t", manifest, OCI)
    for extra in ((), ("--config",)):
        proc = run_ferry("inspect", *extra, "--tls-verify=false", f"docker://{registry.host}/{unique_repo}:t",
                         tmp_path=tmp_path)  # fmt: skip
        assert_one_error(proc, "config.Labels: expected an object of strings, got a list")


def test_sync_keep_going_fails_only_the_malformed_image(
    faulty: FaultyServer, registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    good = {tag: build_image(f"keep-going-{tag}") for tag in ("good1", "good2", "bad")}
    for tag, image in good.items():
        push_image(registry.url, unique_repo, tag, image)
    # the registry holds a valid "bad" (HEAD answers from it); a GET of it brings a manifest with a null layer
    raw, media_type, message = MALFORMED["null-layer"]
    faulty.add(Fault(f"/v2/{unique_repo}/manifests/bad$", serve(raw, media_type), method="GET", times=None))
    dest = f"{registry2.host}/{unique_repo}-mirror"
    proc = run_ferry(
        "sync", "--src", "docker", "--dest", "docker", "--src-tls-verify=false", "--dest-tls-verify=false",
        "--keep-going", f"{faulty.host}/{unique_repo}", dest, tmp_path=tmp_path,
    )  # fmt: skip
    line = assert_one_error(proc, f"{unique_repo}:bad", message)
    assert "good" not in line
    name = f"{unique_repo}-mirror/{unique_repo.rsplit('/', 1)[1]}"  # skopeo's naming: DEST/last-path-element
    tags = httpx.get(f"{registry2.url}/v2/{name}/tags/list").json()["tags"]
    assert sorted(tags) == ["good1", "good2"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("copy", "--src-creds=", "docker://127.0.0.1:1/a:b", "dir:{out}"), "--src-creds"),
        (("copy", "--dest-creds", "", "docker://127.0.0.1:1/a:b", "dir:{out}"), "--dest-creds"),
        (("copy", "--screds=", "docker://127.0.0.1:1/a:b", "dir:{out}"), "--src-creds"),
        (("inspect", "--creds", "", "docker://127.0.0.1:1/a:b"), "--creds"),
        (("list-tags", "--creds=", "docker://127.0.0.1:1/a"), "--creds"),
        (("sync", "--src", "docker", "--dest", "dir", "--src-creds=", "127.0.0.1:1/a", "{out}"), "--src-creds"),
        (("inspect", "--username", "", "--password", "x", "docker://127.0.0.1:1/a:b"), "--username"),
    ],
)
def test_empty_credentials_are_refused(args: tuple[str, ...], flag: str, tmp_path: Path) -> None:
    """skopeo: "credentials can't be empty"; an empty value must never mean anonymous (127.0.0.1:1 is never asked)."""
    out = tmp_path / "out"
    proc = run_ferry(*(a.format(out=out) for a in args), tmp_path=tmp_path)
    assert_one_error(proc, f"{flag}: ", "can't be empty")
    assert "refused" not in proc.stderr
    assert not out.exists()


def test_deeply_nested_auth_file_is_one_error(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    auth.write_bytes(b'{"auths":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    proc = run_ferry("inspect", "--authfile", str(auth), "docker://127.0.0.1:1/a:b", tmp_path=tmp_path)
    assert_one_error(proc, str(auth), "nested too deeply")
