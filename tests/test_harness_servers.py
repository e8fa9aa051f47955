"""The real-server harness works: every registry variant, the token server, TLS, skopeo as a peer, Redis."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.harness.peer import SkopeoError, skopeo
from tests.harness.servers import (
    RedisServer,
    RegistryServer,
    libtrust_key_id,
    start_redis,
    start_token_server,
)

RegistryFactory = Callable[..., RegistryServer]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --------------------------------------------------------------------------------------------------------------
# helpers


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tiny_layer() -> tuple[bytes, str]:
    """A gzipped tar with one file; returns (blob, diff_id)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        content = b"hello from ferry\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), _digest(raw)


def push_tiny_image(client: httpx.Client, repo: str, tag: str = "v1") -> str:
    """Push a one-layer OCI image with plain HTTP calls (monolithic uploads); returns the manifest digest."""
    layer, diff_id = _tiny_layer()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()
    for blob in (layer, config):
        start = client.post(f"/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        # the Location carries distribution's ?_state=...: add the digest, don't replace the query (params= would)
        location = httpx.URL(start.headers["Location"]).copy_add_param("digest", _digest(blob))
        put = client.put(location, content=blob)
        assert put.status_code == 201, put.text
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    resp = client.put(f"/v2/{repo}/manifests/{tag}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert resp.status_code == 201, resp.text
    assert resp.headers["Docker-Content-Digest"] == _digest(manifest)
    return _digest(manifest)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    params = {}
    for part in rest.split('",'):
        key, _, value = part.partition("=")
        params[key.strip()] = value.strip().strip('"')
    return scheme, params


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """A plain-HTTP client (verify=False only skips loading certifi's bundle, ~50 ms per ad-hoc ``httpx.get``)."""
    with httpx.Client(verify=False, timeout=10) as client:
        yield client


# --------------------------------------------------------------------------------------------------------------
# anonymous registry + access log


def test_anonymous_registry_answers_v2(http: httpx.Client, registry: RegistryServer) -> None:
    assert registry.url == f"http://{registry.host}"
    assert registry.running
    resp = http.get(f"{registry.url}/v2/")
    assert resp.status_code == 200
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert registry.ca_cert is None and registry.cert_dir is None and registry.username is None


def test_push_and_pull_back(registry: RegistryServer, unique_repo: str) -> None:
    assert unique_repo.startswith("test/test-push-and-pull-back-")
    with registry.client() as c:
        digest = push_tiny_image(c, unique_repo, "v1")
        assert c.get(f"/v2/{unique_repo}/tags/list").json() == {"name": unique_repo, "tags": ["v1"]}
        got = c.get(f"/v2/{unique_repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200
        assert _digest(got.content) == digest
        # delete is enabled in the config
        assert c.delete(f"/v2/{unique_repo}/manifests/{digest}").status_code == 202
        assert c.get(f"/v2/{unique_repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}).status_code == 404


def test_access_log_counts_requests(registry_factory: RegistryFactory) -> None:
    reg = registry_factory()
    repo = "counting/repo"
    with reg.client() as c:
        assert reg.requests() == []  # startup probes and log-sync markers are not reported
        digest = push_tiny_image(c, repo)
        mark = reg.log_mark()
        c.head(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        c.get(f"/v2/{repo}/manifests/{digest}?x=1", headers={"Accept": OCI_MANIFEST})
        c.head(f"/v2/{repo}/manifests/nope")

    assert reg.requests(since=mark) == [
        ("HEAD", f"/v2/{repo}/manifests/v1"),
        ("GET", f"/v2/{repo}/manifests/{digest}"),
        ("HEAD", f"/v2/{repo}/manifests/nope"),
    ]
    entries = reg.access_log(since=mark)
    assert [e.status for e in entries] == [200, 200, 404]
    assert entries[1].query == "x=1"
    assert entries[0].user_agent.startswith("python-httpx/")
    assert reg.count("HEAD", r"/v2/.+/manifests/.+", since=mark) == 2
    # the whole log: 2 blob uploads (POST + PUT each) and one manifest PUT before the mark
    assert reg.count("POST", r"/v2/counting/repo/blobs/uploads/") == 2
    assert reg.count("PUT", r"/v2/counting/repo/blobs/uploads/.+") == 2
    assert reg.count("PUT", r"/v2/counting/repo/manifests/v1") == 1


def test_registry_stop_kills_process(http: httpx.Client, registry_factory: RegistryFactory) -> None:
    reg = registry_factory()
    proc = reg.process
    assert proc is not None and proc.poll() is None
    reg.stop()
    assert proc.poll() is not None
    assert not reg.running
    with pytest.raises(httpx.ConnectError):
        http.get(f"{reg.url}/v2/")
    reg.stop()  # idempotent


# --------------------------------------------------------------------------------------------------------------
# htpasswd


def test_htpasswd_registry(http: httpx.Client, auth_registry: RegistryServer, unique_repo: str) -> None:
    assert auth_registry.auth == "htpasswd" and auth_registry.username and auth_registry.password
    anon = http.get(f"{auth_registry.url}/v2/")
    assert anon.status_code == 401
    assert anon.headers["WWW-Authenticate"] == 'Basic realm="ferry-test"'
    wrong = http.get(f"{auth_registry.url}/v2/", auth=(auth_registry.username, "wrong"))
    assert wrong.status_code == 401
    with auth_registry.client() as c:
        assert c.get("/v2/").status_code == 200
        push_tiny_image(c, unique_repo)
        assert c.get(f"/v2/{unique_repo}/tags/list").json()["tags"] == ["v1"]


# --------------------------------------------------------------------------------------------------------------
# token auth


def test_token_registry_challenges_with_bearer(
    http: httpx.Client, token_registry: RegistryServer, unique_repo: str
) -> None:
    ts = token_registry.token_server
    assert ts is not None and token_registry.auth == "token"
    resp = http.get(f"{token_registry.url}/v2/")
    assert resp.status_code == 401
    scheme, params = _parse_challenge(resp.headers["WWW-Authenticate"])
    assert scheme == "Bearer"
    assert params == {"realm": ts.realm, "service": ts.service}

    resp = http.get(f"{token_registry.url}/v2/{unique_repo}/tags/list")
    assert resp.status_code == 401
    _, params = _parse_challenge(resp.headers["WWW-Authenticate"])
    assert params["scope"] == f"repository:{unique_repo}:pull"


def test_token_for_the_right_scope_grants_access(
    http: httpx.Client, token_registry: RegistryServer, unique_repo: str
) -> None:
    ts = token_registry.token_server
    assert ts is not None
    ts.reset()
    scope = f"repository:{unique_repo}:pull,push"
    resp = http.get(
        ts.realm, params={"service": ts.service, "scope": scope}, auth=(token_registry.username or "", ts.password)
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300 and body["issued_at"].endswith("Z")
    assert "refresh_token" not in body
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "RS256" and header["kid"] == ts.key_id
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": unique_repo, "actions": ["pull", "push"]}]
    assert claims["aud"] == ts.service and claims["iss"] == ts.issuer and claims["sub"] == ts.username
    assert ts.issued == 1 and ts.scopes == [scope]
    assert ts.requests[0].grant_type == "basic" and ts.requests[0].username == ts.username

    with httpx.Client(base_url=token_registry.url, headers=_bearer(body["token"])) as c:
        push_tiny_image(c, unique_repo)
        tags = c.get(f"/v2/{unique_repo}/tags/list")
        assert tags.status_code == 200 and tags.json()["tags"] == ["v1"]
        # scoped: the same token is useless for another repository
        other = c.get(f"/v2/{unique_repo}-other/tags/list")
        assert other.status_code == 401
        assert 'error="insufficient_scope"' in other.headers["WWW-Authenticate"]

    pull_only = ts.get_token(f"repository:{unique_repo}:pull", username=ts.username, password=ts.password)
    start = http.post(f"{token_registry.url}/v2/{unique_repo}/blobs/uploads/", headers=_bearer(pull_only))
    assert start.status_code == 401  # push was not granted
    assert ts.issued == 2


def test_token_wrong_password_and_anonymous(
    http: httpx.Client, token_registry: RegistryServer, unique_repo: str
) -> None:
    ts = token_registry.token_server
    assert ts is not None
    ts.reset()
    scope = f"repository:{unique_repo}:pull"
    wrong = http.get(ts.realm, params={"service": ts.service, "scope": scope}, auth=(ts.username, "wrong"))
    assert wrong.status_code == 401
    assert "token" not in wrong.json()
    assert ts.issued == 0 and ts.requests[-1].status == 401

    anon = ts.get_token(scope)  # anonymous callers get a token with no access
    assert jwt.decode(anon, options={"verify_signature": False})["access"] == []
    assert ts.issued == 1 and ts.requests[-1].grant_type == "anonymous"
    assert http.get(f"{token_registry.url}/v2/", headers=_bearer(anon)).status_code == 200
    assert http.get(f"{token_registry.url}/v2/{unique_repo}/tags/list", headers=_bearer(anon)).status_code == 401

    ts.public_repos.add(unique_repo)
    try:
        anon = ts.get_token(f"repository:{unique_repo}:pull,push")
    finally:
        ts.public_repos.discard(unique_repo)
    claims = jwt.decode(anon, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]


def test_token_oauth2_post_flow(http: httpx.Client, token_registry: RegistryServer, unique_repo: str) -> None:
    ts = token_registry.token_server
    assert ts is not None
    ts.reset()
    scope = f"repository:{unique_repo}:pull"
    form = {"grant_type": "password", "username": ts.username, "password": ts.password, "service": ts.service}
    resp = http.post(ts.realm, data={**form, "scope": scope, "client_id": "ferry", "access_type": "offline"})
    assert resp.status_code == 200
    refresh = resp.json()["refresh_token"]
    assert resp.json()["scope"] == scope

    assert http.post(ts.realm, data={**form, "password": "wrong", "scope": scope}).status_code == 401

    resp = http.post(
        ts.realm,
        data={"grant_type": "refresh_token", "refresh_token": refresh, "service": ts.service, "scope": scope},
    )
    assert resp.status_code == 200
    token = resp.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["access"][0]["name"] == unique_repo
    assert http.get(f"{token_registry.url}/v2/{unique_repo}/tags/list", headers=_bearer(token)).status_code == 404

    bogus = http.post(ts.realm, data={"grant_type": "refresh_token", "refresh_token": "nope", "scope": scope})
    assert bogus.status_code == 401
    assert [r.grant_type for r in ts.requests] == ["password", "password", "refresh_token", "refresh_token"]
    assert ts.issued == 2

    # docker login style: GET with offline_token=true also returns a refresh token
    resp = http.get(ts.realm, params={"service": ts.service, "offline_token": "true"}, auth=(ts.username, ts.password))
    assert resp.json()["refresh_token"] in ts.refresh_tokens


def test_token_signed_by_unknown_key_is_rejected(
    http: httpx.Client, token_registry: RegistryServer, unique_repo: str
) -> None:
    ts = token_registry.token_server
    assert ts is not None
    good = ts.get_token(f"repository:{unique_repo}:pull", username=ts.username, password=ts.password)
    claims = jwt.decode(good, options={"verify_signature": False})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged_kid = jwt.encode(claims, other, algorithm="RS256", headers={"kid": libtrust_key_id(other.public_key())})
    same_kid = jwt.encode(claims, other, algorithm="RS256", headers={"kid": ts.key_id})
    for token in (forged_kid, same_kid):
        resp = http.get(f"{token_registry.url}/v2/{unique_repo}/tags/list", headers=_bearer(token))
        assert resp.status_code == 401
    assert http.get(f"{token_registry.url}/v2/{unique_repo}/tags/list", headers=_bearer(good)).status_code == 404


def test_token_x5c_header_mode(http: httpx.Client, registry_factory: RegistryFactory, tmp_path: Path) -> None:
    ts = start_token_server(tmp_path / "ts", key_id_mode="x5c", ttl=60)
    try:
        reg = registry_factory(auth="token", token_server=ts)
        token = ts.get_token("repository:x5c/repo:pull", username=ts.username, password=ts.password)
        header = jwt.get_unverified_header(token)
        assert "x5c" in header and "kid" not in header
        assert http.get(f"{reg.url}/v2/x5c/repo/tags/list", headers=_bearer(token)).status_code == 404
        assert http.get(f"{reg.url}/v2/x5c/repo/tags/list").status_code == 401
        reg.stop()
        assert ts.get_token()  # the registry does not own (and so does not stop) a token server it was given
    finally:
        ts.stop()


def test_libtrust_key_id_shape(token_registry: RegistryServer) -> None:
    ts = token_registry.token_server
    assert ts is not None
    groups = ts.key_id.split(":")
    assert len(groups) == 12 and all((len(g) == 4 and g.isupper()) or g.isdigit() for g in groups)


# --------------------------------------------------------------------------------------------------------------
# TLS


def test_tls_registry_needs_the_ca(tls_registry: RegistryServer) -> None:
    assert tls_registry.url == f"https://{tls_registry.host}"
    assert tls_registry.ca_cert is not None and tls_registry.cert_dir is not None
    assert tls_registry.cert_dir.name == tls_registry.host
    assert tls_registry.certs_d == tls_registry.cert_dir.parent
    assert (tls_registry.cert_dir / "ca.crt").read_bytes() == tls_registry.ca_cert.read_bytes()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_registry.url}/v2/")
    ctx = ssl.create_default_context(cafile=str(tls_registry.ca_cert))
    assert httpx.get(f"{tls_registry.url}/v2/", verify=ctx).status_code == 200
    # the cert is valid for localhost too
    port = tls_registry.port
    assert httpx.get(f"https://localhost:{port}/v2/", verify=ctx).status_code == 200
    # a plain-HTTP request to the TLS port gets Go's "client sent an HTTP request to an HTTPS server" 400
    assert httpx.get(f"http://{tls_registry.host}/v2/").status_code == 400


def test_tls_client_certificates(registry_factory: RegistryFactory, unique_repo: str) -> None:
    reg = registry_factory(tls=True, client_auth=True)
    assert reg.cert_dir is not None and reg.ca_cert is not None
    assert sorted(p.name for p in reg.cert_dir.iterdir()) == ["ca.crt", "client.cert", "client.key"]
    no_client_cert = ssl.create_default_context(cafile=str(reg.ca_cert))
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{reg.url}/v2/", verify=no_client_cert)
    with reg.client() as c:
        assert c.get("/v2/").status_code == 200
        push_tiny_image(c, unique_repo)
    out = skopeo("list-tags", "--cert-dir", str(reg.cert_dir), f"docker://{reg.host}/{unique_repo}")
    assert json.loads(out.stdout)["Tags"] == ["v1"]


# --------------------------------------------------------------------------------------------------------------
# skopeo as a peer


def test_skopeo_anonymous_and_copy(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    with registry.client() as c:
        digest = push_tiny_image(c, unique_repo)
    src = f"docker://{registry.host}/{unique_repo}"
    out = skopeo("list-tags", "--tls-verify=false", src)
    assert json.loads(out.stdout) == {"Repository": f"{registry.host}/{unique_repo}", "Tags": ["v1"]}
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"{src}:v1").stdout)
    assert info["Digest"] == digest and info["Architecture"] == "amd64"

    # registry → registry2 (needs the policy file the peer helper provides)
    mark = registry2.log_mark()
    skopeo(
        "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
        f"{src}:v1", f"docker://{registry2.host}/{unique_repo}:copied",
    )  # fmt: skip
    with registry2.client() as c:
        assert c.get(f"/v2/{unique_repo}/tags/list").json()["tags"] == ["copied"]
    assert registry2.count("PUT", rf"/v2/{unique_repo}/manifests/copied", since=mark) == 1
    assert registry2.count("PUT", rf"/v2/{unique_repo}/blobs/uploads/.+", since=mark) == 2

    # oci layout → registry, the other direction skopeo is often used for
    skopeo("copy", "--src-tls-verify=false", f"{src}:v1", f"oci:{tmp_path / 'layout'}:v1")
    skopeo(
        "copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1", f"docker://{registry.host}/{unique_repo}:2"
    )
    with registry.client() as c:
        assert sorted(c.get(f"/v2/{unique_repo}/tags/list").json()["tags"]) == ["2", "v1"]


def test_skopeo_htpasswd(auth_registry: RegistryServer, unique_repo: str) -> None:
    with auth_registry.client() as c:
        push_tiny_image(c, unique_repo)
    ref = f"docker://{auth_registry.host}/{unique_repo}"
    denied = skopeo("list-tags", "--tls-verify=false", ref, check=False)
    assert denied.returncode != 0 and "authentication required" in denied.stderr
    creds = f"{auth_registry.username}:{auth_registry.password}"
    out = skopeo("list-tags", "--tls-verify=false", "--creds", creds, ref)
    assert json.loads(out.stdout)["Tags"] == ["v1"]


def test_skopeo_token(token_registry: RegistryServer, unique_repo: str) -> None:
    ts = token_registry.token_server
    assert ts is not None
    token = ts.get_token(f"repository:{unique_repo}:pull,push", username=ts.username, password=ts.password)
    with httpx.Client(base_url=token_registry.url, headers=_bearer(token)) as c:
        push_tiny_image(c, unique_repo)
    ts.reset()
    ref = f"docker://{token_registry.host}/{unique_repo}"
    out = skopeo("list-tags", "--tls-verify=false", "--creds", f"{ts.username}:{ts.password}", ref)
    assert json.loads(out.stdout)["Tags"] == ["v1"]
    assert ts.issued >= 1
    assert f"repository:{unique_repo}:pull" in ts.scopes
    assert all(r.username == ts.username for r in ts.requests)

    with pytest.raises(SkopeoError):  # anonymous token has no access to the repository
        skopeo("list-tags", "--tls-verify=false", ref)


def test_skopeo_tls(tls_registry: RegistryServer, unique_repo: str) -> None:
    assert tls_registry.cert_dir is not None
    with tls_registry.client() as c:
        push_tiny_image(c, unique_repo)
    ref = f"docker://{tls_registry.host}/{unique_repo}"
    untrusted = skopeo("list-tags", ref, check=False)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr
    out = skopeo("list-tags", "--cert-dir", str(tls_registry.cert_dir), ref)
    assert json.loads(out.stdout)["Tags"] == ["v1"]


# --------------------------------------------------------------------------------------------------------------
# redis


def test_redis_fixture(redis_server: RedisServer) -> None:
    assert redis_server.url.startswith("redis://127.0.0.1:") and redis_server.url.endswith("/0")
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        client.set("ferry:harness", "1")
        assert client.get("ferry:harness") == b"1"
        assert client.config_get("save") == {"save": ""}
    finally:
        client.close()


def test_start_redis_and_stop(tmp_path: Path) -> None:
    t0 = time.monotonic()
    server = start_redis(tmp_path)
    try:
        assert time.monotonic() - t0 < 5
        assert server.command("PING") == b"+PONG"
        server.flushall()
    finally:
        proc = server.process
        server.stop()
    assert proc is not None and proc.poll() is not None
    with pytest.raises(OSError):
        server.command("PING")


# --------------------------------------------------------------------------------------------------------------
# no leftovers


def test_servers_die_with_a_killed_test_process(tmp_path: Path) -> None:
    """A hard-killed Python process (SIGKILL, os._exit from a timeout) takes its servers with it."""
    code = (
        "import sys\n"
        "from tests.harness.servers import start_registry, start_redis\n"
        f"reg = start_registry({str(tmp_path / 'reg')!r})\n"
        f"red = start_redis({str(tmp_path / 'redis')!r})\n"
        "print(reg.process.pid, red.process.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert child.stdout is not None
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return status != "Z"
