"""The read verbs (inspect, list-tags, manifest-digest, delete) and login/logout, side by side with skopeo 1.9
against real registries; and the error experience (one ``Error:`` line, no traceback) of the real binary.

Interop checks run ``producer.cli.main`` in-process (fast); the error checks run the ``ferry`` binary.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer.cli import main
from tests.harness.images import Image, Index, build_image, build_multiarch, push_image, push_index
from tests.harness.peer import skopeo
from tests.harness.servers import RegistryServer, libtrust_key_id
from worker.engine.inspect import host_platform
from worker.registry import Digest

FERRY_BIN = str(Path(sys.executable).with_name("ferry"))
INSECURE = "--tls-verify=false"
#: the summary fields skopeo 1.9 prints (it has no LayersData, and no Variant)
SUMMARY_FIELDS = ["Name", "Digest", "RepoTags", "Created", "DockerVersion", "Labels", "Architecture", "Os", "Layers"]


@pytest.fixture(autouse=True)
def hermetic_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials from the machine running the tests."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "no-such-auth.json"))


@dataclass
class Run:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def ferry(capsysbinary: pytest.CaptureFixture[bytes]) -> Any:
    """Run ``ferry ARGS`` in this process."""

    def run(*args: str) -> Run:
        code = main(list(args))
        out, err = capsysbinary.readouterr()
        return Run(code, out, err.decode())

    return run


def peer(*args: str, check: bool = True) -> str:
    return skopeo(*args, check=check).stdout


# --------------------------------------------------------------------------------------------------------------------
# seeded images


@dataclass
class Seeded:
    kind: str
    ref: str  # docker://HOST/REPO:TAG
    top: Image | Index

    def image(self, arch: str | None = None, variant: str = "") -> Image:
        if isinstance(self.top, Image):
            return self.top
        want = host_platform(arch=arch, variant=variant)
        for child in self.top.children:
            if child.platform.architecture == want.architecture and child.platform.variant == want.variant:
                return child
        raise KeyError(arch)


@pytest.fixture(scope="module")
def seeded(registry: RegistryServer) -> dict[str, Seeded]:
    base = f"test/cli-{secrets.token_hex(3)}"
    labels = {"zeta": "last", "alpha": "first", "html": "<a&b>"}  # unsorted on purpose; Go sorts map keys
    v2s2 = build_image("cli-v2s2", layers=[900, 300], fmt="v2s2", labels=labels, created="2024-02-03T04:05:06.5Z")
    oci = build_image(
        "cli-oci", layers=[500], fmt="oci", env=["A=1", "B=two"], annotations={"org.example": "x"}, labels={}
    )
    platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    oci_index = build_multiarch("cli-oci-index", platforms=platforms, layers=[400], fmt="oci")
    docker_list = build_multiarch("cli-docker-list", platforms=platforms, layers=[400], fmt="v2s2")
    out: dict[str, Seeded] = {}
    tops: list[tuple[str, Image | Index]] = [
        ("v2s2", v2s2),
        ("oci", oci),
        ("oci-index", oci_index),
        ("docker-list", docker_list),
    ]
    for kind, top in tops:
        repo = f"{base}/{kind}"
        if isinstance(top, Index):
            push_index(registry.url, repo, "v1", top)
        else:
            push_image(registry.url, repo, "v1", top)
            push_image(registry.url, repo, "v2", top)
        out[kind] = Seeded(kind, f"docker://{registry.host}/{repo}:v1", top)
    return out


KINDS = ["v2s2", "oci", "oci-index", "docker-list"]


# --------------------------------------------------------------------------------------------------------------------
# inspect


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_raw_matches_skopeo(ferry: Any, seeded: dict[str, Seeded], kind: str) -> None:
    s = seeded[kind]
    run = ferry("inspect", INSECURE, "--raw", s.ref)
    assert run.code == 0, run.err
    assert run.out == s.top.manifest
    assert run.out == peer("inspect", INSECURE, "--raw", s.ref).encode()


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_matches_skopeo(ferry: Any, seeded: dict[str, Seeded], kind: str) -> None:
    s = seeded[kind]
    run = ferry("inspect", INSECURE, s.ref)
    assert run.code == 0, run.err
    mine = run.json()
    theirs = json.loads(peer("inspect", INSECURE, s.ref))
    for name in [*SUMMARY_FIELDS, "Env"]:
        assert mine[name] == theirs[name], name
    assert [k for k in mine if k in theirs] == list(theirs)  # same field order
    assert mine["Digest"] == str(s.top.digest)
    # LayersData (newer skopeo) describes the chosen manifest's layers
    img = s.image()
    assert mine["LayersData"] == [
        {"MIMEType": d.media_type, "Digest": str(d.digest), "Size": d.size, "Annotations": None}
        for d in img.layer_descriptors
    ]
    assert mine["Layers"] == [str(d.digest) for d in img.layer_descriptors]


def test_inspect_text_is_byte_identical_apart_from_layers_data(ferry: Any, seeded: dict[str, Seeded]) -> None:
    s = seeded["v2s2"]
    mine = ferry("inspect", INSECURE, s.ref).json()
    mine.pop("LayersData")
    text = json.dumps(mine, indent=4, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    assert text + "\n" == peer("inspect", INSECURE, s.ref)
    assert list(mine["Labels"]) == ["alpha", "html", "zeta"]


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_config_matches_skopeo(ferry: Any, seeded: dict[str, Seeded], kind: str) -> None:
    s = seeded[kind]
    raw = ferry("inspect", INSECURE, "--config", "--raw", s.ref)
    assert raw.code == 0, raw.err
    assert raw.out == s.image().config
    assert raw.out == peer("inspect", INSECURE, "--config", "--raw", s.ref).encode()
    pretty = ferry("inspect", INSECURE, "--config", s.ref)
    assert pretty.text == peer("inspect", INSECURE, "--config", s.ref)


@pytest.mark.parametrize("kind", ["oci-index", "docker-list"])
@pytest.mark.parametrize(("arch", "variant"), [("arm64", ""), ("arm", "v7")])
def test_override_arch_picks_child_like_skopeo(
    ferry: Any, seeded: dict[str, Seeded], kind: str, arch: str, variant: str
) -> None:
    s = seeded[kind]
    flags = ["--override-arch", arch, "--override-os", "linux"]
    if variant:
        flags += ["--override-variant", variant]
    mine = ferry("inspect", INSECURE, *flags, s.ref).json()
    theirs = json.loads(peer("--override-arch", arch, "--override-os", "linux", *flags[4:], "inspect", INSECURE, s.ref))
    child = s.image(arch, variant)
    assert mine["Architecture"] == theirs["Architecture"] == arch
    assert mine["Layers"] == theirs["Layers"] == [str(d.digest) for d in child.layer_descriptors]
    assert mine["Digest"] == theirs["Digest"] == str(s.top.digest)  # the digest of what the tag names
    config = ferry("inspect", INSECURE, *flags, "--config", "--raw", s.ref)
    assert config.out == child.config


def test_global_override_flags(ferry: Any, seeded: dict[str, Seeded]) -> None:
    s = seeded["docker-list"]
    mine = ferry("--override-arch", "arm64", "inspect", INSECURE, s.ref).json()
    theirs = json.loads(peer("--override-arch", "arm64", "inspect", INSECURE, s.ref))
    assert mine["Layers"] == theirs["Layers"] == [str(d.digest) for d in s.image("arm64").layer_descriptors]


@pytest.mark.parametrize(
    "template",
    [
        "{{.Digest}}",
        "{{.Name}} {{.Os}}/{{.Architecture}}",
        "{{.RepoTags}}",
        "{{len .RepoTags}}",
        "{{.Labels}}",
        "{{.Labels.alpha}}",
        '{{index .Labels "zeta"}}',
        "{{.Labels.missing}}",
        "{{range .Layers}}{{.}}\\n{{end}}",
        "{{range $k, $v := .Labels}}{{$k}}={{$v}};{{end}}",
        "{{if .Labels}}labelled{{else}}bare{{end}}",
        "{{.Created}}",
        "{{.Env}}",
        '{{printf "%s:%s" .Os .Architecture}}',
    ],
)
def test_format_matches_skopeo(ferry: Any, seeded: dict[str, Seeded], template: str) -> None:
    s = seeded["v2s2"]
    run = ferry("inspect", INSECURE, "--format", template, s.ref)
    assert run.code == 0, run.err
    assert run.text == peer("inspect", INSECURE, "--format", template, s.ref)


def test_format_unknown_field_is_an_error(ferry: Any, seeded: dict[str, Seeded]) -> None:
    run = ferry("inspect", INSECURE, "--format", "{{.Nope}}", seeded["oci"].ref)
    assert run.code == 1
    assert run.out == b""
    assert run.err.startswith("Error: ") and "Nope" in run.err
    assert skopeo("inspect", INSECURE, "--format", "{{.Nope}}", seeded["oci"].ref, check=False).returncode != 0


def test_no_tags(ferry: Any, seeded: dict[str, Seeded]) -> None:
    s = seeded["oci"]
    assert sorted(ferry("inspect", INSECURE, s.ref).json()["RepoTags"]) == ["v1", "v2"]
    for flag in ("--no-tags", "-n"):
        mine = ferry("inspect", INSECURE, flag, s.ref).json()
        assert mine["RepoTags"] == json.loads(peer("inspect", INSECURE, flag, s.ref))["RepoTags"] == []


# --------------------------------------------------------------------------------------------------------------------
# list-tags, manifest-digest, delete


@pytest.fixture(scope="module")
def many_tags_repo(registry: RegistryServer) -> str:
    repo = f"test/cli-tags-{secrets.token_hex(3)}"
    img = build_image("cli-tags", layers=[100])
    push_image(registry.url, repo, "latest", img)
    with httpx.Client(base_url=registry.url, timeout=10) as http, ThreadPoolExecutor(8) as pool:

        def put(i: int) -> int:
            headers = {"Content-Type": img.media_type}
            return http.put(f"/v2/{repo}/manifests/t{i}", content=img.manifest, headers=headers).status_code

        assert set(pool.map(put, range(140))) == {201}
    return f"docker://{registry.host}/{repo}"


def test_list_tags_matches_skopeo(ferry: Any, many_tags_repo: str) -> None:
    run = ferry("list-tags", INSECURE, many_tags_repo)
    assert run.code == 0, run.err
    assert run.text == peer("list-tags", INSECURE, many_tags_repo)
    body = run.json()
    assert len(body["Tags"]) == 141
    assert body["Repository"] == many_tags_repo.removeprefix("docker://")


def test_list_tags_rejects_a_tag(ferry: Any, many_tags_repo: str) -> None:
    run = ferry("list-tags", INSECURE, many_tags_repo + ":t1")
    assert run.code == 1
    assert run.err.startswith("Error: ") and "tag" in run.err
    assert skopeo("list-tags", INSECURE, many_tags_repo + ":t1", check=False).returncode != 0


def _signed_schema1() -> tuple[bytes, bytes]:
    """A schema 1 manifest with a (structurally valid) JWS signature; returns (file bytes, signed payload)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    nums = key.public_numbers()

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    payload = (
        b'{\n   "schemaVersion": 1,\n   "name": "a/b",\n   "tag": "v1",\n   "architecture": "amd64",\n'
        b'   "fsLayers": [],\n   "history": []\n}'
    )
    length = len(payload) - 2
    protected = {"formatLength": length, "formatTail": b64(payload[length:]), "time": "2024-01-01T00:00:00Z"}
    jwk = {
        "crv": "P-256",
        "kid": libtrust_key_id(key),
        "kty": "EC",
        "x": b64(nums.x.to_bytes(32, "big")),
        "y": b64(nums.y.to_bytes(32, "big")),
    }
    sig = {
        "header": {"jwk": jwk, "alg": "ES256"},
        "signature": b64(b"\x01" * 64),
        "protected": b64(json.dumps(protected).encode()),
    }
    signed = payload[:length] + b',\n   "signatures": ' + json.dumps([sig], indent=3).encode() + payload[length:]
    return signed, payload


def test_manifest_digest_matches_skopeo(ferry: Any, seeded: dict[str, Seeded], tmp_path: Path) -> None:
    signed, payload = _signed_schema1()
    files = {
        "v2s2.json": seeded["v2s2"].top.manifest,
        "index.json": seeded["oci-index"].top.manifest,
        "schema1-signed.json": signed,
        "not-json.txt": b"plain bytes\n",
        "empty": b"",
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        run = ferry("manifest-digest", str(path))
        assert run.code == 0, (name, run.err)
        assert run.text == peer("manifest-digest", str(path)), name
    assert ferry("manifest-digest", str(tmp_path / "schema1-signed.json")).text == f"{Digest.of(payload)}\n"
    assert ferry("manifest-digest", str(tmp_path / "v2s2.json")).text == f"{seeded['v2s2'].top.digest}\n"

    broken = tmp_path / "broken-signature.json"
    broken.write_text('{"schemaVersion": 1, "signatures": "nope"}')
    run = ferry("manifest-digest", str(broken))
    assert run.code == 1 and run.err.startswith("Error: malformed signed schema 1 manifest")
    missing = ferry("manifest-digest", str(tmp_path / "absent.json"))
    assert missing.code == 1 and "absent.json" in missing.err


def test_delete(ferry: Any, registry: RegistryServer, unique_repo: str) -> None:
    img = build_image(f"cli-delete-{unique_repo}", layers=[100])
    push_image(registry.url, unique_repo, "v1", img)
    push_image(registry.url, unique_repo, "v2", img)
    ref = f"docker://{registry.host}/{unique_repo}"
    assert ferry("delete", INSECURE, f"{ref}:v1").code == 0
    gone = ferry("inspect", INSECURE, f"{ref}:v1")
    assert gone.code == 2  # skopeo >= 1.10: a missing image exits 2
    assert gone.err.startswith("Error: ") and "manifest unknown" in gone.err
    assert skopeo("inspect", INSECURE, f"{ref}:v2", check=False).returncode != 0  # same manifest: v2 went too
    again = ferry("delete", INSECURE, f"{ref}:v1")
    assert again.code == 1 and "manifest unknown" in again.err

    other = build_image(f"cli-delete-digest-{unique_repo}", layers=[100])
    push_image(registry.url, unique_repo, "v3", other)
    assert ferry("delete", INSECURE, f"{ref}@{other.digest}").code == 0
    assert ferry("inspect", INSECURE, "--raw", f"{ref}:v3").code == 2  # not found


# --------------------------------------------------------------------------------------------------------------------
# login / logout / credentials


@pytest.fixture(scope="module")
def auth_image(auth_registry: RegistryServer) -> str:
    assert auth_registry.username and auth_registry.password
    push_image(auth_registry.url, "test/cli-auth", "v1", build_image("cli-auth"), auth=_basic(auth_registry))
    return f"docker://{auth_registry.host}/test/cli-auth:v1"


def _basic(reg: RegistryServer) -> tuple[str, str]:
    """The registry's user and password (which may start with '-': always pass it as --password=...)."""
    assert reg.username is not None and reg.password is not None
    return reg.username, reg.password


def test_login_logout_with_skopeo(ferry: Any, auth_registry: RegistryServer, auth_image: str, tmp_path: Path) -> None:
    user, password = _basic(auth_registry)
    host = auth_registry.host
    authfile = str(tmp_path / "auth.json")

    run = ferry("login", INSECURE, "--authfile", authfile, "-u", user, f"--password={password}", host)
    assert (run.code, run.text) == (0, "Login Succeeded!\n")
    assert peer("login", "--get-login", "--authfile", authfile, host) == f"{user}\n"
    assert ferry("login", "--get-login", "--authfile", authfile, host).text == f"{user}\n"
    stored = json.loads(Path(authfile).read_text())["auths"][host]["auth"]
    assert base64.b64decode(stored).decode() == f"{user}:{password}"

    # credentials from the file are used by inspect (and by skopeo)
    assert ferry("inspect", INSECURE, "--authfile", authfile, auth_image).code == 0
    assert skopeo("inspect", INSECURE, "--authfile", authfile, auth_image, check=False).returncode == 0

    # a wrong password: non-zero, nothing written
    before = Path(authfile).read_bytes()
    bad = ferry("login", INSECURE, "--authfile", authfile, "-u", user, "-p", "definitely-wrong", host)
    assert bad.code == 1
    assert bad.err.startswith("Error: ") and bad.err.count("\n") == 1
    assert "definitely-wrong" not in bad.err
    assert Path(authfile).read_bytes() == before

    assert ferry("logout", "--authfile", authfile, host).text == f"Removed login credentials for {host}\n"
    assert peer("login", "--get-login", "--authfile", authfile, host, check=False) == ""
    assert ferry("logout", "--authfile", authfile, host).code == 1  # not logged in any more
    assert ferry("inspect", INSECURE, "--authfile", authfile, auth_image).code == 1


def test_login_password_stdin_and_logout_all(
    ferry: Any, auth_registry: RegistryServer, auth_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = _basic(auth_registry)
    authfile = tmp_path / "auth.json"
    # another registry's entry, written by skopeo itself
    skopeo("login", INSECURE, "--authfile", str(authfile), "-u", user, f"--password={password}", auth_registry.host)
    other = "other.example:5000"
    data = json.loads(authfile.read_text())
    data["auths"][other] = {"auth": base64.b64encode(b"x:y").decode()}
    authfile.write_text(json.dumps(data))

    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    run = ferry("login", INSECURE, "--authfile", str(authfile), "-u", user, "--password-stdin", auth_registry.host)
    assert run.code == 0, run.err
    assert peer("login", "--get-login", "--authfile", str(authfile), auth_registry.host) == f"{user}\n"
    assert peer("login", "--get-login", "--authfile", str(authfile), other) == "x\n"

    run = ferry("logout", "--all", "--authfile", str(authfile))
    assert run.text == "Removed login credentials for all registries\n"
    assert json.loads(authfile.read_text())["auths"] == {}
    assert skopeo("login", "--get-login", "--authfile", str(authfile), other, check=False).returncode != 0


def test_inspect_with_creds(ferry: Any, auth_registry: RegistryServer, auth_image: str) -> None:
    user, password = _basic(auth_registry)
    assert ferry("inspect", INSECURE, "--creds", f"{user}:{password}", auth_image).json()["RepoTags"] == ["v1"]
    assert ferry("inspect", INSECURE, "--username", user, f"--password={password}", "--raw", auth_image).code == 0
    denied = ferry("inspect", INSECURE, auth_image)
    assert denied.code == 1 and "authentication required" in denied.err
    wrong = ferry("inspect", INSECURE, "--creds", f"{user}:nope-nope", auth_image)
    assert wrong.code == 1 and "nope-nope" not in wrong.err


def test_inspect_token_registry(ferry: Any, token_registry: RegistryServer, tmp_path: Path) -> None:
    ts = token_registry.token_server
    assert ts is not None
    from tests.harness.images import RegistryAuth

    img = build_image("cli-token", fmt="v2s2")
    push_image(token_registry.url, "test/cli-token", "v1", img, auth=RegistryAuth(ts.username, ts.password))
    ref = f"docker://{token_registry.host}/test/cli-token:v1"
    creds = f"{ts.username}:{ts.password}"
    mine = ferry("inspect", INSECURE, "--creds", creds, ref)
    assert mine.code == 0, mine.err
    theirs = json.loads(peer("inspect", INSECURE, "--creds", creds, ref))
    assert {k: mine.json()[k] for k in SUMMARY_FIELDS} == {k: theirs[k] for k in SUMMARY_FIELDS}

    authfile = tmp_path / "auth.json"
    assert ferry("login", INSECURE, "--authfile", str(authfile), "-u", ts.username, f"--password={ts.password}",
                 token_registry.host).code == 0  # fmt: skip
    assert ferry("inspect", INSECURE, "--authfile", str(authfile), "--raw", ref).out == img.manifest
    assert ferry("inspect", INSECURE, "--raw", ref).code == 1


@pytest.fixture(scope="module")
def tls_image(tls_registry: RegistryServer) -> str:
    push_image(tls_registry.url, "test/cli-tls", "v1", build_image("cli-tls"), verify=tls_registry.ssl_context())
    return f"docker://{tls_registry.host}/test/cli-tls:v1"


def test_inspect_tls_registry(ferry: Any, tls_registry: RegistryServer, tls_image: str) -> None:
    cert_dir = str(tls_registry.cert_dir)
    mine = ferry("inspect", "--cert-dir", cert_dir, "--raw", tls_image)
    assert mine.code == 0, mine.err
    assert mine.out == peer("inspect", "--cert-dir", cert_dir, "--raw", tls_image).encode()
    assert ferry("inspect", INSECURE, "--raw", tls_image).out == mine.out
    untrusted = ferry("inspect", "--raw", tls_image)
    assert untrusted.code == 1 and "not trusted" in untrusted.err


# --------------------------------------------------------------------------------------------------------------------
# error experience of the real binary


def _tamper(reg: RegistryServer, digest: Digest, data: bytes) -> None:
    """Replace a blob's bytes in the registry's storage (distribution serves them without checking)."""
    path = reg.storage_dir / "docker/registry/v2/blobs" / digest.algorithm / digest.hex[:2] / digest.hex / "data"
    assert path.exists()
    path.write_bytes(data)


@dataclass
class Outcome:
    args: list[str]
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def error_runs(
    registry: RegistryServer,
    auth_registry: RegistryServer,
    tls_registry: RegistryServer,
    tls_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Outcome]]:
    """Run every failing command at once (each is a separate ``ferry`` process)."""
    token = secrets.token_hex(4)
    tampered = build_image(f"cli-tampered-{token}", layers=[100])
    malformed = build_image(f"cli-malformed-{token}", layers=[100])
    config_bad = build_image(f"cli-config-bad-{token}", layers=[100])
    push_image(registry.url, "test/cli-errors", "tampered", tampered)
    push_image(registry.url, "test/cli-errors", "malformed", malformed)
    push_image(registry.url, "test/cli-errors", "config", config_bad)
    _tamper(registry, tampered.digest, json.dumps(tampered.manifest_json).encode())  # same JSON, other bytes
    broken = malformed.manifest_json
    del broken["layers"][0]["size"]
    _tamper(registry, malformed.digest, json.dumps(broken).encode())
    _tamper(registry, config_bad.config_digest, config_bad.config.replace(b"amd64", b"arm64"))

    with socket_closed_port() as port:
        host = registry.host
        cases = {
            "bad-reference": ["inspect", "docker://UPPER/Case"],
            "bad-transport": ["inspect", "nope://x"],
            "unknown-host": ["inspect", "docker://nosuchhost.invalid/x:y"],
            "refused": ["inspect", INSECURE, "--retry-delay=10ms", f"docker://127.0.0.1:{port}/x:y"],
            "unauthorized": ["inspect", INSECURE, f"docker://{auth_registry.host}/test/cli-auth:v1"],
            "not-found": ["inspect", INSECURE, f"docker://{host}/test/cli-errors:absent"],
            "tls": ["inspect", tls_image],
            "digest-mismatch": ["inspect", INSECURE, "--raw", f"docker://{host}/test/cli-errors@{tampered.digest}"],
            "config-mismatch": ["inspect", INSECURE, f"docker://{host}/test/cli-errors:config"],
            "malformed-manifest": ["inspect", INSECURE, f"docker://{host}/test/cli-errors:malformed"],
            "usage": ["inspect", "--no-such-flag", "docker://x/y"],
            "debug-unknown-host": ["--debug", "inspect", "docker://nosuchhost.invalid/x:y"],
            "debug-not-found": ["--debug", "inspect", INSECURE, f"docker://{host}/test/cli-errors:absent"],
        }
        env = {**os.environ, "REGISTRY_AUTH_FILE": str(tmp_path_factory.mktemp("auth") / "none.json")}
        procs = {
            name: subprocess.Popen(
                [FERRY_BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            for name, args in cases.items()
        }
        outcomes = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            outcomes[name] = Outcome(cases[name], proc.returncode, out, err)
    yield outcomes


class socket_closed_port:
    """A loopback port nobody listens on (bound and released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        pass


ERROR_TEXT = {
    "bad-reference": "repository name must be lowercase",
    "bad-transport": "invalid image name 'nope://x'",
    "unknown-host": "cannot resolve registry host 'nosuchhost.invalid'",
    "refused": "refused",
    "unauthorized": "authentication required",
    "not-found": "manifest unknown",
    "tls": "not trusted",
    "digest-mismatch": "digest mismatch for manifest",
    "config-mismatch": "digest mismatch for blob",
    "malformed-manifest": "malformed manifest",
    "usage": "unknown flag: --no-such-flag",
}


@pytest.mark.parametrize("case", list(ERROR_TEXT))
def test_error_is_one_line(error_runs: dict[str, Outcome], case: str) -> None:
    run = error_runs[case]
    # a missing image exits 2, as skopeo >= 1.10 does (isNotFoundImageError)
    assert run.code == (2 if case == "not-found" else 1), run
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("Error: ")
    assert ERROR_TEXT[case] in lines[0]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("case", ["unknown-host", "not-found"])
def test_debug_shows_detail(error_runs: dict[str, Outcome], case: str) -> None:
    debug, plain = error_runs[f"debug-{case}"], error_runs[case]
    assert debug.code == plain.code != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert len(debug.stderr.splitlines()) > 5
    assert debug.stderr.rstrip("\n").splitlines()[-1] == plain.stderr.rstrip("\n")
