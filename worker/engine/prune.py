"""Prune: delete the tags retention rules no longer keep, safely and resumably.

Rules, in the shapes of ECR lifecycle policies, Harbor tag retention and GitLab cleanup
policies: keep the latest N tags (by semantic version or by creation time), delete tags
older than an age, apply only to tags matching ``include`` and never to tags matching
``keep``. A tag is deleted only when it is outside the latest N *and* (with an age) older
than the age. Tags the rules do not select are never touched.

Registries delete manifests, not tags, so deciding is done per digest:

* a digest that a kept tag points at, or that a kept index lists, is never deleted (the
  tag is reported kept, with the reason);
* a deleted image takes along its signature tags (``sha256-<hex>.sig|.att|.sbom``), its
  referrers (the ``sha256-<hex>`` fallback index and what it lists, and the referrers
  API) and, for an index, its child manifests unless something kept still needs them;
  those of kept images stay.

Creation times: distribution cannot tell when a tag was pushed, so the manifest's
``org.opencontainers.image.created`` annotation stands in, else the image config's
``created`` (for an index, its first child's). Each decision says which was used.

Resuming: before deleting, the decided deletions of a repository are written to a journal
(JSON lines in the cache directory); each finished deletion is appended. A run killed
half-way leaves the journal; the next run first finishes it (a manifest already gone counts
as done), then decides afresh. Images go first, then what they took along, so no tag ever
points at a deleted manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from worker.registry import (
    Digest,
    FerryError,
    HeldOff,
    InvalidInput,
    MalformedDocument,
    NotFound,
    Reference,
    RegistryClient,
    Unsupported,
    check_config,
)
from worker.registry import Manifest as RegistryManifest
from worker.registry._fs import atomic_write

from .executor import describe_error
from .manifest import IMAGE_TYPES, INDEX_TYPES, parse_manifest
from .semver import Version
from .sync import entry_side
from .transports import ClientPool, SideConfig

T = TypeVar("T")
R = TypeVar("R")

SIGNATURE_TAG = re.compile(r"sha256-([0-9a-f]{64})(\.sig|\.att|\.sbom)?")
CREATED_ANNOTATION = "org.opencontainers.image.created"
_AGE = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_AGE_UNITS = {"w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_age(text: str) -> float:
    """``30d``, ``2w``, ``12h``, ``1h30m``, ``90s`` or plain seconds, in seconds."""
    value = str(text).strip()
    try:
        return float(value)
    except ValueError:
        pass
    total, pos = 0.0, 0
    for m in _AGE.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _AGE_UNITS[m.group(2)]
        pos = m.end()
    if not value or pos != len(value):
        raise InvalidInput(f"invalid age {text!r} (e.g. 30d, 2w, 12h, 1h30m)")
    return total


def _regex(pattern: Any, what: str) -> re.Pattern[str]:
    try:
        return re.compile(str(pattern))
    except re.error as exc:
        raise InvalidInput(f"invalid {what} regex {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class Rules:
    keep_latest: int = 0
    keep_latest_by: str = "semver"
    #: seconds; ``None``: age does not matter
    older_than: float | None = None
    include: re.Pattern[str] | None = None
    keep: tuple[re.Pattern[str], ...] = ()

    def check(self, where: str) -> Rules:
        if self.keep_latest < 0:
            raise InvalidInput(f"{where}: keep-latest must be 0 or more")
        if self.keep_latest_by not in ("semver", "created"):
            raise InvalidInput(f"{where}: keep-latest-by must be 'semver' or 'created', not {self.keep_latest_by!r}")
        if not self.keep_latest and self.older_than is None:
            raise InvalidInput(f"{where}: no retention rule: give keep-latest, older-than or both")
        return self

    def with_yaml(self, entry: dict[str, Any], where: str) -> Rules:
        """These rules, overridden by a policy entry's keys."""
        unknown = set(entry) - {"keep-latest", "keep-latest-by", "older-than", "include-tags", "keep-tags"}
        if unknown:
            raise InvalidInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        rules = self
        if "keep-latest" in entry:
            n = entry["keep-latest"]
            if not isinstance(n, int) or isinstance(n, bool):
                raise InvalidInput(f"{where}: keep-latest must be a number")
            rules = replace(rules, keep_latest=n)
        if "keep-latest-by" in entry:
            rules = replace(rules, keep_latest_by=str(entry["keep-latest-by"]))
        if "older-than" in entry:
            rules = replace(rules, older_than=parse_age(str(entry["older-than"])))
        if "include-tags" in entry:
            rules = replace(rules, include=_regex(entry["include-tags"], f"{where}: include-tags"))
        if "keep-tags" in entry:
            keep = entry["keep-tags"]
            keep = [keep] if isinstance(keep, str) else list(keep or [])
            rules = replace(rules, keep=tuple(_regex(p, f"{where}: keep-tags") for p in keep))
        return rules


@dataclass(frozen=True)
class Target:
    """One repository and the rules that apply to it."""

    registry: str
    repository: str
    rules: Rules
    side: SideConfig = field(default_factory=SideConfig, compare=False)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass
class Scope:
    """One registry of a policy file: named repositories and namespaces (catalog prefixes)."""

    registry: str
    side: SideConfig
    repositories: list[tuple[str, Rules]] = field(default_factory=list)
    namespaces: list[tuple[str, Rules]] = field(default_factory=list)


def load_policy(path: str, base_side: SideConfig) -> list[Scope]:
    """Read a policy file: sync's YAML shape (registry -> ``images`` / ``catalog``) with retention keys."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except OSError as exc:
        raise InvalidInput(f"cannot read policy file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"policy file {path}: not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"cannot parse policy file {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(cfg, dict) or not cfg:
        raise InvalidInput(f"policy file {path}: expected a mapping of registries")
    scopes = []
    for registry, entry in cfg.items():
        where = f"policy file {path}: {registry}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: expected a mapping")
        side = entry_side(entry, base_side, f"policy file {path}: {registry}")
        rule_keys = {
            k: v for k, v in entry.items() if k not in ("tls-verify", "cert-dir", "credentials", "images", "catalog")
        }
        defaults = Rules().with_yaml(rule_keys, where)
        scope = Scope(str(registry), side)
        for repo, overrides in (entry.get("images") or {}).items():
            if overrides is not None and not isinstance(overrides, dict):
                raise InvalidInput(f"{where}: images: {repo} must map to rules (or nothing)")
            scope.repositories.append(
                (str(repo), defaults.with_yaml(overrides or {}, f"{where}/{repo}").check(f"{where}/{repo}"))
            )
        catalog = entry.get("catalog")
        if catalog is not None:
            spec = dict(catalog) if isinstance(catalog, dict) else {"prefix": str(catalog or "")}
            prefix = str(spec.pop("prefix", "") or "")
            scope.namespaces.append((prefix, defaults.with_yaml(spec, f"{where}: catalog").check(f"{where}: catalog")))
        if not scope.repositories and not scope.namespaces:
            raise InvalidInput(f"{where}: no repositories (give images or catalog)")
        scopes.append(scope)
    return scopes


def expand(pool: ClientPool, scopes: Sequence[Scope]) -> list[Target]:
    """Targets of a policy: named repositories first, then every repository under each namespace."""
    out: dict[str, Target] = {}
    for scope in scopes:
        for repo, rules in scope.repositories:
            ref = Reference.parse(f"{scope.registry}/{repo}", default_tag=False)
            out.setdefault(ref.name, Target(ref.registry, ref.repository, rules, scope.side))
        for prefix, rules in scope.namespaces:
            probe = Reference.parse(f"{scope.registry}/x")
            for repo in pool.client(probe, scope.side).catalog():
                if repo.startswith(prefix):
                    ref = Reference.parse(f"{scope.registry}/{repo}", default_tag=False)
                    out.setdefault(ref.name, Target(ref.registry, ref.repository, rules, scope.side))
    return list(out.values())


# -- decisions -------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    #: ``registry/repo:tag`` or ``registry/repo@digest``
    reference: str
    digest: str
    #: tag | child | signature | referrer
    kind: str
    reason: str
    size: int = 0
    created: str = ""
    #: where the creation time came from: annotation | config | "" (unknown or not needed)
    created_from: str = ""
    #: the image whose deletion takes this along
    of: str = ""


@dataclass
class PruneReport:
    dry_run: bool = False
    repositories: list[str] = field(default_factory=list)
    deleted: list[Decision] = field(default_factory=list)
    kept: list[Decision] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    #: deletions not attempted because the image they go with could not be deleted
    skipped: list[Decision] = field(default_factory=list)
    #: deletions finished from the journal of an interrupted run
    resumed: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def bytes(self) -> int:
        """Bytes the deleted manifests reference (each manifest once); freed by garbage collection if unshared."""
        return sum({d.digest: d.size for d in self.deleted}.values())

    def add(self, kind: str, items: Iterable[Any]) -> None:
        with self._lock:
            getattr(self, kind).extend(items)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "repositories": self.repositories,
            "deleted": [asdict(d) for d in self.deleted],
            "kept": [asdict(d) for d in self.kept],
            "failed": self.failed,
            "skipped": [asdict(d) for d in self.skipped],
            "resumed": self.resumed,
            "manifests_deleted": len({(_repository_of(d.reference), d.digest) for d in self.deleted}),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
        }


def _repository_of(reference: str) -> str:
    """``registry/repo`` of ``registry/repo:tag`` or ``registry/repo@digest`` (a registry may have a port)."""
    if "@" in reference:
        return reference.split("@", 1)[0]
    head, _, tail = reference.rpartition(":")
    return head if head and "/" not in tail else reference


class DeletesRefused(Unsupported):
    """The registry does not allow deleting manifests at all."""


class _Cache:
    """Manifests by digest and creation times, read once per repository."""

    def __init__(self, client: RegistryClient, repo: str) -> None:
        self.client = client
        self.repo = repo
        self._lock = threading.Lock()
        self._manifests: dict[str, RegistryManifest] = {}

    def manifest(self, digest: str) -> RegistryManifest:
        with self._lock:
            m = self._manifests.get(digest)
        if m is None:
            m = _calm(lambda: self.client.get_manifest(self.repo, Digest.parse(digest)))
            with self._lock:
                self._manifests[digest] = m
        return m

    def size(self, digest: str) -> int:
        """The manifest and the blobs it references (not its children: they are deleted and counted apart)."""
        m = self.manifest(digest)
        return len(m.raw) + sum(b.size for b in parse_manifest(m.raw, m.media_type).blobs)

    def children(self, digest: str) -> list[str]:
        m = self.manifest(digest)
        if m.media_type not in INDEX_TYPES:
            return []
        return [str(c.digest) for c in parse_manifest(m.raw, m.media_type).manifests]

    def created(self, digest: str) -> tuple[dt.datetime | None, str]:
        m = self.manifest(digest)
        parsed = parse_manifest(m.raw, m.media_type)
        annotations = parsed.obj.get("annotations") or {}
        if isinstance(annotations, dict) and annotations.get(CREATED_ANNOTATION):
            return _parse_time(str(annotations[CREATED_ANNOTATION])), "annotation"
        if parsed.is_index:
            return self.created(str(parsed.manifests[0].digest)) if parsed.manifests else (None, "")
        if parsed.config is None or parsed.config.size > 1 << 20:
            return None, ""
        config_digest = parsed.config.digest
        raw = _calm(lambda: self.client.read_blob(self.repo, config_digest))
        try:
            created = check_config(raw).get("created")
        except MalformedDocument:
            return None, ""
        return (_parse_time(str(created)), "config") if created else (None, "")


def _parse_time(text: str) -> dt.datetime | None:
    # Go writes nanoseconds; Python reads at most microseconds
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.strip()).replace("Z", "+00:00")
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when.year < 1971:  # cosign and reproducible builds write the zero time: unknown
        return None
    return when


def _calm(fn: Callable[[], T]) -> T:
    """Run a request, waiting out a shared backoff (``--queue``'s limits) instead of failing on it."""
    while True:
        try:
            return fn()
        except HeldOff as exc:
            time.sleep(min(exc.retry_after or 1.0, 60.0))


def _map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return list(pool.map(fn, items))


def decide(
    client: RegistryClient, target: Target, pool: ThreadPoolExecutor, now: dt.datetime
) -> tuple[list[Decision], list[Decision]]:
    """What goes and what stays in one repository, each with its reason: ``(deleted, kept)``."""
    repo, rules, name = target.repository, target.rules, target.name
    cache = _Cache(client, repo)
    try:
        tags = _calm(lambda: client.list_tags(repo))
    except NotFound:
        return [], []
    heads = _map(pool, lambda t: _calm(lambda: client.head_manifest(repo, t)), tags)
    digest_of = {t: str(h.digest) for t, h in zip(tags, heads, strict=True) if h is not None}
    signatures = {t: d for t, d in digest_of.items() if SIGNATURE_TAG.fullmatch(t)}
    kept: list[Decision] = []
    candidates: list[str] = []
    for tag in sorted(t for t in digest_of if t not in signatures):
        keep_rx = next((p for p in rules.keep if p.search(tag)), None)
        if rules.include is not None and not rules.include.search(tag):
            kept.append(Decision(f"{name}:{tag}", digest_of[tag], "tag", "not selected by include-tags"))
        elif keep_rx is not None:
            kept.append(Decision(f"{name}:{tag}", digest_of[tag], "tag", f"matches keep-tags {keep_rx.pattern}"))
        else:
            candidates.append(tag)
    times: dict[str, tuple[dt.datetime | None, str]] = {}
    if rules.older_than is not None or rules.keep_latest_by == "created":
        unique = sorted({digest_of[t] for t in candidates})
        times = dict(zip(unique, _map(pool, cache.created, unique), strict=True))

    def decision(tag: str, reason: str) -> Decision:
        when, source = times.get(digest_of[tag], (None, ""))
        return Decision(f"{name}:{tag}", digest_of[tag], "tag", reason, 0, when.isoformat() if when else "", source)

    ranked, unranked = _rank(candidates, rules, digest_of, times)
    kept += [decision(t, why) for t, why in unranked]
    going: list[Decision] = []
    for i, tag in enumerate(ranked):
        if i < rules.keep_latest:
            kept.append(decision(tag, f"among the {rules.keep_latest} latest by {rules.keep_latest_by}"))
            continue
        beyond = f"beyond the {rules.keep_latest} latest by {rules.keep_latest_by}" if rules.keep_latest else ""
        if rules.older_than is None:
            going.append(decision(tag, beyond))
            continue
        when = times.get(digest_of[tag], (None, ""))[0]
        age = _age_text(rules.older_than)
        if when is None:
            kept.append(decision(tag, "no creation time known, so never older than " + age))
        elif (now - when).total_seconds() > rules.older_than:
            going.append(decision(tag, ", ".join(x for x in (beyond, f"older than {age}") if x)))
        else:
            kept.append(decision(tag, f"not older than {age}"))
    # only manifests whose HEAD said "image" cannot list others; any other (or no) type is read
    images = {str(h.digest) for h in heads if h is not None and h.media_type in IMAGE_TYPES}
    return _protect(cache, pool, going, kept, signatures, name, images)


def _rank(
    candidates: list[str], rules: Rules, digest_of: dict[str, str], times: dict[str, tuple[dt.datetime | None, str]]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Candidates newest first; and those that cannot be ranked (kept, with why) when a count applies."""
    if not rules.keep_latest:
        return candidates, []
    if rules.keep_latest_by == "semver":
        versions = {t: v for t in candidates if (v := Version.parse(t)) is not None}
        ranked = sorted(versions, key=lambda t: (versions[t], t), reverse=True)
        return ranked, [(t, "not a version, so not ranked by semver") for t in candidates if t not in versions]
    dated = [t for t in candidates if times.get(digest_of[t], (None, ""))[0] is not None]
    ranked = sorted(dated, key=lambda t: (times[digest_of[t]][0], t), reverse=True)
    return ranked, [(t, "no creation time known, so not ranked") for t in candidates if t not in dated]


def _age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _protect(
    cache: _Cache,
    pool: ThreadPoolExecutor,
    going: list[Decision],
    kept: list[Decision],
    signatures: dict[str, str],
    name: str,
    single: set[str],
) -> tuple[list[Decision], list[Decision]]:
    """Keep what a kept tag still needs; add what deleted images take along; sizes for everything that goes.

    ``single``: digests a HEAD showed to be single-image manifests, which list no other manifest.
    """
    kept_tag_of = {d.digest: d.reference.rsplit(":", 1)[1] for d in kept}
    listed_by: dict[str, str] = {}
    kept_indexes = sorted(d for d in kept_tag_of if d not in single)
    for digest, children in zip(kept_indexes, _map(pool, cache.children, kept_indexes), strict=True):
        for child in children:
            listed_by.setdefault(child, kept_tag_of[digest])
    deleted: list[Decision] = []
    for d in going:
        if d.digest in kept_tag_of:
            kept.append(replace(d, reason=f"shares its digest with the kept tag {kept_tag_of[d.digest]}"))
        elif d.digest in listed_by:
            kept.append(replace(d, reason=f"the kept index {listed_by[d.digest]} lists its manifest"))
        else:
            deleted.append(d)
    protected = set(kept_tag_of) | set(listed_by)
    images = sorted({d.digest for d in deleted})
    sizes = dict(zip(images, _map(pool, cache.size, images), strict=True))
    for d in deleted:
        d.size = sizes[d.digest]
    taken = set(images)
    along: list[Decision] = []

    def take(digest: str, kind: str, reference: str, of: str, reason: str) -> None:
        if digest in taken or digest in protected:
            return
        taken.add(digest)
        along.append(Decision(reference, digest, kind, reason, of=of))
        for child in cache.children(digest):
            take(child, "child", f"{name}@{child}", of, f"child manifest of {digest}")
        dependents(digest, of)

    def dependents(digest: str, of: str) -> None:
        hexd = Digest.parse(digest).hex
        for suffix in (".sig", ".att", ".sbom"):
            tag = f"sha256-{hexd}{suffix}"
            if tag in signatures:
                take(signatures[tag], "signature", f"{name}:{tag}", of, f"signature of {digest}")
        fallback = f"sha256-{hexd}"
        if fallback in signatures:
            for listed in cache.children(signatures[fallback]):  # the referrers the fallback index lists
                take(listed, "referrer", f"{name}@{listed}", of, f"referrer of {digest}")
            take(signatures[fallback], "referrer", f"{name}:{fallback}", of, f"referrers index of {digest}")
        referrers = _calm(lambda: cache.client.referrers(cache.repo, Digest.parse(digest))) or []
        for r in referrers:
            take(str(r.digest), "referrer", f"{name}@{r.digest}", of, f"referrer of {digest}")

    for digest in images:
        for child in cache.children(digest):
            take(child, "child", f"{name}@{child}", digest, f"child manifest of {digest}")
        dependents(digest, digest)
    along_digests = sorted({d.digest for d in along})
    along_sizes = dict(zip(along_digests, _map(pool, cache.size, along_digests), strict=True))
    for d in along:
        d.size = along_sizes[d.digest]
    return deleted + along, kept


# -- deleting, with a journal ----------------------------------------------------------------------------------


class Journal:
    """The decided deletions of one repository and which are done: survives a crash of this process."""

    def __init__(self, directory: Path, repository: str) -> None:
        self.path = directory / (hashlib.sha256(repository.encode()).hexdigest()[:24] + ".jsonl")
        self.repository = repository
        self._lock = threading.Lock()

    def pending(self) -> list[Decision]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        planned: list[Decision] = []
        done: set[str] = set()
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash
            if "plan" in entry:
                planned = [Decision(**d) for d in entry["plan"]]
            elif "done" in entry:
                done.add(str(entry["done"]))
        return [d for d in planned if d.digest not in done]

    def start(self, decisions: Sequence[Decision]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = json.dumps({"repository": self.repository, "plan": [asdict(d) for d in decisions]}) + "\n"
        atomic_write(self.path, [entry.encode()])

    def done(self, digest: str) -> None:
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps({"done": digest}) + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def execute(
    client: RegistryClient,
    repo: str,
    decisions: Sequence[Decision],
    journal: Journal,
    pool: ThreadPoolExecutor,
    report: PruneReport,
) -> int:
    """Delete images first, then what they take along (unless the image stayed); returns manifests deleted."""
    first = _unique(d for d in decisions if not d.of)
    failed: set[str] = set()
    deleted = 0

    def delete(d: Decision) -> str | None:
        try:
            _calm(lambda: client.delete_manifest(repo, Digest.parse(d.digest)))
        except NotFound:
            pass  # gone already (a run killed right after this DELETE): done, not deleted twice
        except Unsupported as exc:
            raise DeletesRefused(str(exc), status=exc.status, codes=exc.codes) from None
        except FerryError as exc:
            return describe_error(exc)
        journal.done(d.digest)
        return None

    for batch in (first, None):
        if batch is None:
            along = _unique(d for d in decisions if d.of)
            report.add(
                "skipped",
                (replace(d, reason=f"{d.reason}; kept: deleting {d.of} failed") for d in along if d.of in failed),
            )
            batch = [d for d in along if d.of not in failed]
        for d, error in zip(batch, _map(pool, delete, batch), strict=True):
            if error is None:
                deleted += 1
            else:
                failed.add(d.digest)
                report.add("failed", [{"reference": d.reference, "digest": d.digest, "error": error}])
    report.add("deleted", (d for d in decisions if d.digest not in failed and not (d.of and d.of in failed)))
    return deleted


def _unique(decisions: Iterable[Decision]) -> list[Decision]:
    """One deletion per digest (several tags on one manifest go with one DELETE)."""
    seen: dict[str, Decision] = {}
    for d in decisions:
        seen.setdefault(d.digest, d)
    return list(seen.values())


def prune(
    pool: ClientPool,
    targets: Sequence[Target],
    *,
    journal_dir: Path,
    dry_run: bool = False,
    parallel: int = 16,
    now: dt.datetime | None = None,
) -> PruneReport:
    started = time.monotonic()
    now = now or dt.datetime.now(dt.UTC)
    report = PruneReport(dry_run=dry_run, repositories=[t.name for t in targets])
    with (
        ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ferry-prune") as requests,
        ThreadPoolExecutor(max_workers=min(4, max(1, parallel)), thread_name_prefix="ferry-prune-repo") as repos,
    ):

        def one(target: Target) -> None:
            client = pool.client(Reference.parse(f"{target.name}:x"), target.side)
            journal = Journal(journal_dir, target.name)
            unfinished = journal.pending()
            try:
                if unfinished and dry_run:
                    why = " (decided by an interrupted run)"
                    report.add("deleted", (replace(d, reason=d.reason + why) for d in unfinished))
                elif unfinished:
                    report.resumed += execute(client, target.repository, unfinished, journal, requests, report)
                    journal.finish()
                deleted, kept = decide(client, target, requests, now)
            except DeletesRefused:
                raise
            except FerryError as exc:
                report.add("failed", [{"reference": target.name, "digest": "", "error": describe_error(exc)}])
                return
            report.add("kept", kept)
            if dry_run:
                pending = {d.digest for d in unfinished}
                report.add("deleted", (d for d in deleted if d.digest not in pending))
            elif deleted:
                journal.start(deleted)
                try:
                    execute(client, target.repository, deleted, journal, requests, report)
                finally:
                    journal.finish()  # refused or done: a crash (no finally) leaves it for the next run

        for fut in [repos.submit(one, t) for t in targets]:
            fut.result()
    report.seconds = time.monotonic() - started
    return report
