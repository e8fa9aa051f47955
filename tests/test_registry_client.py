"""RegistryClient against real registries (CNCF distribution 2.8), and against an ``httpx.MockTransport`` only for
faults a real registry cannot be made to produce: tampered bytes, oversized manifests, throttling, 5xx, dropped
connections, cut downloads, redirects to other hosts, and tag pagination (distribution 2.8 ignores ``n`` for tags).
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import RegistryFactory
from tests.harness.images import build_image, build_multiarch, push_blob, push_image
from tests.harness.servers import RegistryServer
from worker.registry import (
    ClientOptions,
    ConnectionFailed,
    Credentials,
    Descriptor,
    Digest,
    DigestMismatch,
    Forbidden,
    ManifestError,
    MediaType,
    NotFound,
    RegistryClient,
    RegistryError,
    RetryPolicy,
    ServerError,
    SizeMismatch,
    TooManyRequests,
    Unauthorized,
)

FAST_RETRY = RetryPolicy(times=3, delay=0.0)
BLOB_TYPE = "application/octet-stream"


def real_client(reg: RegistryServer, **options: Any) -> RegistryClient:
    options.setdefault("retry", FAST_RETRY)
    return RegistryClient(reg.host, options=ClientOptions(tls_verify=False, **options))


def blob_desc(data: bytes) -> Descriptor:
    return Descriptor(BLOB_TYPE, Digest.of(data), len(data))


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --------------------------------------------------------------------------------------------------------------------
# a scripted registry behind httpx.MockTransport


Handler = Callable[[httpx.Request], httpx.Response]


class Fake:
    """``https://reg.test``: answers ``/v2/`` with 200, hands every other request to ``handler``, records all."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == "reg.test" and request.url.path == "/v2/":
            return httpx.Response(200, json={})
        return self.handler(request)

    def calls(self, path_part: str) -> list[httpx.Request]:
        return [r for r in self.requests if path_part in str(r.url)]

    def client(self, *, retry: RetryPolicy = FAST_RETRY, **kwargs: Any) -> RegistryClient:
        credentials = kwargs.pop("credentials", None)
        options = ClientOptions(transport=httpx.MockTransport(self), retry=retry, **kwargs)
        return RegistryClient("reg.test", credentials=credentials, options=options)


def manifest_response(raw: bytes, media_type: str = MediaType.OCI_MANIFEST, **headers: str) -> httpx.Response:
    return httpx.Response(200, content=raw, headers={"Content-Type": media_type, **headers})


def body(data: bytes, status: int = 200, **headers: str) -> httpx.Response:
    """A response whose body is streamed like a real transport's (``content=`` would be pre-read)."""
    return httpx.Response(status, stream=httpx.ByteStream(data), headers={"Content-Length": str(len(data)), **headers})


def error_response(status: int, code: str = "UNKNOWN", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": code.lower()}]}, headers=headers)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record (and skip) every time.sleep: tenacity sleeps through it between attempts."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


IMG = build_image("client-basic", layers=[700], fmt="oci")


# --------------------------------------------------------------------------------------------------------------------
# manifests against a real registry


def test_manifest_put_head_get_delete(registry: RegistryServer, unique_repo: str) -> None:
    client = real_client(registry)
    for digest, _size, blob in IMG.blobs():
        data = blob if isinstance(blob, bytes) else blob.data  # type: ignore[union-attr]
        client.upload_blob(unique_repo, Descriptor(BLOB_TYPE, digest, len(data)), [data])
    assert client.head_manifest(unique_repo, "v1") is None

    digest = client.put_manifest(unique_repo, "v1", IMG.manifest, IMG.media_type)
    assert digest == IMG.digest

    head = client.head_manifest(unique_repo, "v1")
    assert head == Descriptor(MediaType.OCI_MANIFEST, IMG.digest, len(IMG.manifest))
    assert client.head_manifest(unique_repo, IMG.digest) == head

    by_tag = client.get_manifest(unique_repo, "v1")
    by_digest = client.get_manifest(unique_repo, IMG.digest)
    for m in (by_tag, by_digest):
        assert m.raw == IMG.manifest
        assert m.digest == IMG.digest
        assert m.media_type == MediaType.OCI_MANIFEST
    assert by_tag.json()["config"]["digest"] == str(IMG.config_digest)
    assert client.read_blob(unique_repo, IMG.config_digest) == IMG.config

    client.delete_manifest(unique_repo, IMG.digest)
    assert client.head_manifest(unique_repo, "v1") is None
    assert client.head_manifest(unique_repo, IMG.digest) is None
    with pytest.raises(NotFound, match=r"reading manifest v1 in .*: manifest unknown \(HTTP 404\)"):
        client.get_manifest(unique_repo, "v1")


def test_get_manifest_types_and_put_by_digest(registry: RegistryServer, unique_repo: str) -> None:
    index = build_multiarch("client-index", platforms=["linux/amd64", "linux/arm64"], layers=[300], fmt="v2s2")
    for child in index.children:
        push_image(registry.url, unique_repo, None, child)
    client = real_client(registry)
    # a manifest list PUT by digest, then read by digest: nothing is tagged
    assert client.put_manifest(unique_repo, index.digest, index.manifest, index.media_type) == index.digest
    m = client.get_manifest(unique_repo, index.digest)
    assert (m.raw, m.media_type) == (index.manifest, MediaType.DOCKER_MANIFEST_LIST)
    arm = client.get_manifest(unique_repo, index.children[1].digest)
    assert arm.media_type == MediaType.DOCKER_MANIFEST
    assert arm.raw == index.children[1].manifest
    assert client.head_manifest(unique_repo, "latest") is None  # nothing was tagged


def test_missing_repository_errors(registry: RegistryServer, unique_repo: str) -> None:
    client = real_client(registry)
    mark = registry.log_mark()
    with pytest.raises(NotFound):
        client.get_manifest(unique_repo, "nope")
    with pytest.raises(NotFound, match="repository name not known"):
        client.list_tags(unique_repo)
    assert client.blob_size(unique_repo, Digest.of(b"nothing")) is None
    # 404s are final: one request each (after the one-time /v2/ probe)
    assert registry.count("GET", r"/v2/.+/manifests/nope", since=mark) == 1
    assert registry.count("GET", r"/v2/.+/tags/list", since=mark) == 1


# --------------------------------------------------------------------------------------------------------------------
# blobs against a real registry


def test_upload_monolithic(registry: RegistryServer, unique_repo: str) -> None:
    data = os.urandom(200_000)
    desc = blob_desc(data)
    client = real_client(registry)
    client.ping()
    mark = registry.log_mark()
    seen: list[int] = []
    client.upload_blob(unique_repo, desc, pieces(data, 7_000), progress=seen.append)
    assert registry.count("POST", r"/v2/.+/blobs/uploads/", since=mark) == 1
    assert registry.count("PATCH", r".*", since=mark) == 0
    assert registry.count("PUT", r"/v2/.+/blobs/uploads/.+", since=mark) == 1
    assert sum(seen) == len(data)
    assert client.blob_size(unique_repo, desc.digest) == len(data)
    assert client.read_blob(unique_repo, desc.digest) == data


def test_upload_chunked_counts_patches(registry: RegistryServer, unique_repo: str) -> None:
    chunk = 64 * 1024
    data = os.urandom(5 * chunk + 1234)
    desc = blob_desc(data)
    client = real_client(registry, chunk_size=chunk)
    client.ping()
    mark = registry.log_mark()
    seen: list[int] = []
    # the caller's pieces do not line up with the PATCH size
    client.upload_blob(unique_repo, desc, pieces(data, 50_000), progress=seen.append)
    assert registry.count("PATCH", r"/v2/.+/blobs/uploads/.+", since=mark) == math.ceil(len(data) / chunk) == 6
    assert registry.count("PUT", r"/v2/.+/blobs/uploads/.+", since=mark) == 1
    assert sum(seen) == len(data)
    with client.open_blob(unique_repo, desc.digest, desc.size) as chunks:
        assert b"".join(chunks) == data


@pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
def test_upload_digest_mismatch_commits_nothing(registry: RegistryServer, unique_repo: str, chunked: bool) -> None:
    data = os.urandom(150_000)
    claimed = Descriptor(BLOB_TYPE, Digest.of(b"something else"), len(data))
    client = real_client(registry, chunk_size=32 * 1024 if chunked else 1 << 20)
    client.ping()
    mark = registry.log_mark()
    with pytest.raises(DigestMismatch) as info:
        client.upload_blob(unique_repo, claimed, pieces(data, 10_000))
    assert info.value.expected == claimed.digest
    assert info.value.actual == Digest.of(data)
    assert not client.blob_exists(unique_repo, claimed.digest)
    assert not client.blob_exists(unique_repo, Digest.of(data))
    # no PUT ?digest= succeeded: a small blob's streamed PUT was cut short before its last bytes
    assert not [e for e in registry.access_log(mark) if e.method == "PUT" and e.status in (201, 204)]
    if chunked:
        assert registry.count("PUT", r".*", since=mark) == 0
    assert registry.count("DELETE", r"/v2/.+/blobs/uploads/.+", since=mark) == 1


def test_upload_size_mismatch(registry: RegistryServer, unique_repo: str) -> None:
    data = os.urandom(1000)
    client = real_client(registry)
    with pytest.raises(SizeMismatch, match="expected 999 bytes, got 1000"):
        client.upload_blob(unique_repo, Descriptor(BLOB_TYPE, Digest.of(data), 999), [data])
    assert not client.blob_exists(unique_repo, Digest.of(data))


def test_mount_and_mount_fallback(registry: RegistryServer, unique_repo: str) -> None:
    data = os.urandom(5000)
    desc = blob_desc(data)
    push_blob(registry.url, f"{unique_repo}-src", desc.digest, data, len(data))
    client = real_client(registry)
    client.ping()

    mark = registry.log_mark()
    assert client.mount_blob(f"{unique_repo}-dst", desc.digest, f"{unique_repo}-src") is True
    log = registry.access_log(mark)
    assert [(e.method, e.status) for e in log] == [("POST", 201)]
    assert "mount=" in log[0].query and "from=" in log[0].query
    assert client.read_blob(f"{unique_repo}-dst", desc.digest) == data

    # from a repository the registry does not have: 202 opens an upload, which the client cancels
    mark = registry.log_mark()
    assert client.mount_blob(f"{unique_repo}-other", desc.digest, f"{unique_repo}-missing") is False
    log = registry.access_log(mark)
    assert [(e.method, e.status) for e in log] == [("POST", 202), ("DELETE", 204)]
    assert not client.blob_exists(f"{unique_repo}-other", desc.digest)


def test_open_blob_missing_is_not_found(registry: RegistryServer, unique_repo: str) -> None:
    client = real_client(registry)
    with pytest.raises(NotFound), client.open_blob(unique_repo, Digest.of(b"absent")) as chunks:
        next(iter(chunks))


# --------------------------------------------------------------------------------------------------------------------
# tags and catalog


@pytest.fixture(scope="module")
def many_tags(registry: RegistryServer) -> tuple[str, list[str]]:
    """One small manifest under 151 tags (distribution lists them all at once, in its own order)."""
    repo = f"test/many-tags-{secrets.token_hex(3)}"
    img = build_image("many-tags", layers=[100])
    push_image(registry.url, repo, "latest", img)
    tags = ["latest"] + [f"v{i:03d}" for i in range(150)]
    with httpx.Client(base_url=registry.url, timeout=10) as http, ThreadPoolExecutor(8) as pool:

        def put(tag: str) -> int:
            headers = {"Content-Type": img.media_type}
            return http.put(f"/v2/{repo}/manifests/{tag}", content=img.manifest, headers=headers).status_code

        assert set(pool.map(put, tags[1:])) == {201}
    return repo, tags


def test_list_tags_over_100(registry: RegistryServer, many_tags: tuple[str, list[str]]) -> None:
    repo, tags = many_tags
    client = real_client(registry)
    got = client.list_tags(repo)
    assert sorted(got) == sorted(tags)
    assert len(got) == 151
    with httpx.Client(base_url=registry.url) as http:
        assert got == http.get(f"/v2/{repo}/tags/list").json()["tags"]  # the registry's order, unchanged
    assert client.list_tags(repo, page_size=10) == got  # distribution 2.8 ignores n for tags: one page


def test_list_tags_follows_link_pages() -> None:
    """Link-header pagination as registries that honour ``n`` do it (relative and absolute next links)."""
    tags = [f"t{i:03d}" for i in range(230)]

    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.url.params.get("n", "1000"))
        last = request.url.params.get("last")
        start = tags.index(last) + 1 if last else 0
        page = tags[start : start + n]
        headers = {}
        if start + n < len(tags):
            nxt = f"/v2/a/b/tags/list?n={n}&last={page[-1]}"
            if start:  # alternate relative and absolute links
                nxt = "https://reg.test" + nxt
            headers["Link"] = f'<{nxt}>; rel="next"'
        return httpx.Response(200, json={"name": "a/b", "tags": page}, headers=headers)

    fake = Fake(handler)
    assert fake.client().list_tags("a/b", page_size=50) == tags
    pages = fake.calls("/tags/list")
    assert len(pages) == 5
    assert pages[0].url.params["n"] == "50"
    assert pages[2].url.params["last"] == "t099"


def test_pagination_refuses_a_repeated_link() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"tags": ["x"]}, headers={"Link": '</v2/a/tags/list?n=1>; rel="next"'})

    fake = Fake(handler)
    with pytest.raises(RegistryError, match="links back to a page it already sent"):
        fake.client().list_tags("a", page_size=1)
    assert len(fake.calls("/tags/list")) == 1  # the link names the page just read: not fetched again


def test_catalog_pagination(registry_factory: RegistryFactory) -> None:
    # a registry of its own: the shared one gains repositories from other tests, and whether distribution 2.8
    # links a full last page to an empty one depends on where its storage walk stops, so the count here is
    # chosen to end on a partial page
    registry = registry_factory()
    repos = [f"pages/r{i}" for i in range(7)]
    for repo in repos:
        push_blob(registry.url, repo, Digest.of(b"c"), b"c", 1)
    client = real_client(registry)
    client.ping()
    mark = registry.log_mark()
    assert client.catalog(page_size=3) == sorted(repos)
    # one request per page: 3 + 3 + 1, the partial last page has no Link
    assert registry.count("GET", r"/v2/_catalog", since=mark) == 3


# --------------------------------------------------------------------------------------------------------------------
# integrity and size limits (mock transport)


def test_manifest_by_digest_is_verified() -> None:
    good = IMG.manifest
    tampered = json.dumps(json.loads(good)).encode()  # same JSON, other bytes

    fake = Fake(lambda r: manifest_response(tampered, **{"Docker-Content-Digest": str(IMG.digest)}))
    with pytest.raises(DigestMismatch) as info:
        fake.client().get_manifest("a/b", IMG.digest)
    assert info.value.expected == IMG.digest
    assert info.value.actual == Digest.of(tampered)
    assert str(IMG.digest) in str(info.value)
    # by tag there is nothing to check against: the digest is computed from the bytes
    assert fake.client().get_manifest("a/b", "v1").digest == Digest.of(tampered)


def test_manifest_sha512_digest_verified() -> None:
    raw = IMG.manifest
    d512 = Digest.of(raw, "sha512")
    fake = Fake(lambda r: manifest_response(raw))
    assert fake.client().get_manifest("a/b", d512).digest == d512
    with pytest.raises(DigestMismatch):
        fake.client().get_manifest("a/b", Digest.of(raw + b" ", "sha512"))


def test_head_manifest_wrong_digest_header() -> None:
    other = Digest.of(b"other")
    fake = Fake(
        lambda r: httpx.Response(
            200,
            headers={
                "Docker-Content-Digest": str(other),
                "Content-Type": MediaType.OCI_MANIFEST,
                "Content-Length": "9",
            },
        )
    )
    with pytest.raises(DigestMismatch):
        fake.client().head_manifest("a/b", IMG.digest)


def test_read_blob_verified() -> None:
    fake = Fake(lambda r: body(b"not the config"))
    with pytest.raises(DigestMismatch, match=str(IMG.config_digest)):
        fake.client().read_blob("a/b", IMG.config_digest)


def test_manifest_over_4mib_refused() -> None:
    big = b"{" + b" " * (4 * 1024 * 1024) + b"}"
    fake = Fake(lambda r: manifest_response(big))
    with pytest.raises(ManifestError, match="over the 4194304 byte limit"):
        fake.client().get_manifest("a/b", "big")

    produced: list[int] = []

    def endless() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(100):
            produced.append(1)
            yield b" " * (256 * 1024)

    fake = Fake(lambda r: httpx.Response(200, content=endless(), headers={"Content-Type": MediaType.OCI_MANIFEST}))
    with pytest.raises(ManifestError, match="over the 4194304 byte limit"):
        fake.client().get_manifest("a/b", "big")
    assert len(produced) <= 18  # stopped reading soon after 4 MiB, not after 25 MiB
    with pytest.raises(ManifestError, match="over the 4194304 byte limit"):
        Fake(lambda r: httpx.Response(201)).client().put_manifest("a/b", "big", big, MediaType.OCI_MANIFEST)


def test_malformed_manifest() -> None:
    fake = Fake(lambda r: manifest_response(b"<html>oops</html>", "text/html"))
    with pytest.raises(ManifestError, match="malformed manifest"):
        fake.client().get_manifest("a/b", "v1")


# --------------------------------------------------------------------------------------------------------------------
# retries (mock transport)


def flaky(failures: list[httpx.Response | Exception], final: Handler) -> Handler:
    """Answer with each failure in turn (raise it if it is an exception), then ``final`` forever."""
    pending = list(failures)

    def handler(request: httpx.Request) -> httpx.Response:
        if pending:
            failure = pending.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return final(request)

    return handler


def ok_manifest(request: httpx.Request) -> httpx.Response:
    return manifest_response(IMG.manifest)


def test_429_retry_after_seconds(sleeps: list[float]) -> None:
    throttled: list[tuple[str, float]] = []
    before: list[str] = []

    class Gate:
        def before_request(self, host: str) -> None:
            before.append(host)

        def on_throttled(self, host: str, retry_after: float) -> None:
            throttled.append((host, retry_after))

    fake = Fake(flaky([error_response(429, "TOOMANYREQUESTS", **{"Retry-After": "7"})] * 2, ok_manifest))
    client = fake.client(retry=RetryPolicy(times=3), gate=Gate())
    assert client.get_manifest("a/b", "v1").raw == IMG.manifest
    assert sleeps == [7.0, 7.0]
    assert len(fake.calls("/manifests/")) == 3
    assert throttled == [("reg.test", 7.0), ("reg.test", 7.0)]
    assert before.count("reg.test") == len(fake.requests)


def test_429_retry_after_http_date(sleeps: list[float]) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    fake = Fake(flaky([error_response(429, **{"Retry-After": when})], ok_manifest))
    assert fake.client(retry=RetryPolicy(times=2)).get_manifest("a/b", "v1").digest == IMG.digest
    assert len(sleeps) == 1
    assert 28.0 <= sleeps[0] <= 30.5


def test_429_exhausted_reports_retry_after(sleeps: list[float]) -> None:
    fake = Fake(lambda r: error_response(429, "TOOMANYREQUESTS", **{"Retry-After": "2"}))
    with pytest.raises(TooManyRequests) as info:
        fake.client(retry=RetryPolicy(times=2)).get_manifest("a/b", "v1")
    assert info.value.retry_after == 2.0
    assert info.value.status == 429
    assert len(fake.calls("/manifests/")) == 3
    assert sleeps == [2.0, 2.0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_retried_then_success(status: int, sleeps: list[float]) -> None:
    fake = Fake(flaky([error_response(status)] * 2, ok_manifest))
    assert fake.client(retry=RetryPolicy(times=3, initial=0.1)).get_manifest("a/b", "v1").raw == IMG.manifest
    assert len(fake.calls("/manifests/")) == 3
    assert len(sleeps) == 2
    assert all(0 <= s <= 0.2 for s in sleeps)  # exponential backoff with jitter from `initial`


def test_5xx_gives_up_after_retry_times(sleeps: list[float]) -> None:
    fake = Fake(lambda r: error_response(503, "UNAVAILABLE"))
    with pytest.raises(ServerError, match=r"HTTP 503"):
        fake.client(retry=RetryPolicy(times=2, delay=1.5)).get_manifest("a/b", "v1")
    assert len(fake.calls("/manifests/")) == 3
    assert sleeps == [1.5, 1.5]


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(401, "UNAUTHORIZED", Unauthorized), (403, "DENIED", Forbidden), (404, "MANIFEST_UNKNOWN", NotFound)],
)
def test_client_errors_never_retried(status: int, code: str, error: type[Exception], sleeps: list[float]) -> None:
    fake = Fake(lambda r: error_response(status, code))
    with pytest.raises(error):
        fake.client(retry=RetryPolicy(times=5)).get_manifest("a/b", "v1")
    assert len(fake.calls("/manifests/")) == 1
    assert sleeps == []


def test_connection_reset_retried(sleeps: list[float]) -> None:
    reset = httpx.ReadError("[Errno 104] Connection reset by peer")
    fake = Fake(flaky([reset, reset], ok_manifest))
    assert fake.client().get_manifest("a/b", "v1").raw == IMG.manifest
    assert len(fake.calls("/manifests/")) == 3


def test_connection_reset_on_first_request_retried(sleeps: list[float]) -> None:
    """The very first request to a host (the /v2/ probe) gets the same retries."""
    attempts: list[str] = []

    def transport(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) == 1:
            raise httpx.ConnectError("[Errno 104] Connection reset by peer")
        return httpx.Response(200, json={}) if request.url.path == "/v2/" else ok_manifest(request)

    client = RegistryClient(
        "reg.test", options=ClientOptions(transport=httpx.MockTransport(transport), retry=FAST_RETRY)
    )
    assert client.get_manifest("a/b", "v1").digest == IMG.digest
    assert attempts == ["/v2/", "/v2/", "/v2/a/b/manifests/v1"]


def test_connection_reset_exhausted() -> None:
    fake = Fake(lambda r: (_ for _ in ()).throw(httpx.ReadError("Connection reset by peer")))
    with pytest.raises(ConnectionFailed, match=r"connection to reg\.test failed"):
        fake.client(retry=RetryPolicy(times=1, delay=0)).get_manifest("a/b", "v1")
    assert len(fake.calls("/manifests/")) == 2


class CutStream(httpx.SyncByteStream):
    """A response body that delivers ``data`` and then breaks like a reset connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


def test_dropped_blob_download_resumes_with_range() -> None:
    data = os.urandom(30_000)
    digest = Digest.of(data)
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        ranges.append(rng)
        if rng is None:
            return httpx.Response(200, stream=CutStream(data[:12_000]), headers={"Content-Length": str(len(data))})
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        if start < 20_000:  # cut a second time
            return httpx.Response(206, stream=CutStream(data[start:20_000]))
        return body(data[start:], 206, **{"Content-Range": f"bytes {start}-29999/30000"})

    fake = Fake(handler)
    assert fake.client().read_blob("a/b", digest) == data
    assert ranges == [None, "bytes=12000-", "bytes=20000-"]


def test_dropped_download_without_range_support_fails_cleanly() -> None:
    data = os.urandom(5000)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=CutStream(data[:1000]))  # ignores Range, always starts over

    fake = Fake(handler)
    with pytest.raises(ConnectionFailed, match="cannot resume"):
        fake.client().read_blob("a/b", Digest.of(data))


# --------------------------------------------------------------------------------------------------------------------
# credentials stay on the registry's host (mock transport)


def basic_registry(redirects: dict[str, httpx.Response]) -> Handler:
    """reg.test demands Basic auth; other hosts answer from ``redirects`` by host."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host != "reg.test":
            return redirects[request.url.host]
        if "authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="reg.test"'})
        if "/blobs/uploads/" in request.url.path and request.method == "POST":
            return httpx.Response(202, headers={"Location": "https://upload.other.test/session/1?sig=abc"})
        return httpx.Response(307, headers={"Location": "https://cdn.other.test/blob/xyz?sig=abc"})

    return handler


def test_blob_redirect_to_other_host_gets_no_credentials() -> None:
    data = b"layer bytes from the cdn"
    fake = Fake(basic_registry({"cdn.other.test": body(data)}))
    client = fake.client(credentials=Credentials("alice", "s3cret"))
    assert client.read_blob("a/b", Digest.of(data)) == data
    registry_calls = [r for r in fake.requests if r.url.host == "reg.test" and "/blobs/" in r.url.path]
    assert registry_calls[-1].headers["authorization"].startswith("Basic ")
    cdn = [r for r in fake.requests if r.url.host == "cdn.other.test"]
    assert len(cdn) == 1
    assert "authorization" not in cdn[0].headers
    assert cdn[0].url.params["sig"] == "abc"


def test_upload_location_on_other_host_gets_no_credentials() -> None:
    data = b"x" * 100
    put = httpx.Response(201, headers={"Docker-Content-Digest": str(Digest.of(data))})
    fake = Fake(basic_registry({"upload.other.test": put}))
    client = fake.client(credentials=Credentials("alice", "s3cret"))
    client.upload_blob("a/b", blob_desc(data), [data])
    posts = [r for r in fake.requests if r.method == "POST" and r.url.host == "reg.test"]
    assert posts[-1].headers["authorization"].startswith("Basic ")
    uploads = [r for r in fake.requests if r.url.host == "upload.other.test"]
    assert [r.method for r in uploads] == ["PUT"]
    assert "authorization" not in uploads[0].headers
    assert uploads[0].url.params["digest"] == str(Digest.of(data))


def test_foreign_host_401_is_not_answered_with_credentials() -> None:
    challenge = httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="elsewhere"'})
    fake = Fake(basic_registry({"upload.other.test": challenge}))
    client = fake.client(credentials=Credentials("alice", "s3cret"))
    with pytest.raises(Unauthorized):
        client.upload_blob("a/b", blob_desc(b"y"), [b"y"])
    foreign = [r for r in fake.requests if r.url.host == "upload.other.test"]
    assert foreign and all("authorization" not in r.headers for r in foreign)
