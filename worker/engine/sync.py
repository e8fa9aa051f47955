"""Sync: find what a source holds, name it at the destination like skopeo, and copy only what changed.

Steps:

1. ``discover`` lists the images a sync request names (a repository's tags, a
   skopeo sync YAML file, a ``dir:`` tree, an OCI layout) as ``SyncItem``s with
   skopeo's destination naming (``--scoped``, ``--append-suffix``).
2. ``check`` HEADs each source tag and its destination: an unchanged tag costs two
   HEAD requests and no GET. Signature tags (cosign ``sha256-<hex>.sig|.att|.sbom``)
   and OCI referrers of each image join the set unless signatures are removed.
3. What changed is resolved (GET) and planned with ``plan_copy``, exactly like copy,
   and run by either executor.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from worker.registry import (
    Credentials,
    Descriptor,
    Digest,
    FerryError,
    InvalidInput,
    InvalidReference,
    NotFound,
    Platform,
    Reference,
    RegistryClient,
    load_object,
)

from .executor import PlanFeed, describe_error
from .plan import CopyOptions, Planner, ResolvedImage, resolve_image
from .semver import Constraint, Version
from .steps import EngineContext
from .syncfile import CatalogSpec, read_sync_file
from .transports import ImageDestination, ImageName, SideConfig, open_destination, open_repository

log = logging.getLogger("ferry.sync")

SIGNATURE_SUFFIXES = (".sig", ".att", ".sbom")


@dataclass(frozen=True)
class SyncItem:
    source: ImageName
    destination: ImageName
    #: a signature / attestation / referrer that goes along with an image
    extra: bool = False
    options: CopyOptions | None = None
    #: for an extra: the source of the image it goes with (it is dropped when that image is not copied)
    parent: str = ""


@dataclass
class EntryRules:
    """Per registry entry of a YAML file (Ferry extensions to skopeo's format)."""

    exclude: list[re.Pattern[str]] = field(default_factory=list)
    platforms: tuple[Platform, ...] = ()
    keep_latest: int = 0
    keep_latest_by: str = "semver"


@dataclass
class SyncRequest:
    source_kind: str  # docker | yaml | dir | oci
    source: str
    dest_kind: str  # docker | dir | oci
    destination: str
    options: CopyOptions
    scoped: bool = False
    append_suffix: str = ""
    remove_signatures: bool = False


@dataclass
class CheckResult:
    changed: list[SyncItem] = field(default_factory=list)
    unchanged: list[tuple[SyncItem, str]] = field(default_factory=list)
    failed: list[tuple[SyncItem, str]] = field(default_factory=list)
    #: source digest seen for each changed item, to remember what it became at the destination
    source_digests: dict[str, str] = field(default_factory=dict)
    #: source digest of every item checked (``verify`` tells a same-digest copy from a remembered conversion)
    source_heads: dict[str, str] = field(default_factory=dict)


# -- naming ------------------------------------------------------------------------------------------------------


def destination_for(suffix: str, req: SyncRequest) -> ImageName:
    """skopeo's rule: DESTINATION joined with the source's path (its last element unless --scoped) + suffix."""
    if not req.scoped:
        suffix = posixpath.basename(suffix)
    if req.dest_kind == "docker":
        joined = posixpath.join(req.destination, suffix) + req.append_suffix
        try:
            return ImageName("docker", joined, Reference.parse(joined))
        except InvalidReference as exc:
            raise InvalidInput(f"cannot name the destination for {suffix!r}: {exc}") from None
    if req.dest_kind == "dir":
        return ImageName("dir", os.path.join(req.destination, suffix) + req.append_suffix)
    if req.dest_kind == "oci":
        ref = suffix + req.append_suffix
        return ImageName("oci", f"{req.destination}:{ref}")
    raise InvalidInput(f"{req.dest_kind!r} is not a valid destination transport (docker, dir, oci)")


def _docker_suffix(ref: Reference) -> str:
    return str(ref)


# -- discovery ---------------------------------------------------------------------------------------------------


class Tasks:
    """A thread pool that knows when everything spawned (and everything those spawned) has finished.

    Discovery, checks and resolution run as tasks on one pool, each starting as soon as what it needs is
    known: a repository's checks as soon as its tag list arrives, an image's resolution as soon as its
    check says it changed. The first unexpected error is kept and raised by ``join``; after it no new task
    starts.
    """

    def __init__(self, parallel: int, name: str = "ferry-sync") -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix=name)
        self._cond = threading.Condition()
        self._outstanding = 0
        self.error: BaseException | None = None
        self.stopped = False

    def spawn(self, fn: Callable[[], None]) -> None:
        with self._cond:
            if self.error is not None or self.stopped:
                return
            self._outstanding += 1

        def run() -> None:
            try:
                if self.error is None and not self.stopped:
                    fn()
            except BaseException as exc:
                with self._cond:
                    if self.error is None:
                        self.error = exc
            finally:
                with self._cond:
                    self._outstanding -= 1
                    self._cond.notify_all()

        self._pool.submit(run)

    def stop(self) -> None:
        with self._cond:
            self.stopped = True

    def join(self) -> None:
        """Wait for every task; raise the first error one of them raised."""
        try:
            with self._cond:
                while self._outstanding:
                    self._cond.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.error is not None:
            raise self.error


@dataclass
class Discovery:
    items: list[SyncItem] = field(default_factory=list)
    #: source registry -> side (TLS, credentials) from the YAML file
    sides: dict[str, SideConfig] = field(default_factory=dict)
    #: destination repository -> every tag its source repository has now (for --delete)
    source_tags: dict[str, set[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: source repository -> its tags, as listed (checks look for signature tags here: no second listing)
    tag_lists: dict[str, list[str]] = field(default_factory=dict)
    #: runs tag listings in parallel (``None``: one after another)
    tasks: Tasks | None = None
    #: called with (order, item) for every image found; default: ``items`` in order
    emit: Callable[[int, SyncItem], None] | None = None
    #: run as a task beside the first listing (once the request has been read and found valid)
    beside_first_listing: Callable[[], None] | None = None
    _order: int = 0
    _found: list[tuple[int, SyncItem]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_order(self) -> int:
        with self._lock:
            self._order += 1
            return self._order

    def found(self, order: int, item: SyncItem) -> None:
        if self.emit is not None:
            self.emit(order, item)
        else:
            with self._lock:
                self._found.append((order, item))

    def run(self, fn: Callable[[], None]) -> None:
        if self.tasks is not None:
            with self._lock:
                beside, self.beside_first_listing = self.beside_first_listing, None
            if beside is not None:
                self.tasks.spawn(beside)
            self.tasks.spawn(fn)
        else:
            fn()

    def finish(self) -> None:
        """Put what was found in discovery order (the order of the YAML file and of each tag list)."""
        self._found.sort(key=lambda pair: pair[0])
        self.items = [item for _order, item in self._found]


def discover(ctx: EngineContext, req: SyncRequest, *, parallel: int = 8) -> Discovery:
    """Every image the request names, with its destination name; tag lists are fetched in parallel."""
    out = Discovery(tasks=Tasks(parallel, "ferry-discover"))
    try:
        discover_into(ctx, req, out)
    finally:
        out.tasks.join()  # type: ignore[union-attr]
    out.finish()
    if req.source_kind == "docker" and not out.items:
        raise InvalidInput(f"no images to sync found in {req.source!r}")
    return out


def discover_into(ctx: EngineContext, req: SyncRequest, out: Discovery) -> None:
    """Start discovery: images go to ``out.found`` as they are known; listings run on ``out.tasks``."""
    if req.source_kind == req.dest_kind == "dir":
        raise InvalidInput("sync from 'dir' to 'dir' is not supported: use rsync")
    if req.source_kind == "docker":
        ref = Reference.parse(req.source, default_tag=False)
        _discover_repo(ctx, req, out, ref, tags=None if ref.tag is None and ref.digest is None else [])
    elif req.source_kind == "yaml":
        _discover_yaml(ctx, req, out)
    elif req.source_kind == "dir":
        _discover_dir(req, out)
    elif req.source_kind == "oci":
        _discover_oci(req, out)
    else:
        raise InvalidInput(f"{req.source_kind!r} is not a valid source transport (docker, yaml, dir, oci)")


def _list_tags(ctx: EngineContext, ref: Reference) -> list[str]:
    # at the name as given, never a mirror's (skopeo's GetRepositoryTags): a mirror may hold fewer tags
    side = ctx.source_sides.get(ref.registry, ctx.source_side)
    return open_repository(ImageName.parse(f"docker://{ref.with_tag('latest')}"), side, ctx.pool).list_tags()


def _discover_repo(
    ctx: EngineContext,
    req: SyncRequest,
    out: Discovery,
    ref: Reference,
    *,
    tags: list[str] | None,
    tag_filter: Callable[[str], bool] | None = None,
    rules: EntryRules | None = None,
    options: CopyOptions | None = None,
) -> None:
    """Add a repository's images: named tags/digests, or (``tags is None``) every tag passing the filter."""
    rules = rules or EntryRules()
    order = out.next_order()
    if tags == []:  # a tagged or digested reference: just that image
        out.found(order, SyncItem(_src(ref), destination_for(_docker_suffix(ref), req), options=options))
        return
    dest_repo = destination_for(_docker_suffix(ref.with_tag("x")), req)

    def listed() -> None:
        all_tags = _list_tags(ctx, ref)
        with out._lock:
            out.tag_lists[ref.name] = all_tags
            if dest_repo.reference is not None:
                # under their destination names (--append-suffix), which is what --delete compares with
                out.source_tags.setdefault(dest_repo.reference.name, set()).update(
                    t + req.append_suffix for t in all_tags
                )
        if tags:
            wanted = []
            for t in tags:
                try:
                    is_digest = t.startswith("sha") and ":" in t
                    wanted.append(ref.with_digest(Digest.parse(t)) if is_digest else ref.with_tag(t))
                except FerryError:
                    wanted.append(ref.with_tag(t))
        else:
            selected = [t for t in all_tags if not _is_signature_tag(t)]
            if tag_filter is not None:
                selected = [t for t in selected if tag_filter(t)]
            selected = [t for t in selected if not any(p.search(t) for p in rules.exclude)]
            if rules.keep_latest:
                selected = _keep_latest(ctx, ref, selected, rules)
            wanted = [ref.with_tag(t) for t in selected]
        for r in wanted:
            if r.tag is not None and any(p.search(r.tag) for p in rules.exclude):
                continue
            out.found(order, SyncItem(_src(r), destination_for(_docker_suffix(r), req), options=options))

    out.run(listed)


def _src(ref: Reference) -> ImageName:
    return ImageName("docker", str(ref), ref)


def _is_signature_tag(tag: str) -> bool:
    return bool(re.fullmatch(r"sha256-[0-9a-f]{64}(\.(sig|att|sbom))?", tag))


def _keep_latest(ctx: EngineContext, ref: Reference, tags: list[str], rules: EntryRules) -> list[str]:
    n = rules.keep_latest
    if rules.keep_latest_by == "semver":
        versioned = [(v, t) for t in tags if (v := Version.parse(t)) is not None]
        versioned.sort(key=lambda vt: vt[0]._key(), reverse=True)
        return [t for _, t in versioned[:n]]
    if rules.keep_latest_by == "created":
        from .inspect import host_platform, inspect_image

        src = ctx.source(f"docker://{ref.with_tag('latest')}")
        dated: list[tuple[str, str]] = []
        for t in tags:
            tagged = ctx.source(f"docker://{ref.with_tag(t)}")
            info = inspect_image(tagged, name=None, tags=[], wanted=host_platform())
            dated.append((str(info.get("Created") or ""), t))
        del src
        dated.sort(reverse=True)
        return [t for _, t in dated[:n]]
    raise InvalidInput(f"keep-latest-by must be 'semver' or 'created', not {rules.keep_latest_by!r}")


def _yaml_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidInput(f"{what} must be true or false")


def entry_side(entry: dict[str, Any], base: SideConfig, registry: str) -> SideConfig:
    """A policy file entry's own ``tls-verify``, ``cert-dir`` and ``credentials`` (prune; sync files use
    ``syncfile``). A value of the wrong shape is an error, never silently ignored."""
    side = replace(base)
    if "tls-verify" in entry:
        side.tls_verify = _yaml_bool(entry["tls-verify"], f"{registry}: tls-verify")
    if entry.get("cert-dir") is not None:
        if not isinstance(entry["cert-dir"], str):
            raise InvalidInput(f"{registry}: cert-dir must be a directory path")
        side.cert_dir = entry["cert-dir"]
    creds = entry.get("credentials")
    if creds is not None:
        if not isinstance(creds, dict) or set(creds) - {"username", "password"}:
            raise InvalidInput(f"{registry}: credentials must be a mapping with username and password")
        username, password = creds.get("username"), creds.get("password", "")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise InvalidInput(f"{registry}: credentials need a non-empty username and a password (strings)")
        side.credentials = Credentials(username=username, password=password)
    return side


def _discover_yaml(ctx: EngineContext, req: SyncRequest, out: Discovery) -> None:
    entries = read_sync_file(req.source)  # every problem of the file, before anything is listed
    base_side = ctx.source_side
    for entry in entries:
        registry = entry.registry
        side = replace(base_side)
        if entry.tls_verify is not None:
            side.tls_verify = entry.tls_verify
        if entry.cert_dir:
            side.cert_dir = entry.cert_dir
        if entry.credentials is not None:
            side.credentials = entry.credentials
        host = Reference.parse(f"{registry}/x").registry
        out.sides[host] = side
        ctx.source_sides[host] = side
        rules = EntryRules(list(entry.exclude_tags), entry.platforms, entry.keep_latest, entry.keep_latest_by)
        options = replace(req.options, platforms=rules.platforms) if rules.platforms else None
        for repo, tags in entry.images.items():
            ref = Reference.parse(f"{registry}/{repo}", default_tag=False)
            _discover_repo(ctx, req, out, ref, tags=tags or None, rules=rules, options=options)
        for repo, pattern in entry.images_by_tag_regex.items():
            ref = Reference.parse(f"{registry}/{repo}", default_tag=False)
            _discover_repo(ctx, req, out, ref, tags=None, tag_filter=_regex_filter(pattern), rules=rules,
                           options=options)  # fmt: skip
        for repo, constraint in entry.images_by_semver.items():
            ref = Reference.parse(f"{registry}/{repo}", default_tag=False)
            _discover_repo(ctx, req, out, ref, tags=None, tag_filter=_semver_filter(constraint), rules=rules,
                           options=options)  # fmt: skip
        if entry.catalog is not None:
            _discover_catalog(ctx, req, out, registry, entry.catalog, rules, options)
        if not entry.selects_images:
            out.warnings.append(f"no images specified for registry {registry}")


def _regex_filter(rx: re.Pattern[str]) -> Callable[[str], bool]:
    return lambda tag: bool(rx.search(tag))


def _semver_filter(c: Constraint) -> Callable[[str], bool]:
    def check(tag: str) -> bool:
        v = Version.parse(tag)
        return v is not None and c.check(v)

    return check


def _discover_catalog(
    ctx: EngineContext,
    req: SyncRequest,
    out: Discovery,
    registry: str,
    catalog: CatalogSpec,
    rules: EntryRules,
    options: CopyOptions | None,
) -> None:
    """A whole registry (``catalog: {}``) or a namespace (``catalog: {prefix: team/}``) via ``_catalog``."""
    host = Reference.parse(f"{registry}/x").registry
    client = ctx.pool.client(Reference.parse(f"{registry}/x"), ctx.source_sides.get(host, ctx.source_side))
    # each page's repositories are listed (in parallel) while the next page is read
    for page in client.catalog_pages():
        for repo in page:
            if catalog.prefix and not repo.startswith(catalog.prefix):
                continue
            try:
                ref = Reference.parse(f"{registry}/{repo}", default_tag=False)
            except InvalidReference as exc:
                raise InvalidInput(f"the catalog of {registry} names an invalid repository: {exc}") from None
            flt = _regex_filter(catalog.tags) if catalog.tags is not None else None
            _discover_repo(ctx, req, out, ref, tags=None, tag_filter=flt, rules=rules, options=options)


def _discover_dir(req: SyncRequest, out: Discovery) -> None:
    base = req.source
    if not os.path.isdir(base):
        raise InvalidInput(f"invalid source directory {base!r}")
    found = 0
    for root, dirs, files in os.walk(base):
        if "manifest.json" in files:
            rel = os.path.relpath(root, base)
            suffix = os.path.basename(os.path.abspath(base)) if rel == "." else rel
            out.found(out.next_order(), SyncItem(ImageName("dir", root), destination_for(suffix, req)))
            found += 1
            dirs[:] = []
    if not found:
        raise InvalidInput(f"no images to sync found in {base!r}")


def _discover_oci(req: SyncRequest, out: Discovery) -> None:
    index_path = Path(req.source) / "index.json"
    try:
        index = load_object(index_path.read_bytes(), f"index.json of OCI layout {req.source}")
    except OSError as exc:
        raise InvalidInput(f"cannot read OCI layout {req.source}: {exc}") from None
    found = 0
    for m in index.objects("manifests"):
        name = m.text_map("annotations").get("org.opencontainers.image.ref.name")
        if name:
            out.found(out.next_order(), SyncItem(ImageName("oci", f"{req.source}:{name}"), destination_for(name, req)))
            found += 1
    if not found:
        raise InvalidInput(f"no named images to sync found in OCI layout {req.source!r}")


# -- checking: HEAD, HEAD, compare ---------------------------------------------------------------------------


@dataclass
class Checked:
    item: SyncItem
    source_digest: str
    #: what the destination holds at the name now (``None``: nothing)
    dest: Descriptor | None
    #: the destination already has this image (the same digest, or what a previous sync made of it)
    unchanged: bool
    extras: list[SyncItem]


def _dest_head(dest: ImageDestination) -> Descriptor | None:
    try:
        return dest.head_manifest(None)
    except NotFound:
        return None


def check_one(
    ctx: EngineContext,
    item: SyncItem,
    req: SyncRequest,
    memo: Any,
    tag_lists: dict[str, list[str]],
    heads: Executor | None = None,
) -> Checked:
    """HEAD the source and the destination; find the image's signatures and referrers.

    With ``heads`` (a pool that runs nothing but these HEADs, so waiting on it cannot deadlock), a registry
    destination's HEAD is sent on it while this thread sends the source's: one round trip, not two.
    """
    src = ctx.source(str(item.source))
    dest = ctx.destination(str(item.destination))
    pending = heads.submit(_dest_head, dest) if heads is not None and item.destination.reference else None
    src_desc = src.head_manifest(None)
    if src_desc is None:
        raise NotFound(f"{item.source}: manifest unknown", status=404)
    dest_desc = pending.result() if pending is not None else _dest_head(dest)
    extras = [] if req.remove_signatures or item.extra else _extras(ctx, item, src_desc, req, tag_lists)
    src_digest = str(src_desc.digest)
    expected = {src_digest}
    if memo is not None and dest_desc is not None and str(dest_desc.digest) != src_digest:
        remembered = memo.memo_get(str(item.source), src_digest, _options_key(item.options or req.options))
        if remembered:
            expected.add(remembered)
    unchanged = dest_desc is not None and str(dest_desc.digest) in expected
    return Checked(item, src_digest, dest_desc, unchanged, extras)


def _record(result: CheckResult, c: Checked) -> None:
    result.source_heads[str(c.item.source)] = c.source_digest
    if c.unchanged:
        assert c.dest is not None
        result.unchanged.append((c.item, str(c.dest.digest)))
    else:
        result.changed.append(c.item)
        result.source_digests[str(c.item.source)] = c.source_digest


def check(
    ctx: EngineContext,
    items: Sequence[SyncItem],
    req: SyncRequest,
    memo: Any,
    *,
    parallel: int = 8,
    tag_lists: dict[str, list[str]] | None = None,
) -> CheckResult:
    """Split items into changed and unchanged using HEAD requests only (plus signature discovery)."""
    result = CheckResult()
    lists = tag_lists if tag_lists is not None else {}

    with (
        ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-check") as pool,
        ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-head") as heads,
    ):
        pending = list(items)
        seen: set[str] = set()
        while pending:
            batch, pending = pending, []
            futures = []
            for it in batch:
                # the same image named twice (a tag listed under `images` and matched by a regex): check it once
                if str(it.destination) in seen:
                    continue
                seen.add(str(it.destination))
                futures.append((it, pool.submit(check_one, ctx, it, req, memo, lists, heads)))
            for it, fut in futures:
                try:
                    c = fut.result()
                except FerryError as exc:
                    result.failed.append((it, describe_error(exc)))
                    continue
                _record(result, c)
                pending.extend(e for e in c.extras if str(e.destination) not in seen)
    return result


# -- the pipelined sync ----------------------------------------------------------------------------------------


@dataclass
class SyncOutcome:
    """What a pipelined sync found besides the copies (those are in the executor's report)."""

    discovery: Discovery
    checked: CheckResult
    resolved: list[ResolvedImage] = field(default_factory=list)
    #: resolution failures (check failures are in ``checked.failed``)
    resolve_failed: list[tuple[SyncItem, str]] = field(default_factory=list)


def sync_pipelined(
    ctx: EngineContext,
    req: SyncRequest,
    memo: Any,
    feed: PlanFeed,
    *,
    parallel: int = 8,
    keep_going: bool = False,
) -> SyncOutcome:
    """Discover, check, resolve and plan at once, each image as soon as the step before it is done for it.

    Planned images go to ``feed`` for an executor running meanwhile, so the first blob moves while tag lists
    are still arriving; unchanged images go there too, as up to date (``checked.unchanged`` lists them as
    well). A failed check or resolution is recorded; without ``keep_going`` it also tells the executor to
    start nothing new (``feed.fail``). Errors of discovery itself (a repository that does not
    exist, a bad YAML file) are raised once the tasks already running have ended. ``feed`` is finished here,
    whatever happens.
    """
    tasks = Tasks(parallel)
    heads = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-head")
    disc = Discovery(tasks=tasks)
    out = SyncOutcome(disc, CheckResult())
    planner = Planner(req.options)
    lock = threading.Lock()
    seen: set[str] = set()
    found: list[tuple[int, SyncItem]] = []

    def failed(item: SyncItem, exc: FerryError, into: list[tuple[SyncItem, str]]) -> None:
        with lock:
            into.append((item, describe_error(exc)))
        if not keep_going:
            feed.fail()
            tasks.stop()

    def resolve(c: Checked) -> None:
        item = c.item
        try:
            src = ctx.source(str(item.source))
            dest = ctx.destination(str(item.destination))
            r = resolve_image(
                item.source, src, item.destination, dest, item.options or req.options, head_destination=False
            )
            r.dest_digest = c.dest.digest if c.dest is not None else None
            if item.extra:
                r.attachment = True
            else:
                ctx.admit(item.source, src, r)  # the trust policy, before anything of it is written
            with lock:
                image, steps = planner.add(r)
                out.resolved.append(r)
        except FerryError as exc:
            failed(item, exc, out.resolve_failed)
            return
        feed.put([image], steps)
        # a signature or referrer goes only with an image that is copied (never with a rejected one)
        for extra in c.extras:
            emit(0, extra)

    def check_item(item: SyncItem) -> None:
        if feed.closed:
            return
        try:
            c = check_one(ctx, item, req, memo, disc.tag_lists, heads)
        except FerryError as exc:
            failed(item, exc, out.checked.failed)
            return
        with lock:
            _record(out.checked, c)
            if c.unchanged:
                assert c.dest is not None
                image = planner.up_to_date(str(item.source), str(item.destination), c.source_digest, str(c.dest.digest))
        if c.unchanged:
            feed.put([image], {})  # reported (and counted by the display) as it is found
            for extra in c.extras:
                emit(0, extra)
        else:
            tasks.spawn(lambda: resolve(c))  # its extras follow once it is admitted and planned

    def emit(order: int, item: SyncItem) -> None:
        with lock:
            # the same image named twice (a tag listed under `images` and matched by a regex): copy it once
            if str(item.destination) in seen:
                return
            seen.add(str(item.destination))
            if not item.extra:
                found.append((order, item))
        tasks.spawn(lambda: check_item(item))

    disc.emit = emit
    try:
        try:
            if req.dest_kind == "docker":
                # the destination's first round trip (scheme probe, connection) overlaps the tag lists, not a check
                disc.beside_first_listing = lambda: _reach_destination(ctx, req)
            discover_into(ctx, req, disc)
        finally:
            tasks.join()
            heads.shutdown(wait=True)
    finally:
        feed.finish()
    found.sort(key=lambda pair: pair[0])
    disc.items = [item for _order, item in found]
    if req.source_kind == "docker" and not disc.items:
        raise InvalidInput(f"no images to sync found in {req.source!r}")
    return out


def _reach_destination(ctx: EngineContext, req: SyncRequest) -> None:
    """Open the destination registry's client and learn its base URL (one ``/v2/`` round trip) right away."""
    try:
        name = destination_for("ferry", req)
        dest = open_destination(name, ctx.dest_side, ctx.pool)
        client = getattr(dest, "client", None)
        if client is not None:
            client.base_url  # noqa: B018 - the probe is the point
    except FerryError as exc:
        log.debug("reaching the destination early failed (the first check will say why): %s", exc)


def _options_key(options: CopyOptions) -> str:
    return json.dumps(
        {
            "multi": options.multi_arch,
            "platforms": [str(p) for p in options.platforms],
            "system": str(options.system_platform),
            "format": options.format,
        },
        sort_keys=True,
    )


def _extras(
    ctx: EngineContext, item: SyncItem, desc: Descriptor, req: SyncRequest, tag_lists: dict[str, list[str]]
) -> list[SyncItem]:
    """Signature, attestation and SBOM tags and OCI referrers of this image, when the digest is kept."""
    ref = item.source.reference
    dest_ref = item.destination.reference
    if ref is None or dest_ref is None:
        return []
    options = item.options or req.options
    single = desc.media_type not in (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
    if options.format is not None or not (single or (options.multi_arch == "all" and not options.platforms)):
        return []  # digests change at the destination: signatures for the old digest would not apply
    key = ref.name
    if key not in tag_lists:  # discovery lists each repository it walks; a single named image needs a listing
        try:
            tag_lists[key] = ctx.source(str(item.source)).list_tags()
        except FerryError:
            tag_lists[key] = []
    tags = set(tag_lists[key])
    base = f"{desc.digest.algorithm}-{desc.digest.hex}"
    extra_opts = replace(options, multi_arch="all", platforms=(), format=None)
    out = []
    for tag in [base + s for s in SIGNATURE_SUFFIXES] + [base]:
        if tag in tags:
            out.append(
                SyncItem(
                    _src(ref.with_tag(tag)),
                    _named(dest_ref.with_tag(tag)),
                    extra=True,
                    options=extra_opts,
                    parent=str(item.source),
                )
            )
    client = ctx.pool.client(ref, ctx.source_sides.get(ref.registry, ctx.source_side))
    referrers = _referrers(client, ref.repository, desc.digest)
    for r in referrers or []:
        out.append(
            SyncItem(
                _src(Reference(ref.registry, ref.repository, None, r.digest)),
                _named(Reference(dest_ref.registry, dest_ref.repository, None, r.digest)),
                extra=True,
                options=extra_opts,
                parent=str(item.source),
            )
        )
    return out


class _FirstAnswer:
    """Whether a registry has the referrers API is learnt from its first answer: until that answer is in, the
    other checks wait for it rather than each asking (a registry without the API would get one futile request
    per image checked meanwhile)."""

    def __init__(self) -> None:
        self.asking = threading.Lock()
        self.answered = threading.Event()


_FIRST_REFERRERS: weakref.WeakKeyDictionary[RegistryClient, _FirstAnswer] = weakref.WeakKeyDictionary()
_FIRST_REFERRERS_LOCK = threading.Lock()


def _referrers(client: RegistryClient, repository: str, digest: Digest) -> list[Descriptor] | None:
    with _FIRST_REFERRERS_LOCK:
        first = _FIRST_REFERRERS.setdefault(client, _FirstAnswer())
    if not first.answered.is_set():
        if first.asking.acquire(blocking=False):
            try:
                return _referrers_or_none(client, repository, digest)
            finally:
                first.answered.set()
        first.answered.wait(60)  # the first request's own timeouts bound this; past it, ask anyway
    return _referrers_or_none(client, repository, digest)  # without the API: no request (the client knows)


def _referrers_or_none(client: RegistryClient, repository: str, digest: Digest) -> list[Descriptor] | None:
    try:
        return client.referrers(repository, digest)
    except FerryError:
        return None


def _named(ref: Reference) -> ImageName:
    return ImageName("docker", str(ref), ref)


# -- resolving what changed -------------------------------------------------------------------------------------


def resolve_changed(
    ctx: EngineContext, items: Sequence[SyncItem], req: SyncRequest, *, parallel: int = 8
) -> tuple[list[ResolvedImage], list[tuple[SyncItem, str]]]:
    """Read every changed image; the trust policy admits each (its signatures and referrers go along)."""

    def one(item: SyncItem) -> ResolvedImage:
        src = ctx.source(str(item.source))
        dest = ctx.destination(str(item.destination))
        resolved = resolve_image(item.source, src, item.destination, dest, item.options or req.options)
        if item.extra:
            resolved.attachment = True
        else:
            ctx.admit(item.source, src, resolved)
        return resolved

    done: list[tuple[SyncItem, ResolvedImage]] = []
    failed: list[tuple[SyncItem, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-resolve") as pool:
        futures = [(it, pool.submit(one, it)) for it in items]
        for it, fut in futures:
            try:
                done.append((it, fut.result()))
            except FerryError as exc:
                failed.append((it, describe_error(exc)))
    # a signature or referrer goes only with an image that is copied (never with a rejected one)
    not_copied = {str(it.source) for it, _ in failed}
    resolved = [r for it, r in done if not (it.extra and it.parent in not_copied)]
    return resolved, failed


# -- deleting what the source no longer has ------------------------------------------------------------------


@dataclass
class Deletion:
    destination: str
    digest: str
    #: why the tag stays although the source no longer has it (empty: it is deleted)
    kept_because: str = ""


_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")


def plan_deletions(
    ctx: EngineContext, disc: Discovery, items: Sequence[SyncItem], incoming: Sequence[tuple[str, str]] = ()
) -> list[Deletion]:
    """Destination tags the source no longer has, in repositories this sync manages.

    A registry deletes manifests by digest, which removes every tag on it: a stale
    tag sharing its digest with a kept tag, or whose manifest a kept index lists,
    is reported and kept. ``incoming`` are the ``(destination, digest)`` pairs this
    sync writes, for planning before the copy (a dry run): a tag renamed at the
    source shares its manifest with a tag the destination does not have yet.
    """
    coming: dict[str, dict[str, str]] = {}
    for name, digest in incoming:
        dref = ImageName.parse(name).reference if name.startswith("docker://") else None
        if dref is not None and dref.tag is not None:
            coming.setdefault(dref.name, {})[dref.tag] = digest
    managed: dict[str, Reference] = {}
    for it in items:
        if it.destination.reference is not None and not it.extra:
            managed.setdefault(it.destination.reference.name, it.destination.reference)
    out: list[Deletion] = []
    for name, ref in managed.items():
        source_tags = disc.source_tags.get(name)
        if source_tags is None:
            continue  # the source named single images: nothing says which tags are gone
        dest = ctx.destination(f"docker://{ref.with_tag('latest')}")
        client = dest.client  # type: ignore[attr-defined]
        try:
            dest_tags = client.list_tags(ref.repository)
        except NotFound:
            continue
        stale = [t for t in dest_tags if t not in source_tags and not _is_signature_tag(t)]
        if not stale:
            continue
        digests: dict[str, str] = {}
        media_types: dict[str, str] = {}
        for t in dest_tags:
            d = client.head_manifest(ref.repository, t)
            if d is not None:
                digests[t] = str(d.digest)
                media_types[t] = str(d.media_type)
        # manifests an index that stays lists: deleting one would break that index
        listed_by: dict[str, str] = {}
        for t in dest_tags:
            if t in stale or media_types.get(t) not in _INDEX_TYPES:
                continue
            index = client.get_manifest(ref.repository, Digest.parse(digests[t])).fields()
            for m in index.objects("manifests"):
                listed_by.setdefault(m.text("digest"), t)
        digests.update(coming.get(name, {}))  # what those tags will point at once the copy is done
        for t in stale:
            digest = digests.get(t, "")
            sharing = [k for k, v in digests.items() if v == digest and k not in stale]
            reason = ""
            if sharing:
                reason = f"shares its digest with {', '.join(sharing)}"
            elif digest in listed_by:
                reason = f"the index {listed_by[digest]} lists its manifest"
            out.append(Deletion(str(ref.with_tag(t)), digest, reason))
    return out


def apply_deletions(ctx: EngineContext, deletions: Sequence[Deletion]) -> list[str]:
    done = []
    gone: set[tuple[str, str]] = set()
    for d in deletions:
        if d.kept_because or not d.digest:
            continue
        ref = Reference.parse(d.destination)
        key = (ref.name, d.digest)
        if key not in gone:  # two stale tags on one manifest: deleting it once removes both
            dest = ctx.destination(f"docker://{ref}")
            dest.client.delete_manifest(ref.repository, Digest.parse(d.digest))  # type: ignore[attr-defined]
            gone.add(key)
        done.append(d.destination)
    return done
