"""skopeo's flags as a skopeo user's scripts spell them: the same command run with ferry and with skopeo 1.9,
comparing exit codes and what lands at the destination.

The ``ferry`` binary is run (not ``main`` in-process): the point is the command line as typed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.images import RegistryAuth, build_image, push_image
from tests.harness.peer import peer_env, skopeo
from tests.harness.servers import RegistryServer

FERRY_BIN = str(Path(sys.executable).with_name("ferry"))


def ferry(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY_BIN, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=peer_env(env),
        stdin=subprocess.DEVNULL,
    )


def both(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The same command with each tool; every ``{tool}`` in an argument becomes ``ferry``/``skopeo``."""
    f = ferry(*(a.replace("{tool}", "ferry") for a in args), env=env)
    s = skopeo(*(a.replace("{tool}", "skopeo") for a in args), check=False, env=env)
    return f, s


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` and the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def write_auth(path: Path, host: str, user: str, password: str) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return str(path)


@pytest.fixture(scope="module")
def auth_image(auth_registry: RegistryServer) -> str:
    repo = f"test/flags-{secrets.token_hex(3)}"
    img = build_image("flags-auth", layers=[700, 300], fmt="v2s2")
    push_image(auth_registry.url, repo, "v1", img, auth=(auth_registry.username or "", auth_registry.password or ""))
    return f"{auth_registry.host}/{repo}:v1"


@pytest.fixture(scope="module")
def plain_image(registry: RegistryServer) -> str:
    repo = f"test/flags-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v1", build_image("flags-plain", layers=[500], fmt="oci"))
    return f"{registry.host}/{repo}:v1"


def test_copy_authfile_both_sides(auth_registry: RegistryServer, auth_image: str, tmp_path: Path) -> None:
    """``copy --authfile F`` (one file for both sides) pulls from a registry that needs the login in it."""
    assert auth_registry.username and auth_registry.password
    authfile = write_auth(tmp_path / "auth.json", auth_registry.host, auth_registry.username, auth_registry.password)
    f, s = both(
        "copy", "--authfile", authfile, "--src-tls-verify=false", f"docker://{auth_image}", f"dir:{tmp_path}/{{tool}}"
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert tree(tmp_path / "ferry") == tree(tmp_path / "skopeo")
    # without it, both are refused by the registry
    f, s = both("copy", "--src-tls-verify=false", f"docker://{auth_image}", f"dir:{tmp_path}/no-{{tool}}")
    assert f.returncode == s.returncode == 1
    assert f.stderr.startswith("Error: ") and len(f.stderr.splitlines()) == 1


@pytest.mark.parametrize("verb", ["inspect", "list-tags", "delete-check"])
def test_authfile_on_read_verbs(auth_registry: RegistryServer, auth_image: str, tmp_path: Path, verb: str) -> None:
    assert auth_registry.username and auth_registry.password
    authfile = write_auth(tmp_path / "auth.json", auth_registry.host, auth_registry.username, auth_registry.password)
    target = f"docker://{auth_image}"
    if verb == "list-tags":
        target = target.rsplit(":", 1)[0]
    if verb == "delete-check":
        # delete a tag that does not exist: both get past authentication and fail on the missing manifest
        f, s = both("delete", "--authfile", authfile, "--tls-verify=false", target.rsplit(":", 1)[0] + ":nope")
        assert f.returncode == s.returncode != 0, (f.stderr, s.stderr)
        assert "manifest unknown" in f.stderr
        return
    f, s = both(verb, "--authfile", authfile, "--tls-verify=false", target)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    key = "Tags" if verb == "list-tags" else "Digest"
    assert json.loads(f.stdout)[key] == json.loads(s.stdout)[key]


def test_global_tls_verify_before_the_verb(plain_image: str, tmp_path: Path) -> None:
    """``ferry --tls-verify=false copy …``: skopeo's hidden global flag, the default for both sides."""
    f, s = both("--tls-verify=false", "copy", f"docker://{plain_image}", f"dir:{tmp_path}/{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert tree(tmp_path / "ferry") == tree(tmp_path / "skopeo")
    # a side's own flag wins over the global one: both insist on TLS and fail against a plain-HTTP registry
    f, s = both(
        "--tls-verify=false", "copy", "--src-tls-verify=true", f"docker://{plain_image}", f"dir:{tmp_path}/x{{tool}}"
    )
    assert f.returncode == s.returncode == 1
    # and inspect honours it too
    f, s = both("--tls-verify=false", "inspect", f"docker://{plain_image}")
    assert (f.returncode, s.returncode) == (0, 0)
    assert json.loads(f.stdout)["Digest"] == json.loads(s.stdout)["Digest"]


def test_screds_dcreds_aliases(auth_registry: RegistryServer, auth_image: str, tmp_path: Path) -> None:
    creds = f"{auth_registry.username}:{auth_registry.password}"
    repo = auth_image.split("/", 1)[1].rsplit(":", 1)[0]
    f, s = both(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--screds",
        creds,
        "--dcreds",
        creds,
        f"docker://{auth_image}",
        f"docker://{auth_registry.host}/{repo}-{{tool}}:copied",
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    digests = [
        json.loads(
            skopeo(
                "inspect", "--tls-verify=false", "--creds", creds, f"docker://{auth_registry.host}/{repo}-{t}:copied"
            ).stdout
        )["Digest"]
        for t in ("ferry", "skopeo")
    ]
    assert digests[0] == digests[1]


def test_registry_token_is_the_bearer(token_registry: RegistryServer, tmp_path: Path) -> None:
    """``--src-registry-token T`` goes as ``Authorization: Bearer T``; without it the registry refuses."""
    ts = token_registry.token_server
    assert ts is not None
    repo = f"test/token-{secrets.token_hex(3)}"
    push_image(
        token_registry.url,
        repo,
        "v1",
        build_image("flags-token", layers=[300], fmt="v2s2"),
        auth=RegistryAuth(ts.username, ts.password),
    )
    token = ts.make_token(ts.username, [f"repository:{repo}:pull"])
    src = f"docker://{token_registry.host}/{repo}:v1"
    ts.reset()
    f, s = both("copy", "--src-tls-verify=false", "--src-registry-token", token, src, f"dir:{tmp_path}/{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert tree(tmp_path / "ferry") == tree(tmp_path / "skopeo")
    assert ts.requests == [], "the given token is used as is: no token request"
    # inspect spells it without prefix
    f, s = both("inspect", "--tls-verify=false", "--registry-token", token, src)
    assert (f.returncode, s.returncode) == (0, 0)
    # a token without pull rights: refused by the registry, one error line, and still no token exchange
    bad = ts.make_token(ts.username, [])
    f, s = both("inspect", "--tls-verify=false", "--registry-token", bad, src)
    assert f.returncode == s.returncode == 1
    assert f.stderr.startswith("Error: ") and bad not in f.stderr
    assert ts.requests == []


def test_registry_token_stays_with_its_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's token is a credential of the source side only."""
    from producer.cli import build_parser, parse_args
    from producer.options import side_config
    from worker.registry import Reference

    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "none.json"))
    argv = ["copy", "--src-registry-token", "s3cr3t-value", "docker://a.example/x:1", "docker://b.example/y:1"]
    args = parse_args(build_parser(), argv)
    src, dest = side_config(args, "src-"), side_config(args, "dest-")
    src_creds = src.credentials_for(Reference.parse("a.example/x:1"))
    assert src_creds is not None and src_creds.registry_token == "s3cr3t-value"
    assert "s3cr3t" not in repr(src_creds)
    assert dest.credentials_for(Reference.parse("b.example/y:1")) is None


def test_inspect_short_flags_each_take_their_value(plain_image: str) -> None:
    f, s = both("inspect", "-n", "-f", "{{.Name}} {{.Digest}}", "--tls-verify=false", f"docker://{plain_image}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert f.stdout == s.stdout
    f, s = both("inspect", "-nf", "{{len .RepoTags}}", "--tls-verify=false", f"docker://{plain_image}")
    assert f.stdout == s.stdout == "0\n"


def test_logout_all_without_auth_file_fails_like_skopeo(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    f, s = both("logout", "-a", "--authfile", missing)
    assert f.returncode == s.returncode == 1
    assert f"checking authfile: stat {missing}: no such file or directory" in s.stderr
    assert f.stderr == f"Error: checking authfile: stat {missing}: no such file or directory\n"
    assert not os.path.exists(missing)


def test_unknown_flag_names_the_flag() -> None:
    f, s = both("copy", "--authfilex", "x", "dir:/a", "dir:/b")
    assert f.returncode != 0 and s.returncode != 0
    assert 'unknown flag: --authfilex"' in s.stderr
    assert f.stderr.startswith("Error: unknown flag: --authfilex ")
    f = ferry("inspect", "--bogus=1", "dir:/a")
    assert f.stderr.startswith("Error: unknown flag: --bogus ")


def test_help_and_completion_verbs(tmp_path: Path) -> None:
    assert ferry("help", "copy").stdout == ferry("copy", "--help").stdout
    assert "copy" in ferry("help").stdout
    assert ferry("help", "nosuchverb").returncode == 1
    script = ferry("completion", "bash")
    assert script.returncode == 0
    # the script is valid bash and completes a verb's flags
    probe = tmp_path / "probe.sh"
    probe.write_text(
        script.stdout + 'COMP_WORDS=(ferry copy --src-registry-t); COMP_CWORD=2; _ferry; echo "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["--src-registry-token"]
    for shell in ("zsh", "fish", "powershell"):
        assert (
            "--src-registry-token" in ferry("completion", shell).stdout
            or "src-registry-token" in ferry("completion", shell).stdout
        )


def test_version_like_skopeo() -> None:
    assert skopeo("--version").stdout.startswith("skopeo version ")
    assert ferry("--version").stdout.startswith("ferry version ")
    assert ferry("-v").stdout == ferry("--version").stdout


def test_user_agent_prefix(registry: RegistryServer, plain_image: str) -> None:
    marker = f"flags-ua-{secrets.token_hex(4)}"
    mark = registry.log_mark()
    run = ferry("--user-agent-prefix", marker, "inspect", "--tls-verify=false", f"docker://{plain_image}")
    assert run.returncode == 0, run.stderr
    agents = {e.user_agent for e in registry.access_log(mark)}
    assert agents and all(ua.startswith(f"{marker} ferry/") for ua in agents), agents


def test_shared_blob_dir_interop(plain_image: str, tmp_path: Path) -> None:
    """``--dest-shared-blob-dir``: the layout's blobs live in the shared directory; skopeo reads it back."""
    shared = tmp_path / "blobs"
    run = ferry(
        "copy",
        "--src-tls-verify=false",
        "--dest-shared-blob-dir",
        str(shared),
        f"docker://{plain_image}",
        f"oci:{tmp_path}/layout:v1",
    )
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "layout" / "blobs" / "sha256").exists() or not any(
        (tmp_path / "layout" / "blobs" / "sha256").iterdir()
    )
    assert any((shared / "sha256").iterdir())
    f, s = both(
        "copy", "--src-shared-blob-dir", str(shared), f"oci:{tmp_path}/layout:v1", f"dir:{tmp_path}/back-{{tool}}"
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert tree(tmp_path / "back-ferry") == tree(tmp_path / "back-skopeo")
    # on another transport it is refused, never ignored
    run = ferry("copy", "--dest-shared-blob-dir", str(shared), f"oci:{tmp_path}/layout:v1", f"dir:{tmp_path}/d")
    assert run.returncode == 1 and "oci: layouts only" in run.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tls-details", "/dev/null", "inspect", "dir:/x"], "--tls-details"),
        (["copy", "--src-daemon-host", "unix:///x", "dir:/a", "dir:/b"], "docker-daemon"),
    ],
)
def test_unsupported_flags_are_refused(args: list[str], needle: str) -> None:
    run = ferry(*args)
    assert run.returncode == 1
    assert run.stderr.startswith("Error: ") and needle in run.stderr and len(run.stderr.splitlines()) == 1
