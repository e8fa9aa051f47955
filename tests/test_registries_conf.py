"""registries.conf with two real registries as primary and mirror, ferry and skopeo 1.9 given the same file.

The mirror holds a different image under the same name, so which registry answered shows in the digest.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.harness.images import build_image, push_image
from tests.harness.servers import RedisServer, RegistryServer
from tests.harness.workers import start_worker
from tests.test_skopeo_flags import both, ferry, skopeo
from worker.engine.registries_conf import load, registries_d
from worker.registry import InvalidInput, Reference


@pytest.fixture(scope="module")
def setup(registry: RegistryServer, registry2: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    repo = f"test/mirror-{secrets.token_hex(3)}"
    primary = push_image(registry.url, repo, "v1", build_image("conf-primary", layers=[200]))
    push_image(registry.url, repo, "only-primary", build_image("conf-primary", layers=[200]))
    mirrored = push_image(registry2.url, repo, "v1", build_image("conf-mirror", layers=[300]))
    conf = tmp_path_factory.mktemp("conf") / "registries.conf"
    conf.write_text(
        f"""
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "{registry.host}"
location = "{registry.host}"
insecure = true
[[registry.mirror]]
location = "{registry2.host}"
insecure = true

[[registry]]
prefix = "example.invalid/team"
location = "{registry.host}/test"
insecure = true

[[registry]]
prefix = "{registry.host}/test/blocked"
location = "{registry.host}/test/blocked"
blocked = true

[aliases]
"short" = "{registry.host}/{repo}"
"""
    )
    return {"repo": repo, "primary": str(primary), "mirror": str(mirrored), "conf": str(conf)}


def digest(out: str) -> str:
    return str(json.loads(out)["Digest"])


def test_mirror_first_then_primary(registry: RegistryServer, setup: dict) -> None:
    conf = setup["conf"]
    # no --tls-verify: registries.conf marks both plain-HTTP registries insecure
    f, s = both("--registries-conf", conf, "inspect", "--no-tags", f"docker://{registry.host}/{setup['repo']}:v1")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert digest(f.stdout) == digest(s.stdout) == setup["mirror"]
    # the mirror lacks this tag: both fall back to the primary
    name = f"docker://{registry.host}/{setup['repo']}:only-primary"
    f, s = both("--registries-conf", conf, "inspect", "--no-tags", name)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert digest(f.stdout) == digest(s.stdout) == setup["primary"]


def test_copy_pulls_from_the_mirror(registry: RegistryServer, setup: dict, tmp_path: Path) -> None:
    src = f"docker://{registry.host}/{setup['repo']}:v1"
    f, s = both("--registries-conf", setup["conf"], "copy", src, f"dir:{tmp_path}/{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert (tmp_path / "ferry" / "manifest.json").read_bytes() == (tmp_path / "skopeo" / "manifest.json").read_bytes()


def test_prefix_rewrite(setup: dict) -> None:
    name = f"docker://example.invalid/team/{setup['repo'].split('/', 1)[1]}:only-primary"
    f, s = both("--registries-conf", setup["conf"], "inspect", "--no-tags", name)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert digest(f.stdout) == digest(s.stdout) == setup["primary"]


def test_blocked_registry_is_refused(registry: RegistryServer, setup: dict, tmp_path: Path) -> None:
    name = f"docker://{registry.host}/test/blocked/x:1"
    f, s = both("--registries-conf", setup["conf"], "inspect", name)
    assert f.returncode == s.returncode == 1
    assert "blocked" in s.stderr and f.stderr.startswith("Error: ") and "blocked" in f.stderr
    run = ferry("--registries-conf", setup["conf"], "copy", f"dir:{tmp_path}/none", name)
    assert run.returncode == 1


def test_docker_names_never_use_aliases(setup: dict) -> None:
    """As in skopeo, docker:// names are always qualified: ``short`` is docker.io/library/short, not the alias."""
    conf = load(setup["conf"])
    assert conf.aliases["short"].endswith(setup["repo"])
    assert conf.unqualified_search_registries == ["docker.io"]
    assert conf.entry_for(Reference.parse("short")) is None


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[[registry]\n")
    run = ferry("--registries-conf", str(bad), "inspect", "docker://localhost:1/x:1")
    assert (
        run.returncode == 1 and run.stderr.startswith("Error: registries.conf ") and len(run.stderr.splitlines()) == 1
    )
    v1 = tmp_path / "v1.conf"
    v1.write_text('[registries.search]\nregistries = ["docker.io"]\n')
    with pytest.raises(InvalidInput, match="version 1"):
        load(str(v1))
    run = ferry("--registries-conf", str(tmp_path / "missing.conf"), "inspect", "docker://localhost:1/x:1")
    assert run.returncode == 1 and "no such file" in run.stderr


def test_registries_d_parsed(tmp_path: Path) -> None:
    d = tmp_path / "registries.d"
    d.mkdir()
    (d / "a.yaml").write_text(
        "default-docker:\n  lookaside: file:///var/sigs\n"
        "docker:\n  example.com/team:\n    use-sigstore-attachments: true\n"
        "  example.com:\n    lookaside: https://sigs.example.com\n"
    )
    conf = registries_d(str(d))
    assert conf.for_reference(Reference.parse("example.com/team/app:1")).use_sigstore_attachments
    assert conf.for_reference(Reference.parse("example.com/other:1")).lookaside == "https://sigs.example.com"
    assert conf.for_reference(Reference.parse("quay.io/x:1")).lookaside == "file:///var/sigs"
    (d / "b.yaml").write_text("docker:\n  example.com:\n    lookaside: x\n")
    run = ferry("--registries.d", str(d), "inspect", "docker://localhost:1/x:1")
    assert run.returncode == 1 and "more than once" in run.stderr


# ---------------------------------------------------------------------------------------------- queued (--queue)

QUEUE_DB = 11


@pytest.fixture(scope="module")
def conf_queue(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real worker with no registries.conf of its own (an empty file) and no TLS flags: whatever it applies
    comes from the producer's job."""
    url = redis_server.url_for(QUEUE_DB)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    home = tmp_path_factory.mktemp("conf-worker")
    (home / "empty.conf").write_text("")
    (home / "auth.json").write_text("{}")
    env = {"CONTAINERS_REGISTRIES_CONF": str(home / "empty.conf"), "REGISTRY_AUTH_FILE": str(home / "auth.json")}
    worker = start_worker(url, "conf@%h", home, concurrency=2, env=env)
    try:
        yield url
    finally:
        worker.stop(grace=5)


def landed(registry: RegistryServer, repo: str) -> str:
    run = ferry("inspect", "--tls-verify=false", "--no-tags", f"docker://{registry.host}/{repo}")
    assert run.returncode == 0, run.stderr
    return digest(run.stdout)


def test_queued_copy_applies_the_producers_registries_conf(
    registry: RegistryServer, setup: dict, conf_queue: str
) -> None:
    """A mirror (which holds a different image), a prefix rewrite, insecure registries and no TLS flag: the worker
    reads where the producer read, as the embedded copy and skopeo do. Pushes are never rewritten (containers/image
    applies registries.conf redirection to reads only): a rewritten destination prefix is refused by all three."""
    conf = setup["conf"]
    leaf = f"queued-{secrets.token_hex(3)}"
    name = setup["repo"].rsplit("/", 1)[1]
    sources = {
        "mirror": (f"docker://{registry.host}/{setup['repo']}:v1", setup["mirror"]),
        "rewrite": (f"docker://example.invalid/team/{name}:only-primary", setup["primary"]),
    }
    for kind, (src, want) in sources.items():
        dest = f"docker://{registry.host}/test/{leaf}-{kind}-{{tool}}:v1"
        f, s = both("--registries-conf", conf, "copy", src, dest)
        assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
        queued = dest.replace("{tool}", "queued")
        q = ferry("--registries-conf", conf, "copy", "--queue", conf_queue, "--wait", src, queued)
        assert q.returncode == 0, q.stderr
        for tool in ("ferry", "skopeo", "queued"):
            assert landed(registry, f"test/{leaf}-{kind}-{tool}:v1") == want, (kind, tool)
    src = sources["mirror"][0]
    f, s = both("--registries-conf", conf, "copy", src, f"docker://example.invalid/team/{leaf}:v1")
    assert f.returncode == s.returncode == 1 and "example.invalid" in f.stderr, (f.stderr, s.stderr)
    # a blocked source is refused before any job exists
    dest = f"docker://{registry.host}/test/{leaf}-never:v1"
    blocked = ferry(
        "--registries-conf", conf, "copy", "--queue", conf_queue, f"docker://{registry.host}/test/blocked/x:1", dest
    )
    assert blocked.returncode == 1 and "blocked in registries.conf" in blocked.stderr
    assert blocked.stdout == ""  # no job id printed


def test_queued_sync_applies_the_producers_registries_conf(
    registry: RegistryServer, setup: dict, conf_queue: str
) -> None:
    conf = setup["conf"]
    leaf = f"qsync-{secrets.token_hex(3)}"
    src = f"{registry.host}/{setup['repo']}"
    flags = ["--src", "docker", "--dest", "docker"]
    runs = {
        "embedded": ferry("--registries-conf", conf, "sync", *flags, src, f"{registry.host}/test/{leaf}-embedded"),
        "queued": ferry(
            "--registries-conf",
            conf,
            "sync",
            *flags,
            "--queue",
            conf_queue,
            "--wait",
            src,
            f"{registry.host}/test/{leaf}-queued",
        ),
        "skopeo": skopeo(
            "--registries-conf", conf, "sync", *flags, src, f"{registry.host}/test/{leaf}-skopeo", check=False
        ),
    }
    name = setup["repo"].rsplit("/", 1)[1]
    for mode, run in runs.items():
        assert run.returncode == 0, (mode, run.stderr)
        # v1 from the mirror, only-primary from the primary (the mirror lacks it)
        assert landed(registry, f"test/{leaf}-{mode}/{name}:v1") == setup["mirror"], mode
        assert landed(registry, f"test/{leaf}-{mode}/{name}:only-primary") == setup["primary"], mode


def test_tags_are_listed_at_the_name_as_given(registry: RegistryServer, registry2: RegistryServer, setup: dict) -> None:
    """list-tags, inspect's RepoTags and sync's discovery never ask a mirror (which may hold fewer tags), as skopeo."""
    repo = setup["repo"]
    push_image(registry2.url, repo, "latest", build_image("conf-mirror-latest", layers=[100]))
    conf = setup["conf"]
    f, s = both("--registries-conf", conf, "list-tags", f"docker://{registry.host}/{repo}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert json.loads(f.stdout)["Tags"] == json.loads(s.stdout)["Tags"]
    assert sorted(json.loads(f.stdout)["Tags"]) == ["only-primary", "v1"]
    f, s = both("--registries-conf", conf, "inspect", f"docker://{registry.host}/{repo}:v1")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert json.loads(f.stdout)["RepoTags"] == json.loads(s.stdout)["RepoTags"]
    assert sorted(json.loads(f.stdout)["RepoTags"]) == ["only-primary", "v1"]
    assert digest(f.stdout) == setup["mirror"]
    # a blocked repository: list-tags and delete are refused too
    for verb in ("list-tags", "delete"):
        name = f"docker://{registry.host}/test/blocked/x" + (":1" if verb == "delete" else "")
        f, s = both("--registries-conf", conf, verb, name)
        assert f.returncode == s.returncode == 1, (verb, f.stderr, s.stderr)
        assert "blocked" in f.stderr and "blocked" in s.stderr, verb


def test_verify_reads_the_destination_itself(registry: RegistryServer, registry2: RegistryServer, setup: dict) -> None:
    """A mirror of the destination registry that holds something else under the same name is never read."""
    conf = setup["conf"]
    leaf = f"verify-{secrets.token_hex(3)}"
    src, dest = f"{registry.host}/{setup['repo']}", f"{registry.host}/test/{leaf}"
    name = setup["repo"].rsplit("/", 1)[1]
    push_image(registry2.url, f"test/{leaf}/{name}", "v1", build_image("conf-decoy", layers=[150]))
    flags = ["--src", "docker", "--dest", "docker"]
    run = ferry("--registries-conf", conf, "sync", *flags, src, dest)
    assert run.returncode == 0, run.stderr
    run = ferry("--registries-conf", conf, "verify", *flags, src, dest)
    assert run.returncode == 0, (run.stdout, run.stderr)
