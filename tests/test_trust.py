"""Promotion: trust policy, sigstore signing and verification, on real registries.

Debian's skopeo 1.9 is built with sigstore disabled ("Debian-local change: sigstore disabled": it neither
signs nor verifies sigstore signatures, and has no ``generate-sigstore-key``). It still reads and writes
sigstore attachments with ``use-sigstore-attachments: true``, so the peer checks are: skopeo carries
Ferry's signatures to another registry and Ferry verifies what skopeo wrote; Ferry appends to an
attachment manifest skopeo wrote; OpenSSL verifies Ferry's ECDSA signatures independently.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import (
    build_image,
    build_multiarch,
    fetch_manifest,
    push_image,
    push_index,
    put_manifest,
    registry_client,
)
from tests.harness.peer import SKOPEO_BIN, peer_env
from tests.harness.servers import RegistryServer
from worker.engine.transports import ImageName
from worker.engine.trust import (
    SIGNATURE_MEDIA_TYPE,
    PrivateKey,
    TrustPolicy,
    attachment_tag,
    generate_key_pair,
    load_public_keys,
    make_payload,
    parse_payload,
    verify_signature,
)
from worker.engine.trust.payload import InvalidPayload
from worker.engine.trust.policy import SignedIdentity, image_scopes
from worker.registry import Digest, InvalidInput, Reference

FERRY = str(Path(sys.executable).with_name("ferry"))
INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")
PASSPHRASE = "correct horse battery staple"


# -- pure parts ----------------------------------------------------------------------------------------------------


def test_key_pair_round_trip_and_wrong_passphrase() -> None:
    pair = generate_key_pair(b"pw")
    assert pair.private_pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    body = json.loads(__import__("base64").b64decode(b"".join(pair.private_pem.splitlines()[1:-1])))
    assert body["kdf"]["name"] == "scrypt" and body["cipher"]["name"] == "nacl/secretbox"
    key = PrivateKey.load(pair.private_pem, b"pw")
    public = load_public_keys(pair.public_pem, "pub")
    sig = key.sign(b"payload")
    assert verify_signature(public, b"payload", sig)
    assert not verify_signature(public, b"payload!", sig)
    with pytest.raises(InvalidInput, match="wrong passphrase"):
        PrivateKey.load(pair.private_pem, b"nope")


def test_payload_is_parsed_strictly() -> None:
    digest = Digest.of(b"m")
    claims = parse_payload(make_payload(digest, "example.com/a/b:1"))
    assert claims.manifest_digest == digest and claims.docker_reference == "example.com/a/b:1"
    doc = json.loads(make_payload(digest, "example.com/a/b:1"))
    doc["critical"]["extra"] = 1
    with pytest.raises(InvalidPayload, match="fields"):
        parse_payload(json.dumps(doc).encode())
    doc = json.loads(make_payload(digest, "example.com/a/b:1"))
    doc["critical"]["type"] = "atomic container signature"
    with pytest.raises(InvalidPayload, match="unrecognized signature type"):
        parse_payload(json.dumps(doc).encode())


def test_scopes_follow_containers_image() -> None:
    name = ImageName.parse("docker://registry.example.com:5000/team/app:1")
    assert image_scopes(name) == [
        "registry.example.com:5000/team/app:1",
        "registry.example.com:5000/team/app",
        "registry.example.com:5000/team",
        "registry.example.com:5000",
        "*.example.com",
        "*.com",
    ]
    policy = TrustPolicy.from_json(
        {
            "default": [{"type": "reject"}],
            "transports": {
                "docker": {
                    "registry.example.com:5000/team": [{"type": "insecureAcceptAnything"}],
                    "*.example.com": [{"type": "reject"}],
                }
            },
        }
    )
    scope, _reqs = policy.requirements_for(name)
    assert scope == "transports.docker['registry.example.com:5000/team']"
    assert policy.requirements_for(ImageName.parse("docker://other.example.com/x:1"))[0] == (
        "transports.docker['*.example.com']"
    )
    assert policy.requirements_for(ImageName.parse("docker://quay.io/x:1"))[0] == "default"
    assert image_scopes(ImageName.parse("dir:/srv/images/app")) == ["/srv/images/app", "/srv/images", "/srv"]
    assert image_scopes(ImageName.parse("oci:/srv/layout:app")) == ["/srv/layout", "/srv"]


@pytest.mark.parametrize(
    ("identity", "image", "signed", "ok"),
    [
        ({"type": "matchRepoDigestOrExact"}, "r.io/a/b:1", "r.io/a/b:1", True),
        ({"type": "matchRepoDigestOrExact"}, "r.io/a/b:1", "r.io/a/b:2", False),
        ({"type": "matchRepoDigestOrExact"}, f"r.io/a/b@{Digest.of(b'x')}", "r.io/a/b:2", True),
        ({"type": "matchRepoDigestOrExact"}, "r.io/a/b:1", "r.io/a/c:1", False),
        ({"type": "matchRepository"}, "r.io/a/b:1", "r.io/a/b:9", True),
        ({"type": "matchExact"}, f"r.io/a/b@{Digest.of(b'x')}", "r.io/a/b:1", False),
        ({"type": "exactReference", "dockerReference": "q.io/p/b:7"}, "r.io/a/b:1", "q.io/p/b:7", True),
        ({"type": "exactRepository", "dockerRepository": "q.io/p/b"}, "r.io/a/b:1", "q.io/p/b:3", True),
        ({"type": "remapIdentity", "prefix": "r.io/a", "signedPrefix": "q.io/p"}, "r.io/a/b:1", "q.io/p/b:1", True),
        ({"type": "remapIdentity", "prefix": "r.io/a", "signedPrefix": "q.io/p"}, "r.io/a/b:1", "r.io/a/b:1", False),
        ({"type": "remapIdentity", "prefix": "r.io/a", "signedPrefix": "q.io/p"}, "r.io/ab:1", "r.io/ab:1", True),
    ],
)
def test_signed_identity(identity: dict[str, str], image: str, signed: str, ok: bool) -> None:
    assert SignedIdentity.from_json(identity).matches(Reference.parse(image), signed) is ok


# -- helpers for the real parts ------------------------------------------------------------------------------------


@dataclass
class Keys:
    dir: Path
    passphrase: Path

    def private(self, name: str) -> Path:
        return self.dir / f"{name}.private"

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.pub"


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL, check=False
    )


def ferry(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return run([FERRY, *args], env={**os.environ, "FERRY_CACHE_DIR": str(cache)})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    passphrase = d / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    for name in ("a", "b"):
        proc = run(
            [FERRY, "generate-sigstore-key", "--output-prefix", str(d / name), "--passphrase-file", str(passphrase)]
        )
        assert proc.returncode == 0, proc.stderr
    assert oct((d / "a.private").stat().st_mode & 0o777) == "0o600"
    return Keys(d, passphrase)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def registries_d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("registries.d")
    (d / "sigstore.yaml").write_text("default-docker:\n  use-sigstore-attachments: true\n")
    return d


def write_policy(path: Path, requirement: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {"docker": {"": [requirement]}}}))
    return path


def sigstore(key: Path, identity: dict[str, str] | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"type": "sigstoreSigned", "keyPath": str(key)}
    if identity:
        req["signedIdentity"] = identity
    return req


def skopeo(*args: str, policy: Path, registries_d: Path) -> subprocess.CompletedProcess[str]:
    argv = [SKOPEO_BIN, "--policy", str(policy), "--registries.d", str(registries_d), *args]
    return run(argv, env=peer_env())


def docker(reg: RegistryServer, repo: str, tag: str) -> str:
    return f"docker://{reg.host}/{repo}:{tag}"


def has_manifest(reg: RegistryServer, repo: str, ref: str) -> bool:
    with registry_client(reg.url) as (client, base):
        resp = client.head(
            f"{base}/v2/{repo}/manifests/{ref}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"},
        )
        return resp.status_code == 200


def signature_layers(reg: RegistryServer, repo: str, digest: Digest) -> list[dict[str, Any]]:
    raw, _ = fetch_manifest(reg.url, repo, attachment_tag(digest))
    layers: list[dict[str, Any]] = json.loads(raw)["layers"]
    return layers


@pytest.fixture
def seeded(registry: RegistryServer, unique_repo: str) -> Iterator[tuple[str, Digest]]:
    img = build_image(unique_repo, layers=[2048])
    digest = push_image(registry.url, unique_repo, "1", img)
    yield unique_repo, digest


# -- interop -------------------------------------------------------------------------------------------------------


def test_ferry_signs_skopeo_carries_the_signatures_ferry_verifies(
    registry: RegistryServer,
    registry2: RegistryServer,
    seeded: tuple[str, Digest],
    keys: Keys,
    registries_d: Path,
    cache: Path,
    tmp_path: Path,
) -> None:
    repo, digest = seeded
    signed = docker(registry, repo + "-signed", "1")
    sign_a = ("--sign-by-sigstore-private-key", str(keys.private("a")), "--sign-passphrase-file", str(keys.passphrase))
    proc = ferry("--insecure-policy", "copy", *INSECURE, *sign_a, docker(registry, repo, "1"), signed, cache=cache)
    assert proc.returncode == 0, proc.stderr
    layers = signature_layers(registry, repo + "-signed", digest)
    assert [layer["mediaType"] for layer in layers] == [SIGNATURE_MEDIA_TYPE]
    # again: the image is up to date and already carries this key's signature, so nothing is added
    proc = ferry("--insecure-policy", "copy", *INSECURE, *sign_a, docker(registry, repo, "1"), signed, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert len(signature_layers(registry, repo + "-signed", digest)) == 1

    # an independent ECDSA implementation (OpenSSL) accepts the signature over the payload with the public key
    payload = tmp_path / "payload"
    with registry_client(registry.url) as (client, base):
        resp = client.get(f"{base}/v2/{repo}-signed/blobs/{layers[0]['digest']}")
        payload.write_bytes(resp.content)
    der = tmp_path / "sig.der"
    der.write_bytes(base64.b64decode(layers[0]["annotations"]["dev.cosignproject.cosign/signature"]))
    check = run(["openssl", "dgst", "-sha256", "-verify", str(keys.public("a")), "-signature", str(der), str(payload)])
    assert check.stdout.strip() == "Verified OK", check.stdout + check.stderr
    claims = parse_payload(payload.read_bytes())
    assert claims.manifest_digest == digest and claims.docker_reference == signed.removeprefix("docker://")

    # skopeo (use-sigstore-attachments) reads Ferry's attachment and writes its own copy of it
    accept = tmp_path / "accept.json"
    accept.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    carried = docker(registry2, repo + "-carried", "1")
    peer = skopeo("copy", *INSECURE, signed, carried, policy=accept, registries_d=registries_d)
    assert peer.returncode == 0, peer.stderr
    assert len(signature_layers(registry2, repo + "-carried", digest)) == 1

    # the identity is the first destination's, so the policy names it (promotion: remapIdentity or exactRepository)
    same_repo = {"type": "exactRepository", "dockerRepository": signed.removeprefix("docker://").rsplit(":", 1)[0]}
    policy_a = write_policy(tmp_path / "a.json", sigstore(keys.public("a"), same_repo))
    proc = ferry("--policy", str(policy_a), "copy", *INSECURE, carried, docker(registry2, repo, "1"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert has_manifest(registry2, repo, "1")

    # the policy trusts key b only: refused, one line, nothing written
    policy_b = write_policy(tmp_path / "b.json", sigstore(keys.public("b"), same_repo))
    proc = ferry(
        "--policy", str(policy_b), "copy", *INSECURE, carried, docker(registry2, repo + "-b", "1"), cache=cache
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: {carried} rejected by the trust policy (transports.docker[''])")
    assert "sigstoreSigned" in lines[0] and "not signed by a trusted key" in lines[0]
    assert not has_manifest(registry2, repo + "-b", "1")

    # signing in place appends key b's signature to the manifest skopeo wrote; both keys are now accepted
    sign_b = ("--sign-by-sigstore-private-key", str(keys.private("b")), "--sign-passphrase-file", str(keys.passphrase))
    sign_b += ("--sign-identity", signed.removeprefix("docker://"))
    proc = ferry("--insecure-policy", "copy", *INSECURE, *sign_b, carried, carried, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert len(signature_layers(registry2, repo + "-carried", digest)) == 2
    proc = ferry(
        "--policy", str(policy_b), "copy", *INSECURE, carried, docker(registry2, repo + "-b", "1"), cache=cache
    )
    assert proc.returncode == 0, proc.stderr
    peer = skopeo(
        "copy", *INSECURE, carried, docker(registry, repo + "-back", "1"), policy=accept, registries_d=registries_d
    )
    assert peer.returncode == 0, peer.stderr
    assert len(signature_layers(registry, repo + "-back", digest)) == 2


def test_refuses_tampered_foreign_key_other_identity_and_unsigned(
    registry: RegistryServer,
    registry2: RegistryServer,
    unique_repo: str,
    keys: Keys,
    cache: Path,
    tmp_path: Path,
) -> None:
    repo = unique_repo
    sign = ("--sign-by-sigstore-private-key", str(keys.private("a")), "--sign-passphrase-file", str(keys.passphrase))
    good = build_image(repo + "good", layers=[1024])
    evil = build_image(repo + "evil", layers=[1024])
    push_image(registry.url, repo + "/src", "good", good)
    push_image(registry.url, repo + "/src", "evil", evil)

    def ferry_sign(tag: str, *extra: str, key: tuple[str, ...] = sign) -> None:
        proc = ferry(
            "--insecure-policy",
            "copy",
            *INSECURE,
            *key,
            *extra,
            docker(registry, repo + "/src", "good" if tag != "evil" else "evil"),
            docker(registry, repo, tag),
            cache=cache,
        )
        assert proc.returncode == 0, proc.stderr

    # tampered: "tampered" now points at other content, with the good image's signature copied to its .sig tag
    ferry_sign("tampered")
    push_image(registry.url, repo, "tampered", evil)
    raw, _ = fetch_manifest(registry.url, repo, attachment_tag(good.digest))
    put_manifest(registry.url, repo, attachment_tag(evil.digest), raw, "application/vnd.oci.image.manifest.v1+json")
    # signed by key b (not trusted)
    key_b = ("--sign-by-sigstore-private-key", str(keys.private("b")), "--sign-passphrase-file", str(keys.passphrase))
    ferry_sign("foreign", key=key_b)
    # signed by key a, but for another identity
    ferry_sign("elsewhere", "--sign-identity", f"{registry.host}/{repo}-other:elsewhere")
    # never signed
    push_image(registry.url, repo, "unsigned", build_image(repo + "unsigned", layers=[512]))
    # and one that passes, to show the policy can accept
    ferry_sign("ok")

    policy = write_policy(tmp_path / "a.json", sigstore(keys.public("a")))
    expected = {
        "tampered": "does not match",
        "foreign": "not signed by a trusted key",
        "elsewhere": "is not accepted",
        "unsigned": "no signature exists",
    }
    for tag, why in expected.items():
        dest_repo = f"{repo}-dest-{tag}"
        proc = ferry(
            "--policy",
            str(policy),
            "copy",
            *INSECURE,
            docker(registry, repo, tag),
            docker(registry2, dest_repo, tag),
            cache=cache,
        )
        assert proc.returncode == 1, (tag, proc.stderr)
        assert why in proc.stderr and proc.stderr.count("\n") == 1, (tag, proc.stderr)
        assert not has_manifest(registry2, dest_repo, tag)
    proc = ferry(
        "--policy",
        str(policy),
        "copy",
        *INSECURE,
        docker(registry, repo, "ok"),
        docker(registry2, repo, "ok"),
        cache=cache,
    )
    assert proc.returncode == 0, proc.stderr


def test_sync_keep_going_reports_rejected_images_and_copies_the_rest(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, keys: Keys, cache: Path, tmp_path: Path
) -> None:
    repo = unique_repo
    push_image(registry.url, repo + "/in", "signed", build_image(repo + "s", layers=[512]))
    push_image(registry.url, repo + "/app", "unsigned", build_image(repo + "u", layers=[512]))
    sign = ("--sign-by-sigstore-private-key", str(keys.private("a")), "--sign-passphrase-file", str(keys.passphrase))
    proc = ferry(
        "--insecure-policy",
        "copy",
        *INSECURE,
        *sign,
        docker(registry, repo + "/in", "signed"),
        docker(registry, repo + "/app", "signed"),
        cache=cache,
    )
    assert proc.returncode == 0, proc.stderr
    policy = write_policy(tmp_path / "a.json", sigstore(keys.public("a"), {"type": "matchRepository"}))
    dest = f"{registry2.host}/{repo}-mirror"
    args = ["--policy", str(policy), "sync", *INSECURE, "--src", "docker", "--dest", "docker"]
    proc = ferry(*args, f"{registry.host}/{repo}/app", dest, cache=cache)
    assert proc.returncode == 1 and "--keep-going" in proc.stderr, proc.stderr
    assert not has_manifest(registry2, f"{repo}-mirror/app", "signed")
    proc = ferry(*args, "--keep-going", f"{registry.host}/{repo}/app", dest, cache=cache)
    assert proc.returncode == 1
    assert has_manifest(registry2, f"{repo}-mirror/app", "signed")
    assert not has_manifest(registry2, f"{repo}-mirror/app", "unsigned")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and ":unsigned" in errors[0] and "no signature exists" in errors[0], proc.stderr
    # the signature went along with the admitted image (sync copies .sig tags when digests are kept)
    raw, _ = fetch_manifest(registry2.url, f"{repo}-mirror/app", "signed")
    assert has_manifest(registry2, f"{repo}-mirror/app", attachment_tag(Digest.of(raw)))

    # sync signing what it admits: the source's signature comes along, this run's is appended to it
    proc = ferry(*args, "--keep-going", *sign, f"{registry.host}/{repo}/app", f"{dest}-signed", cache=cache)
    assert proc.returncode == 1 and "no signature exists" in proc.stderr, proc.stderr
    layers = signature_layers(registry2, f"{repo}-mirror-signed/app", Digest.of(raw))
    claims = [parse_payload(fetch_blob_bytes(registry2, f"{repo}-mirror-signed/app", x["digest"])) for x in layers]
    assert [c.docker_reference for c in claims] == [
        f"{registry.host}/{repo}/app:signed",
        f"{registry2.host}/{repo}-mirror-signed/app:signed",
    ]
    assert not has_manifest(registry2, f"{repo}-mirror-signed/app", "unsigned")


def test_require_signed_and_refusals(
    registry: RegistryServer,
    registry2: RegistryServer,
    seeded: tuple[str, Digest],
    keys: Keys,
    cache: Path,
    tmp_path: Path,
) -> None:
    repo, _ = seeded
    accept = tmp_path / "accept.json"
    accept.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    src, dest = docker(registry, repo, "1"), docker(registry2, repo, "1")
    proc = ferry("--policy", str(accept), "copy", *INSECURE, "--require-signed", src, dest, cache=cache)
    assert proc.returncode == 1 and "--require-signed" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not has_manifest(registry2, repo, "1")

    gpg = write_policy(tmp_path / "gpg.json", {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"})
    proc = ferry("--policy", str(gpg), "copy", *INSECURE, src, dest, cache=cache)
    assert proc.returncode == 1 and "requirement signedBy" in proc.stderr and "GPG" in proc.stderr, proc.stderr

    bad = tmp_path / "bad.json"
    bad.write_text('{"default": [{"type": "acceptEverything"}]}')
    proc = ferry("--policy", str(bad), "copy", *INSECURE, src, dest, cache=cache)
    assert proc.stderr.strip() == "Error: policy: unknown requirement type 'acceptEverything'", proc.stderr
    proc = ferry("--policy", str(tmp_path / "missing.json"), "copy", *INSECURE, src, dest, cache=cache)
    assert proc.returncode == 1 and "no trust policy at" in proc.stderr
    proc = ferry("--insecure-policy", "copy", *INSECURE, "--sign-by", "ABCD", src, dest, cache=cache)
    assert proc.returncode == 1 and "GPG" in proc.stderr
    proc = ferry("standalone-sign", "m.json", "r.io/a:1", "ABCD", "-o", "sig", cache=cache)
    assert proc.returncode == 1 and "GPG simple signing" in proc.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    proc = ferry(
        "--insecure-policy",
        "copy",
        *INSECURE,
        "--sign-by-sigstore-private-key",
        str(keys.private("a")),
        "--sign-passphrase-file",
        str(wrong),
        src,
        dest,
        cache=cache,
    )
    assert proc.stderr.strip() == "Error: cannot decrypt the private key: wrong passphrase?", proc.stderr
    assert not has_manifest(registry2, repo, "1")
    assert (keys.dir / "a.private").read_bytes() != b""
    proc = ferry(
        "generate-sigstore-key", "--output-prefix", str(keys.dir / "a"), "--passphrase-file", str(wrong), cache=cache
    )
    assert proc.returncode == 1 and "refusing to overwrite" in proc.stderr


def test_multi_arch_each_copied_image_is_signed_and_checked(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, keys: Keys, cache: Path, tmp_path: Path
) -> None:
    """Like skopeo: signing signs every image written and the index; the policy checks every image copied."""
    repo = unique_repo
    index = build_multiarch(repo, platforms=("linux/amd64", "linux/arm64"), layers=[256])
    push_index(registry.url, repo, "m", index)
    sign = ("--sign-by-sigstore-private-key", str(keys.private("a")), "--sign-passphrase-file", str(keys.passphrase))
    signed = docker(registry, repo + "-signed", "m")
    proc = ferry(
        "--insecure-policy", "copy", *INSECURE, "--all", *sign, docker(registry, repo, "m"), signed, cache=cache
    )
    assert proc.returncode == 0, proc.stderr
    for digest in [index.digest, *(c.digest for c in index.children)]:
        assert len(signature_layers(registry, repo + "-signed", digest)) == 1

    policy = write_policy(tmp_path / "a.json", sigstore(keys.public("a")))
    proc = ferry("--policy", str(policy), "copy", *INSECURE, "--all", signed, docker(registry2, repo, "m"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    # the index is signed but one of its images is not: copying that image (or all of them) is refused
    arm = index.child("linux/arm64").digest
    with registry_client(registry.url) as (client, base):
        resp = client.delete(f"{base}/v2/{repo}-signed/manifests/{fetch_digest(registry, repo + '-signed', arm)}")
        assert resp.status_code == 202, resp.text
    proc = ferry(
        "--policy", str(policy), "--override-arch", "arm64", "copy", *INSECURE, signed,
        docker(registry2, repo + "-arm", "m"), cache=cache,
    )  # fmt: skip
    assert proc.returncode == 1 and f"manifest {arm}" in proc.stderr and "no signature exists" in proc.stderr
    assert not has_manifest(registry2, repo + "-arm", "m")
    proc = ferry(
        "--policy", str(policy), "--override-arch", "amd64", "copy", *INSECURE, signed,
        docker(registry2, repo + "-amd", "m"), cache=cache,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def fetch_blob_bytes(reg: RegistryServer, repo: str, digest: str) -> bytes:
    with registry_client(reg.url) as (client, base):
        resp = client.get(f"{base}/v2/{repo}/blobs/{digest}")
        assert resp.status_code == 200, resp.text
        return resp.content


def fetch_digest(reg: RegistryServer, repo: str, digest: Digest) -> str:
    """The digest of the signature manifest of ``digest`` (the registry deletes manifests by digest)."""
    raw, _ = fetch_manifest(reg.url, repo, attachment_tag(digest))
    return str(Digest.of(raw))


def test_global_policy_flag_is_apart_from_prune_policy() -> None:
    from producer.cli import build_parser
    from producer.options import normalize_argv

    parser = build_parser()
    args = parser.parse_args(normalize_argv(["--policy", "trust.json", "prune", "--policy", "retention.yml"]))
    assert args.trust_policy == "trust.json" and args.policy == "retention.yml"
    args = parser.parse_args(normalize_argv(["--insecure-policy", "copy", "dir:a", "dir:b"]))
    assert args.insecure_policy is True and args.trust_policy is None
