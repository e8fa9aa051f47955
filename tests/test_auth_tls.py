"""Authentication (anonymous, htpasswd Basic, Bearer tokens incl. refresh grants) and TLS (CA dirs, client
certificates, insecure mode, plain-HTTP fallback), all against real registries and a real token server."""

from __future__ import annotations

import base64
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.images import RegistryAuth, build_image, push_image
from tests.harness.servers import RegistryServer
from worker.registry import (
    ClientOptions,
    ConnectionFailed,
    Credentials,
    Descriptor,
    Digest,
    InvalidInput,
    RegistryClient,
    RetryPolicy,
    TLSError,
    Unauthorized,
    _auth,
)

IMG = build_image("auth-tls", layers=[400], fmt="v2s2")
NO_RETRY = RetryPolicy(times=0)


def client_for(reg: RegistryServer, creds: Credentials | None = None, **options: Any) -> RegistryClient:
    options.setdefault("retry", NO_RETRY)
    options.setdefault("tls_verify", False)
    return RegistryClient(reg.host, credentials=creds, options=ClientOptions(**options))


def user_creds(reg: RegistryServer) -> Credentials:
    assert reg.username is not None and reg.password is not None
    return Credentials(reg.username, reg.password)


def secret_forms(password: str, username: str) -> list[str]:
    return [password, base64.b64encode(f"{username}:{password}".encode()).decode()]


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)
    for secret in secrets:
        assert secret not in text


# --------------------------------------------------------------------------------------------------------------------
# anonymous and htpasswd


def test_anonymous(registry: RegistryServer, unique_repo: str) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    client = client_for(registry)
    assert client.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert client.auth.tokens_fetched == 0


@pytest.fixture(scope="module")
def auth_repo(auth_registry: RegistryServer) -> str:
    repo = "test/auth-basic"
    push_image(auth_registry.url, repo, "v1", IMG, auth=(auth_registry.username or "", auth_registry.password or ""))
    return repo


def test_basic_right_credentials(auth_registry: RegistryServer, auth_repo: str) -> None:
    client = client_for(auth_registry, user_creds(auth_registry))
    client.ping()
    mark = auth_registry.log_mark()
    for _ in range(3):
        assert client.get_manifest(auth_repo, "v1").raw == IMG.manifest
        assert client.read_blob(auth_repo, IMG.config_digest) == IMG.config
    log = auth_registry.access_log(mark)
    assert len(log) == 6
    assert all(e.status == 200 for e in log)  # Basic learned once, sent up front from then on


def test_basic_anonymous_refused(auth_registry: RegistryServer, auth_repo: str) -> None:
    with pytest.raises(Unauthorized, match=r"authentication required or credentials rejected \(HTTP 401\)"):
        client_for(auth_registry).get_manifest(auth_repo, "v1")


def test_basic_wrong_password(auth_registry: RegistryServer, auth_repo: str) -> None:
    wrong = "Wr0ng-pa55word-xyz"
    client = client_for(auth_registry, Credentials(auth_registry.username or "", wrong), retry=RetryPolicy(times=3))
    mark = auth_registry.log_mark()
    with pytest.raises(Unauthorized) as info:
        client.get_manifest(auth_repo, "v1")
    assert info.value.status == 401
    assert "HTTP 401" in str(info.value)
    assert_no_secret(info.value, *secret_forms(wrong, auth_registry.username or ""))
    # one anonymous try, one with the credentials; a rejection is never retried
    assert auth_registry.count("GET", r"/v2/.+/manifests/v1", since=mark) == 2


# --------------------------------------------------------------------------------------------------------------------
# bearer tokens


@pytest.fixture(scope="module")
def token_repos(token_registry: RegistryServer) -> tuple[str, str]:
    ts = token_registry.token_server
    assert ts is not None
    auth = RegistryAuth(ts.username, ts.password)
    repos = ("test/token-a", "test/token-b")
    for repo in repos:
        push_image(token_registry.url, repo, "v1", IMG, auth=auth)
    return repos


@pytest.fixture
def ts(token_registry: RegistryServer, token_repos: tuple[str, str]) -> Any:
    server = token_registry.token_server
    assert server is not None
    server.reset()
    return server


def test_token_fetched_once_and_reused(token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any) -> None:
    repo_a, repo_b = token_repos
    client = client_for(token_registry, user_creds(token_registry))
    for _ in range(10):
        assert client.get_manifest(repo_a, "v1").digest == IMG.digest
        assert client.head_manifest(repo_a, "v1") is not None
        assert client.read_blob(repo_a, IMG.config_digest) == IMG.config
    assert client.list_tags(repo_a) == ["v1"]
    assert ts.issued == 1
    assert ts.requests[0].username == ts.username
    assert ts.requests[0].scopes == (f"repository:{repo_a}:pull",)

    # another repository is another scope: one more token, then reused too
    for _ in range(3):
        client.get_manifest(repo_b, "v1")
    assert ts.issued == 2
    assert ts.requests[1].scopes == (f"repository:{repo_b}:pull",)

    # pushing needs pull,push
    data = b"pushed with a token"
    client.upload_blob(repo_b, Descriptor("application/octet-stream", Digest.of(data), len(data)), [data])
    assert ts.issued == 3
    assert ts.requests[2].scopes == (f"repository:{repo_b}:pull,push",)
    assert client.read_blob(repo_b, Digest.of(data)) == data


def test_token_anonymous_has_no_access(token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any) -> None:
    with pytest.raises(Unauthorized):
        client_for(token_registry).get_manifest(token_repos[0], "v1")
    assert ts.issued >= 1
    assert all(r.grant_type == "anonymous" for r in ts.requests)
    assert ts.issued <= 3  # re-scoped at most once, no loop


def test_token_wrong_password(token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any) -> None:
    wrong = "Wr0ng-token-pa55"
    client = client_for(token_registry, Credentials(ts.username, wrong))
    with pytest.raises(Unauthorized, match="token service refused the credentials") as info:
        client.get_manifest(token_repos[0], "v1")
    assert_no_secret(info.value, *secret_forms(wrong, ts.username))
    assert ts.issued == 0
    assert len(ts.requests) == 1 and ts.requests[0].status == 401


class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_token_expiry_refresh(
    token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_auth, "time", clock)
    client = client_for(token_registry, user_creds(token_registry))
    client.get_manifest(token_repos[0], "v1")
    assert ts.issued == 1
    clock.offset = ts.ttl - 60  # well before expiry: reused
    client.get_manifest(token_repos[0], "v1")
    assert ts.issued == 1
    clock.offset = ts.ttl  # past expiry (less the safety margin): fetched again before the request
    mark = token_registry.log_mark()
    client.get_manifest(token_repos[0], "v1")
    assert ts.issued == 2
    assert [e.status for e in token_registry.access_log(mark)] == [200]  # no 401 round trip


def test_token_rejected_by_registry_is_refetched(
    token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any
) -> None:
    client = client_for(token_registry, user_creds(token_registry))
    client.get_manifest(token_repos[0], "v1")
    for token in client.auth._tokens.values():  # e.g. revoked, or signed with a rotated key
        token.value = token.value[:-8] + "AAAAAAAA"
    mark = token_registry.log_mark()
    assert client.get_manifest(token_repos[0], "v1").digest == IMG.digest
    assert ts.issued == 2
    assert [e.status for e in token_registry.access_log(mark)] == [401, 200]


def test_insufficient_scope_rescoped_once(
    token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first token comes back without the access asked for; the registry's insufficient_scope challenge names
    the scope, and the client asks again (once) for it."""
    granted: list[int] = []

    def stingy_first(user: str | None, typ: str, name: str, actions: list[str]) -> list[str]:
        granted.append(1)
        return [] if len(granted) == 1 else actions

    monkeypatch.setattr(ts, "authorizer", stingy_first)
    client = client_for(token_registry, user_creds(token_registry))
    mark = token_registry.log_mark()
    assert client.get_manifest(token_repos[0], "v1").digest == IMG.digest
    assert ts.issued == 2
    assert ts.requests[1].scopes == (f"repository:{token_repos[0]}:pull",)
    manifest_gets = [e.status for e in token_registry.access_log(mark) if "/manifests/" in e.path]
    assert manifest_gets == [401, 401, 200]  # anonymous; token without access (insufficient_scope); re-scoped


def test_insufficient_scope_gives_up(
    token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ts, "authorizer", lambda user, typ, name, actions: [])
    client = client_for(token_registry, user_creds(token_registry), retry=RetryPolicy(times=3, delay=0))
    mark = token_registry.log_mark()
    with pytest.raises(Unauthorized):
        client.get_manifest(token_repos[0], "v1")
    assert ts.issued == 2
    assert token_registry.count("GET", r"/v2/.+/manifests/v1", since=mark) == 3


def test_identity_token_refresh_grant(token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any) -> None:
    resp = httpx.post(
        ts.realm,
        data={
            "grant_type": "password",
            "username": ts.username,
            "password": ts.password,
            "service": ts.service,
            "client_id": "ferry-tests",
        },
    )
    refresh = resp.json()["refresh_token"]
    ts.reset()
    client = client_for(token_registry, Credentials(identity_token=refresh))
    assert client.get_manifest(token_repos[1], "v1").digest == IMG.digest
    assert client.read_blob(token_repos[1], IMG.config_digest) == IMG.config
    assert ts.issued == 1
    (req,) = ts.requests
    assert (req.method, req.grant_type, req.username) == ("POST", "refresh_token", ts.username)
    assert req.scopes == (f"repository:{token_repos[1]}:pull",)

    bogus = client_for(token_registry, Credentials(identity_token="not-a-refresh-token"))
    with pytest.raises(Unauthorized) as info:
        bogus.get_manifest(token_repos[1], "v1")
    assert_no_secret(info.value, "not-a-refresh-token")


def test_credentials_only_to_registry_and_its_realm(
    token_registry: RegistryServer, token_repos: tuple[str, str], ts: Any
) -> None:
    """Record every request the client sends: the password goes to the token realm named in the challenge,
    the registry only ever sees Bearer tokens."""
    seen: list[httpx.Request] = []
    real = httpx.HTTPTransport(verify=False)

    class Recording(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return real.handle_request(request)

    client = client_for(token_registry, user_creds(token_registry), transport=Recording())
    client.get_manifest(token_repos[0], "v1")
    basic = [r for r in seen if r.headers.get("authorization", "").startswith("Basic ")]
    assert basic and all(str(r.url).startswith(ts.realm) for r in basic)
    to_registry = [r for r in seen if r.url.port == token_registry.port and "authorization" in r.headers]
    assert to_registry and all(r.headers["authorization"].startswith("Bearer ") for r in to_registry)


# --------------------------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def tls_repo(tls_registry: RegistryServer) -> str:
    push_image(tls_registry.url, "test/tls", "v1", IMG, verify=tls_registry.ssl_context())
    return "test/tls"


def test_tls_untrusted_by_default(tls_registry: RegistryServer, tls_repo: str) -> None:
    client = client_for(tls_registry, tls_verify=True)
    with pytest.raises(TLSError, match=rf"TLS certificate of {tls_registry.host} is not trusted"):
        client.get_manifest(tls_repo, "v1")


def test_tls_with_cert_dir(tls_registry: RegistryServer, tls_repo: str) -> None:
    client = client_for(tls_registry, tls_verify=True, cert_dir=str(tls_registry.cert_dir))
    assert client.get_manifest(tls_repo, "v1").digest == IMG.digest
    assert client.base_url == f"https://{tls_registry.host}"


def test_tls_verify_false_still_https(tls_registry: RegistryServer, tls_repo: str) -> None:
    client = client_for(tls_registry, tls_verify=False)
    assert client.read_blob(tls_repo, IMG.config_digest) == IMG.config
    assert client.base_url == f"https://{tls_registry.host}"  # not downgraded


def test_tls_missing_cert_dir(tls_registry: RegistryServer, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        client_for(tls_registry, tls_verify=True, cert_dir=str(tmp_path / "nope"))


def test_tls_client_certificate(registry_factory: Any, tmp_path: Path) -> None:
    reg = registry_factory(tls=True, client_auth=True)
    push_image(reg.url, "test/mtls", "v1", IMG, verify=reg.ssl_context())
    assert {p.name for p in reg.cert_dir.iterdir()} == {"ca.crt", "client.cert", "client.key"}

    client = client_for(reg, tls_verify=True, cert_dir=str(reg.cert_dir))
    assert client.get_manifest("test/mtls", "v1").digest == IMG.digest

    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(reg.cert_dir / "ca.crt", ca_only / "ca.crt")
    with pytest.raises(TLSError, match="client certificate"):
        client_for(reg, tls_verify=True, cert_dir=str(ca_only)).get_manifest("test/mtls", "v1")
    # insecure mode does not turn a refused handshake into a confusing plain-HTTP answer
    with pytest.raises(TLSError, match="client certificate"):
        client_for(reg, tls_verify=False).get_manifest("test/mtls", "v1")

    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(reg.cert_dir / "client.cert", half / "client.cert")
    with pytest.raises(InvalidInput, match="no matching key"):
        client_for(reg, tls_verify=True, cert_dir=str(half))


def test_plain_http_registry(registry: RegistryServer, unique_repo: str) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    insecure = client_for(registry, tls_verify=False)
    assert insecure.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert insecure.base_url == f"http://{registry.host}"

    with pytest.raises(TLSError, match="--tls-verify=false"):
        client_for(registry, tls_verify=True).get_manifest(unique_repo, "v1")


def test_insecure_fallback_keeps_the_https_error(tmp_path: Path) -> None:
    """Nothing listening: the error names the refused connection (the https attempt), not a later http one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RegistryClient(f"127.0.0.1:{port}", options=ClientOptions(tls_verify=False, retry=NO_RETRY))
    with pytest.raises(ConnectionFailed, match=rf"connection to 127.0.0.1:{port} refused"):
        client.get_manifest("x", "v1")
