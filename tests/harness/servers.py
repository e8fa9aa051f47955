"""Real servers for the test suite: CNCF distribution (``docker-registry``), a token server, Redis.

Everything listens on 127.0.0.1 only, on free ports, with state in a caller-supplied temp dir.

- :func:`start_registry` starts ``/usr/bin/docker-registry`` (distribution 2.8) anonymous, with htpasswd
  basic auth, or with token auth; optionally over TLS (optionally requiring client certificates).
- :func:`start_token_server` starts an in-process Docker token server (GET and OAuth2 POST flows) that counts
  the tokens it issues.
- :func:`start_redis` starts ``redis-server`` without persistence.

Every child process is killed by :meth:`stop`, by :func:`stop_all` (the test session calls it at the end),
at interpreter exit, and -- when started from the main thread -- by the kernel if the Python process dies.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import hashlib
import ipaddress
import json
import re
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qs, urlsplit

import bcrypt
import httpx
import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "AccessLogEntry",
    "CertAuthority",
    "RedisServer",
    "RegistryServer",
    "TokenRequest",
    "TokenServer",
    "libtrust_key_id",
    "start_redis",
    "start_registry",
    "start_token_server",
    "stop_all",
]

REGISTRY_BIN = "/usr/bin/docker-registry"
REDIS_BIN = "/usr/bin/redis-server"
POLL_INTERVAL = 0.02
STARTUP_TIMEOUT = 15.0
SYNC_USER_AGENT = "ferry-harness-sync"

AuthMode = Literal["htpasswd", "token"]


# --------------------------------------------------------------------------------------------------------------
# process bookkeeping


_live_lock = threading.Lock()
_live: set[subprocess.Popen[bytes]] = set()
_live_stoppers: list[Callable[[], None]] = []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen between fork and exec


def _child_preexec() -> None:  # pragma: no cover - runs in the child
    # Die with the parent (SIGKILL on parent death). Only used when spawning from the main thread: the signal fires
    # when the *thread* that forked exits, which would kill a server spawned from a short-lived worker thread.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn(argv: Sequence[str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    preexec = _child_preexec if threading.current_thread() is threading.main_thread() else None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=preexec,
        )
    with _live_lock:
        _live.add(proc)
    return proc


def _terminate(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with _live_lock:
        _live.discard(proc)


def stop_all() -> None:
    """Stop every server this module started and has not stopped yet (token servers included)."""
    with _live_lock:
        stoppers = list(_live_stoppers)
        procs = list(_live)
    for stop in stoppers:
        with contextlib.suppress(Exception):
            stop()
    for proc in procs:
        _terminate(proc, grace=1.0)


atexit.register(stop_all)


def _register_stopper(stop: Callable[[], None]) -> None:
    with _live_lock:
        _live_stoppers.append(stop)


def _unregister_stopper(stop: Callable[[], None]) -> None:
    with _live_lock, contextlib.suppress(ValueError):
        _live_stoppers.remove(stop)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------------------
# certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _write_cert(path: Path, *certs: x509.Certificate) -> None:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


class CertAuthority:
    """A throwaway CA (ECDSA P-256: instant to generate) that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "Ferry Test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "ca.crt"
        _write_cert(self.cert_path, self.cert)

    def issue(
        self,
        basename: str,
        *,
        common_name: str,
        hosts: Iterable[str] = (),
        client: bool = False,
        cert_suffix: str = ".crt",
    ) -> tuple[Path, Path]:
        """Issue a leaf certificate; returns ``(cert_path, key_path)`` written into the CA's directory."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.directory / f"{basename}{cert_suffix}"
        key_path = self.directory / f"{basename}.key"
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
        return cert_path, key_path


def libtrust_key_id(public_key: Any) -> str:
    """The key ID docker/libtrust (and so distribution's token auth ``kid`` lookup) derives from a public key.

    base32(sha256(DER SubjectPublicKeyInfo)[:30]) in groups of four joined by ``:``.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


# --------------------------------------------------------------------------------------------------------------
# token server


class TokenRequest(NamedTuple):
    """One request the token server answered (or refused)."""

    method: str  # "GET" or "POST"
    grant_type: str  # "basic" (GET with basic auth), "anonymous" (GET without), "password", "refresh_token"
    username: str | None  # the authenticated user, None if anonymous or refused
    service: str
    scopes: tuple[str, ...]  # the raw requested scope strings
    status: int  # HTTP status returned


Authorizer = Callable[[str | None, str, str, list[str]], list[str]]


@dataclass
class TokenServer:
    """A Docker registry token server (https://distribution.github.io/distribution/spec/auth/token/).

    ``GET {realm}?service=..&scope=repository:NAME:pull,push`` with optional HTTP basic auth, and the OAuth2
    ``POST {realm}`` form flow (``grant_type=password`` / ``grant_type=refresh_token``). Known users get every
    requested action; anonymous callers get ``pull`` on :attr:`public_repos` and nothing else (a token with an
    empty access list, like Docker Hub gives for private repos); a wrong password gets 401.

    Counters (thread-safe, reset with :meth:`reset`): :attr:`issued` (tokens handed out), :attr:`requests`
    (every :class:`TokenRequest`), :attr:`scopes` (every requested scope string, in order).
    """

    tmp_dir: Path
    username: str = "ferry"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    service: str = "ferry-test-registry"
    issuer: str = "ferry-test-token-issuer"
    ttl: int = 300
    key_id_mode: Literal["kid", "x5c"] = "kid"
    users: dict[str, str] = field(default_factory=dict)
    public_repos: set[str] = field(default_factory=set)
    authorizer: Authorizer | None = None

    issued: int = 0
    requests: list[TokenRequest] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    refresh_tokens: dict[str, str] = field(default_factory=dict)

    port: int = 0
    cert_path: Path = field(init=False)
    _key: rsa.RSAPrivateKey = field(init=False, repr=False)
    _cert: x509.Certificate = field(init=False, repr=False)
    _httpd: ThreadingHTTPServer | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.users.setdefault(self.username, self.password)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = _now()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.tmp_dir / "token-signing.crt"
        _write_cert(self.cert_path, self._cert)
        self.key_id = libtrust_key_id(self._key.public_key())

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def start(self) -> TokenServer:
        server = self

        class Handler(_TokenHandler):
            token_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="token-server", daemon=True
        )
        self._thread.start()
        _register_stopper(self.stop)
        return self

    def stop(self) -> None:
        _unregister_stopper(self.stop)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def reset(self) -> None:
        """Zero the counters (not the refresh tokens)."""
        with self._lock:
            self.issued = 0
            self.requests.clear()
            self.scopes.clear()

    # -- issuing ---------------------------------------------------------------------------------------------

    def authenticate(self, username: str | None, password: str | None) -> bool:
        return (
            username is not None
            and username in self.users
            and secrets.compare_digest(self.users[username], password or "")
        )

    def grant(self, username: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The JWT ``access`` claim for ``username`` (None = anonymous) asking for ``scopes``."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            typ, name, actions = parsed
            if self.authorizer is not None:
                allowed = self.authorizer(username, typ, name, actions)
            elif username is not None:
                allowed = ["*"] if "*" in actions else actions
            elif typ == "repository" and name in self.public_repos:
                allowed = [a for a in actions if a == "pull"]
            else:
                allowed = []
            if allowed:
                access.append({"type": typ, "name": name, "actions": allowed})
        return access

    def make_token(self, username: str | None, scopes: Iterable[str], *, service: str | None = None) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": service or self.service,
            "exp": now + self.ttl,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": self.grant(username, scopes),
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.key_id_mode == "x5c":
            headers["x5c"] = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        else:
            headers["kid"] = self.key_id
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    def get_token(
        self, *scopes: str, username: str | None = None, password: str | None = None, service: str | None = None
    ) -> str:
        """Fetch a token over HTTP exactly as a client would (counts as an issued token)."""
        params = httpx.QueryParams([("service", service or self.service), *(("scope", s) for s in scopes)])
        auth = (username, password or "") if username is not None else None
        resp = httpx.get(self.realm, params=params, auth=auth, timeout=10, verify=False)  # plain-HTTP realm
        resp.raise_for_status()
        return str(resp.json()["token"])

    def _record(self, req: TokenRequest, issued: bool) -> None:
        with self._lock:
            self.requests.append(req)
            self.scopes.extend(req.scopes)
            if issued:
                self.issued += 1


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    # type[(class)]:name:actions -- the name may itself contain ':' (e.g. a host:port prefix), so split both ends.
    head, sep, actions = scope.rpartition(":")
    if not sep:
        return None
    typ, sep, name = head.partition(":")
    if not sep or not typ or not name:
        return None
    typ = typ.split("(", 1)[0]
    return typ, name, [a for a in actions.split(",") if a]


class _TokenHandler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _basic_auth(self) -> tuple[str | None, str | None, bool]:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, None, False
        try:
            user, _, pw = base64.b64decode(header[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, None, True
        return user, pw, True

    def _issue(
        self,
        *,
        method: str,
        grant_type: str,
        username: str | None,
        service: str,
        scopes: tuple[str, ...],
        refresh: bool,
    ) -> None:
        ts = self.token_server
        token = ts.make_token(username, scopes, service=service)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": ts.ttl,
            "issued_at": _now().isoformat().replace("+00:00", "Z"),
        }
        if method == "POST":
            body["scope"] = " ".join(scopes)
        if refresh and username is not None:
            rt = secrets.token_urlsafe(24)
            with ts._lock:
                ts.refresh_tokens[rt] = username
            body["refresh_token"] = rt
        ts._record(TokenRequest(method, grant_type, username, service, scopes, 200), issued=True)
        self._send(200, body)

    def _refuse(self, status: int, method: str, grant_type: str, service: str, scopes: tuple[str, ...]) -> None:
        ts = self.token_server
        ts._record(TokenRequest(method, grant_type, None, service, scopes, status), issued=False)
        headers = {"WWW-Authenticate": f'Basic realm="{ts.realm}"'} if status == 401 else None
        error = "unauthorized" if status == 401 else "invalid_request"
        self._send(status, {"errors": [{"code": error.upper(), "message": error}], "error": error}, headers)

    def do_GET(self) -> None:
        ts = self.token_server
        url = urlsplit(self.path)
        if url.path != "/token":
            self._send(404, {"error": "not found"})
            return
        query = parse_qs(url.query)
        service = query.get("service", [ts.service])[0]
        scopes = tuple(s for raw in query.get("scope", []) for s in raw.split(" ") if s)
        user, pw, has_auth = self._basic_auth()
        if not has_auth:
            self._issue(
                method="GET", grant_type="anonymous", username=None, service=service, scopes=scopes, refresh=False
            )
            return
        if not ts.authenticate(user, pw):
            self._refuse(401, "GET", "basic", service, scopes)
            return
        offline = query.get("offline_token", ["false"])[0].lower() == "true"
        self._issue(method="GET", grant_type="basic", username=user, service=service, scopes=scopes, refresh=offline)

    def do_POST(self) -> None:
        ts = self.token_server
        if urlsplit(self.path).path != "/token":
            self._send(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        grant_type = form.get("grant_type", [""])[0]
        service = form.get("service", [ts.service])[0]
        scopes = tuple(s for raw in form.get("scope", []) for s in raw.split(" ") if s)
        if grant_type == "password":
            user = form.get("username", [""])[0]
            if not ts.authenticate(user, form.get("password", [""])[0]):
                self._refuse(401, "POST", grant_type, service, scopes)
                return
            self._issue(
                method="POST", grant_type=grant_type, username=user, service=service, scopes=scopes, refresh=True
            )
        elif grant_type == "refresh_token":
            with ts._lock:
                user_or_none = ts.refresh_tokens.get(form.get("refresh_token", [""])[0])
            if user_or_none is None:
                self._refuse(401, "POST", grant_type, service, scopes)
                return
            self._issue(
                method="POST",
                grant_type=grant_type,
                username=user_or_none,
                service=service,
                scopes=scopes,
                refresh=False,
            )
        else:
            self._refuse(400, "POST", grant_type or "?", service, scopes)


def start_token_server(
    tmp_dir: Path | str,
    *,
    username: str = "ferry",
    password: str | None = None,
    service: str = "ferry-test-registry",
    ttl: int = 300,
    key_id_mode: Literal["kid", "x5c"] = "kid",
) -> TokenServer:
    """Start a token server on a free loopback port (in a daemon thread of this process)."""
    ts = TokenServer(
        Path(tmp_dir),
        username=username,
        password=password or secrets.token_urlsafe(12),
        service=service,
        ttl=ttl,
        key_id_mode=key_id_mode,
    )
    return ts.start()


# --------------------------------------------------------------------------------------------------------------
# registry


class AccessLogEntry(NamedTuple):
    """One line of the registry's combined-format access log."""

    method: str
    path: str  # without the query string
    query: str
    status: int
    user_agent: str


# 127.0.0.1 - - [28/Nov/2026:00:35:23 +0000] "HEAD /v2/foo/manifests/latest HTTP/1.1" 404 96 "" "curl/7.88.1"
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) \S+ "[^"]*" "(?P<ua>[^"]*)"$'
)


@dataclass
class RegistryServer:
    """A running ``docker-registry`` (distribution 2.8). See :func:`start_registry`."""

    host: str  # "127.0.0.1:PORT"
    url: str  # "http://127.0.0.1:PORT" or "https://..."
    port: int
    root_dir: Path
    storage_dir: Path
    config_path: Path
    log_path: Path
    auth: AuthMode | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_cert: Path | None = None  # the CA that signed the server (and client) certificates
    cert_dir: Path | None = None  # certs.d/<host>/ with ca.crt (+ client.cert/client.key): skopeo --cert-dir
    certs_d: Path | None = None  # the certs.d root that contains cert_dir
    client_cert: Path | None = None
    client_key: Path | None = None
    token_server: TokenServer | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_token_server: bool = field(default=False, repr=False)
    _sync_client: httpx.Client | None = field(default=None, repr=False)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None
        if self.process is not None:
            _terminate(self.process)
            self.process = None
        if self.token_server is not None and self._owns_token_server:
            self.token_server.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- clients ---------------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the server with the test CA and presents the client certificate if there is one."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert) if self.ca_cert else None)
        if self.client_cert and self.client_key:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def client(self, *, authenticated: bool = True, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` with ``base_url`` = :attr:`url`, the test CA (TLS), and basic auth (htpasswd)."""
        kwargs.setdefault("base_url", self.url)
        kwargs.setdefault("timeout", 10)
        # plain HTTP: verify=False only skips loading certifi's bundle (~50 ms per client); nothing to verify
        kwargs.setdefault("verify", self.ssl_context() if self.tls else False)
        if authenticated and self.auth == "htpasswd" and self.username is not None:
            kwargs.setdefault("auth", (self.username, self.password or ""))
        return httpx.Client(**kwargs)

    # -- access log ------------------------------------------------------------------------------------------

    def sync_log(self, timeout: float = 5.0) -> int:
        """Make sure every request answered so far is in the log; return the log size at that point.

        The registry writes an access-log line right after the response, so a client can see the response a
        moment before the line exists. This sends a marker request (filtered out of :meth:`access_log`) and waits
        for its line.
        """
        marker = uuid.uuid4().hex
        ua = f"{SYNC_USER_AGENT}/{marker}"
        if self._sync_client is None:
            self._sync_client = self.client(authenticated=False)
        self._sync_client.get("/v2/", headers={"User-Agent": ua})
        needle = ua.encode()
        deadline = time.monotonic() + timeout
        while True:
            data = self.log_path.read_bytes()
            idx = data.find(needle)
            if idx >= 0:
                end = data.find(b"\n", idx)
                return len(data) if end < 0 else end + 1
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"registry {self.host} did not log marker request; log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.005)

    def log_mark(self) -> int:
        """A position in the access log: pass it as ``since=`` to count only requests made after this call."""
        return self.sync_log()

    def access_log(self, since: int = 0, *, sync: bool = True) -> list[AccessLogEntry]:
        """Parsed access-log entries (excluding the harness's marker requests), oldest first."""
        end = self.sync_log() if sync else None
        with open(self.log_path, "rb") as f:
            f.seek(since)
            data = f.read() if end is None else f.read(max(0, end - since))
        entries: list[AccessLogEntry] = []
        for raw in data.decode(errors="replace").splitlines():
            m = _ACCESS_RE.match(raw)
            if m is None or m["ua"].startswith(SYNC_USER_AGENT):
                continue
            path, _, query = m["uri"].partition("?")
            entries.append(AccessLogEntry(m["method"], path, query, int(m["status"]), m["ua"]))
        return entries

    def requests(self, since: int = 0, *, sync: bool = True) -> list[tuple[str, str]]:
        """``(method, path)`` of every request logged since ``since`` (a :meth:`log_mark`), oldest first."""
        return [(e.method, e.path) for e in self.access_log(since, sync=sync)]

    def count(self, method: str, path_pattern: str, since: int = 0) -> int:
        """How many requests with ``method`` had a path fully matching the regex ``path_pattern``.

        E.g. ``reg.count("GET", r"/v2/.+/manifests/.+", since=mark)`` or ``reg.count("POST", r".*/blobs/uploads/")``.
        """
        rx = re.compile(path_pattern)
        return sum(1 for m, p in self.requests(since) if m == method and rx.fullmatch(p))


def _write_htpasswd(path: Path, users: dict[str, str]) -> None:
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n" for u, p in users.items()]
    path.write_text("".join(lines))


def _wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    verify: ssl.SSLContext | bool,
    timeout: float = STARTUP_TIMEOUT,
) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=verify, timeout=2) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: server exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
            try:
                resp = c.get(url, headers={"User-Agent": f"{SYNC_USER_AGENT}/startup"})
            except httpx.TransportError:
                pass
            else:
                if resp.status_code in (200, 401):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up in {timeout}s; log tail:\n{_tail(log_path)}")
            time.sleep(POLL_INTERVAL)


def start_registry(
    tmp_dir: Path | str,
    *,
    auth: AuthMode | None = None,
    tls: bool = False,
    client_auth: bool = False,
    token_server: TokenServer | None = None,
    username: str = "ferry",
    password: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> RegistryServer:
    """Start ``docker-registry`` on a free 127.0.0.1 port with its config, storage, certs and log in ``tmp_dir``.

    ``auth``: None (anonymous), ``"htpasswd"`` (basic auth as ``username``/``password``) or ``"token"`` (Bearer
    tokens from ``token_server``; one is started -- and stopped with the registry -- if not given; ``username``
    and ``password`` then come from the token server). ``tls``: serve HTTPS with a cert from a fresh test CA
    valid for 127.0.0.1 and localhost; ``client_auth`` additionally requires a client certificate signed by that
    CA (written as ``client.cert``/``client.key`` into :attr:`RegistryServer.cert_dir`). ``extra_config`` is
    deep-merged into the generated YAML.
    """
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    if client_auth and not tls:
        raise ValueError("client_auth requires tls=True")
    if auth == "token" and token_server is None:
        owns_token_server = True
        token_server = start_token_server(root / "token", username=username, password=password)
    else:
        owns_token_server = False
    user: str | None = None
    if auth == "token":
        assert token_server is not None
        user, password = token_server.username, token_server.password
    elif auth == "htpasswd":
        user, password = username, password or secrets.token_urlsafe(12)
    else:
        password = None

    try:
        last_error: Exception | None = None
        for _attempt in range(3):  # a freshly picked free port can be grabbed by someone else before we bind it
            try:
                return _start_registry_once(
                    root, auth, tls, client_auth, token_server, owns_token_server, user, password, extra_config
                )
            except RuntimeError as exc:
                if "address already in use" not in str(exc):
                    raise
                last_error = exc
        assert last_error is not None
        raise last_error
    except BaseException:
        if owns_token_server and token_server is not None:
            token_server.stop()
        raise


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _start_registry_once(
    root: Path,
    auth: AuthMode | None,
    tls: bool,
    client_auth: bool,
    token_server: TokenServer | None,
    owns_token_server: bool,
    username: str | None,
    password: str | None,
    extra_config: dict[str, Any] | None,
) -> RegistryServer:
    port = _free_port()
    host = f"127.0.0.1:{port}"
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    log_path = root / "registry.log"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": host,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    server = RegistryServer(
        host=host,
        url=f"{'https' if tls else 'http'}://{host}",
        port=port,
        root_dir=root,
        storage_dir=storage,
        config_path=root / "config.yml",
        log_path=log_path,
        auth=auth,
        tls=tls,
        username=username,
        password=password,
        token_server=token_server,
        _owns_token_server=owns_token_server,
    )
    if auth == "htpasswd":
        assert username is not None and password is not None
        htpasswd = root / "htpasswd"
        _write_htpasswd(htpasswd, {username: password})
        config["auth"] = {"htpasswd": {"realm": "ferry-test", "path": str(htpasswd)}}
    elif auth == "token":
        assert token_server is not None
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": token_server.service,
                "issuer": token_server.issuer,
                "rootcertbundle": str(token_server.cert_path),
            }
        }
    if tls:
        ca = CertAuthority(root / "pki")
        cert, key = ca.issue("server", common_name="127.0.0.1", hosts=["127.0.0.1", "localhost"])
        tls_conf: dict[str, Any] = {"certificate": str(cert), "key": str(key)}
        certs_d = root / "certs.d"
        cert_dir = certs_d / host
        cert_dir.mkdir(parents=True, exist_ok=True)
        (cert_dir / "ca.crt").write_bytes(ca.cert_path.read_bytes())
        server.ca_cert, server.certs_d, server.cert_dir = ca.cert_path, certs_d, cert_dir
        if client_auth:
            tls_conf["clientcas"] = [str(ca.cert_path)]
            ccert, ckey = ca.issue("client", common_name="ferry-test-client", client=True, cert_suffix=".cert")
            (cert_dir / "client.cert").write_bytes(ccert.read_bytes())
            (cert_dir / "client.key").write_bytes(ckey.read_bytes())
            (cert_dir / "client.key").chmod(0o600)
            server.client_cert, server.client_key = cert_dir / "client.cert", cert_dir / "client.key"
        config["http"]["tls"] = tls_conf
    if extra_config:
        _deep_merge(config, extra_config)
    server.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    start = log_path.stat().st_size if log_path.exists() else 0
    proc = _spawn([REGISTRY_BIN, "serve", str(server.config_path)], log_path, root)
    server.process = proc
    try:
        _wait_http(f"{server.url}/v2/", proc, log_path, server.ssl_context() if tls else False)
    except BaseException as exc:
        _terminate(proc)
        server.process = None
        if "address already in use" in log_path.read_bytes()[start:].decode(errors="replace"):
            raise RuntimeError(f"{host}: address already in use") from exc
        raise
    return server


# --------------------------------------------------------------------------------------------------------------
# redis


@dataclass
class RedisServer:
    """A running ``redis-server`` without persistence. See :func:`start_redis`."""

    host: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: ``requirepass``: when set, :attr:`url` carries it (``redis://:PASSWORD@host:port/0``)
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def command(self, *args: str) -> bytes:
        """Send one inline command and return the raw first reply line (e.g. ``b"+PONG"``)."""
        with socket.create_connection((self.host, self.port), timeout=2) as s:
            reader = s.makefile("rb")
            if self.password:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                reader.readline()
            s.sendall((" ".join(args) + "\r\n").encode())
            return reader.readline().rstrip(b"\r\n")

    def flushall(self) -> None:
        assert self.command("FLUSHALL") == b"+OK"

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None


def start_redis(tmp_dir: Path | str, *, password: str | None = None) -> RedisServer:
    """Start ``redis-server`` on a free 127.0.0.1 port, no RDB/AOF persistence, working dir ``tmp_dir``;
    with ``password``, clients must authenticate (``requirepass``)."""
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "redis.log"
    for _attempt in range(3):
        port = _free_port()
        offset = log_path.stat().st_size if log_path.exists() else 0
        argv = [
            REDIS_BIN, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(root), "--daemonize", "no", "--protected-mode", "no",
        ]  # fmt: skip
        if password:
            argv += ["--requirepass", password]
        proc = _spawn(argv, log_path, root)
        server = RedisServer("127.0.0.1", port, log_path, proc, password)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                _terminate(proc)
                if b"Address already in use" in log_path.read_bytes()[offset:]:
                    break  # retry with another port
                raise RuntimeError(f"redis-server exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
            try:
                if server.command("PING") == b"+PONG":
                    return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                _terminate(proc)
                raise TimeoutError(f"redis-server did not come up; log tail:\n{_tail(log_path)}")
            time.sleep(POLL_INTERVAL)
    raise RuntimeError("redis-server: could not find a free port")
