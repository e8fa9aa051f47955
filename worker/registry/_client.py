"""The OCI distribution (v1.1) client for one registry host.

One ``RegistryClient`` talks to one registry host and holds that host's
credentials, tokens and TLS settings. It knows nothing of Celery or Redis;
callers that want shared throttling across processes pass a ``RequestGate``.

Streaming rules: blob downloads yield chunks (resuming a dropped download with
``Range``); uploads consume an iterator of chunks and verify size and digest as
the bytes pass, so a bad blob is never committed. Streamed requests are never
retried here (the body cannot be replayed): callers restart the whole upload.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import tenacity

from ._auth import Authenticator, repository_scope
from ._credentials import Credentials
from ._documents import Fields, load_object, parse_name_page
from ._errors import (
    ConnectionFailed,
    DigestMismatch,
    FerryError,
    Forbidden,
    HeldOff,
    ManifestError,
    NetworkError,
    NotFound,
    RegistryError,
    RequestTimeout,
    ServerError,
    SizeMismatch,
    TLSError,
    TooManyRequests,
    Unauthorized,
    UnknownHost,
    Unsupported,
    is_temporary,
)
from ._mediatype import sniff_media_type
from ._pools import ThreadPools
from ._stall import StallGuard, TransferStalled, env_min_rate, env_window
from ._tls import ssl_context
from ._types import MANIFEST_ACCEPT, Descriptor, Digest
from ._verify import verify_stream

log = logging.getLogger("ferry.registry")

T = TypeVar("T")

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: Blobs up to this size are uploaded in one PUT.
MONOLITHIC_LIMIT = 4 * 1024 * 1024
#: Streamed uploads send PATCH requests of at most this many bytes.
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
READ_CHUNK = 1024 * 1024
#: connections a thread keeps alive per host (it rarely holds more than two at once)
_THREAD_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=4, keepalive_expiry=30.0)
#: environment variables httpx takes proxies from
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
#: a tag list or catalog longer than this is refused (it is held in memory whole)
MAX_LISTED = 1_000_000
USER_AGENT = "ferry/0.1"


class RequestGate(Protocol):
    """Hook to share throttling between processes (Ferry's workers back it with Redis)."""

    def before_request(self, host: str) -> None: ...

    def on_throttled(self, host: str, retry_after: float) -> None: ...


#: set while a ``RetryPolicy.run`` is retrying on this thread: requests inside it are tried once each
_retry_scope = threading.local()


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry temporary failures, and how long to wait (``--retry-times``/``--retry-delay``)."""

    times: int = 3
    #: fixed delay between attempts; ``None`` means exponential backoff with jitter
    delay: float | None = None
    initial: float = 0.5
    maximum: float = 30.0

    def wait_seconds(self, attempt: int, exc: BaseException | None) -> float:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(min(max(retry_after, 0.0), 300.0))
        if self.delay is not None:
            return self.delay
        return random.uniform(0, min(self.maximum, self.initial * (2 ** max(attempt - 1, 0))))

    def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying temporary failures; inside another ``run`` on this thread, call it once.

        Retries never nest: the outermost ``run`` (a step: an existence check, a mount, a whole transfer, a
        manifest push; or a single request outside any step) owns the one budget of ``times`` retries, and
        the requests it makes are not retried again on their own.
        """
        if getattr(_retry_scope, "active", False):
            return fn()
        _retry_scope.active = True
        try:
            # the first attempt costs one call: tenacity's machinery is set up only once something failed
            try:
                return fn()
            except Exception as exc:
                if self.times <= 0 or not _retryable(exc):
                    raise
                failed = exc
            return self._retrying(fn, failed)
        finally:
            _retry_scope.active = False

    def _retrying(self, fn: Callable[[], T], failed: Exception) -> T:
        """Attempts 2.. of ``fn``, whose first attempt raised ``failed`` (waits and logs as if tenacity made it)."""
        first: list[Exception] = [failed]

        def again() -> T:
            if first:
                raise first.pop()
            return fn()

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number, exc)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("retrying after %s (attempt %d of %d)", exc, state.attempt_number, self.times + 1)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.times + 1),
            retry=tenacity.retry_if_exception(_retryable),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(again)


def _retryable(exc: BaseException) -> bool:
    # a shared backoff is not waited out here: the caller (a task) is rescheduled instead
    return is_temporary(exc) and not isinstance(exc, HeldOff)


@dataclass
class ClientOptions:
    tls_verify: bool = True
    cert_dir: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 60.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    user_agent: str = USER_AGENT
    #: an httpx transport, for the few faults a real registry cannot be made to produce
    transport: httpx.BaseTransport | None = None
    gate: RequestGate | None = None
    #: tag list and catalog pagination stops with an error after this many pages
    max_pages: int = 10_000
    #: a body slower than ``min_rate`` bytes/s over ``stall_window`` seconds fails as a timeout (0: no check)
    min_rate: float = field(default_factory=env_min_rate)
    stall_window: float = field(default_factory=env_window)


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    media_type: str
    digest: Digest

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))

    def json(self) -> dict[str, Any]:
        """The manifest's top-level JSON object (``MalformedDocument`` when it is none)."""
        return self.fields().obj

    def fields(self) -> Fields:
        """The manifest's top-level object, for checked field access (``MalformedDocument`` otherwise)."""
        return load_object(self.raw, f"manifest {self.digest}")


#: with --tls-verify=false, the scheme each host answered on (per process: every client to the host shares it)
_SCHEMES: dict[str, tuple[str, float]] = {}
_SCHEMES_LOCK = threading.Lock()
#: a learnt scheme is probed again after this many seconds (a registry may move to TLS)
SCHEME_TTL = 600.0


def _learnt_scheme(host: str) -> str | None:
    with _SCHEMES_LOCK:
        entry = _SCHEMES.get(host)
    if entry is None or time.monotonic() - entry[1] > SCHEME_TTL:
        return None
    return entry[0]


def _learn_scheme(host: str, base: str) -> str:
    with _SCHEMES_LOCK:
        _SCHEMES[host] = (base, time.monotonic())
    return base


def translate_transport_error(exc: httpx.HTTPError, host: str) -> FerryError:
    """The one place httpx's errors become Ferry's."""
    text = str(exc)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return UnknownHost(f"cannot resolve registry host {host!r}: {cause.strerror or cause}")
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TLSError(f"TLS certificate of {host} is not trusted: {cause.verify_message or cause}")
        if isinstance(cause, ssl.SSLError):
            hint = ""
            if cause.reason == "WRONG_VERSION_NUMBER":
                hint = " (the registry may speak plain HTTP: use --tls-verify=false)"
            elif cause.reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
                hint = " (the registry may require a client certificate: NAME.cert and NAME.key in --cert-dir)"
            return TLSError(f"TLS handshake with {host} failed: {cause.reason or cause}{hint}")
        cause = cause.__cause__ or cause.__context__
    if "Name or service not known" in text or "nodename nor servname" in text or "No address associated" in text:
        return UnknownHost(f"cannot resolve registry host {host!r}")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return TLSError(f"TLS certificate of {host} is not trusted")
    if isinstance(exc, (TransferStalled, httpx.WriteTimeout)) and "stalled" in text:
        return RequestTimeout(f"transfer with {host} too slow: {text}")
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(f"request to {host} timed out")
    if isinstance(exc, httpx.ConnectError):
        if "refused" in text.lower():
            return ConnectionFailed(f"connection to {host} refused")
        return ConnectionFailed(f"cannot connect to {host}: {text or type(exc).__name__}")
    return ConnectionFailed(f"connection to {host} failed: {text or type(exc).__name__}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def registry_error(resp: httpx.Response, what: str) -> RegistryError:
    """Build the error for a failed response; the message names the operation and the registry's own words."""
    codes: list[str] = []
    messages: list[str] = []
    with contextlib.suppress(Exception):
        body = json.loads(resp.read()) if resp.headers.get("content-type", "").find("json") >= 0 else None
        if isinstance(body, dict):
            for err in body.get("errors") or []:
                if isinstance(err, dict):
                    code = str(err.get("code", ""))
                    msg = str(err.get("message", ""))
                    codes.append(code)
                    if msg:
                        messages.append(msg)
    status = resp.status_code
    detail = "; ".join(messages) if messages else (resp.reason_phrase or "").lower()
    text = f"{what}: {detail} (HTTP {status})" if detail else f"{what}: HTTP {status}"
    cls: type[RegistryError]
    if status == 401:
        cls = Unauthorized
        text = f"{what}: authentication required or credentials rejected (HTTP 401)"
    elif status == 403 or "DENIED" in codes:
        cls = Forbidden
    elif status == 404 or any(c.endswith("_UNKNOWN") for c in codes):
        cls = NotFound
    elif status == 429 or "TOOMANYREQUESTS" in codes:
        cls = TooManyRequests
    elif status >= 500 or "UNAVAILABLE" in codes:
        cls = ServerError
    elif status == 405 or "UNSUPPORTED" in codes:
        cls = Unsupported
    else:
        cls = RegistryError
    return cls(text, status=status, codes=tuple(codes), retry_after=_retry_after(resp.headers.get("retry-after")))


class RegistryClient:
    """Client for one registry host (``Reference.registry``)."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        from ._reference import DOCKER_HUB, DOCKER_HUB_API

        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.options = options or ClientOptions()
        self._base: str | None = None
        self._base_lock = threading.Lock()
        self._http = self._make_http()
        self.auth = Authenticator(self.host, credentials, lambda: self._http)
        self.requests_sent = 0
        self._no_referrers = False
        # what every request carries, worked out once (the client's defaults: User-Agent, Accept, ...)
        self._default_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self._http.headers.raw}
        self._extensions = {"timeout": self._http.timeout.as_dict()}
        # with proxies in the environment (HTTPS_PROXY, NO_PROXY...), requests go through httpx.Client, which
        # applies them; otherwise straight to the transport (the Client's auth, redirect and cookie layers are
        # not used: the client authenticates, follows redirects by hand and, like skopeo, keeps no cookies)
        self._env_proxies = any(os.environ.get(k) for k in _PROXY_VARIABLES)

    def _make_http(self) -> httpx.Client:
        opts = self.options
        verify: ssl.SSLContext | bool = ssl_context(self.host, verify=opts.tls_verify, cert_dir=opts.cert_dir)
        timeout = httpx.Timeout(opts.timeout, connect=min(opts.timeout, 30.0))
        if opts.transport is not None:
            inner = opts.transport
        else:
            # connections kept alive 30 s, in one small pool per thread: a thread sends one request at a time (two
            # when it streams a blob from and to the same host), so a request never waits for a connection nor
            # scans or locks a pool every other thread uses (httpcore's shared pool did both, per request)
            inner = ThreadPools(lambda: httpx.HTTPTransport(verify=verify, limits=_THREAD_LIMITS))
        # every body is held to a minimum rate: a trickling server cannot reset the read timeout for ever
        self._transport = StallGuard(inner, opts.min_rate, opts.stall_window)
        return httpx.Client(
            verify=verify,
            timeout=timeout,
            headers={"User-Agent": opts.user_agent},
            follow_redirects=False,
            transport=self._transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``https://host`` or, for an insecure registry that does not speak TLS, ``http://host``."""
        if self._base is None:
            with self._base_lock:
                if self._base is None:
                    self._base = self._probe_scheme()
        return self._base

    def _probe_scheme(self) -> str:
        https = f"https://{self.host}"
        if self.options.tls_verify:
            # the first request to a host: a dropped connection here is as temporary as anywhere else
            self.options.retry.run(lambda: self._send_raw("GET", https + "/v2/"))
            return https
        learnt = _learnt_scheme(self.host)
        if learnt is not None:
            return learnt
        try:
            self._send_raw("GET", https + "/v2/").close()
            return _learn_scheme(self.host, https)
        except (TLSError, ConnectionFailed) as exc:
            https_error = exc
        # --tls-verify=false: like containers/image, fall back to plain HTTP -- if it answers like a registry;
        # otherwise (e.g. an HTTPS-only server answering 400 to plain HTTP) the HTTPS failure is the real one.
        # Its answers are classified like any other: a 503, a 429 or a reset is retried, and if it lasts it is
        # reported as the temporary failure it is, never as "not a registry" (a permanent TLS error).
        http = f"http://{self.host}"
        what = f"checking {self.registry} over plain HTTP"

        def probe_http() -> int:
            resp = self._send_raw("GET", http + "/v2/")  # not streamed: read whole (a drop mid-body raises here)
            error = registry_error(resp, what)
            if is_temporary(error):
                raise error
            return resp.status_code

        try:
            status = self.options.retry.run(probe_http)
        except RegistryError:
            raise
        except NetworkError as exc:
            if isinstance(https_error, TLSError) and is_temporary(exc):
                # something answered in plain text on this port: its failing now is temporary
                raise ConnectionFailed(f"{exc} (after the TLS handshake failed: {https_error})") from None
            raise https_error from None
        if status not in (200, 401):
            raise https_error
        return _learn_scheme(self.host, http)

    def _send_raw(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        if self.options.gate is not None:
            self.options.gate.before_request(self.host)
        hdrs = {**self._default_headers, **headers} if headers else self._default_headers
        self.requests_sent += 1
        try:
            req = httpx.Request(method, url, headers=hdrs, content=content, extensions=self._extensions)
            if self._env_proxies:
                resp = self._http.send(req, stream=stream)
            else:
                resp = self._transport.handle_request(req)
                resp.request = req
                if not stream:
                    try:
                        resp.read()
                    finally:
                        resp.close()
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, self.host) from exc
        except httpx.InvalidURL as exc:
            raise RegistryError(f"{method} {_without_query(url)}: not a valid URL ({exc})") from exc
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: HTTP %d", method, _without_query(url), resp.status_code)
        if resp.status_code == 429 and self.options.gate is not None:
            self.options.gate.on_throttled(self.host, _retry_after(resp.headers.get("retry-after")) or 1.0)
        return resp

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        scopes: Sequence[str],
        what: str,
        ok: Sequence[int] = (200,),
        headers: dict[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        stream: bool = False,
        params: dict[str, str] | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send a request with authentication; raise the mapped error unless the status is in ``ok``."""
        url = path_or_url if "://" in path_or_url else self.base_url + path_or_url
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        replayable = content is None or isinstance(content, bytes)
        # An absolute URL from the registry (upload Location, Link header) may name another host:
        # credentials and tokens go only to this registry's own host.
        own_host = "://" not in path_or_url or _same_host(url, self.host)  # a path is on this registry's base URL

        def attempt() -> httpx.Response:
            tries = 0
            while True:
                hdrs = dict(headers or {})
                if own_host:
                    hdrs.update(self.auth.headers(scopes))
                resp = self._send_raw(method, url, headers=hdrs, content=content, stream=stream)
                if resp.status_code == 401 and replayable and own_host:
                    with contextlib.suppress(httpx.HTTPError):
                        resp.read()
                    resp.close()
                    if self.auth.challenge(resp, scopes, attempt=tries):
                        tries += 1
                        continue
                if resp.status_code in ok:
                    return resp
                try:
                    resp.read()
                except httpx.HTTPError as exc:
                    raise translate_transport_error(exc, self.host) from exc
                finally:
                    resp.close()
                raise registry_error(resp, what)

        if retry and replayable:
            return self.options.retry.run(attempt)
        return attempt()

    @staticmethod
    def _pull(repo: str) -> list[str]:
        return [repository_scope(repo, "pull")]

    @staticmethod
    def _push(repo: str) -> list[str]:
        return [repository_scope(repo, "pull", "push")]

    # -- API check -----------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the host speaks the distribution API and our credentials (if any) work."""
        self._request("GET", "/v2/", scopes=[], what=f"checking {self.registry}")

    # -- manifests -------------------------------------------------------------------------------------------------

    def head_manifest(self, repo: str, ref: str | Digest) -> Descriptor | None:
        """Descriptor of the manifest (digest, type, size) by a HEAD request; ``None`` when absent."""
        resp = self._request(
            "HEAD",
            f"/v2/{repo}/manifests/{ref}",
            scopes=self._pull(repo),
            what=f"checking manifest {ref} in {self.registry}/{repo}",
            ok=(200, 404),
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
        )
        if resp.status_code == 404:
            return None
        dig = resp.headers.get("docker-content-digest")
        size = int(resp.headers.get("content-length") or -1)
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        if not dig:
            # The registry did not say; a GET gives the bytes to hash.
            m = self.get_manifest(repo, ref)
            return m.descriptor
        digest = Digest.parse(dig)
        if isinstance(ref, Digest) and digest != ref:
            raise DigestMismatch(f"manifest {self.registry}/{repo}@{ref}", ref, digest)
        return Descriptor(media_type, digest, size)

    def get_manifest(self, repo: str, ref: str | Digest, accept: Sequence[str] = MANIFEST_ACCEPT) -> Manifest:
        what = f"reading manifest {ref} in {self.registry}/{repo}"
        resp = self._request(
            "GET",
            f"/v2/{repo}/manifests/{ref}",
            scopes=self._pull(repo),
            what=what,
            headers={"Accept": ", ".join(accept)},
            stream=True,
        )
        try:
            declared = int(resp.headers.get("content-length") or 0)
            if declared > MAX_MANIFEST_SIZE:
                raise ManifestError(f"{what}: manifest is {declared} bytes, over the {MAX_MANIFEST_SIZE} byte limit")
            buf = bytearray()
            for chunk in resp.iter_bytes():
                buf.extend(chunk)
                if len(buf) > MAX_MANIFEST_SIZE:
                    raise ManifestError(f"{what}: manifest is over the {MAX_MANIFEST_SIZE} byte limit")
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, self.host) from exc
        finally:
            resp.close()
        raw = bytes(buf)
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        if isinstance(ref, Digest):
            actual = Digest.of(raw, ref.algorithm)
            if actual != ref:
                raise DigestMismatch(f"manifest {self.registry}/{repo}@{ref}", ref, actual)
            digest = ref
        else:
            digest = Digest.of(raw)
        media_type = sniff_media_type(raw, what, media_type)
        return Manifest(raw, media_type, digest)

    def put_manifest(self, repo: str, ref: str | Digest, raw: bytes, media_type: str) -> Digest:
        what = f"writing manifest {ref} to {self.registry}/{repo}"
        if len(raw) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"{what}: manifest is {len(raw)} bytes, over the {MAX_MANIFEST_SIZE} byte limit")
        resp = self._request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            scopes=self._push(repo),
            what=what,
            ok=(200, 201, 202),
            headers={"Content-Type": media_type},
            content=raw,
        )
        expected = Digest.of(raw, ref.algorithm if isinstance(ref, Digest) else "sha256")
        dig = resp.headers.get("docker-content-digest")
        if dig and Digest.parse(dig).algorithm == expected.algorithm and Digest.parse(dig) != expected:
            raise DigestMismatch(f"manifest pushed to {self.registry}/{repo}", expected, dig)
        return expected

    def delete_manifest(self, repo: str, digest: Digest) -> None:
        self._request(
            "DELETE",
            f"/v2/{repo}/manifests/{digest}",
            scopes=[repository_scope(repo, "delete"), *self._push(repo)],
            what=f"deleting {self.registry}/{repo}@{digest}",
            ok=(200, 202),
        )

    # -- tags and catalog ---------------------------------------------------------------------------------------

    def list_tags(self, repo: str, page_size: int | None = None) -> list[str]:
        return self._paginate(
            f"/v2/{repo}/tags/list", "tags", self._pull(repo), f"listing tags of {self.registry}/{repo}", page_size
        )

    def catalog(self, page_size: int | None = 1000) -> list[str]:
        return self._paginate(
            "/v2/_catalog",
            "repositories",
            ["registry:catalog:*"],
            f"listing repositories of {self.registry}",
            page_size,
        )

    def catalog_pages(self, page_size: int | None = 1000) -> Iterator[list[str]]:
        """The repositories of ``_catalog`` page by page, as each page arrives."""
        return self._pages(
            "/v2/_catalog",
            "repositories",
            ["registry:catalog:*"],
            f"listing repositories of {self.registry}",
            page_size,
        )

    def _paginate(self, path: str, key: str, scopes: list[str], what: str, page_size: int | None) -> list[str]:
        return [entry for page in self._pages(path, key, scopes, what, page_size) for entry in page]

    def _pages(self, path: str, key: str, scopes: list[str], what: str, page_size: int | None) -> Iterator[list[str]]:
        """Follow ``Link: rel="next"`` to the end; a registry whose pages never end or loop gets an error."""
        listed = 0
        url: str | None = path + (f"?n={page_size}" if page_size else "")
        seen: set[str] = set()
        while url:
            if len(seen) >= self.options.max_pages:
                raise RegistryError(f"{what}: more than {self.options.max_pages} pages; giving up")
            absolute = url if "://" in url else self.base_url + url
            if absolute in seen:
                raise RegistryError(f"{what}: the registry links back to a page it already sent ({url})")
            seen.add(absolute)
            resp = self._request("GET", url, scopes=scopes, what=what)
            page = parse_name_page(resp.content, key, f"answer to {what}")
            listed += len(page)
            if listed > MAX_LISTED:
                raise RegistryError(f"{what}: more than {MAX_LISTED} entries; giving up")
            url = _next_link(resp.headers.get("link"), self.base_url + path)
            yield page

    # -- blobs ---------------------------------------------------------------------------------------------------------

    def blob_size(self, repo: str, digest: Digest) -> int | None:
        """Size of the blob from a HEAD request, or ``None`` when the repository does not have it."""
        resp = self._request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            scopes=self._pull(repo),
            what=f"checking blob {digest} in {self.registry}/{repo}",
            ok=(200, 404),
        )
        if resp.status_code == 404:
            return None
        return int(resp.headers.get("content-length") or 0)

    def blob_exists(self, repo: str, digest: Digest) -> bool:
        return self.blob_size(repo, digest) is not None

    @contextlib.contextmanager
    def open_blob(self, repo: str, digest: Digest, size: int | None = None) -> Iterator[Iterator[bytes]]:
        """Stream a blob's bytes; a dropped download resumes with ``Range`` from where it stopped.

        The chunks are not verified here (the copier verifies every byte on the way through);
        use ``read_blob`` for a small blob wanted whole and checked.
        """
        state: dict[str, httpx.Response | None] = {"resp": None}
        what = f"reading blob {digest} from {self.registry}/{repo}"

        def open_at(offset: int) -> httpx.Response:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp = self._request(
                "GET",
                f"/v2/{repo}/blobs/{digest}",
                scopes=self._pull(repo),
                what=what,
                ok=(200, 206, 301, 302, 303, 307, 308),
                headers=headers,
                stream=True,
            )
            hops = 0
            while resp.status_code in (301, 302, 303, 307, 308):
                location = resp.headers.get("location")
                resp.close()
                hops += 1
                if not location or hops > 5:
                    raise RegistryError(f"{what}: bad redirect")
                # A redirect (often to object storage on another host) gets no credentials.
                target = urljoin(str(resp.request.url), location)
                resp = self._send_raw("GET", target, headers=headers, stream=True)
            if resp.status_code not in (200, 206):
                resp.read()
                resp.close()
                raise registry_error(resp, what)
            if offset and resp.status_code != 206:
                resp.close()
                raise ConnectionFailed(f"{what}: the download broke and the server cannot resume it")
            state["resp"] = resp
            return resp

        def chunks() -> Iterator[bytes]:
            received = 0
            resumes = 0
            resp = self.options.retry.run(lambda: open_at(0))
            while True:
                try:
                    # chunks as they arrive: a re-chunking buffer would lose what it held when the
                    # connection drops, and the resume would start before bytes already received
                    for chunk in resp.iter_raw():
                        received += len(chunk)
                        yield chunk
                    return
                except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout) as exc:
                    resp.close()
                    resumes += 1
                    if resumes > max(self.options.retry.times, 1) or (size is not None and received >= size):
                        raise translate_transport_error(exc, self.host) from exc
                    log.info("download of %s dropped after %d bytes; resuming", digest, received)
                    resp = self.options.retry.run(lambda at=received: open_at(at))  # type: ignore[misc]

        try:
            yield chunks()
        finally:
            resp = state["resp"]
            if resp is not None:
                resp.close()

    def read_blob(self, repo: str, digest: Digest, limit: int = MAX_MANIFEST_SIZE * 4) -> bytes:
        """A small blob (a config) read whole and verified."""
        buf = bytearray()
        with self.open_blob(repo, digest) as chunks:
            for chunk in chunks:
                buf.extend(chunk)
                if len(buf) > limit:
                    raise ManifestError(f"blob {digest} is larger than {limit} bytes")
        actual = Digest.of(bytes(buf), digest.algorithm)
        if actual != digest:
            raise DigestMismatch(f"blob {digest} from {self.registry}/{repo}", digest, actual)
        return bytes(buf)

    def mount_blob(self, repo: str, digest: Digest, from_repo: str) -> bool:
        """Cross-repository mount; ``False`` when the registry starts an upload instead (202)."""
        resp = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            params={"mount": str(digest), "from": from_repo},
            scopes=self._push(repo) + self._pull(from_repo),
            what=f"mounting blob {digest} from {from_repo} into {self.registry}/{repo}",
            ok=(201, 202),
        )
        if resp.status_code == 201:
            return True
        # The registry opened an upload session instead: close it so it does not linger.
        location = resp.headers.get("location")
        if location:
            self._cancel_upload(repo, location)
        return False

    def open_upload(self, repo: str, digest: Digest) -> str | None:
        """Ask whether ``repo`` has the blob and, if not, start its upload: one request for both.

        A cross-repository mount from the repository itself: a registry that has the blob there answers 201
        (``None`` is returned: nothing to upload); otherwise it falls back to an upload session (202, as the
        distribution spec says for any mount it cannot make), whose location is returned for ``upload_blob``.
        A registry that refuses the request raises (the caller then asks with a HEAD).
        """
        resp = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            params={"mount": str(digest), "from": repo},
            scopes=self._push(repo),
            what=f"checking blob {digest} in {self.registry}/{repo}",
            ok=(201, 202),
        )
        if resp.status_code == 201:
            return None
        location = str(resp.headers.get("location") or "")
        if not location:
            raise RegistryError(f"starting upload to {self.registry}/{repo}: the registry sent no upload location")
        return urljoin(self.base_url + "/", location)

    def cancel_upload(self, repo: str, location: str) -> None:
        """Give up an upload session (best effort: it expires on the registry anyway)."""
        self._cancel_upload(repo, location)

    def _start_upload(self, repo: str) -> str:
        resp = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            scopes=self._push(repo),
            what=f"starting upload to {self.registry}/{repo}",
            ok=(202,),
        )
        location = str(resp.headers.get("location") or "")
        if not location:
            raise RegistryError(f"starting upload to {self.registry}/{repo}: the registry sent no upload location")
        return urljoin(self.base_url + "/", location)

    def _cancel_upload(self, repo: str, location: str) -> None:
        with contextlib.suppress(FerryError, httpx.HTTPError):
            self._request(
                "DELETE",
                urljoin(self.base_url + "/", location),
                scopes=self._push(repo),
                what="cancelling upload",
                ok=(200, 202, 204, 404),
                retry=False,
            )

    def upload_blob(
        self,
        repo: str,
        desc: Descriptor,
        chunks: Iterable[bytes],
        *,
        progress: Callable[[int], None] | None = None,
        location: str | None = None,
    ) -> None:
        """Upload a blob from a stream of chunks, verifying size and digest on the way.

        Small blobs (up to ``MONOLITHIC_LIMIT`` and ``chunk_size``) go in one PUT; larger ones as PATCH
        requests of at most ``chunk_size`` bytes each, streamed, then a closing PUT. On any failure
        (including a digest mismatch) the upload session is cancelled: nothing is
        committed. ``location``: a session ``open_upload`` started (else one is started here).
        """
        verified = verify_stream(chunks, desc, f"blob {desc.digest}")
        if location is None:
            location = self._start_upload(repo)
        what = f"uploading blob {desc.digest} to {self.registry}/{repo}"
        try:
            if 0 <= desc.size <= min(MONOLITHIC_LIMIT, self.options.chunk_size):
                # One PUT whose body is the verified stream itself (never gathered): the stream raises before
                # its last chunk when the digest or size is wrong, so the registry sees a body shorter than
                # Content-Length and commits nothing.
                self._request(
                    "PUT",
                    location,
                    params={"digest": str(desc.digest)},
                    scopes=self._push(repo),
                    what=what,
                    ok=(201, 204),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
                    content=_counting(iter(verified), progress),
                    retry=False,
                )
                return
            it = iter(verified)
            if desc.size < 0:
                # Size unknown: one streamed PATCH with chunked transfer encoding.
                resp = self._request(
                    "PATCH",
                    location,
                    scopes=self._push(repo),
                    what=what,
                    ok=(202, 204),
                    headers={"Content-Type": "application/octet-stream"},
                    content=_counting(it, progress),
                    retry=False,
                )
                location = urljoin(location, resp.headers.get("location") or location)
            offset = 0
            leftover = [b""]
            while 0 <= offset < desc.size:
                length = min(self.options.chunk_size, desc.size - offset)
                resp = self._request(
                    "PATCH",
                    location,
                    scopes=self._push(repo),
                    what=what,
                    ok=(202, 204),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + length - 1}",
                        "Content-Length": str(length),
                    },
                    content=_segment(it, leftover, length, desc, progress),
                    retry=False,
                )
                offset += length
                location = urljoin(location, resp.headers.get("location") or location)
            for _extra in it:
                raise SizeMismatch(f"blob {desc.digest}", desc.size, desc.size + 1)
            self._request(
                "PUT",
                location,
                params={"digest": str(desc.digest)},
                scopes=self._push(repo),
                what=what,
                ok=(201, 204),
                content=b"",
                retry=False,
            )
        except BaseException:
            self._cancel_upload(repo, location)
            raise

    def delete_blob(self, repo: str, digest: Digest) -> None:
        self._request(
            "DELETE",
            f"/v2/{repo}/blobs/{digest}",
            scopes=[repository_scope(repo, "delete"), *self._push(repo)],
            what=f"deleting blob {digest} from {self.registry}/{repo}",
            ok=(200, 202),
        )

    # -- referrers (OCI 1.1) ---------------------------------------------------------------------------------------

    def referrers(self, repo: str, digest: Digest) -> list[Descriptor] | None:
        """Descriptors of manifests whose ``subject`` is ``digest``; ``None`` when the registry lacks the API.

        A registry with the API never answers 404 (OCI distribution 1.1): after a 404 or 405 the client
        asks no more.
        """
        if self._no_referrers:
            return None
        resp = self._request(
            "GET",
            f"/v2/{repo}/referrers/{digest}",
            scopes=self._pull(repo),
            what=f"listing referrers of {digest} in {self.registry}/{repo}",
            ok=(200, 404, 405),
            headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        )
        if resp.status_code != 200:
            self._no_referrers = True
            return None
        ctype = resp.headers.get("content-type", "")
        if "application/vnd.oci.image.index.v1+json" not in ctype:
            return None
        body = load_object(resp.content, f"referrers list of {digest} in {self.registry}/{repo}")
        return [Descriptor.from_json(d) for d in body.objects("manifests")]


def _segment(
    it: Iterator[bytes],
    leftover: list[bytes],
    length: int,
    desc: Descriptor,
    progress: Callable[[int], None] | None,
) -> Iterator[bytes]:
    """Yield exactly ``length`` bytes from ``it`` (splitting a chunk if needed): one PATCH body, streamed."""
    sent = 0
    while sent < length:
        chunk = leftover[0]
        leftover[0] = b""
        if not chunk:
            nxt = next(it, None)
            if nxt is None:
                raise SizeMismatch(f"blob {desc.digest}", desc.size, sent)
            chunk = nxt
        take = chunk[: length - sent]
        leftover[0] = chunk[len(take) :]
        sent += len(take)
        if progress:
            progress(len(take))
        yield take


def _counting(it: Iterator[bytes], progress: Callable[[int], None] | None) -> Iterator[bytes]:
    for chunk in it:
        if progress:
            progress(len(chunk))
        yield chunk


def _without_query(url: str) -> str:
    return url.split("?", 1)[0]


def _same_host(url: str, host: str) -> bool:
    """Whether ``url`` points at ``host`` (``name[:port]``); a missing port matches the scheme's default."""
    target = urlsplit(url)
    own = urlsplit("//" + host)
    if (target.hostname or "").lower() != (own.hostname or "").lower():
        return False
    default = {"https": 443, "http": 80}.get(target.scheme)
    target_port = target.port or default
    return target_port == (own.port or default)


def _next_link(header: str | None, base: str) -> str | None:
    if not header:
        return None
    for part in header.split(","):
        url, _, params = part.partition(";")
        if 'rel="next"' in params.replace(" ", "") or "rel=next" in params.replace(" ", ""):
            url = url.strip().strip("<>")
            return urljoin(base, url)
    return None


__all__ = [
    "ClientOptions",
    "Manifest",
    "RegistryClient",
    "RequestGate",
    "RetryPolicy",
    "registry_error",
    "translate_transport_error",
]
