"""The sync YAML file (skopeo's format plus Ferry's extensions), checked against its schema before any use.

The file is read into YAML nodes, not Python values, and each key is checked for the shape it must have.
Every problem becomes one line naming the registry entry, the key and the file line, e.g.
``sync.yml: line 4: docker.io: images: 'app': expected a list of tags, got a string ('latest')``; all
problems are collected and raised together as :class:`InvalidSyncFile`, before anything is listed or
written. Tags are taken as the text written (``1.10`` stays ``1.10``, as skopeo's Go YAML reads it into
a string), while flags must be true/false and counts whole numbers.

Keys of a registry entry (``docs/sync.md``): ``images``, ``images-by-tag-regex``, ``images-by-semver``,
``credentials`` (``username``, ``password``), ``tls-verify``, ``cert-dir`` (skopeo's), and ``exclude-tags``,
``platforms``, ``keep-latest``, ``keep-latest-by``, ``catalog`` (``prefix``, ``tags``) (Ferry's).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from worker.registry import Credentials, FerryError, InvalidInput, Platform, Reference

from .semver import Constraint

__all__ = ["CatalogSpec", "InvalidSyncFile", "SyncEntry", "read_sync_file"]

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_KINDS = {
    _STR: "a string",
    _INT: "a number",
    "tag:yaml.org,2002:float": "a number",
    _BOOL: "true/false",
    _NULL: "null",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:binary": "binary data",
}

ENTRY_KEYS = (
    "images",
    "images-by-tag-regex",
    "images-by-semver",
    "credentials",
    "tls-verify",
    "cert-dir",
    "exclude-tags",
    "platforms",
    "keep-latest",
    "keep-latest-by",
    "catalog",
)


class InvalidSyncFile(InvalidInput):
    """A sync file with problems; ``problems`` holds one line per problem (the CLI prints each)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class CatalogSpec:
    prefix: str = ""
    tags: re.Pattern[str] | None = None


@dataclass
class SyncEntry:
    """One registry entry of the file, every value of its type."""

    registry: str
    #: repository -> tags or digests (empty: every tag)
    images: dict[str, list[str]] = field(default_factory=dict)
    images_by_tag_regex: dict[str, re.Pattern[str]] = field(default_factory=dict)
    images_by_semver: dict[str, Constraint] = field(default_factory=dict)
    credentials: Credentials | None = None
    tls_verify: bool | None = None
    cert_dir: str = ""
    exclude_tags: list[re.Pattern[str]] = field(default_factory=list)
    platforms: tuple[Platform, ...] = ()
    keep_latest: int = 0
    keep_latest_by: str = "semver"
    catalog: CatalogSpec | None = None

    @property
    def selects_images(self) -> bool:
        return bool(self.images or self.images_by_tag_regex or self.images_by_semver or self.catalog)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _KINDS.get(node.tag, "a value")


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
        text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        return f"{_kind(node)} ({text!r})"
    return _kind(node)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, node: yaml.Node | None, where: str, text: str) -> None:
        line = f"line {node.start_mark.line + 1}: " if node is not None else ""
        self.problems.append(f"sync file {self.path}: {line}{where}: {text}")

    def mapping(self, node: yaml.Node, where: str, expected: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """``(key text, key node, value node)`` of a mapping whose keys are strings; null is empty."""
        if _is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, where, f"expected {expected}, got {_shown(node)}")
            return []
        out: list[tuple[str, yaml.Node, yaml.Node]] = []
        seen: set[str] = set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or _is_null(k):
                self.problem(k, where, f"a key must be a name, got {_kind(k)}")
                continue
            if k.value in seen:
                self.problem(k, where, f"{k.value!r} appears twice")
                continue
            seen.add(k.value)
            out.append((k.value, k, v))
        return out

    def text(self, node: yaml.Node, where: str, expected: str, *, strict: bool = False) -> str | None:
        """A scalar's text as written; ``strict``: it must be a string (``5`` or ``true`` are refused)."""
        if isinstance(node, yaml.ScalarNode) and not _is_null(node) and (node.tag == _STR or not strict):
            return str(node.value)
        self.problem(node, where, f"expected {expected}, got {_shown(node)}")
        return None

    def texts(self, node: yaml.Node, where: str, item: str, *, strict: bool = False) -> list[str] | None:
        """A list of scalars (``item`` names one: ``a tag``); null is empty."""
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            hint = f"; write [{node.value}]" if isinstance(node, yaml.ScalarNode) and node.tag == _STR else ""
            self.problem(node, where, f"expected a list ({item} per item), got {_shown(node)}{hint}")
            return None
        out: list[str] = []
        for i, one in enumerate(node.value):
            value = self.text(one, f"{where}[{i}]", item, strict=strict)
            if value is not None:
                out.append(value)
        return out

    def flag(self, node: yaml.Node, where: str) -> bool | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _BOOL:
            return bool(yaml.safe_load(node.value))
        self.problem(node, where, f"expected true or false, got {_shown(node)}")
        return None

    def compiled(self, node: yaml.Node, where: str, text: str | None) -> re.Pattern[str] | None:
        if text is None:
            return None
        try:
            return re.compile(text)
        except re.error as exc:
            self.problem(node, where, f"invalid regex {text!r}: {exc}")
            return None

    def parsed(self, node: yaml.Node, where: str, text: str | None, parse: Callable[[str], Any]) -> Any:
        if text is None:
            return None
        try:
            return parse(text)
        except FerryError as exc:
            self.problem(node, where, str(exc))
            return None


def _repositories(c: _Checker, registry: str, node: yaml.Node, key: str, expected: str) -> list[tuple[str, yaml.Node]]:
    """A mapping of repository -> something; each repository name checked against the registry."""
    out = []
    for repo, k, v in c.mapping(node, f"{registry}: {key}", expected):
        try:
            Reference.parse(f"{registry}/{repo}", default_tag=False)
        except FerryError as exc:
            c.problem(k, f"{registry}: {key}: {repo!r}", str(exc))
            continue
        out.append((repo, v))
    return out


def _entry(c: _Checker, registry: str, key_node: yaml.Node, node: yaml.Node) -> SyncEntry | None:
    try:
        Reference.parse(f"{registry}/x")
    except FerryError as exc:
        c.problem(key_node, repr(registry), f"not a registry name: {exc}")
        return None
    entry = SyncEntry(registry)
    for key, k, v in c.mapping(node, registry, "a mapping of settings (images, tls-verify, ...)"):
        where = f"{registry}: {key}"
        if key == "images":
            for repo, tags in _repositories(c, registry, v, key, "a mapping of repository to a list of tags"):
                got = c.texts(tags, f"{where}: {repo!r}", "a tag or digest")
                if got is not None:
                    entry.images[repo] = got
        elif key == "images-by-tag-regex":
            for repo, rx in _repositories(c, registry, v, key, "a mapping of repository to a regex"):
                pattern = c.compiled(rx, f"{where}: {repo!r}", c.text(rx, f"{where}: {repo!r}", "a regex"))
                if pattern is not None:
                    entry.images_by_tag_regex[repo] = pattern
        elif key == "images-by-semver":
            for repo, cn in _repositories(c, registry, v, key, "a mapping of repository to a version constraint"):
                w = f"{where}: {repo!r}"
                if isinstance(cn, yaml.SequenceNode):  # skopeo's manual shows a list: any of them
                    parts = c.texts(cn, w, "a version constraint")
                    text = " || ".join(parts) if parts else None
                else:
                    text = c.text(cn, w, "a version constraint")
                constraint = c.parsed(cn, w, text, Constraint)
                if constraint is not None:
                    entry.images_by_semver[repo] = constraint
        elif key == "credentials":
            creds = c.mapping(v, where, "a mapping with username and password")
            fields: dict[str, str] = {}
            before = len(c.problems)
            for name, kn, vn in creds:
                if name not in ("username", "password"):
                    c.problem(kn, where, f"unknown key {name!r} (username, password)")
                    continue
                value = c.text(vn, f"{where}: {name}", "a string")
                if value is not None:
                    fields[name] = value
            if len(c.problems) > before:
                pass
            elif creds and not fields.get("username"):
                c.problem(v, where, "username is missing or empty")
            elif fields:
                entry.credentials = Credentials(username=fields["username"], password=fields.get("password", ""))
        elif key == "tls-verify":
            entry.tls_verify = c.flag(v, where)
        elif key == "cert-dir":
            entry.cert_dir = c.text(v, where, "a directory path", strict=True) or ""
        elif key == "exclude-tags":
            if isinstance(v, yaml.ScalarNode) and v.tag == _STR:
                patterns: list[str] | None = [v.value]
            else:
                patterns = c.texts(v, where, "a regex, quoted if it looks like a number", strict=True)
            for i, p in enumerate(patterns or []):
                exclude = c.compiled(v, f"{where}[{i}]", p)
                if exclude is not None:
                    entry.exclude_tags.append(exclude)
        elif key == "platforms":
            got = c.texts(v, where, "a platform os/arch[/variant]", strict=True)
            entry.platforms = tuple(p for p in (c.parsed(v, where, t, Platform.parse) for t in got or []) if p)
        elif key == "keep-latest":
            if isinstance(v, yaml.ScalarNode) and v.tag == _INT and int(yaml.safe_load(v.value)) >= 1:
                entry.keep_latest = int(yaml.safe_load(v.value))
            else:
                c.problem(v, where, f"expected a whole number >= 1, got {_shown(v)}")
        elif key == "keep-latest-by":
            by = c.text(v, where, "semver or created", strict=True)
            if by is not None and by not in ("semver", "created"):
                c.problem(v, where, f"expected semver or created, got {by!r}")
            elif by is not None:
                entry.keep_latest_by = by
        elif key == "catalog":
            entry.catalog = _catalog(c, registry, v)
        else:
            c.problem(k, registry, f"unknown key {key!r} (known: {', '.join(ENTRY_KEYS)})")
    return entry


def _catalog(c: _Checker, registry: str, node: yaml.Node) -> CatalogSpec | None:
    where = f"{registry}: catalog"
    if isinstance(node, yaml.ScalarNode) and not _is_null(node):
        return CatalogSpec(prefix=c.text(node, where, "a prefix or a mapping", strict=True) or "")
    spec = CatalogSpec()
    for name, kn, vn in c.mapping(node, where, "a mapping with prefix and tags"):
        if name == "prefix":
            spec = CatalogSpec(c.text(vn, f"{where}: prefix", "a repository prefix", strict=True) or "", spec.tags)
        elif name == "tags":
            rx = c.compiled(vn, f"{where}: tags", c.text(vn, f"{where}: tags", "a regex"))
            spec = CatalogSpec(spec.prefix, rx)
        else:
            c.problem(kn, where, f"unknown key {name!r} (prefix, tags)")
    return spec


def read_sync_file(path: str) -> list[SyncEntry]:
    """Read and check a sync file; raises :class:`InvalidSyncFile` listing every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read sync file {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSyncFile([f"sync file {path}: not a YAML text file (not UTF-8)"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise InvalidSyncFile([f"sync file {path}: cannot parse YAML: {' '.join(str(exc).split())}"]) from None
    c = _Checker(path)
    entries: list[SyncEntry] = []
    if root is not None:
        for registry, k, v in c.mapping(root, "top level", "a mapping of registry name to its settings"):
            entry = _entry(c, registry, k, v)
            if entry is not None:
                entries.append(entry)
    if c.problems:
        raise InvalidSyncFile(c.problems)
    return entries
