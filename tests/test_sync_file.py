"""The sync YAML file is checked against its schema: one error line per problem, naming the key (issue #8)."""

# ruff: noqa: E501 - one case per line reads better than wrapped strings

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.cli import run_ferry
from worker.engine.syncfile import InvalidSyncFile, read_sync_file
from worker.registry import Platform


def problems_of(tmp_path: Path, text: str | bytes) -> list[str]:
    path = tmp_path / "sync.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InvalidSyncFile) as info:
        read_sync_file(str(path))
    return list(info.value.problems)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("docker.io:\n  images: 'app'\n", "line 2: docker.io: images: expected a mapping of repository to a list"),
        ("docker.io:\n  images: [app]\n", "docker.io: images: expected a mapping of repository to a list of tags, got a list"),
        ("docker.io:\n  images: {app: latest}\n", "docker.io: images: 'app': expected a list (a tag or digest per item), got a string ('latest'); write [latest]"),
        ("docker.io:\n  images: {app: [[1]]}\n", "docker.io: images: 'app'[0]: expected a tag or digest, got a list"),
        ("docker.io:\n  images: {'Bad Repo': []}\n", "docker.io: images: 'Bad Repo'"),
        ("docker.io:\n  images: {app: []}\n  platforms: linux/amd64\n", "line 3: docker.io: platforms: expected a list (a platform os/arch[/variant] per item), got a string ('linux/amd64'); write [linux/amd64]"),
        ("docker.io:\n  images: {app: []}\n  platforms: [linux]\n", "docker.io: platforms: invalid platform 'linux'"),
        ("docker.io:\n  images: {app: []}\n  exclude-tags: 5\n", "docker.io: exclude-tags: expected a list (a regex, quoted if it looks like a number per item), got a number ('5')"),
        ("docker.io:\n  images: {app: []}\n  exclude-tags: ['(']\n", "docker.io: exclude-tags[0]: invalid regex '('"),
        ("docker.io:\n  images: {app: []}\n  credentials: 'user:pw'\n", "docker.io: credentials: expected a mapping with username and password, got a string ('user:pw')"),
        ("docker.io:\n  images: {app: []}\n  credentials: {user: a, password: b}\n", "docker.io: credentials: unknown key 'user' (username, password)"),
        ("docker.io:\n  images: {app: []}\n  tls-verify: 0\n", "docker.io: tls-verify: expected true or false, got a number ('0')"),
        ("docker.io:\n  images: {app: []}\n  keep-latest: 0\n", "docker.io: keep-latest: expected a whole number >= 1, got a number ('0')"),
        ("docker.io:\n  images: {app: []}\n  keep-latest: '5'\n", "docker.io: keep-latest: expected a whole number >= 1, got a string ('5')"),
        ("docker.io:\n  images: {app: []}\n  keep-latest-by: size\n", "docker.io: keep-latest-by: expected semver or created, got 'size'"),
        ("docker.io:\n  images-by-tag-regex: {app: '('}\n", "docker.io: images-by-tag-regex: 'app': invalid regex '('"),
        ("docker.io:\n  images-by-semver: {app: [1]}\n", ""),
        ("docker.io:\n  images-by-semver: {app: {a: 1}}\n", "docker.io: images-by-semver: 'app': expected a version constraint, got a mapping"),
        ("docker.io:\n  catalog: {prefix: a/, tag: x}\n", "docker.io: catalog: unknown key 'tag' (prefix, tags)"),
        ("docker.io:\n  imagez: {app: []}\n", "docker.io: unknown key 'imagez' (known: images, "),
        ("docker.io: [a]\n", "docker.io: expected a mapping of settings"),
        ("- docker.io\n", "top level: expected a mapping of registry name to its settings, got a list"),
        ("'bad registry!':\n  images: {app: []}\n", "'bad registry!': not a registry name"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a YAML text file"),
        ("docker.io:\n  images: {app: [\n", "cannot parse YAML"),
    ],
)  # fmt: skip
def test_each_problem_names_its_key(tmp_path: Path, text: str | bytes, message: str) -> None:
    if not message:  # a list of constraints is fine; a number in it is read as its text, like skopeo
        (tmp_path / "sync.yml").write_text(text if isinstance(text, str) else "")
        assert read_sync_file(str(tmp_path / "sync.yml"))[0].images_by_semver["app"].text == "1"
        return
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"sync file {tmp_path / 'sync.yml'}: ")
    assert message in problems[0], problems[0]


def test_a_well_formed_file_reads_into_typed_entries(tmp_path: Path) -> None:
    path = tmp_path / "sync.yml"
    path.write_text(
        "reg.example:5000:\n"
        "  tls-verify: no\n"
        "  cert-dir: /etc/certs\n"
        "  credentials: {username: u, password: p}\n"
        "  images:\n"
        "    team/app: [1.10, '2.0', latest]\n"
        "    team/all:\n"
        "  images-by-tag-regex: {team/re: ^v}\n"
        "  images-by-semver: {team/sv: ['>=1 <2', '^3']}\n"
        "  exclude-tags: -rc$\n"
        "  platforms: [linux/amd64, linux/arm64/v8]\n"
        "  keep-latest: 3\n"
        "  keep-latest-by: created\n"
        "  catalog: tools/\n"
        "docker.io:\n"
    )
    reg, hub = read_sync_file(str(path))
    assert reg.registry == "reg.example:5000" and reg.tls_verify is False and reg.cert_dir == "/etc/certs"
    assert reg.credentials is not None and (reg.credentials.username, reg.credentials.password) == ("u", "p")
    assert reg.images == {"team/app": ["1.10", "2.0", "latest"], "team/all": []}, "tags are read as written"
    assert reg.images_by_tag_regex["team/re"].pattern == "^v"
    assert reg.images_by_semver["team/sv"].text == ">=1 <2 || ^3"
    assert [p.pattern for p in reg.exclude_tags] == ["-rc$"]
    assert reg.platforms == (Platform.parse("linux/amd64"), Platform.parse("linux/arm64/v8"))
    assert (reg.keep_latest, reg.keep_latest_by) == (3, "created")
    assert reg.catalog is not None and reg.catalog.prefix == "tools/"
    assert hub.registry == "docker.io" and not hub.selects_images


def test_cli_prints_one_line_per_problem_and_writes_nothing(tmp_path: Path) -> None:
    sync_file = tmp_path / "sync.yml"
    # 127.0.0.1:1 refuses connections: a sync that tried to list anything would say so instead
    sync_file.write_text(
        "127.0.0.1:1:\n"
        "  images: {app: latest}\n"
        "  platforms: linux/amd64\n"
        "  exclude-tags: 5\n"
        "  credentials: 'user:pw'\n"
        "127.0.0.1:2:\n"
        "  images: 'app'\n"
    )
    out = tmp_path / "out"
    proc = run_ferry("sync", "--src", "yaml", "--dest", "dir", str(sync_file), str(out), tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line.split(": ")[3] for line in lines] == [
        "127.0.0.1:1",
        "127.0.0.1:1",
        "127.0.0.1:1",
        "127.0.0.1:1",
        "127.0.0.1:2",
    ], lines
    assert all(line.startswith(f"Error: sync file {sync_file}: line ") for line in lines), lines
    assert "images: 'app': expected a list" in lines[0] and "platforms:" in lines[1]
    assert "exclude-tags:" in lines[2] and "credentials:" in lines[3] and "images: expected a mapping" in lines[4]
    assert "refused" not in proc.stderr and "internal error" not in proc.stderr
    assert not out.exists()

    sync_file.write_bytes(bytes(range(256)))
    proc = run_ferry("sync", "--src", "yaml", "--dest", "dir", str(sync_file), str(out), tmp_path=tmp_path)
    assert proc.returncode == 1 and proc.stderr == f"Error: sync file {sync_file}: not a YAML text file (not UTF-8)\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            b"127.0.0.1:1:\n  credentials: 'user:pw'\n  images: {app: {}}\n",
            "credentials must be a mapping with username and password",
        ),
        (
            b"127.0.0.1:1:\n  credentials: {username: '', password: x}\n  images: {app: {}}\n",
            "credentials need a non-empty username",
        ),
        (b"127.0.0.1:1:\n  cert-dir: [a]\n  images: {app: {}}\n", "cert-dir must be a directory path"),
        (bytes(range(256)), "not a YAML text file"),
    ],
)
def test_prune_policy_file_refuses_what_it_would_ignore(tmp_path: Path, text: bytes, message: str) -> None:
    """The policy file shares the registry settings of a sync file: a wrong shape is one error, not ignored."""
    policy = tmp_path / "policy.yml"
    policy.write_bytes(text)
    proc = run_ferry("prune", "--policy", str(policy), tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("Error: ") == 1 and message in proc.stderr, proc.stderr
    assert "refused" not in proc.stderr and "internal error" not in proc.stderr
