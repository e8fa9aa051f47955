"""A small lying registry: serves whatever documents a test sets, for faults distribution refuses to store.

distribution validates manifests on push and hashes what it serves, so a manifest with a null layer, a tag
list that is not an object, a token answer with ``expires_in: "soon"`` or a manifest whose bytes do not
match the digest it is served under cannot be put into a real registry. :class:`LyingRegistry` answers the
read side of the distribution API (``/v2/``, manifests, blobs, tags, catalog and an optional Bearer token
service) from in-memory tables over plain HTTP on 127.0.0.1, in a thread of the test process.

Use it only for such faults; everything else runs against the real registry (``tests/harness/servers.py``).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness.images import Image, Index
from worker.registry import Digest

__all__ = ["LyingRegistry", "start_lying_registry"]

_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs|tags)/(?P<ref>[^/]+)$")
_NOT_FOUND = json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": "not here"}]}).encode()


@dataclass
class LyingRegistry:
    """The tables a test fills; the server reads them on every request."""

    #: (repository, tag or digest) -> (raw bytes, Content-Type)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    #: digest string -> raw bytes
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: repository -> raw body of /v2/REPO/tags/list (default: the tags in ``manifests``)
    tag_lists: dict[str, bytes] = field(default_factory=dict)
    #: raw body of /v2/_catalog (default: the repositories in ``manifests``)
    catalog: bytes | None = None
    #: when set, /v2/ asks for a Bearer token and the token service answers this body
    token_answer: bytes | None = None
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, repo: str, tag: str, image: Image | Index) -> None:
        """Serve a harness-built image or index (and its children and blobs) at ``repo:tag``."""
        self.manifests[(repo, tag)] = (image.manifest, image.media_type)
        self.manifests[(repo, str(image.digest))] = (image.manifest, image.media_type)
        for child in image.children if isinstance(image, Index) else (image,):
            self.manifests[(repo, str(child.digest))] = (child.manifest, child.media_type)
            for digest, _size, blob in child.blobs():
                self.blobs[str(digest)] = blob if isinstance(blob, bytes) else b"".join(blob.chunks())

    def lie(
        self, repo: str, ref: str, raw: bytes | Any, media_type: str = "application/vnd.oci.image.manifest.v1+json"
    ) -> None:
        """Serve ``raw`` (bytes, or any JSON value) as the manifest ``repo:ref``."""
        body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        self.manifests[(repo, ref)] = (body, media_type)

    def start(self) -> LyingRegistry:
        liar = self

        class Handler(_Handler):
            registry = liar

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="lying-registry", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    registry: LyingRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.registry.token_answer is None:
            return True
        if self.headers.get("Authorization", "").startswith("Bearer "):
            return True
        realm = f"http://{self.registry.host}/token"
        self._send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="liar"'})
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        reg = self.registry
        path = self.path.split("?", 1)[0]
        if path == "/token":
            self._send(200, reg.token_answer or b"{}")
            return
        if not self._authorized():
            return
        if path in ("/v2", "/v2/"):
            self._send(200, b"{}")
            return
        if path == "/v2/_catalog":
            repos = sorted({repo for repo, _ in reg.manifests})
            self._send(200, reg.catalog if reg.catalog is not None else json.dumps({"repositories": repos}).encode())
            return
        m = _PATH_RE.match(path)
        if m is None:
            self._send(404, _NOT_FOUND)
            return
        repo, kind, ref = m["repo"], m["kind"], m["ref"]
        if kind == "tags":
            if repo in reg.tag_lists:
                self._send(200, reg.tag_lists[repo])
                return
            tags = sorted(r for rp, r in reg.manifests if rp == repo and not r.startswith("sha256:"))
            self._send(200, json.dumps({"name": repo, "tags": tags}).encode())
        elif kind == "manifests" and (repo, ref) in reg.manifests:
            raw, media_type = reg.manifests[(repo, ref)]
            # a liar claims the digest asked for; for a tag, the digest of what it sends
            digest = ref if ref.startswith("sha256:") else str(Digest.of(raw))
            self._send(200, raw, {"Content-Type": media_type, "Docker-Content-Digest": digest})
        elif kind == "blobs" and ref in reg.blobs:
            self._send(200, reg.blobs[ref], {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref})
        else:
            self._send(404, _NOT_FOUND)

    def _refuse(self) -> None:
        self._send(405, json.dumps({"errors": [{"code": "UNSUPPORTED", "message": "read-only liar"}]}).encode())

    do_PUT = do_POST = do_PATCH = do_DELETE = _refuse


def start_lying_registry() -> LyingRegistry:
    return LyingRegistry().start()
