"""Verify: does the destination of a sync hold every image its source names, complete?

Same addressing as sync (``discover``: a repository, a YAML file, ``dir:``/OCI trees,
``--scoped``, ``--append-suffix``), same fast check (``check``: a HEAD at each side):

1. Each source tag's destination tag must exist. Its digest must equal the source's,
   or be a *valid counterpart* of it when the copy converts (``--format``, one platform
   of an index, ``platforms``): either the digest an earlier sync recorded for this
   source digest and these options (the digest memo), or the digest ``plan_copy``
   computes from the source manifests with these options, which is exactly what a
   sync writes. Anything else is a differing digest.
2. Every manifest that matched is walked at the destination: its blobs (config and
   layers) must be there (HEAD), and for an index every child manifest (GET, by digest,
   verified) and the child's blobs. A manifest or blob shared by many tags is checked once.

Signature and referrer tags of each image (``sha256-<hex>.sig`` …) are checked as images
of their own, as sync copies them (unless signatures are removed). Nothing is written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from worker.registry import Descriptor, Digest, FerryError, InvalidInput, NotFound

from .executor import describe_error
from .manifest import parse_manifest
from .plan import plan_copy
from .steps import EngineContext
from .sync import Discovery, SyncItem, SyncRequest, check, discover, resolve_changed
from .transports import ImageName, ImageSource, open_repository, open_source

T = TypeVar("T")


@dataclass(frozen=True)
class Missing:
    """A manifest or blob a destination tag needs but the destination does not hold."""

    destination: str
    #: the manifest that references it (the tag's own manifest, or a child of its index)
    manifest: str
    digest: str


@dataclass
class VerifyReport:
    tags_checked: int = 0
    #: destinations that hold their image, complete
    complete: list[str] = field(default_factory=list)
    #: complete destinations whose digest differs from the source's by a conversion: how it was decided
    converted: list[dict[str, str]] = field(default_factory=list)
    missing_tags: list[dict[str, str]] = field(default_factory=list)
    differing_digests: list[dict[str, str]] = field(default_factory=list)
    missing_blobs: list[Missing] = field(default_factory=list)
    missing_manifests: list[Missing] = field(default_factory=list)
    #: the source or destination could not be read
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.missing_tags or self.differing_digests or self.missing_blobs or self.missing_manifests or self.errors
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.ok,
            "tags_checked": self.tags_checked,
            "tags_complete": len(self.complete),
            "converted": self.converted,
            "missing_tags": self.missing_tags,
            "differing_digests": self.differing_digests,
            "missing_blobs": [asdict(m) for m in self.missing_blobs],
            "missing_manifests": [asdict(m) for m in self.missing_manifests],
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        head = "complete" if self.ok else "INCOMPLETE"
        return (
            f"Verify {head}: {self.tags_checked} tag(s) checked, {len(self.complete)} complete"
            f" ({len(self.converted)} converted), {len(self.missing_tags)} missing,"
            f" {len(self.differing_digests)} with a different digest, {len(self.missing_blobs)} missing blob(s),"
            f" {len(self.missing_manifests)} missing child manifest(s), {len(self.errors)} error(s)"
            f" in {self.seconds:.1f}s"
        )


class _Once:
    """Compute each key once, however many threads ask; the others wait for the first one's result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, ...], Future[Any]] = {}

    def get(self, key: tuple[str, ...], fn: Callable[[], T]) -> T:
        with self._lock:
            fut = self._futures.get(key)
            owner = fut is None
            if fut is None:
                fut = self._futures[key] = Future()
        if owner:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        result: T = fut.result()
        return result


#: what one manifest tree lacks: ("blob" | "manifest", referencing manifest, digest)
_Lacks = list[tuple[str, str, str]]


class _TreeChecker:
    """Walks manifests at the destination, reading each manifest and HEADing each blob once per location."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self._once = _Once()
        self._readers: dict[str, ImageSource] = {}
        self._lock = threading.Lock()

    def reader(self, name: ImageName) -> ImageSource:
        """The destination opened for reading, with the destination's TLS settings and credentials."""
        key = _location(name)
        with self._lock:
            src = self._readers.get(key)
            if src is None:
                # the destination itself, never a registries.conf mirror or rewrite of it (where the copy wrote)
                opener = open_repository if name.reference is not None else open_source
                src = self._readers[key] = opener(name, self.ctx.dest_side, self.ctx.pool)
            return src

    def lacks(self, name: ImageName, digest: Digest) -> _Lacks:
        loc = _location(name)
        return self._once.get(("tree", loc, str(digest)), lambda: self._walk(name, digest))

    def _walk(self, name: ImageName, digest: Digest) -> _Lacks:
        src = self.reader(name)
        raw, media_type = src.get_manifest(digest)
        parsed = parse_manifest(raw, media_type)
        out: _Lacks = []
        for blob in parsed.blobs:
            if not self._has_blob(name, src, blob):
                out.append(("blob", str(digest), str(blob.digest)))
        for child in parsed.manifests:
            try:
                out.extend(self.lacks(name, child.digest))
            except NotFound:
                out.append(("manifest", str(digest), str(child.digest)))
        return out

    def _has_blob(self, name: ImageName, src: ImageSource, blob: Descriptor) -> bool:
        return self._once.get(("blob", _location(name), str(blob.digest)), lambda: src.has_blob(blob))

    def close(self) -> None:
        for src in self._readers.values():
            src.close()


def _location(name: ImageName) -> str:
    """Where blobs are shared: a registry repository, or one OCI layout."""
    if name.reference is not None:
        return f"docker://{name.reference.name}"
    return f"{name.transport}:{name.details.split(':', 1)[0]}"


def _check_destination(req: SyncRequest) -> None:
    if req.dest_kind not in ("docker", "oci"):
        raise InvalidInput(f"verify reads registries and OCI layouts (--dest docker or oci), not {req.dest_kind!r}")
    if req.dest_kind == "oci":
        import os

        if not os.path.isfile(os.path.join(req.destination, "index.json")):
            raise InvalidInput(f"no OCI layout at {req.destination}: index.json does not exist")


def verify(
    ctx: EngineContext,
    req: SyncRequest,
    memo: Any,
    *,
    disc: Discovery | None = None,
    parallel: int = 16,
) -> VerifyReport:
    """Check every image ``req`` names at its destination; ``disc`` reuses a discovery (``sync --verify``)."""
    _check_destination(req)
    started = time.monotonic()
    report = VerifyReport()
    if disc is None:
        disc = discover(ctx, req)
    checked = check(ctx, disc.items, req, memo, parallel=parallel)
    report.tags_checked = len(checked.unchanged) + len(checked.changed) + len(checked.failed)
    for item, err in checked.failed:
        report.errors.append({"source": str(item.source), "destination": str(item.destination), "error": err})
    matched: list[tuple[SyncItem, str]] = []
    for item, dest_digest in checked.unchanged:
        src_digest = checked.source_heads.get(str(item.source), "")
        if dest_digest != src_digest:
            report.converted.append(_converted(item, src_digest, dest_digest, "digest memo of an earlier sync"))
        matched.append((item, dest_digest))
    trees = _TreeChecker(ctx)
    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-verify") as pool:
            matched += _counterparts(ctx, req, checked.changed, checked.source_heads, report, pool, parallel)
            futures = [(item, digest, pool.submit(trees.lacks, item.destination, Digest.parse(digest)))
                       for item, digest in matched]  # fmt: skip
            for item, digest, fut in futures:
                dest = str(item.destination)
                try:
                    lacks = fut.result()
                except NotFound:
                    lacks = [("manifest", digest, digest)]
                except FerryError as exc:
                    report.errors.append(
                        {"source": str(item.source), "destination": dest, "error": describe_error(exc)}
                    )
                    continue
                for kind, manifest, digest_missing in lacks:
                    entry = Missing(dest, manifest, digest_missing)
                    (report.missing_blobs if kind == "blob" else report.missing_manifests).append(entry)
                if not lacks:
                    report.complete.append(dest)
    finally:
        trees.close()
    report.seconds = time.monotonic() - started
    return report


def _converted(item: SyncItem, src_digest: str, dest_digest: str, decided_by: str) -> dict[str, str]:
    return {
        "source": str(item.source),
        "destination": str(item.destination),
        "source_digest": src_digest,
        "destination_digest": dest_digest,
        "decided_by": decided_by,
    }


def _counterparts(
    ctx: EngineContext,
    req: SyncRequest,
    changed: list[SyncItem],
    source_heads: dict[str, str],
    report: VerifyReport,
    pool: ThreadPoolExecutor,
    parallel: int,
) -> list[tuple[SyncItem, str]]:
    """Items whose destination digest differs from the source's: missing, converted, or wrong."""

    def head(item: SyncItem) -> Descriptor | None:
        try:
            return ctx.destination(str(item.destination)).head_manifest(None)
        except NotFound:
            return None

    present: list[SyncItem] = []
    for item, fut in [(it, pool.submit(head, it)) for it in changed]:
        names = {"source": str(item.source), "destination": str(item.destination)}
        try:
            desc = fut.result()
        except FerryError as exc:
            report.errors.append({**names, "error": describe_error(exc)})
            continue
        if desc is None:
            report.missing_tags.append(names)
        else:
            present.append(item)
    # what a sync with these options writes: read the source (GET) and plan it, as sync does
    resolved, failed = resolve_changed(ctx, present, req, parallel=parallel)
    for item, err in failed:
        report.errors.append({"source": str(item.source), "destination": str(item.destination), "error": err})
    by_destination = {str(it.destination): it for it in present}
    out: list[tuple[SyncItem, str]] = []
    for r in resolved:
        item = by_destination[r.destination]
        src_digest = source_heads.get(r.source, "")
        found = str(r.dest_digest or "")
        try:
            expected = plan_copy([r], r.options or req.options).images[0].dest_digest
        except FerryError as exc:
            report.errors.append({"source": r.source, "destination": r.destination, "error": describe_error(exc)})
            continue
        if found == expected:
            report.converted.append(_converted(item, src_digest, found, "the digest a sync with these options writes"))
            out.append((item, found))
        else:
            report.differing_digests.append(
                {
                    "source": r.source,
                    "destination": r.destination,
                    "source_digest": src_digest,
                    "expected_digest": expected,
                    "destination_digest": found,
                }
            )
    return out
