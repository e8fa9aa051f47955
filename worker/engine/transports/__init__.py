"""Transport names (``docker://``, ``oci:``, ``oci-archive:``, ``dir:``, ``docker-archive:``) and how to open them."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from worker.registry import (
    USER_AGENT,
    ClientOptions,
    Credentials,
    FerryError,
    InvalidInput,
    Reference,
    RegistryClient,
    RequestGate,
    RetryPolicy,
    resolve_credentials,
)

from ..registries_conf import RegistriesConf
from .base import BlobUpload, ImageDestination, ImageSource

log = logging.getLogger("ferry.transports")

TRANSPORTS = ("docker", "oci", "oci-archive", "dir", "docker-archive")
#: skopeo's other transports, refused by name
_OTHER_TRANSPORTS = {
    "sif": "Singularity image files",
    "docker-daemon": "a local Docker daemon",
    "containers-storage": "a local containers/storage store",
    "ostree": "OSTree repositories",
}


@dataclass(frozen=True)
class ImageName:
    """A parsed ``TRANSPORT:DETAILS`` image name as the user wrote it."""

    transport: str
    details: str
    reference: Reference | None = None

    @classmethod
    def parse(cls, text: str) -> ImageName:
        transport, sep, details = text.partition(":")
        if sep and transport in _OTHER_TRANSPORTS:
            raise InvalidInput(
                f"{text}: Ferry does not support the {transport}: transport ({_OTHER_TRANSPORTS[transport]})"
            )
        if not sep or transport not in TRANSPORTS:
            known = ", ".join(f"{t}:" for t in TRANSPORTS)
            raise InvalidInput(f"invalid image name {text!r}: expected TRANSPORT:DETAILS with one of {known}")
        if transport == "docker":
            if not details.startswith("//"):
                raise InvalidInput(f"invalid image name {text!r}: docker references start with docker://")
            return cls("docker", details[2:], Reference.parse(details[2:]))
        if not details:
            raise InvalidInput(f"invalid image name {text!r}: missing path after {transport}:")
        return cls(transport, details)

    def __str__(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.reference}"
        return f"{self.transport}:{self.details}"


@dataclass
class SideConfig:
    """How to reach one side (source or destination): TLS, credentials, retries.

    Explicit ``credentials`` (``--creds``) live only in this process; they never
    travel in a task message.
    """

    tls_verify: bool | None = None
    cert_dir: str | None = None
    credentials: Credentials | None = None
    authfile: str | None = None
    no_creds: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_size: int | None = None
    user_agent: str = USER_AGENT
    #: registries.conf (mirrors, prefix rewrites, blocked and insecure registries); None: not applied
    registries: RegistriesConf | None = None
    #: skopeo's ``--shared-blob-dir``: an oci: layout keeps its blobs there instead of in its own blobs/
    shared_blob_dir: str | None = None
    #: shared throttling across processes (the workers back it with Redis)
    gate: RequestGate | None = None
    #: an httpx transport for every client of this side (tests: faults a real registry cannot produce)
    transport: httpx.BaseTransport | None = None

    def client_options(self) -> ClientOptions:
        opts = ClientOptions(
            tls_verify=True if self.tls_verify is None else self.tls_verify,
            cert_dir=self.cert_dir,
            retry=self.retry,
            gate=self.gate,
            transport=self.transport,
            user_agent=self.user_agent,
        )
        if self.chunk_size:
            opts.chunk_size = self.chunk_size
        return opts

    def credentials_for(self, reference: Reference) -> Credentials | None:
        if self.no_creds:
            return None
        if self.credentials is not None:
            return self.credentials
        return resolve_credentials(reference.registry, reference.repository, authfile=self.authfile)


@dataclass(frozen=True)
class ClientKey:
    """Everything a ``RegistryClient`` is built from, compared by value: equal keys may share one client.

    The gate is compared by identity (it is a live object); the key holds it, so its identity cannot be reused.
    """

    registry: str
    credentials: Credentials | None
    tls_verify: bool | None
    cert_dir: str | None
    retry: RetryPolicy
    chunk_size: int | None
    gate: RequestGate | None

    @classmethod
    def of(cls, reference: Reference, side: SideConfig) -> ClientKey:
        return cls(
            reference.registry,
            side.credentials_for(reference),
            side.tls_verify,
            side.cert_dir,
            side.retry,
            side.chunk_size,
            side.gate,
        )


class ClientPool:
    """One ``RegistryClient`` per registry and settings (credentials, TLS, retries), so tokens and connections are
    reused; two sides that differ in anything never share one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[ClientKey, RegistryClient] = {}

    def client(self, reference: Reference, side: SideConfig) -> RegistryClient:
        key = ClientKey.of(reference, side)
        with self._lock:
            c = self._clients.get(key)
            if c is None:
                c = RegistryClient(reference.registry, credentials=key.credentials, options=side.client_options())
                self._clients[key] = c
            return c

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()


def _local(name: ImageName, *, write: bool, shared_blob_dir: str | None = None) -> ImageSource | ImageDestination:
    """Open a local transport (everything but docker://): which class, and how its details split."""
    from .dir import DirDestination, DirSource
    from .docker_archive import DockerArchiveDestination, DockerArchiveSource, parse_docker_archive_spec
    from .oci_archive import OCIArchiveDestination, OCIArchiveSource
    from .oci_layout import OCILayoutDestination, OCILayoutSource, parse_oci_spec

    if name.transport == "dir":
        if shared_blob_dir:
            raise InvalidInput("a shared blob directory applies to oci: layouts only, not dir:")
        return DirDestination(name.details) if write else DirSource(name.details)
    table: dict[str, tuple[Any, type[Any], type[Any]]] = {
        "oci": (parse_oci_spec, OCILayoutSource, OCILayoutDestination),
        "oci-archive": (parse_oci_spec, OCIArchiveSource, OCIArchiveDestination),
        "docker-archive": (parse_docker_archive_spec, DockerArchiveSource, DockerArchiveDestination),
    }
    if name.transport not in table:
        raise InvalidInput(f"unsupported transport {name.transport}")
    if shared_blob_dir and name.transport != "oci":
        raise InvalidInput(f"a shared blob directory applies to oci: layouts only, not {name.transport}:")
    parse, source_cls, dest_cls = table[name.transport]
    path, ref = parse(name.details)
    cls = dest_cls if write else source_cls
    opened: ImageSource | ImageDestination = (
        cls(path, ref, shared_blob_dir=shared_blob_dir) if shared_blob_dir else cls(path, ref)
    )
    return opened


def _endpoint_side(side: SideConfig, insecure: bool) -> SideConfig:
    """registries.conf ``insecure = true`` turns TLS off for that endpoint unless a flag said otherwise."""
    if insecure and side.tls_verify is None:
        return replace(side, tls_verify=False)
    return side


def open_source(name: ImageName, side: SideConfig, pool: ClientPool | None = None) -> ImageSource:
    if name.reference is not None:
        from .registry import RegistrySource

        pool = pool or ClientPool()
        if side.registries is None:
            return RegistrySource(name.reference, pool.client(name.reference, side))
        # registries.conf: mirrors first (the first that has the image), then the primary location
        sources = side.registries.pull_sources(name.reference)
        for ref, insecure in sources[:-1]:
            try:
                mirror = RegistrySource(ref, pool.client(ref, _endpoint_side(side, insecure)))
                if mirror.head_manifest() is not None:
                    return mirror
            except FerryError as exc:
                log.info("mirror %s of %s not used: %s", ref, name.reference, exc)
        ref, insecure = sources[-1]
        return RegistrySource(ref, pool.client(ref, _endpoint_side(side, insecure)))
    src = _local(name, write=False, shared_blob_dir=side.shared_blob_dir)
    assert isinstance(src, ImageSource)
    return src


def open_repository(name: ImageName, side: SideConfig, pool: ClientPool | None = None) -> ImageSource:
    """A registry name as given, for its tag list (list-tags, inspect's RepoTags, sync's discovery) and deletes.

    As containers/image's ``GetRepositoryTags`` and ``DeleteImage``: registries.conf's ``blocked`` and ``insecure``
    apply, its rewrites and mirrors do not (a mirror may hold fewer tags than the registry it mirrors).
    """
    from .registry import RegistrySource

    if name.reference is None:
        raise InvalidInput(f"{name}: not a registry name")
    ref, insecure = (name.reference, False) if side.registries is None else side.registries.push_target(name.reference)
    return RegistrySource(ref, (pool or ClientPool()).client(ref, _endpoint_side(side, insecure)))


def open_destination(name: ImageName, side: SideConfig, pool: ClientPool | None = None) -> ImageDestination:
    if name.reference is not None:
        from .registry import RegistryDestination

        ref, insecure = (
            (name.reference, False) if side.registries is None else side.registries.push_target(name.reference)
        )
        return RegistryDestination(ref, (pool or ClientPool()).client(ref, _endpoint_side(side, insecure)))
    dest = _local(name, write=True, shared_blob_dir=side.shared_blob_dir)
    assert isinstance(dest, ImageDestination)
    return dest


__all__ = [
    "TRANSPORTS",
    "BlobUpload",
    "ClientKey",
    "ClientPool",
    "ImageDestination",
    "ImageName",
    "ImageSource",
    "SideConfig",
    "open_destination",
    "open_repository",
    "open_source",
]
