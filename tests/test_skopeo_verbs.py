"""skopeo's deprecated ``layers`` verb, ``login``/``logout --compat-auth-file`` (current skopeo) and
``--sign-by-sq-fingerprint``, each run with ferry and, where skopeo 1.9 has it, with skopeo side by side."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.harness.images import build_image, push_image
from tests.harness.peer import SKOPEO_BIN, peer_env
from tests.harness.servers import RegistryServer
from tests.test_skopeo_flags import FERRY_BIN, ferry, skopeo, tree


@pytest.fixture(scope="module")
def layered(registry: RegistryServer) -> str:
    repo = f"test/layers-{secrets.token_hex(3)}"
    # a layer twice: skopeo fetches each digest once
    img = build_image("layers", layers=[300, 200, 300], fmt="v2s2")
    push_image(registry.url, repo, "v1", img)
    return f"docker://{registry.host}/{repo}:v1"


def run_in(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, env=peer_env())


@pytest.mark.parametrize("which", ["all", "one"])
def test_layers_like_skopeo(layered: str, tmp_path: Path, which: str) -> None:
    wanted: list[str] = []
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", layered).stdout)
    if which == "one":
        wanted = [manifest["layers"][1]["digest"].removeprefix("sha256:")]  # skopeo adds the sha256: itself
    f = run_in(tmp_path / "ferry", [FERRY_BIN, "layers", "--tls-verify=false", layered, *wanted])
    s = run_in(tmp_path / "skopeo", [SKOPEO_BIN, "layers", "--tls-verify=false", layered, *wanted])
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert f.stdout == s.stdout == ""
    assert s.stderr.startswith("DEPRECATED: skopeo layers is deprecated in favor of skopeo copy")
    assert f.stderr == "DEPRECATED: ferry layers is deprecated in favor of ferry copy\n"
    (fdir,) = (tmp_path / "ferry").iterdir()
    (sdir,) = (tmp_path / "skopeo").iterdir()
    assert fdir.name.startswith("layers-") and sdir.name.startswith("layers-")
    assert tree(fdir) == tree(sdir)
    distinct = len({layer["digest"] for layer in manifest["layers"]})
    assert len(tree(fdir)) == (distinct + 3 if which == "all" else 3)  # layers (+ config), manifest, version


def test_layers_errors(layered: str, tmp_path: Path) -> None:
    run = run_in(tmp_path, [FERRY_BIN, "layers", "--tls-verify=false", layered, "sha256:" + "0" * 64])
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith("Error: sha256:000")
    run = run_in(tmp_path, [FERRY_BIN, "layers", "--tls-verify=false", layered, "nothex"])
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith("Error: ")
    run = run_in(tmp_path, [FERRY_BIN, "layers"])
    assert run.returncode == 1 and "IMAGE-NAME" in run.stderr
    assert not list(tmp_path.glob("layers-*"))  # nothing left behind by a failed run


def test_compat_auth_file(auth_registry: RegistryServer, tmp_path: Path) -> None:
    """``login --compat-auth-file``: Docker's config.json format (other keys kept); skopeo reads it back."""
    assert auth_registry.username and auth_registry.password
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {}, "psFormat": "table"}))
    user, password = auth_registry.username, auth_registry.password
    login = ["login", "--tls-verify=false", "--compat-auth-file", str(config)]
    run = ferry(*login, "-u", user, "-p", password, auth_registry.host)
    assert run.returncode == 0, run.stderr
    data = json.loads(config.read_text())
    assert data["psFormat"] == "table"
    assert base64.b64decode(data["auths"][auth_registry.host]["auth"]).decode() == f"{user}:{password}"
    run = ferry("login", "--compat-auth-file", str(config), "--get-login", auth_registry.host)
    assert run.returncode == 0 and run.stdout == f"{user}\n"
    # the file works as skopeo's --authfile
    name = f"docker://{auth_registry.host}/test/none"
    probe = skopeo("list-tags", "--tls-verify=false", "--authfile", str(config), name, check=False)
    assert "unauthorized" not in probe.stderr.lower(), probe.stderr
    # containers/common's refusals, one line each
    for argv, needle in [
        (["login", "--authfile", str(tmp_path / "a.json"), "--compat-auth-file", str(config), "-u", "u", "-p", "p"],
         "can not be set simultaneously"),
        (["login", "--compat-auth-file", str(config), "-u", "u", "-p", "p", f"{auth_registry.host}/ns"],
         "Credentials cannot be recorded in Docker-compatible format with namespaced key"),
    ]:  # fmt: skip
        run = ferry(*argv, *([auth_registry.host] if "--authfile" in argv else []))
        assert run.returncode == 1 and needle in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    run = ferry("logout", "--compat-auth-file", str(config), auth_registry.host)
    assert run.returncode == 0, run.stderr
    assert json.loads(config.read_text()) == {"auths": {}, "psFormat": "table"}


@pytest.mark.parametrize("verb", ["copy", "sync"])
def test_sign_by_sq_fingerprint_is_refused_by_name(tmp_path: Path, verb: str) -> None:
    args = ["--src", "dir", "--dest", "dir", str(tmp_path), str(tmp_path / "o")] if verb == "sync" else [
        f"dir:{tmp_path}", f"dir:{tmp_path}/o"]  # fmt: skip
    run = ferry("--insecure-policy", verb, "--sign-by-sq-fingerprint", "ABCD", *args)
    assert run.returncode == 1
    assert run.stderr.startswith("Error: --sign-by-sq-fingerprint: ") and len(run.stderr.splitlines()) == 1


def test_inspect_manifest_digest_sha512(layered: str) -> None:
    """Current skopeo's ``inspect --manifest-digest sha512``: the Digest of the same manifest, by sha512."""
    import hashlib

    raw = skopeo("inspect", "--raw", "--tls-verify=false", layered).stdout.encode()
    run = ferry("inspect", "--manifest-digest", "sha512", "--tls-verify=false", "-f", "{{.Digest}}", layered)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"sha512:{hashlib.sha512(raw).hexdigest()}\n"
    run = ferry("inspect", "--manifest-digest=sha256", "--tls-verify=false", "-f", "{{.Digest}}", layered)
    assert run.stdout == f"sha256:{hashlib.sha256(raw).hexdigest()}\n"
    run = ferry("inspect", "--manifest-digest", "md5", "--tls-verify=false", layered)
    assert run.returncode == 1 and run.stderr.startswith("Error: ") and "--manifest-digest" in run.stderr


def test_global_require_signed(layered: str, tmp_path: Path) -> None:
    """Current skopeo's global ``--require-signed``: an unsigned image is refused even by an accept-anything policy."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    dest = f"dir:{tmp_path}/out"
    run = ferry("--policy", str(policy), "--require-signed", "copy", "--src-tls-verify=false", layered, dest)
    assert run.returncode == 1 and run.stderr.startswith("Error: ") and not (tmp_path / "out").exists(), run.stderr
    run = ferry("--policy", str(policy), "copy", "--src-tls-verify=false", layered, dest)
    assert run.returncode == 0, run.stderr
