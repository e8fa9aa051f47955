"""registries.conf (containers-registries.conf(5), version 2) and registries.d, as containers/image reads them.

For ``docker://`` names: the ``[[registry]]`` entry with the longest matching ``prefix`` (``*.example.com``
wildcards too) decides where the image really is (``location``), whether it may be used at all
(``blocked``), whether TLS is skipped (``insecure``) and which mirrors are tried first when pulling
(``mirror``, ``mirror-by-digest-only``, ``pull-from-mirror``). ``unqualified-search-registries`` and
``[aliases]`` are parsed, but as in skopeo they never apply to ``docker://`` names (those are always
qualified: ``alpine`` is ``docker.io/library/alpine``).

Files: ``--registries-conf PATH`` alone; otherwise ``$CONTAINERS_REGISTRIES_CONF``, else
``$HOME/.config/containers/registries.conf`` when it exists, else ``/etc/containers/registries.conf``,
then the ``*.conf`` drop-ins of the matching ``registries.conf.d`` in name order (later files override
the same prefix; scalar keys override).

registries.d (``--registries.d DIR``, default ``$HOME/.config/containers/registries.d`` then
``/etc/containers/registries.d``): YAML files with ``default-docker`` and ``docker: {NAMESPACE: …}``
entries (``lookaside``, ``lookaside-staging``, ``use-sigstore-attachments``); :func:`registries_d` returns
the merged view and :meth:`RegistriesD.for_reference` the entry for one image (longest namespace match).
"""

from __future__ import annotations

import glob
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from worker.registry import InvalidInput, Reference


@dataclass(frozen=True)
class Endpoint:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"  # all | digest-only | tag-only (mirrors only)


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Endpoint, ...] = ()
    mirror_by_digest_only: bool = False


@dataclass
class RegistriesConf:
    registries: list[RegistryEntry] = field(default_factory=list)
    unqualified_search_registries: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    #: pulls already resolved (a queued job: the endpoint the producer read each image from, and whether it is
    #: insecure): workers use that endpoint, never probe the mirrors again nor fall back elsewhere
    pinned: dict[str, tuple[str, bool]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What a queued job carries to its workers: the entries that apply and the producer's pulls."""
        return {
            "registries": [
                {
                    "prefix": e.prefix,
                    "location": e.location,
                    "insecure": e.insecure,
                    "blocked": e.blocked,
                    "mirror-by-digest-only": e.mirror_by_digest_only,
                    "mirror": [
                        {"location": m.location, "insecure": m.insecure, "pull-from-mirror": m.pull_from_mirror}
                        for m in e.mirrors
                    ],
                }
                for e in self.registries
            ],
            "pinned": {name: [location, insecure] for name, (location, insecure) in self.pinned.items()},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RegistriesConf:
        conf = cls()
        _merge(conf, {"registry": obj.get("registries") or []}, "the job's registries.conf")
        conf.pinned = {str(k): (str(v[0]), bool(v[1])) for k, v in (obj.get("pinned") or {}).items()}
        return conf

    def has_mirrors(self, ref: Reference) -> bool:
        entry = self.entry_for(ref)
        return entry is not None and bool(entry.mirrors)

    def entry_for(self, ref: Reference) -> RegistryEntry | None:
        """The entry whose prefix matches ``ref`` longest (containers/image ``FindRegistry``)."""
        text = f"{ref.registry}/{ref.repository}"
        best: RegistryEntry | None = None
        best_len = -1
        for entry in self.registries:
            n = _match_len(entry.prefix, text)
            if n > best_len:
                best, best_len = entry, n
        return best

    def pull_sources(self, ref: Reference) -> list[tuple[Reference, bool]]:
        """Where to pull ``ref`` from, in order (mirrors, then the primary location), and whether TLS is off."""
        entry = self.entry_for(ref)
        if entry is not None and entry.blocked:
            raise InvalidInput(f"registry {entry.location or entry.prefix} is blocked in registries.conf ({ref})")
        pinned = self.pinned.get(str(ref))
        if pinned is not None:
            return [(Reference.parse(pinned[0]), pinned[1])]
        if entry is None:
            return [(ref, False)]
        by_digest = ref.digest is not None
        out: list[tuple[Reference, bool]] = []
        if not (entry.mirror_by_digest_only and not by_digest):
            for m in entry.mirrors:
                if m.pull_from_mirror == "digest-only" and not by_digest:
                    continue
                if m.pull_from_mirror == "tag-only" and by_digest:
                    continue
                out.append((_rewrite(ref, entry.prefix, m.location), m.insecure))
        out.append((_rewrite(ref, entry.prefix, entry.location), entry.insecure))
        return out

    def push_target(self, ref: Reference) -> tuple[Reference, bool]:
        """Where a push of ``ref`` goes: ``ref`` itself, as in containers/image ("redirection and mirrors are
        currently processed only when reading images"); its entry still blocks it or makes it insecure."""
        entry = self.entry_for(ref)
        if entry is None:
            return ref, False
        if entry.blocked:
            raise InvalidInput(f"registry {entry.location or entry.prefix} is blocked in registries.conf ({ref})")
        return ref, entry.insecure


def _match_len(prefix: str, text: str) -> int:
    """Length of the match of a registries.conf prefix on ``host/repo`` (-1: no match)."""
    if prefix.startswith("*."):
        host = text.split("/", 1)[0]
        return len(prefix) if host.endswith(prefix[1:]) else -1
    if text == prefix or (text.startswith(prefix) and text[len(prefix)] in "/:@"):
        return len(prefix)
    return -1


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    if prefix.startswith("*.") or not location:
        return ref
    text = f"{ref.registry}/{ref.repository}"
    moved = location + text[len(prefix) :]
    suffix = f"@{ref.digest}" if ref.digest is not None else f":{ref.tag}" if ref.tag else ""
    try:
        return Reference.parse(moved + suffix)
    except InvalidInput as exc:
        raise InvalidInput(f"registries.conf: rewriting {ref} with location {location!r}: {exc}") from None


def _entry(raw: dict[str, Any], where: str) -> RegistryEntry:
    prefix = str(raw.get("prefix") or raw.get("location") or "")
    location = str(raw.get("location") or "")
    if not prefix:
        raise InvalidInput(f"{where}: a [[registry]] entry needs a prefix or a location")
    if not location and not prefix.startswith("*."):
        # containers/image's rule, in its words
        raise InvalidInput(
            f"{where}: invalid condition: location is unset and prefix is not in the format: *.example.com"
        )
    mirrors = []
    for m in raw.get("mirror") or []:
        if not isinstance(m, dict) or not m.get("location"):
            raise InvalidInput(f"{where}: every mirror of {prefix} needs a location")
        pull = str(m.get("pull-from-mirror") or "all")
        if pull not in ("all", "digest-only", "tag-only"):
            raise InvalidInput(f"{where}: pull-from-mirror must be all, digest-only or tag-only, not {pull!r}")
        mirrors.append(Endpoint(str(m["location"]), bool(m.get("insecure", False)), pull))
    return RegistryEntry(
        prefix=prefix,
        location=location,
        insecure=bool(raw.get("insecure", False)),
        blocked=bool(raw.get("blocked", False)),
        mirrors=tuple(mirrors),
        mirror_by_digest_only=bool(raw.get("mirror-by-digest-only", False)),
    )


def _merge(conf: RegistriesConf, data: dict[str, Any], where: str) -> None:
    if "registries" in data and isinstance(data["registries"], dict):
        raise InvalidInput(f"{where}: version 1 registries.conf ([registries.search]) is not supported; use version 2")
    if "unqualified-search-registries" in data:
        conf.unqualified_search_registries = [str(x) for x in data["unqualified-search-registries"] or []]
    for raw in data.get("registry") or []:
        entry = _entry(raw, where)
        conf.registries = [e for e in conf.registries if e.prefix != entry.prefix] + [entry]
    for name, target in (data.get("aliases") or {}).items():
        conf.aliases[str(name)] = str(target)


def _files(path: str | None) -> list[str]:
    if path:
        return [path]
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return [env]
    home = os.path.expanduser("~/.config/containers/registries.conf")
    main = home if os.path.exists(home) else "/etc/containers/registries.conf"
    drop_ins = sorted(glob.glob(os.path.join(main + ".d", "*.conf")))
    return [main, *drop_ins]


def load(path: str | None = None) -> RegistriesConf:
    """Read the registries.conf files (a missing default file is no configuration; a named one must exist)."""
    conf = RegistriesConf()
    for f in _files(path):
        try:
            with open(f, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            if f == path:
                raise InvalidInput(f"registries.conf {f}: no such file") from None
            continue
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"registries.conf {f}: {exc}") from None
        except OSError as exc:
            raise InvalidInput(f"registries.conf {f}: {exc.strerror}") from None
        _merge(conf, data, f)
        conf.files.append(f)
    return conf


# ----------------------------------------------------------------------------------------------- registries.d


@dataclass(frozen=True)
class SignatureStorage:
    """One registries.d entry: where simple-signing signatures live, and whether sigstore attachments are used."""

    lookaside: str = ""
    lookaside_staging: str = ""
    use_sigstore_attachments: bool = False


@dataclass
class RegistriesD:
    default: SignatureStorage = field(default_factory=SignatureStorage)
    namespaces: dict[str, SignatureStorage] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def for_reference(self, ref: Reference) -> SignatureStorage:
        """The entry for ``ref``: the longest namespace that is a prefix of it, else ``default-docker``."""
        text = f"{ref.registry}/{ref.repository}"
        best, best_len = self.default, -1
        for ns, storage in self.namespaces.items():
            if (text == ns or text.startswith(ns + "/")) and len(ns) > best_len:
                best, best_len = storage, len(ns)
        return best


def _storage(raw: Any, where: str) -> SignatureStorage:
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: an entry must be a mapping")
    return SignatureStorage(
        lookaside=str(raw.get("lookaside") or raw.get("sigstore") or ""),
        lookaside_staging=str(raw.get("lookaside-staging") or raw.get("sigstore-staging") or ""),
        use_sigstore_attachments=bool(raw.get("use-sigstore-attachments", False)),
    )


def registries_d(path: str | None = None) -> RegistriesD:
    """Read registries.d (``--registries.d DIR``; default the user's, else /etc/containers/registries.d)."""
    import yaml

    if path is None:
        user = os.path.expanduser("~/.config/containers/registries.d")
        path = user if os.path.isdir(user) else "/etc/containers/registries.d"
        if not os.path.isdir(path):
            return RegistriesD()
    elif not os.path.isdir(path):
        raise InvalidInput(f"registries.d {path}: no such directory")
    out = RegistriesD()
    for f in sorted(glob.glob(os.path.join(path, "*.yaml"))):
        try:
            with open(f, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"registries.d {f}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"registries.d {f}: not a mapping")
        if "default-docker" in data:
            out.default = _storage(data["default-docker"], f)
        for ns, raw in (data.get("docker") or {}).items():
            if ns in out.namespaces:
                raise InvalidInput(f"registries.d {f}: {ns} is configured more than once")
            out.namespaces[str(ns)] = _storage(raw, f)
        out.files.append(f)
    return out
