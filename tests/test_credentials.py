"""Credential resolution and login files, checked against containers-auth.json(5) and skopeo itself.

Every test is hermetic: HOME, XDG_RUNTIME_DIR and PATH come from an ``env`` mapping pointing into tmp_path.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.registry._credentials import (
    Credentials,
    default_auth_file,
    get_login,
    parse_creds,
    remove_all_logins,
    remove_login,
    resolve_credentials,
    store_login,
)
from worker.registry._errors import InvalidInput

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")

SECRET = "hunter2-S3CRET"
TOKEN = "eyJ-identity-TOKEN"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_entry(user: str, password: str = SECRET) -> dict[str, str]:
    return {"auth": b64(f"{user}:{password}")}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


HELPER_SCRIPT = r"""#!/bin/sh
# A docker-credential-helpers look-alike backed by files in $FAKE_HELPER_DIR.
input=$(cat)
db="$FAKE_HELPER_DIR"
key=$(printf '%s' "$input" | tr '/:' '__')
case "$1" in
get)
    printf 'get %s\n' "$input" >> "$db/log"
    if [ -f "$db/fail" ]; then cat "$db/fail"; cat "$db/fail" >&2; exit 2; fi
    if [ -f "$db/$key" ]; then cat "$db/$key"; exit 0; fi
    echo "credentials not found in native keychain"; exit 1;;
store)
    printf 'store\n' >> "$db/log"
    printf '%s' "$input" > "$db/stored"; exit 0;;
erase)
    printf 'erase %s\n' "$input" >> "$db/log"
    if [ -f "$db/$key" ]; then rm -f "$db/$key"; exit 0; fi
    echo "credentials not found in native keychain"; exit 1;;
esac
exit 1
"""


class FakeHelper:
    """``docker-credential-fake`` on PATH; ``put`` what ``get`` should answer for a server URL."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "helperdb"
        self.dir.mkdir()

    def _file(self, server: str) -> Path:
        return self.dir / server.replace("/", "_").replace(":", "_")

    def put(self, server: str, username: str, secret: str) -> None:
        self._file(server).write_text(json.dumps({"ServerURL": server, "Username": username, "Secret": secret}))

    def put_raw(self, server: str, text: str) -> None:
        self._file(server).write_text(text)

    def has(self, server: str) -> bool:
        return self._file(server).exists()

    def fail_with(self, text: str) -> None:
        (self.dir / "fail").write_text(text)

    def calls(self) -> list[str]:
        log = self.dir / "log"
        return log.read_text().splitlines() if log.exists() else []

    def stored(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.dir / "stored").read_text())
        return data


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    run = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    for d in (home, run, bin_dir):
        d.mkdir()
    return {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(run),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "FAKE_HELPER_DIR": str(tmp_path / "helperdb"),
    }


@pytest.fixture
def helper(tmp_path: Path, env: dict[str, str]) -> FakeHelper:
    script = tmp_path / "bin" / "docker-credential-fake"
    script.write_text(HELPER_SCRIPT)
    script.chmod(0o755)
    return FakeHelper(tmp_path)


def primary(env: dict[str, str]) -> Path:
    return Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"


def config_auth(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".config" / "containers" / "auth.json"


def docker_config(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".docker" / "config.json"


def dockercfg(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".dockercfg"


# --------------------------------------------------------------------------- Credentials, parse_creds


def test_repr_and_str_hide_secrets() -> None:
    creds = Credentials("alice", SECRET, TOKEN)
    for text in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert "alice" in text
        assert SECRET not in text
        assert TOKEN not in text
        assert "***" in text
    assert repr(Credentials("bob")) == "Credentials(username='bob', password='', identity_token='')"


def test_is_anonymous() -> None:
    assert Credentials().is_anonymous
    assert not Credentials("u").is_anonymous
    assert not Credentials(password="p").is_anonymous
    assert not Credentials(identity_token="t").is_anonymous


def test_credentials_are_frozen_and_comparable() -> None:
    creds = Credentials("a", "b")
    assert creds == Credentials("a", "b")
    with pytest.raises(AttributeError):
        creds.username = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user:pass", Credentials("user", "pass")),
        ("user:pa:ss", Credentials("user", "pa:ss")),
        ("user:", Credentials("user", "")),
        ("user::", Credentials("user", ":")),
        ("us er:p w", Credentials("us er", "p w")),
    ],
)
def test_parse_creds(text: str, expected: Credentials) -> None:
    assert parse_creds(text) == expected


@pytest.mark.parametrize("text", ["", ":", ":" + SECRET, SECRET])
def test_parse_creds_rejects_without_echoing(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_creds(text)
    message = str(info.value)
    assert "\n" not in message
    if text:
        assert SECRET not in message


def test_parse_creds_missing_password_says_so() -> None:
    with pytest.raises(InvalidInput, match="password is required"):
        parse_creds("alice")


# --------------------------------------------------------------------------- explicit credentials


def test_explicit_creds_win_over_files(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"quay.io": auth_entry("fromfile")}})
    assert resolve_credentials("quay.io", creds="cli:pw", env=env) == Credentials("cli", "pw")
    assert resolve_credentials("quay.io", username="u", password="p", env=env) == Credentials("u", "p")
    assert resolve_credentials("quay.io", username="u", password="", env=env) == Credentials("u", "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"creds": "a:b", "username": "u", "password": "p"}, "at the same time"),
        ({"creds": "a:b", "username": "u"}, "at the same time"),
        ({"username": "u"}, "password must be specified"),
        ({"password": SECRET}, "username must be specified"),
        ({"username": "", "password": SECRET}, "username can't be empty"),
    ],
)
def test_explicit_credentials_conflicts(env: dict[str, str], kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as info:
        resolve_credentials("quay.io", env=env, **kwargs)
    assert SECRET not in str(info.value)


def test_nothing_configured_is_anonymous(env: dict[str, str]) -> None:
    assert resolve_credentials("quay.io", "ns/repo", env=env) is None


@pytest.mark.parametrize("registry", ["", "https://quay.io", "quay.io/ns", "user@quay.io"])
def test_registry_must_be_a_host(env: dict[str, str], registry: str) -> None:
    with pytest.raises(InvalidInput):
        resolve_credentials(registry, env=env)


# --------------------------------------------------------------------------- file locations and precedence


def test_file_precedence(env: dict[str, str]) -> None:
    files = [
        (primary(env), {"auths": {"quay.io": auth_entry("runtime")}}),
        (config_auth(env), {"auths": {"quay.io": auth_entry("config")}}),
        (docker_config(env), {"auths": {"quay.io": auth_entry("docker")}}),
        (dockercfg(env), {"https://quay.io/v1/": auth_entry("legacy")}),  # legacy: top level is the auths map
    ]
    for path, data in files:
        write_json(path, data)
    for path, expected in zip([f for f, _ in files], ["runtime", "config", "docker", "legacy"], strict=True):
        found = resolve_credentials("quay.io", env=env)
        assert found == Credentials(expected, SECRET)
        path.unlink()
    assert resolve_credentials("quay.io", env=env) is None


def test_each_file_is_searched_for_the_registry(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"a.example": auth_entry("runtime")}})
    write_json(config_auth(env), {"auths": {"b.example": auth_entry("config")}})
    write_json(docker_config(env), {"auths": {"c.example": auth_entry("docker")}})
    write_json(dockercfg(env), {"d.example": auth_entry("legacy")})
    found = {host: resolve_credentials(host, env=env) for host in ("a.example", "b.example", "c.example", "d.example")}
    assert {host: c.username if c else None for host, c in found.items()} == {
        "a.example": "runtime",
        "b.example": "config",
        "c.example": "docker",
        "d.example": "legacy",
    }


def test_xdg_config_home_and_docker_config_are_honoured(env: dict[str, str], tmp_path: Path) -> None:
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdgconf")
    env["DOCKER_CONFIG"] = str(tmp_path / "dockerconf")
    write_json(tmp_path / "xdgconf" / "containers" / "auth.json", {"auths": {"a.example": auth_entry("xdg")}})
    write_json(tmp_path / "dockerconf" / "config.json", {"auths": {"b.example": auth_entry("dc")}})
    write_json(config_auth(env), {"auths": {"a.example": auth_entry("ignored")}})
    assert resolve_credentials("a.example", env=env) == Credentials("xdg", SECRET)
    assert resolve_credentials("b.example", env=env) == Credentials("dc", SECRET)


def test_explicit_authfile_is_the_only_file(env: dict[str, str], tmp_path: Path) -> None:
    write_json(primary(env), {"auths": {"quay.io": auth_entry("runtime"), "other.io": auth_entry("o")}})
    explicit = write_json(tmp_path / "explicit.json", {"auths": {"quay.io": auth_entry("explicit")}})
    assert resolve_credentials("quay.io", authfile=str(explicit), env=env) == Credentials("explicit", SECRET)
    assert resolve_credentials("other.io", authfile=str(explicit), env=env) is None
    assert resolve_credentials("quay.io", authfile=explicit, env=env) == Credentials("explicit", SECRET)
    assert resolve_credentials("quay.io", authfile=str(tmp_path / "missing.json"), env=env) is None


def test_registry_auth_file_env(env: dict[str, str], tmp_path: Path) -> None:
    write_json(primary(env), {"auths": {"quay.io": auth_entry("runtime")}})
    from_env = write_json(tmp_path / "env.json", {"auths": {"quay.io": auth_entry("env")}})
    flag = write_json(tmp_path / "flag.json", {"auths": {"quay.io": auth_entry("flag")}})
    env["REGISTRY_AUTH_FILE"] = str(from_env)
    assert resolve_credentials("quay.io", env=env) == Credentials("env", SECRET)
    assert resolve_credentials("quay.io", authfile=str(flag), env=env) == Credentials("flag", SECRET)
    env["REGISTRY_AUTH_FILE"] = ""
    assert resolve_credentials("quay.io", env=env) == Credentials("runtime", SECRET)


def test_default_auth_file(env: dict[str, str]) -> None:
    assert default_auth_file(env) == primary(env)
    no_runtime = {k: v for k, v in env.items() if k != "XDG_RUNTIME_DIR"}
    assert default_auth_file(no_runtime) == Path(f"/run/containers/{os.getuid()}/auth.json")


def test_missing_runtime_dir_is_skipped_for_reading_but_refused_for_writing(env: dict[str, str]) -> None:
    env["XDG_RUNTIME_DIR"] = str(Path(env["HOME"]) / "no-such-dir")
    write_json(config_auth(env), {"auths": {"quay.io": auth_entry("config")}})
    assert resolve_credentials("quay.io", env=env) == Credentials("config", SECRET)
    with pytest.raises(InvalidInput, match=r"XDG_RUNTIME_DIR does not exist"):
        store_login("quay.io", Credentials("u", SECRET), env=env)
    assert not Path(env["XDG_RUNTIME_DIR"]).exists()


# --------------------------------------------------------------------------- keys inside a file


def test_namespace_keys_most_specific_first(env: dict[str, str]) -> None:
    write_json(
        primary(env),
        {
            "auths": {
                "quay.io": auth_entry("registry"),
                "quay.io/ns": auth_entry("namespace"),
                "quay.io/ns/repo": auth_entry("repo"),
                "quay.io/n": auth_entry("not-a-prefix-match"),
            }
        },
    )
    assert resolve_credentials("quay.io", "ns/repo", env=env) == Credentials("repo", SECRET)
    assert resolve_credentials("quay.io", "/ns/repo/", env=env) == Credentials("repo", SECRET)
    assert resolve_credentials("quay.io", "ns/repo/sub", env=env) == Credentials("repo", SECRET)
    assert resolve_credentials("quay.io", "ns/other", env=env) == Credentials("namespace", SECRET)
    assert resolve_credentials("quay.io", "nsx/repo", env=env) == Credentials("registry", SECRET)
    assert resolve_credentials("quay.io", "n2/repo", env=env) == Credentials("registry", SECRET)
    assert resolve_credentials("quay.io", env=env) == Credentials("registry", SECRET)


def test_namespace_key_in_earlier_file_beats_registry_key_in_later(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"quay.io/ns": auth_entry("ns")}})
    write_json(docker_config(env), {"auths": {"quay.io": auth_entry("docker")}})
    assert resolve_credentials("quay.io", "ns/repo", env=env) == Credentials("ns", SECRET)
    assert resolve_credentials("quay.io", "other/repo", env=env) == Credentials("docker", SECRET)


@pytest.mark.parametrize(
    "file_key",
    ["docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io", "http://docker.io"],
)
@pytest.mark.parametrize("registry", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_hub_aliases(env: dict[str, str], file_key: str, registry: str) -> None:
    write_json(docker_config(env), {"auths": {file_key: auth_entry("hubuser")}})
    assert resolve_credentials(registry, "library/busybox", env=env) == Credentials("hubuser", SECRET)


def test_docker_hub_namespaced_alias_key(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"index.docker.io/myorg": auth_entry("org"), "docker.io": auth_entry("hub")}})
    # exact keys first (containers/image), so the registry-wide docker.io entry wins over the alias spelling
    assert resolve_credentials("docker.io", "myorg/app", env=env) == Credentials("hub", SECRET)
    write_json(primary(env), {"auths": {"index.docker.io/myorg": auth_entry("org")}})
    assert resolve_credentials("docker.io", "myorg/app", env=env) == Credentials("org", SECRET)
    assert resolve_credentials("docker.io", "library/app", env=env) is None


def test_exact_key_beats_normalised_key(env: dict[str, str]) -> None:
    write_json(
        docker_config(env),
        {"auths": {"https://index.docker.io/v1/": auth_entry("url"), "docker.io": auth_entry("exact")}},
    )
    assert resolve_credentials("docker.io", env=env) == Credentials("exact", SECRET)


@pytest.mark.parametrize(
    ("file_key", "registry"),
    [
        ("https://quay.io", "quay.io"),
        ("https://quay.io/v2/", "quay.io"),
        ("http://localhost:5000/v1/", "localhost:5000"),
        ("localhost:5000", "localhost:5000"),
    ],
)
def test_url_keys(env: dict[str, str], file_key: str, registry: str) -> None:
    write_json(docker_config(env), {"auths": {file_key: auth_entry("urluser")}})
    assert resolve_credentials(registry, "ns/repo", env=env) == Credentials("urluser", SECRET)


def test_url_key_does_not_match_other_port(env: dict[str, str]) -> None:
    write_json(docker_config(env), {"auths": {"https://localhost:5000/v2/": auth_entry("u")}})
    assert resolve_credentials("localhost:5001", env=env) is None
    assert resolve_credentials("localhost", env=env) is None


def test_legacy_dockercfg(env: dict[str, str]) -> None:
    write_json(dockercfg(env), {"https://index.docker.io/v1/": {"auth": b64("old:pw"), "email": "x@example.com"}})
    assert resolve_credentials("docker.io", "library/alpine", env=env) == Credentials("old", "pw")


def test_identity_token(env: dict[str, str]) -> None:
    write_json(
        primary(env),
        {
            "auths": {
                "a.example": {"auth": b64("<token>:"), "identitytoken": TOKEN},
                "b.example": {"identitytoken": TOKEN},
                "c.example": {"auth": b64("alice:" + SECRET), "identitytoken": TOKEN},
            }
        },
    )
    assert resolve_credentials("a.example", env=env) == Credentials("<token>", "", TOKEN)
    assert resolve_credentials("b.example", env=env) == Credentials(identity_token=TOKEN)
    assert resolve_credentials("c.example", env=env) == Credentials("alice", SECRET, TOKEN)


def test_password_with_colons_and_nul_padding(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"quay.io": {"auth": b64("u:pa:ss\x00\x00")}}})
    assert resolve_credentials("quay.io", env=env) == Credentials("u", "pa:ss")


def test_unpadded_base64_is_accepted(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"quay.io": {"auth": b64("ab:c").rstrip("=")}}})
    assert resolve_credentials("quay.io", env=env) == Credentials("ab", "c")


def test_empty_entries_fall_through_to_next_file(env: dict[str, str]) -> None:
    # docker writes "auths": {"host": {}} when a credential store holds the secret
    write_json(primary(env), {"auths": {"quay.io": {}, "x.io": {"auth": b64("nocolon")}}})
    write_json(docker_config(env), {"auths": {"quay.io": auth_entry("docker"), "x.io": auth_entry("dx")}})
    assert resolve_credentials("quay.io", env=env) == Credentials("docker", SECRET)
    assert resolve_credentials("x.io", env=env) == Credentials("dx", SECRET)


def test_empty_file_and_missing_auths_are_fine(env: dict[str, str]) -> None:
    primary(env).parent.mkdir(parents=True)
    primary(env).write_text("")
    write_json(config_auth(env), {"credsStore": ""})
    write_json(docker_config(env), {"auths": None, "quay.io": auth_entry("not-in-auths")})
    assert resolve_credentials("quay.io", env=env) is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"auths": ["quay.io"]}),
        json.dumps({"auths": {"quay.io": "dXNlcjpwYXNz"}}),
        json.dumps({"auths": {"quay.io": {"auth": 42}}}),
        json.dumps({"credHelpers": {"quay.io": 1}}),
        '{"auths": {"quay.io": {"auth": "' + SECRET + '!!"}}}',
    ],
)
def test_malformed_files_are_invalid_input_without_secrets(env: dict[str, str], content: str) -> None:
    primary(env).parent.mkdir(parents=True)
    primary(env).write_text(content)
    with pytest.raises(InvalidInput) as info:
        resolve_credentials("quay.io", env=env)
    assert str(primary(env)) in str(info.value)
    assert SECRET not in str(info.value)
    assert "dXNlcjpwYXNz" not in str(info.value)


def test_unreadable_file_is_invalid_input(env: dict[str, str]) -> None:
    primary(env).mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(InvalidInput, match="reading auth file"):
        resolve_credentials("quay.io", env=env)


# --------------------------------------------------------------------------- credential helpers


def test_cred_helpers(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("quay.io", "helperuser", SECRET)
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}})
    assert resolve_credentials("quay.io", "ns/repo", env=env) == Credentials("helperuser", SECRET)
    assert helper.calls() == ["get quay.io"]  # the host name on stdin, as containers/image sends it


def test_cred_helper_identity_token(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("quay.io", "<token>", TOKEN)
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}})
    assert resolve_credentials("quay.io", env=env) == Credentials(identity_token=TOKEN)


def test_cred_helper_decides_alone_within_its_file(env: dict[str, str], helper: FakeHelper) -> None:
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}, "auths": {"quay.io": auth_entry("unused")}})
    write_json(docker_config(env), {"auths": {"quay.io": auth_entry("docker")}})
    assert resolve_credentials("quay.io", env=env) == Credentials("docker", SECRET)
    assert helper.calls() == ["get quay.io"]
    helper.put("quay.io", "helperuser", SECRET)
    assert resolve_credentials("quay.io", env=env) == Credentials("helperuser", SECRET)


def test_cred_helper_not_found_means_no_credentials(env: dict[str, str], helper: FakeHelper) -> None:
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}})
    assert resolve_credentials("quay.io", env=env) is None


def test_creds_store(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("quay.io", "storeuser", SECRET)
    helper.put("ghcr.io", "ghuser", SECRET)
    write_json(
        docker_config(env),
        {"credsStore": "fake", "auths": {"quay.io": {}, "ghcr.io": auth_entry("fromauths")}},
    )
    assert resolve_credentials("quay.io", env=env) == Credentials("storeuser", SECRET)
    assert resolve_credentials("ghcr.io", env=env) == Credentials("fromauths", SECRET)  # auths before credsStore
    assert resolve_credentials("gcr.io", env=env) is None
    assert helper.calls() == ["get quay.io", "get gcr.io"]


def test_creds_store_for_docker_hub_tries_docker_server_url(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("https://index.docker.io/v1/", "hubuser", SECRET)
    write_json(docker_config(env), {"credsStore": "fake", "auths": {"https://index.docker.io/v1/": {}}})
    assert resolve_credentials("docker.io", "library/alpine", env=env) == Credentials("hubuser", SECRET)
    assert helper.calls() == ["get docker.io", "get https://index.docker.io/v1/"]


def test_cred_helpers_key_in_url_form(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("docker.io", "hubuser", SECRET)
    write_json(docker_config(env), {"credHelpers": {"https://index.docker.io/v1/": "fake"}})
    assert resolve_credentials("docker.io", env=env) == Credentials("hubuser", SECRET)


def test_failing_helper_names_helper_but_not_secret(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("quay.io", "helperuser", SECRET)
    helper.fail_with(f"panic: backend exploded while holding {SECRET}")
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}})
    with pytest.raises(InvalidInput) as info:
        resolve_credentials("quay.io", env=env)
    message = str(info.value)
    assert "docker-credential-fake" in message
    assert "quay.io" in message
    assert SECRET not in message
    assert "exploded" not in message


def test_helper_with_malformed_output(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put_raw("quay.io", f'{{"Username": "u", "Secret": "{SECRET}"')
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}})
    with pytest.raises(InvalidInput, match="docker-credential-fake returned malformed output") as info:
        resolve_credentials("quay.io", env=env)
    assert SECRET not in str(info.value)


def test_helper_missing_from_path(env: dict[str, str]) -> None:
    write_json(primary(env), {"credHelpers": {"quay.io": "nosuchhelper"}})
    with pytest.raises(InvalidInput, match="docker-credential-nosuchhelper not found"):
        resolve_credentials("quay.io", env=env)


@pytest.mark.parametrize("name", ["../fake", "a/b", ""])
def test_helper_names_cannot_be_paths(env: dict[str, str], helper: FakeHelper, name: str) -> None:
    write_json(primary(env), {"credHelpers": {"quay.io": name}})
    with pytest.raises(InvalidInput, match="invalid credential helper name"):
        resolve_credentials("quay.io", env=env)


# --------------------------------------------------------------------------- login, logout


def test_store_get_remove_round_trip(env: dict[str, str]) -> None:
    path = store_login("quay.io", Credentials("alice", SECRET), env=env)
    assert path == primary(env)
    assert json.loads(path.read_text()) == {"auths": {"quay.io": {"auth": b64("alice:" + SECRET)}}}
    assert get_login("quay.io", env=env) == "alice"
    assert resolve_credentials("quay.io", "ns/repo", env=env) == Credentials("alice", SECRET)
    assert remove_login("quay.io", env=env) is True
    assert get_login("quay.io", env=env) is None
    assert remove_login("quay.io", env=env) is False
    assert json.loads(path.read_text()) == {"auths": {}}


def test_store_login_permissions_and_atomicity(env: dict[str, str], tmp_path: Path) -> None:
    path = store_login(
        "quay.io", Credentials("alice", SECRET), authfile=str(tmp_path / "a" / "b" / "auth.json"), env=env
    )
    assert path == tmp_path / "a" / "b" / "auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    path.chmod(0o644)
    store_login("ghcr.io", Credentials("bob", SECRET), authfile=str(path), env=env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["auth.json"]  # no temporary files left behind


def test_store_login_preserves_other_registries_and_keys(env: dict[str, str]) -> None:
    original = {
        "auths": {"ghcr.io": {"auth": b64("gh:tok"), "email": "x@example.com"}, "quay.io": auth_entry("old")},
        "credHelpers": {"gcr.io": "gcloud"},
        "credsStore": "desktop",
        "HttpHeaders": {"User-Agent": "x"},
    }
    write_json(primary(env), original)
    store_login("quay.io", Credentials("new", "pw"), env=env)
    data = json.loads(primary(env).read_text())
    assert data["auths"]["quay.io"] == {"auth": b64("new:pw")}
    assert data["auths"]["ghcr.io"] == original["auths"]["ghcr.io"]  # type: ignore[index]
    assert {k: v for k, v in data.items() if k != "auths"} == {
        "credHelpers": {"gcr.io": "gcloud"},
        "credsStore": "desktop",
        "HttpHeaders": {"User-Agent": "x"},
    }
    assert remove_login("quay.io", env=env)
    data = json.loads(primary(env).read_text())
    assert list(data["auths"]) == ["ghcr.io"]
    assert data["credsStore"] == "desktop"


def test_store_login_identity_token(env: dict[str, str]) -> None:
    store_login("quay.io", Credentials("alice", SECRET, TOKEN), env=env)
    entry = json.loads(primary(env).read_text())["auths"]["quay.io"]
    assert entry == {"auth": b64("alice:" + SECRET), "identitytoken": TOKEN}
    assert resolve_credentials("quay.io", env=env) == Credentials("alice", SECRET, TOKEN)


def test_login_keys(env: dict[str, str]) -> None:
    store_login("https://quay.io/v2/", Credentials("url", "pw"), env=env)  # skopeo reduces a URL to its host
    store_login("quay.io/ns/repo", Credentials("repo", "pw"), env=env)
    assert sorted(json.loads(primary(env).read_text())["auths"]) == ["quay.io", "quay.io/ns/repo"]
    assert get_login("quay.io/ns/repo", env=env) == "repo"
    assert get_login("quay.io/ns/other", env=env) == "url"
    assert get_login("http://quay.io", env=env) == "url"
    for bad in ("quay.io/ns/repo:tag", "quay.io/ns/repo@sha256:abc", "", "https://"):
        with pytest.raises(InvalidInput):
            store_login(bad, Credentials("u", "p"), env=env)


def test_store_login_needs_a_username(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="username is required") as info:
        store_login("quay.io", Credentials("", SECRET), env=env)
    assert SECRET not in str(info.value)
    with pytest.raises(InvalidInput, match="must not contain ':'"):
        store_login("quay.io", Credentials("a:b", SECRET), env=env)
    assert not primary(env).exists()


def test_get_login_identity_token_only_is_not_logged_in(env: dict[str, str]) -> None:
    write_json(primary(env), {"auths": {"quay.io": {"identitytoken": TOKEN}}})
    assert get_login("quay.io", env=env) is None


def test_get_login_searches_all_default_files(env: dict[str, str]) -> None:
    write_json(docker_config(env), {"auths": {"https://index.docker.io/v1/": auth_entry("hub")}})
    assert get_login("docker.io", env=env) == "hub"
    assert get_login("index.docker.io", env=env) == "hub"


def test_remove_login_removes_every_spelling_in_the_file(env: dict[str, str], tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "config.json",
        {
            "auths": {
                "https://index.docker.io/v1/": auth_entry("a"),
                "docker.io": auth_entry("b"),
                "docker.io/library": auth_entry("keep"),
                "quay.io": auth_entry("keep"),
            }
        },
    )
    assert remove_login("docker.io", authfile=str(path), env=env) is True
    assert sorted(json.loads(path.read_text())["auths"]) == ["docker.io/library", "quay.io"]


def test_remove_login_when_file_missing(env: dict[str, str]) -> None:
    assert remove_login("quay.io", env=env) is False
    assert not primary(env).exists()


def test_remove_login_only_touches_the_writable_file(env: dict[str, str]) -> None:
    write_json(docker_config(env), {"auths": {"quay.io": auth_entry("docker")}})
    assert remove_login("quay.io", env=env) is False
    assert get_login("quay.io", env=env) == "docker"


def test_login_through_cred_helper(env: dict[str, str], helper: FakeHelper) -> None:
    write_json(primary(env), {"credHelpers": {"quay.io": "fake"}})
    store_login("quay.io", Credentials("alice", SECRET), env=env)
    assert helper.stored() == {"ServerURL": "quay.io", "Username": "alice", "Secret": SECRET}
    assert json.loads(primary(env).read_text()) == {"credHelpers": {"quay.io": "fake"}}  # nothing in auths
    with pytest.raises(InvalidInput, match="namespaced key is not supported"):
        store_login("quay.io/ns", Credentials("alice", SECRET), env=env)
    helper.put("quay.io", "alice", SECRET)
    assert remove_login("quay.io", env=env) is True
    assert not helper.has("quay.io")
    assert remove_login("quay.io", env=env) is False
    assert helper.calls() == ["store", "erase quay.io", "erase quay.io"]


def test_remove_all_logins(env: dict[str, str], helper: FakeHelper) -> None:
    helper.put("gcr.io", "g", SECRET)
    write_json(
        primary(env),
        {
            "auths": {"quay.io": auth_entry("q"), "ghcr.io": auth_entry("g")},
            "credHelpers": {"gcr.io": "fake", "ecr.example": "fake"},
            "credsStore": "desktop",
        },
    )
    assert remove_all_logins(env=env) == primary(env)
    assert json.loads(primary(env).read_text()) == {"auths": {}, "credsStore": "desktop"}
    assert not helper.has("gcr.io")
    assert sorted(helper.calls()) == ["erase ecr.example", "erase gcr.io"]
    assert stat.S_IMODE(primary(env).stat().st_mode) == 0o600


def test_remove_all_logins_without_file(env: dict[str, str]) -> None:
    assert remove_all_logins(env=env) == primary(env)
    assert not primary(env).exists()


def test_writes_follow_registry_auth_file(env: dict[str, str], tmp_path: Path) -> None:
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "env-auth.json")
    assert store_login("quay.io", Credentials("u", "p"), env=env) == tmp_path / "env-auth.json"
    assert not primary(env).exists()
    flag = tmp_path / "flag.json"
    assert store_login("quay.io", Credentials("f", "p"), authfile=flag, env=env) == flag
    assert get_login("quay.io", env=env) == "u"
    assert get_login("quay.io", authfile=str(flag), env=env) == "f"


def test_malformed_file_is_not_overwritten(env: dict[str, str]) -> None:
    primary(env).parent.mkdir(parents=True)
    primary(env).write_text('{"auths": [}')
    with pytest.raises(InvalidInput):
        store_login("quay.io", Credentials("u", "p"), env=env)
    with pytest.raises(InvalidInput):
        remove_login("quay.io", env=env)
    assert primary(env).read_text() == '{"auths": [}'


# --------------------------------------------------------------------------- interoperability with skopeo


def skopeo(env: dict[str, str], *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    run_env = {"HOME": env["HOME"], "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"], "PATH": env["PATH"]}
    return subprocess.run(
        [SKOPEO, *args], env=run_env, capture_output=True, text=True, timeout=60, input=input, check=False
    )


@needs_skopeo
def test_skopeo_reads_what_store_login_writes(env: dict[str, str], tmp_path: Path) -> None:
    authfile = tmp_path / "auth.json"
    store_login("registry.example:5000", Credentials("alice", "pa:ss"), authfile=authfile, env=env)
    store_login("quay.io/ns", Credentials("nsuser", SECRET), authfile=authfile, env=env)
    out = skopeo(env, "login", "--get-login", "--authfile", str(authfile), "registry.example:5000")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "alice"
    out = skopeo(env, "login", "--get-login", "--authfile", str(authfile), "quay.io/ns/repo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "nsuser"
    # and skopeo's logout edits our file the way remove_login would
    out = skopeo(env, "logout", "--authfile", str(authfile), "registry.example:5000")
    assert out.returncode == 0, out.stderr
    assert get_login("registry.example:5000", authfile=authfile, env=env) is None
    assert get_login("quay.io/ns", authfile=authfile, env=env) == "nsuser"


@needs_skopeo
def test_skopeo_not_logged_in_agrees(env: dict[str, str], tmp_path: Path) -> None:
    authfile = write_json(tmp_path / "auth.json", {"auths": {"quay.io": {"identitytoken": TOKEN}}})
    out = skopeo(env, "login", "--get-login", "--authfile", str(authfile), "quay.io")
    assert out.returncode != 0
    assert "not logged into quay.io" in out.stderr
    assert get_login("quay.io", authfile=authfile, env=env) is None


class _OkRegistry(http.server.BaseHTTPRequestHandler):
    """Answers 200 to everything: enough for ``skopeo login`` to consider the credentials good."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def ok_registry() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OkRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@needs_skopeo
def test_we_read_what_skopeo_login_writes(env: dict[str, str], tmp_path: Path, ok_registry: str) -> None:
    authfile = tmp_path / "sub" / "auth.json"
    write_json(authfile, {"auths": {"other.example": auth_entry("other")}})
    out = skopeo(
        env, "login", "--tls-verify=false", "--authfile", str(authfile), "-u", "alice", "--password-stdin",
        ok_registry, input="pa:ss-" + SECRET + "\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert resolve_credentials(ok_registry, "ns/repo", authfile=authfile, env=env) == Credentials(
        "alice", "pa:ss-" + SECRET
    )
    assert get_login(ok_registry, authfile=authfile, env=env) == "alice"
    assert get_login("other.example", authfile=authfile, env=env) == "other"
    assert remove_login(ok_registry, authfile=authfile, env=env) is True
    out = skopeo(env, "login", "--get-login", "--authfile", str(authfile), ok_registry)
    assert out.returncode != 0


def test_skopeo_format_is_read(env: dict[str, str]) -> None:
    """The exact bytes skopeo 1.9 writes (tab-indented, no trailing newline)."""
    primary(env).parent.mkdir(parents=True)
    primary(env).write_text('{\n\t"auths": {\n\t\t"127.0.0.1:5987": {\n\t\t\t"auth": "YWxpY2U6czNjcmV0"\n\t\t}\n\t}\n}')
    assert resolve_credentials("127.0.0.1:5987", "ns/repo", env=env) == Credentials("alice", "s3cret")
