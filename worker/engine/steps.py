"""Running one plan step. Both executors (threads in-process, Celery tasks) call these functions.

``EngineContext`` opens transports by name and keeps them for reuse. It also
holds a ``BlobLocations`` (where each digest already lives in each registry,
so a blob is mounted rather than uploaded again) which the Celery side backs
with Redis; the engine itself knows nothing of Celery or Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from worker.registry import Cancelled, Digest, FerryError, RetryPolicy, is_temporary

from .compression import staged_chunks, transform
from .plan import BlobStep, ManifestStep, ResolvedImage
from .status import BlobAction
from .transports import (
    BlobUpload,
    ClientPool,
    ImageDestination,
    ImageName,
    ImageSource,
    SideConfig,
    open_destination,
    open_source,
)

if TYPE_CHECKING:
    from .trust import Admission

log = logging.getLogger("ferry.engine")


class BlobLocations(Protocol):
    """Which repositories of a registry are known to hold a digest."""

    def where(self, store: str, digest: str) -> list[str]: ...

    def add(self, store: str, digest: str, repository: str) -> None: ...


class MemoryBlobLocations:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._map: dict[tuple[str, str], list[str]] = {}

    def where(self, store: str, digest: str) -> list[str]:
        with self._lock:
            return list(self._map.get((store, digest), ()))

    def add(self, store: str, digest: str, repository: str) -> None:
        with self._lock:
            repos = self._map.setdefault((store, digest), [])
            if repository not in repos:
                repos.append(repository)


#: blob transfers at once for the whole run when ``--image-parallel-copies`` is not given
DEFAULT_STREAMS = 32
#: blob transfers at once from or to one registry host, unless lowered (``--host-concurrency``, ``ferry limit``)
DEFAULT_PER_HOST = 16


class HostSlots:
    """Per-host caps on blob transfers in flight (a transfer holds a slot on its source and destination host)."""

    def __init__(self, default: int = DEFAULT_PER_HOST, caps: dict[str, int] | None = None) -> None:
        self.default = default
        self.caps = dict(caps or {})
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._slots.get(host)
            if slot is None:
                cap = self.caps.get(host) or self.default
                slot = self._slots[host] = threading.BoundedSemaphore(max(1, cap))
            return slot

    @contextlib.contextmanager
    def hold(self, hosts: list[str], cancel: threading.Event) -> Iterator[None]:
        taken: list[threading.BoundedSemaphore] = []
        try:
            for host in sorted(set(hosts)):  # one order for every transfer: no deadlock
                slot = self._slot(host)
                while not slot.acquire(timeout=0.5):
                    if cancel.is_set():
                        raise Cancelled("copy interrupted")
                taken.append(slot)
            yield
        finally:
            for slot in taken:
                slot.release()


@dataclass
class BlobResult:
    action: BlobAction
    bytes: int = 0


@dataclass
class EngineContext:
    """Opened transports and shared helpers for running steps."""

    source_side: SideConfig = field(default_factory=SideConfig)
    #: per source registry (sync YAML entries carry their own TLS settings and credentials)
    source_sides: dict[str, SideConfig] = field(default_factory=dict)
    dest_side: SideConfig = field(default_factory=SideConfig)
    locations: BlobLocations = field(default_factory=MemoryBlobLocations)
    cancel: threading.Event = field(default_factory=threading.Event)
    #: called with the byte count of every chunk streamed
    on_bytes: Callable[[str, int], None] | None = None
    #: called with the digest when a blob's streaming attempt starts (a retried upload restarts from byte 0)
    on_attempt: Callable[[str], None] | None = None
    pool: ClientPool = field(default_factory=ClientPool)
    #: the trust policy every image must pass while it is resolved (None: accept anything)
    admission: Admission | None = None
    #: per-host caps on blob transfers in flight
    hosts: HostSlots = field(default_factory=HostSlots)
    _sources: dict[ImageName, ImageSource] = field(default_factory=dict)
    _dests: dict[ImageName, ImageDestination] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _manifest_locks: dict[str, threading.Lock] = field(default_factory=dict)

    def source(self, name: str | ImageName) -> ImageSource:
        parsed = ImageName.parse(name) if isinstance(name, str) else name
        with self._lock:
            src = self._sources.get(parsed)
            if src is None:
                side = self.source_side
                if parsed.reference is not None:
                    side = self.source_sides.get(parsed.reference.registry, side)
                src = open_source(parsed, side, self.pool)
                self._sources[parsed] = src
            return src

    def opened_sources(self) -> dict[str, ImageSource]:
        """The sources opened so far, by name (a queued job pins the endpoint each registry image came from)."""
        with self._lock:
            return {str(name): src for name, src in self._sources.items()}

    def destination(self, name: str | ImageName) -> ImageDestination:
        parsed = ImageName.parse(name) if isinstance(name, str) else name
        with self._lock:
            dest = self._dests.get(parsed)
            if dest is None:
                dest = open_destination(parsed, self.dest_side, self.pool)
                self._dests[parsed] = dest
            return dest

    def admit(self, name: ImageName, src: ImageSource, resolved: ResolvedImage) -> None:
        """Raise ``PolicyRejected`` unless the trust policy admits the image just resolved (before any write)."""
        if self.admission is not None:
            self.admission.check(name, src, resolved)

    def manifest_lock(self, destination: ImageName) -> threading.Lock:
        """Local layouts rewrite one index file: serialise manifest writes per destination store."""
        key = destination.details.split(":", 1)[0] if destination.reference is None else str(destination)
        with self._lock:
            return self._manifest_locks.setdefault(key, threading.Lock())

    def retry_policy(self) -> RetryPolicy:
        return self.dest_side.retry

    def commit(self, names: list[str] | None = None) -> None:
        """Commit destinations (archives are written here)."""
        with self._lock:
            dests = [d for n, d in self._dests.items() if names is None or str(n) in names]
        for d in dests:
            d.commit()

    def close_transports(self) -> None:
        """Close opened sources and destinations but keep the (shared) client pool."""
        with self._lock:
            items = list(self._sources.values()) + list(self._dests.values())
            self._sources.clear()
            self._dests.clear()
        for t in items:
            try:
                t.close()
            except Exception:  # closing must not hide the real outcome
                log.debug("closing %s failed", t, exc_info=True)

    def close(self) -> None:
        self.close_transports()
        self.pool.close()


def _store_of(name: ImageName) -> tuple[str, str]:
    if name.reference is not None:
        return f"docker://{name.reference.registry}", name.reference.repository
    return f"{name.transport}:{name.details}", ""


def _stream(ctx: EngineContext, digest: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        if ctx.cancel.is_set():
            raise Cancelled("copy interrupted")
        if ctx.on_bytes is not None:
            ctx.on_bytes(digest, len(chunk))
        yield chunk


def run_blob_step(ctx: EngineContext, step: BlobStep, *, deps_done: bool = False) -> BlobResult:
    """Make the blob exist at the destination: skip if there, else mount, else stream it across.

    ``deps_done``: the caller ran this step only after the steps it depends on succeeded (the embedded
    executor; Celery does not order blob tasks). The existence check of a blob with nothing to mount it from
    also starts its upload (``ImageDestination.prepare_blob``: one request where a HEAD and a POST were two).
    """
    found, upload = _find_blob(ctx, step, deps_done=deps_done, prepare=True)
    if found is not None:
        return found
    return transfer_blob(ctx, step, upload=upload)


def blob_store(step: BlobStep) -> str:
    """The store (``docker://registry`` or a local path) the blob goes to: in-flight locks are per store."""
    return _store_of(step.destination)[0]


def existing_blob(ctx: EngineContext, step: BlobStep, *, deps_done: bool = False) -> BlobResult | None:
    """Skip the blob when the destination has it, or mount it from a repository known to hold it.

    Requests go only where they can tell something new. When this plan already put the blob into another
    repository of the same registry (``mount_from``), or source and destination share a registry, a mount
    answers both questions at once (``201`` also when the repository has the blob), so no HEAD is sent
    first. When it already put the blob into this same repository (another tag), and that step is done
    (``deps_done``), nothing is sent at all. Otherwise one HEAD, then mounts from repositories the location
    map knows.
    """
    return _find_blob(ctx, step, deps_done=deps_done, prepare=False)[0]


def check_blob(
    ctx: EngineContext, step: BlobStep, *, deps_done: bool = False
) -> tuple[BlobResult | None, BlobUpload | None]:
    """``existing_blob`` whose check may also open the upload (see ``run_blob_step``), for a caller that takes
    a lock or a slot between the check and the transfer (a worker): it hands the upload to ``transfer_blob``
    or cancels it (``BlobUpload.cancel`` is a no-op once the upload was used or cancelled)."""
    return _find_blob(ctx, step, deps_done=deps_done, prepare=True)


def _find_blob(
    ctx: EngineContext, step: BlobStep, *, deps_done: bool, prepare: bool
) -> tuple[BlobResult | None, BlobUpload | None]:
    """``existing_blob``; with ``prepare``, when no repository is known to mount from, the existence check is
    ``prepare_blob`` (a registry answers it with a mount from the repository itself: 201 when it has the blob,
    else the upload session the transfer then uses)."""
    desc = step.descriptor
    digest = str(step.digest)
    dest = ctx.destination(step.destination)
    store, repo = _store_of(step.destination)
    retry = ctx.retry_policy()

    def mount(other: str) -> bool:
        try:
            if retry.run(lambda: dest.mount_blob(desc, other)):
                ctx.locations.add(store, digest, repo)
                return True
        except FerryError as exc:
            log.info("mount of %s from %s refused (%s); uploading", digest, other, exc)
        return False

    def present() -> tuple[BlobResult, None]:
        if repo:
            ctx.locations.add(store, digest, repo)
        return BlobResult(BlobAction.SKIPPED), None

    if deps_done and repo and step.deps and not step.mount_from:
        # the step this one depends on put the blob into this same repository (another tag of it): it is there
        return BlobResult(BlobAction.SKIPPED), None
    tried: set[str] = set()
    if repo:
        sure = [step.mount_from] if step.mount_from else []
        src_name = step.source
        if src_name.reference is not None and _store_of(src_name)[0] == store and step.source_digest is None:
            # same registry on both sides: mount straight from the source repository
            sure.append(src_name.reference.repository)
        for other in sure:
            if other not in tried and other != repo:
                tried.add(other)
                if mount(other):
                    return BlobResult(BlobAction.MOUNTED), None
    known: list[str] | None = None
    if prepare:
        known = [o for o in ctx.locations.where(store, digest) if o not in tried and o != repo] if repo else []
        if not known:
            try:
                upload = retry.run(lambda: dest.prepare_blob(desc))
            except FerryError as exc:
                if is_temporary(exc) or not repo:
                    raise
                # a registry that refuses a mount from the repository itself: ask with a HEAD instead
                log.info("check of %s by a mount refused (%s); asking with HEAD", digest, exc)
            else:
                return present() if upload is None else (None, upload)
    if retry.run(lambda: dest.blob_exists(desc)):
        return present()
    if repo:
        for other in ctx.locations.where(store, digest) if known is None else known:
            if other not in tried and other != repo:
                tried.add(other)
                if mount(other):
                    return BlobResult(BlobAction.MOUNTED), None
    return None, None


def transfer_blob(ctx: EngineContext, step: BlobStep, *, upload: BlobUpload | None = None) -> BlobResult:
    """Stream the blob from the source to the destination, verified; retried as a whole.

    ``upload``: one ``prepare_blob`` started, for the first attempt that gets as far as streaming (given up
    if none does).
    """
    desc = step.descriptor
    digest = str(step.digest)
    dest = ctx.destination(step.destination)
    store, repo = _store_of(step.destination)
    retry = ctx.retry_policy()
    src = ctx.source(step.source)
    prepared = [upload] if upload is not None else []

    def transfer() -> BlobResult:
        if ctx.cancel.is_set():
            raise Cancelled("copy interrupted")
        if ctx.on_attempt is not None:
            ctx.on_attempt(digest)
        # A failed attempt restarts the whole upload session: a streamed body cannot be replayed.
        if step.staged and os.path.exists(step.staged):
            # (de/re)compressed while planning from a local source: send that (the destination verifies it)
            put(staged_chunks(step.staged))
            return BlobResult(BlobAction.TRANSFERRED, desc.size)
        with src.open_blob(step.source_descriptor) as chunks:
            # a layer (de/re)compressed on the fly: the source verifies what is read, the destination the result
            op = step.recompress_op
            put(transform(chunks, op, f"blob {step.source_digest}") if op else chunks)
        return BlobResult(BlobAction.TRANSFERRED, desc.size)

    def put(body: Iterator[bytes]) -> None:
        if prepared:
            dest.put_prepared_blob(desc, _stream(ctx, digest, body), prepared.pop())
        else:
            dest.put_blob(desc, _stream(ctx, digest, body))

    hosts = [n.reference.api_host for n in (step.source, step.destination) if n.reference]
    try:
        with ctx.hosts.hold(hosts, ctx.cancel):
            result = retry.run(transfer)
    finally:
        for unused in prepared:
            unused.cancel()
    if step.staged:
        with contextlib.suppress(OSError):  # sent: the disk space goes back now, not at exit
            os.unlink(step.staged)
    if repo:
        ctx.locations.add(store, digest, repo)
    if step.source.reference is not None and step.source_digest is None:  # the source holds what was read, not this
        src_store, src_repo = _store_of(step.source)
        ctx.locations.add(src_store, digest, src_repo)
    return result


def run_manifest_step(ctx: EngineContext, step: ManifestStep) -> Digest:
    """Push a manifest by digest (``tag is None``) or under the destination's tag."""
    dest = ctx.destination(step.destination)
    retry = ctx.retry_policy()
    digest = step.digest
    ref: str | Digest | None
    if step.top:
        # the destination's own reference: its tag, its digest, or a layout's ref name
        ref = None
    elif step.tag is None:
        ref = digest
    else:
        ref = step.tag
    with ctx.manifest_lock(step.destination):
        retry.run(lambda: dest.put_manifest(step.raw, step.media_type, ref))
    return digest


__all__ = [
    "DEFAULT_PER_HOST",
    "DEFAULT_STREAMS",
    "BlobLocations",
    "BlobResult",
    "EngineContext",
    "HostSlots",
    "MemoryBlobLocations",
    "is_temporary",
    "run_blob_step",
    "run_manifest_step",
]
