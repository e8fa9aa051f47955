"""Registry credentials, found and stored the way containers/image (skopeo, podman) does it.

Reading (:func:`resolve_credentials`):

1. Explicit credentials win: ``--creds USER:PASS`` or ``--username``/``--password``.
2. Otherwise auth files are searched in order, the first one that yields credentials wins:

   * ``authfile`` (``--authfile``), else ``$REGISTRY_AUTH_FILE``: *only* that file. (skopeo 1.9, i.e.
     containers/image 5.23, still went on to the default files; containers/image >= 5.29 stops at the
     explicit file, which is what we do.)
   * otherwise the primary file (see :func:`default_auth_file`), then
     ``${XDG_CONFIG_HOME:-$HOME/.config}/containers/auth.json``, then
     ``${DOCKER_CONFIG:-$HOME/.docker}/config.json``, then ``$HOME/.dockercfg`` (legacy format: the
     top level is the ``auths`` map).

   Within one file: a ``credHelpers`` entry for the registry decides alone (``docker-credential-<name> get``);
   else ``auths`` keys, most specific first (``host/ns/repo``, ``host/ns``, ``host``), exact keys before
   normalised ones (``https://host/v1/`` and ``http://host`` forms, docker.io aliases); else the file's
   ``credsStore`` helper (docker's, which containers/image ignores; we honour it after ``auths``).

Writing (:func:`store_login`, :func:`remove_login`, :func:`remove_all_logins`) edits one file only:
``authfile``, else ``$REGISTRY_AUTH_FILE``, else :func:`default_auth_file`. Unlike skopeo 1.9, unknown
top-level keys (``credsStore``, ``HttpHeaders``, ...) survive an edit.

Secrets (passwords, identity tokens, ``auth`` fields, helper output) never appear in an exception
message, a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import InvalidInput
from ._fs import atomic_write

__all__ = [
    "HELPER_TIMEOUT",
    "Credentials",
    "default_auth_file",
    "get_login",
    "parse_creds",
    "remove_all_logins",
    "remove_login",
    "resolve_credentials",
    "store_login",
]

_log = logging.getLogger(__name__)

#: Seconds a ``docker-credential-*`` helper may take before it is killed.
HELPER_TIMEOUT = 60.0

_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
#: The server URL ``docker login`` uses for Docker Hub in helpers and config files.
_HUB_LEGACY_SERVER = "https://index.docker.io/v1/"
_TOKEN_USERNAME = "<token>"
_NOT_FOUND_TEXT = "credentials not found"
_SCHEMES = ("https://", "http://")


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and password, and/or an OAuth2 identity (refresh) token.

    ``repr`` shows the username only; the password and token appear as ``***``.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""
    #: skopeo's ``--registry-token``: sent as ``Authorization: Bearer`` to this registry, no token exchange
    registry_token: str = ""

    @property
    def is_anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def __repr__(self) -> str:
        password = "'***'" if self.password else "''"
        token = "'***'" if self.identity_token else "''"
        bearer = ", registry_token='***'" if self.registry_token else ""
        return f"Credentials(username={self.username!r}, password={password}, identity_token={token}{bearer})"

    __str__ = __repr__


# --------------------------------------------------------------------------- explicit credentials


def parse_creds(text: str) -> Credentials:
    """Parse ``--creds USERNAME[:PASSWORD]``: split on the first colon, like skopeo.

    ``user:pa:ss`` gives password ``pa:ss``; ``user:`` an explicitly empty password. A missing password
    (``user``) is an error here (skopeo would prompt). Messages never repeat ``text``.
    """
    if not text:
        raise InvalidInput("credentials can't be empty")
    username, sep, password = text.partition(":")
    if not username:
        raise InvalidInput("username can't be empty in --creds USERNAME:PASSWORD")
    if not sep:
        raise InvalidInput("a password is required: use --creds USERNAME:PASSWORD")
    return Credentials(username=username, password=password)


def _explicit_credentials(creds: str | None, username: str | None, password: str | None) -> Credentials | None:
    if creds is not None and (username is not None or password is not None):
        raise InvalidInput("creds and username/password cannot be specified at the same time")
    if creds is not None:
        return parse_creds(creds)
    if username is not None and password is None:
        raise InvalidInput("password must be specified when username is specified")
    if password is not None and username is None:
        raise InvalidInput("username must be specified when password is specified")
    if username is not None and password is not None:
        if not username:
            raise InvalidInput("username can't be empty")
        return Credentials(username=username, password=password)
    return None


# --------------------------------------------------------------------------- file locations


@dataclass(frozen=True)
class _AuthPath:
    path: Path
    legacy: bool = False


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME", "")
    if home:
        return Path(home)
    try:  # like Go's homedir.Get(): fall back to the passwd entry
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        return Path("/")


def _explicit_auth_file(authfile: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if authfile is not None and os.fspath(authfile):
        return Path(authfile)
    from_env = env.get("REGISTRY_AUTH_FILE", "")
    return Path(from_env) if from_env else None


def default_auth_file(env: Mapping[str, str] | None = None) -> Path:
    """The primary (read/write) auth file, as skopeo 1.9 on Linux picks it.

    ``${XDG_RUNTIME_DIR}/containers/auth.json`` when ``XDG_RUNTIME_DIR`` is set, else
    ``/run/containers/<uid>/auth.json`` (verified: ``skopeo login`` with ``XDG_RUNTIME_DIR`` unset writes
    there, creating the directories 0700). ``$REGISTRY_AUTH_FILE`` and ``--authfile`` override this
    in the callers, not here.
    """
    env = _environ(env)
    runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    if runtime_dir:
        return Path(runtime_dir) / "containers" / "auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def _missing_runtime_dir(env: Mapping[str, str]) -> str | None:
    runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    if runtime_dir and not os.path.exists(runtime_dir):
        return (
            f"{runtime_dir!r} directory set by $XDG_RUNTIME_DIR does not exist. "
            "Either create the directory or unset $XDG_RUNTIME_DIR."
        )
    return None


#: what the list of auth files depends on, besides ``--authfile``, the uid and whether $XDG_RUNTIME_DIR exists
_PATH_VARIABLES = ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "HOME", "XDG_CONFIG_HOME", "DOCKER_CONFIG")
_PATHS_SEEN: dict[tuple[object, ...], tuple[_AuthPath, ...]] = {}


def _auth_file_paths(authfile: str | os.PathLike[str] | None, env: Mapping[str, str]) -> list[_AuthPath]:
    """The auth files to search, in order (worked out once per setting: a sync looks credentials up per image)."""
    runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    key = (
        os.fspath(authfile) if authfile is not None else None,
        *(env.get(name, "") for name in _PATH_VARIABLES),
        os.getuid(),
        bool(runtime_dir) and os.path.exists(runtime_dir),
    )
    paths = _PATHS_SEEN.get(key)
    if paths is None:
        paths = _PATHS_SEEN[key] = tuple(_list_auth_file_paths(authfile, env))
    return list(paths)


def _list_auth_file_paths(authfile: str | os.PathLike[str] | None, env: Mapping[str, str]) -> list[_AuthPath]:
    explicit = _explicit_auth_file(authfile, env)
    if explicit is not None:
        return [_AuthPath(explicit)]
    paths: list[_AuthPath] = []
    problem = _missing_runtime_dir(env)
    if problem is None:
        paths.append(_AuthPath(default_auth_file(env)))
    else:
        _log.warning("%s Looking for credentials elsewhere.", problem)
    home = _home(env)
    config_home = env.get("XDG_CONFIG_HOME", "")
    paths.append(_AuthPath((Path(config_home) if config_home else home / ".config") / "containers" / "auth.json"))
    docker_config = env.get("DOCKER_CONFIG", "")
    paths.append(_AuthPath((Path(docker_config) if docker_config else home / ".docker") / "config.json"))
    paths.append(_AuthPath(home / ".dockercfg", legacy=True))
    unique: list[_AuthPath] = []
    for p in paths:
        if all(p.path != u.path for u in unique):
            unique.append(p)
    return unique


def _writable_auth_file(authfile: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    explicit = _explicit_auth_file(authfile, env)
    if explicit is not None:
        return explicit
    problem = _missing_runtime_dir(env)
    if problem is not None:
        raise InvalidInput(problem)
    return default_auth_file(env)


# --------------------------------------------------------------------------- keys


def _canonical_host(host: str) -> str:
    lowered = host.lower()
    return _HUB if lowered in _HUB_ALIASES else host


def _normalize_key(key: str, legacy: bool) -> str:
    """An ``auths`` key as ``host[/namespace...]``, docker.io aliases folded to ``docker.io``.

    A key written as a URL (``https://host/v1/``) or found in a legacy file names a host only; its path
    is an API path, not a namespace.
    """
    stripped = key
    for scheme in _SCHEMES:
        if stripped.startswith(scheme):
            stripped = stripped[len(scheme) :]
            break
    host, _, rest = stripped.partition("/")
    if legacy or stripped != key:
        rest = ""
    host = _canonical_host(host)
    rest = rest.strip("/")
    return f"{host}/{rest}" if rest else host


def _lookup_keys(key: str) -> list[str]:
    """``quay.io/ns/repo`` -> ``quay.io/ns/repo``, ``quay.io/ns``, ``quay.io``."""
    keys = [key]
    while "/" in key:
        key = key.rsplit("/", 1)[0]
        keys.append(key)
    return keys


def _registry_host(registry: str) -> str:
    if not registry:
        raise InvalidInput("registry name must not be empty")
    if "://" in registry:
        raise InvalidInput(f"registry {registry!r} must be a host name, not a URL")
    if "/" in registry or "@" in registry:
        raise InvalidInput(f"registry {registry!r} must be a host name with an optional port")
    return _canonical_host(registry)


def _login_key(registry: str) -> str:
    """The auth-file key for ``skopeo login KEY``: ``host[/namespace...]``; a URL is reduced to its host."""
    key = registry
    for scheme in _SCHEMES:
        if key.startswith(scheme):
            key = key[len(scheme) :].partition("/")[0]
            break
    key = key.rstrip("/")
    host, sep, rest = key.partition("/")
    if not host:
        raise InvalidInput("registry name must not be empty")
    if "@" in key:
        raise InvalidInput(f"credentials key {key!r} contains a '@' character")
    if sep and ":" in rest:
        raise InvalidInput(f"reference {key!r} contains tag or digest")
    if "//" in key:
        raise InvalidInput(f"credentials key {key!r} has an empty path component")
    return key


# --------------------------------------------------------------------------- reading files


def _read_json(path: Path, *, what: str = "auth file") -> dict[str, Any] | None:
    """The file's top-level object, ``None`` if it does not exist. An empty file counts as ``{}``."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InvalidInput(f"reading {what} {path}: {exc.strerror or type(exc).__name__}") from None
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"reading {what} {path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise InvalidInput(f"reading {what} {path}: not UTF-8 text") from None
    except RecursionError:
        raise InvalidInput(f"reading {what} {path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"reading {what} {path}: the top level must be a JSON object")
    return data


def _auths_of(data: dict[str, Any], path: Path, legacy: bool) -> dict[str, Any]:
    auths = data if legacy else data.get("auths")
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise InvalidInput(f'reading auth file {path}: "auths" must be a JSON object')
    return auths


def _str_map(data: dict[str, Any], field: str, path: Path) -> dict[str, str]:
    value = data.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidInput(f'reading auth file {path}: "{field}" must map registries to helper names')
    return value


def _string_field(entry: dict[str, Any], field: str, key: str, path: Path) -> str:
    value = entry.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f'reading auth file {path}: field "{field}" of {key!r} must be a string')
    return value


def _decode_entry(entry: Any, key: str, path: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        raise InvalidInput(f"reading auth file {path}: entry {key!r} must be a JSON object")
    auth = _string_field(entry, "auth", key, path)
    token = _string_field(entry, "identitytoken", key, path)
    username = password = ""
    if auth:
        try:
            decoded = base64.b64decode(auth + "=" * (-len(auth) % 4), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidInput(
                f'reading auth file {path}: the "auth" field of {key!r} is not base64-encoded "user:password"'
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            _log.warning('ignoring the "auth" field of %r in %s: no colon between username and password', key, path)
            username = password = ""
        password = password.strip("\x00")
    creds = Credentials(username=username, password=password, identity_token=token)
    return None if creds.is_anonymous else creds


def _match_entry(auths: dict[str, Any], key: str, legacy: bool) -> tuple[str, Any] | None:
    """The best ``auths`` entry for ``key`` (``host[/ns...]``, host canonical)."""
    host = key.partition("/")[0]
    candidates = [host] if legacy else _lookup_keys(key)
    for candidate in candidates:
        if candidate in auths:
            return candidate, auths[candidate]
    # Then keys in other spellings: URLs, docker.io aliases (docker's https://index.docker.io/v1/).
    normalized: dict[str, str] = {}
    for file_key in auths:
        normalized.setdefault(_normalize_key(file_key, legacy), file_key)
    for candidate in candidates:
        if candidate in normalized:
            file_key = normalized[candidate]
            return file_key, auths[file_key]
    return None


def _find_in_file(auth_path: _AuthPath, key: str, env: Mapping[str, str]) -> Credentials | None:
    path, legacy = auth_path.path, auth_path.legacy
    data = _read_json(path)
    if data is None:
        return None
    host = key.partition("/")[0]
    if not legacy:
        helpers = _str_map(data, "credHelpers", path)
        helper = _helper_for(helpers, host)
        if helper is not None:
            # A credHelpers entry decides alone, like containers/image: the auths entries are not used.
            _log.debug("looking up %s with credential helper %s (credHelpers in %s)", host, helper, path)
            return _helper_get(helper, host, env)
    match = _match_entry(_auths_of(data, path, legacy), key, legacy)
    if match is not None:
        creds = _decode_entry(match[1], match[0], path)
        if creds is not None:
            _log.debug("found credentials for %s in %s (key %r)", key, path, match[0])
            return creds
    if not legacy:
        store = data.get("credsStore")
        if isinstance(store, str) and store:
            _log.debug("looking up %s with credential helper %s (credsStore in %s)", host, store, path)
            return _helper_get(store, host, env)
    return None


def _helper_for(helpers: dict[str, str], host: str) -> str | None:
    if host in helpers:
        return helpers[host]
    for registry, helper in helpers.items():
        if _normalize_key(registry, legacy=False) == host:
            return helper
    return None


# --------------------------------------------------------------------------- credential helpers


def _helper_program(name: str) -> str:
    if not name or "/" in name or os.sep in name or "\x00" in name:
        raise InvalidInput(f"invalid credential helper name {name!r}")
    return f"docker-credential-{name}"


def _run_helper(name: str, action: str, stdin: str, server: str, env: Mapping[str, str]) -> str | None:
    """Run ``docker-credential-<name> <action>``; its stdout, or ``None`` for "credentials not found".

    Error messages name the helper, the action and the server, never the helper's output (it may hold
    the secret) nor ``stdin`` (for ``store`` it does).
    """
    program = _helper_program(name)
    executable = shutil.which(program, path=env.get("PATH", os.defpath))
    if executable is None:
        raise InvalidInput(f"credential helper {program} not found in $PATH")
    try:
        proc = subprocess.run(
            [executable, action],
            input=stdin.encode(),
            capture_output=True,
            env=dict(env),
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InvalidInput(
            f"credential helper {program} timed out after {HELPER_TIMEOUT:g}s ({action} for {server})"
        ) from None
    except OSError as exc:
        raise InvalidInput(
            f"credential helper {program} could not be run: {exc.strerror or type(exc).__name__}"
        ) from None
    stdout = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        said = (stdout + "\n" + proc.stderr.decode("utf-8", "replace")).lower()
        if _NOT_FOUND_TEXT in said:
            return None
        raise InvalidInput(
            f"credential helper {program} failed to {action} credentials for {server} (exit status {proc.returncode})"
        )
    return stdout


def _helper_servers(host: str) -> list[str]:
    # containers/image asks helpers for the host name; docker stores Hub under its old API URL.
    return [host, _HUB_LEGACY_SERVER] if host == _HUB else [host]


def _helper_get(name: str, host: str, env: Mapping[str, str]) -> Credentials | None:
    for server in _helper_servers(host):
        out = _run_helper(name, "get", server, server, env)
        if out is None:
            continue
        try:
            reply = json.loads(out)
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            raise InvalidInput(f"credential helper {_helper_program(name)} returned malformed output for {server}")
        username = reply.get("Username") or ""
        secret = reply.get("Secret") or ""
        if not isinstance(username, str) or not isinstance(secret, str):
            raise InvalidInput(f"credential helper {_helper_program(name)} returned malformed output for {server}")
        if username == _TOKEN_USERNAME:
            creds = Credentials(identity_token=secret)
        else:
            creds = Credentials(username=username, password=secret)
        if not creds.is_anonymous:
            return creds
    return None


def _helper_store(name: str, key: str, creds: Credentials, env: Mapping[str, str]) -> None:
    payload = json.dumps({"ServerURL": key, "Username": creds.username, "Secret": creds.password})
    if _run_helper(name, "store", payload, key, env) is None:
        raise InvalidInput(f"credential helper {_helper_program(name)} failed to store credentials for {key}")


def _helper_erase(name: str, key: str, env: Mapping[str, str]) -> bool:
    """True if the helper erased something, False if it had nothing for ``key``."""
    return _run_helper(name, "erase", key, key, env) is not None


# --------------------------------------------------------------------------- public lookup


def resolve_credentials(
    registry: str,
    repository: str | None = None,
    *,
    creds: str | None = None,
    username: str | None = None,
    password: str | None = None,
    authfile: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``; ``repository`` refines namespace-specific keys).

    Explicit ``creds`` (``USER[:PASS]``) or ``username`` + ``password`` win; otherwise the auth files are
    searched as described in the module docstring. ``None`` means anonymous. ``env`` defaults to
    ``os.environ`` (``HOME``, ``XDG_RUNTIME_DIR``, ``XDG_CONFIG_HOME``, ``DOCKER_CONFIG``,
    ``REGISTRY_AUTH_FILE``, ``PATH``; helpers run with it as their environment).
    """
    explicit = _explicit_credentials(creds, username, password)
    if explicit is not None:
        return explicit
    env = _environ(env)
    host = _registry_host(registry)
    repo = (repository or "").strip("/")
    key = f"{host}/{repo}" if repo else host
    for auth_path in _auth_file_paths(authfile, env):
        found = _find_in_file(auth_path, key, env)
        if found is not None:
            return found
    return None


def get_login(
    registry: str,
    *,
    authfile: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """The username ``skopeo login --get-login REGISTRY`` would print, ``None`` if not logged in.

    ``registry`` may name a namespace (``quay.io/ns``) like ``skopeo login`` keys do. Credentials that
    are only an identity token have no username: ``None``, as skopeo then says "not logged into".
    """
    key = _login_key(registry)
    host, _, repo = key.partition("/")
    found = resolve_credentials(host, repo or None, authfile=authfile, env=env)
    if found is None or not found.username:
        return None
    return found.username


# --------------------------------------------------------------------------- writing files


def _mkdirs(directory: Path) -> None:
    """``mkdir -p`` where every directory created gets mode 0700 (like Go's ``os.MkdirAll(dir, 0700)``)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, then rename), mode 0600."""
    text = json.dumps(data, indent="\t") + "\n"
    try:
        _mkdirs(path.parent)
        atomic_write(path, [text.encode("utf-8")], mode=0o600)
    except OSError as exc:
        raise InvalidInput(f"writing auth file {path}: {exc.strerror or type(exc).__name__}") from None


def _read_for_edit(path: Path) -> dict[str, Any] | None:
    data = _read_json(path)
    if data is None:
        return None
    _auths_of(data, path, legacy=False)  # validate before we touch anything
    _str_map(data, "credHelpers", path)
    return data


def store_login(
    registry: str,
    creds: Credentials,
    *,
    authfile: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Record a login like ``skopeo login``; returns the auth file edited.

    ``registry`` is a host or a namespace (``quay.io/ns``); a URL is reduced to its host. The entry is
    ``{"auth": base64("user:password")}`` (plus ``identitytoken`` if ``creds`` has one). If the file has
    a ``credHelpers`` entry for the registry, the helper stores the credentials instead (a namespaced key
    is then refused: helpers take no namespaces). Other registries and other top-level keys are kept;
    directories are created 0700, the file is written 0600 via a temporary file and a rename.
    """
    env = _environ(env)
    key = _login_key(registry)
    if not creds.username:
        raise InvalidInput("a username is required to log in")
    if ":" in creds.username:
        raise InvalidInput("the username must not contain ':'")
    path = _writable_auth_file(authfile, env)
    data = _read_for_edit(path) or {}
    helper = _helper_for(_str_map(data, "credHelpers", path), _canonical_host(key.partition("/")[0]))
    if helper is not None:
        # containers/image reads a registry with a credHelpers entry from the helper only, so a namespaced
        # auths entry would never be used: refuse it like containers/image refuses namespaced helper keys.
        if "/" in key:
            raise InvalidInput(f"namespaced key is not supported for credential helper {helper}")
        _helper_store(helper, key, creds, env)
        return path
    entry: dict[str, str] = {}
    if creds.username or creds.password:
        entry["auth"] = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode("ascii")
    if creds.identity_token:
        entry["identitytoken"] = creds.identity_token
    auths = data.get("auths")
    if not isinstance(auths, dict):
        auths = {}
        data["auths"] = auths
    auths[key] = entry
    _write_json(path, data)
    return path


def _matching_keys(auths: dict[str, Any], key: str) -> Iterator[str]:
    wanted = _normalize_key(key, legacy=False)
    for file_key in auths:
        if file_key == key or _normalize_key(file_key, legacy=False) == wanted:
            yield file_key


def remove_login(
    registry: str,
    *,
    authfile: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Forget a login like ``skopeo logout REGISTRY``; False if there was none (skopeo: "not logged into").

    Removes the key from ``auths`` of the one writable file, along with entries that name the same
    registry in another spelling (``https://index.docker.io/v1/`` for ``docker.io``), and erases it from
    the ``credHelpers`` helper for that key, if any.
    """
    env = _environ(env)
    key = _login_key(registry)
    path = _writable_auth_file(authfile, env)
    data = _read_for_edit(path)
    if data is None:
        return False
    removed = False
    helper = _helper_for(_str_map(data, "credHelpers", path), _canonical_host(key))
    if helper is not None and "/" not in key:
        removed = _helper_erase(helper, key, env)
    auths = _auths_of(data, path, legacy=False)
    doomed = list(_matching_keys(auths, key))
    for file_key in doomed:
        del auths[file_key]
    if doomed:
        removed = True
        _write_json(path, data)
    return removed


def remove_all_logins(
    *,
    authfile: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """``skopeo logout --all``: erase every ``credHelpers`` entry from its helper, then empty ``auths``.

    Like skopeo, the ``credHelpers`` map goes too; other top-level keys stay. Returns the file edited
    (not created when it does not exist).
    """
    env = _environ(env)
    path = _writable_auth_file(authfile, env)
    data = _read_for_edit(path)
    if data is None:
        return path
    for registry, helper in _str_map(data, "credHelpers", path).items():
        _helper_erase(helper, registry, env)
    data.pop("credHelpers", None)
    data["auths"] = {}
    _write_json(path, data)
    return path
