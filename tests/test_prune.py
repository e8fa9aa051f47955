"""``ferry prune`` (issue #13) against real registries (distribution 2.8 with deletes enabled).

* Retention by count (semver), with include/keep regexes, a digest shared with a kept tag, an index whose
  child a kept tag still points at, and signatures and referrers (the ``sha256-<hex>`` fallback tag) that go
  with a deleted image and stay with a kept one; ``--dry-run`` lists exactly that, with sizes, and writes nothing.
* Retention by age and by creation time from a policy file with a namespace (catalog prefix): the config's
  ``created`` and the ``org.opencontainers.image.created`` annotation stand in for the push time, and the
  report says which.
* A registry that refuses deletes gives one line; a prune killed with SIGKILL half-way finishes on a re-run
  and deletes nothing twice (the registry's access log shows each manifest DELETEd once).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import (
    RegistryAuth,
    build_image,
    build_index,
    cosign_signature_tag,
    push_artifact_referrer,
    push_cosign_signature,
    push_image,
    push_index,
    referrers_tag,
)
from tests.harness.servers import RedisServer, RegistryServer
from tests.test_sync import FERRY, WRITES, ferry, has_manifest, tag_digests

RegistryFactory = Callable[..., RegistryServer]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    d = tmp_path / "ferry-cache"
    d.mkdir()
    return d


def prune(*args: str, cache: Path, check: bool | None = True) -> subprocess.CompletedProcess[str]:
    return ferry("prune", "--tls-verify=false", *args, cache=cache, check=check)


def ago(days: float) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def human(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def test_prune_by_semver_count_keeps_what_kept_tags_need_and_takes_signatures_along(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    repo = f"{unique_repo}/app"
    img = {v: build_image(f"{repo}/{v}", layers=[300]) for v in ("0.9.0", "1.0.0", "1.1.0", "2.0.0", "3.0.0")}
    amd, arm = (build_image(f"{repo}/1.2.0/{p}", layers=[200], platform=p) for p in ("linux/amd64", "linux/arm64"))
    idx = build_index([amd, arm])
    kept_idx = build_index([build_image(f"{repo}/multi/{p}", platform=p) for p in ("linux/amd64", "linux/arm64")])
    with registry.client() as c:
        for tag, image in img.items():
            push_image(c, repo, tag, image)
        push_image(c, repo, "latest", img["1.0.0"])  # shares 1.0.0's digest
        push_index(c, repo, "1.2.0", idx)
        push_image(c, repo, "arm-1.2.0", arm)  # a kept tag on a child of the index that goes
        push_index(c, repo, "multi", kept_idx)  # a kept index ...
        push_image(c, repo, "1.0.5", kept_idx.children[0])  # ... lists the manifest of a tag due for deletion
    sig_old = push_cosign_signature(registry.url, repo, img["1.1.0"])
    ref_old = push_artifact_referrer(registry.url, repo, img["1.1.0"])
    sig_new = push_cosign_signature(registry.url, repo, img["3.0.0"])
    before = tag_digests(registry, repo)
    rules = ("--keep-latest", "2", "--include-tags", r"^\d", "--keep-tags", r"^0\.9\.")
    name = f"{registry.host}/{repo}"

    mark = registry.log_mark()
    report = tmp_path / "dry.json"
    proc = prune(*rules, "--dry-run", "--summary-json", str(report), name, cache=cache)
    assert [(m, p) for m, p in registry.requests(mark) if m in WRITES] == []
    assert tag_digests(registry, repo) == before
    old = img["1.1.0"]
    old_size = len(old.manifest) + len(old.config) + sum(ly.size for ly in old.layers)
    going = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("Would delete"))
    assert going == sorted(
        [
            f"Would delete {name}:1.1.0 ({old.digest}, {human(old_size)}): beyond the 2 latest by semver",
            f"Would delete {name}:1.2.0 ({idx.digest}, {human(len(idx.manifest))}): beyond the 2 latest by semver",
            f"Would delete {name}@{amd.digest} ({human(amd.size + len(amd.config) + amd.layers[0].size)}): "
            f"child manifest of {idx.digest}",
            f"Would delete {name}:{cosign_signature_tag(old.digest)} ({sig_old.digest}, "
            f"{human(sig_old.size + sum(len(b) for _, b in sig_old.blobs))}): signature of {old.digest}",
            f"Would delete {name}:{referrers_tag(old.digest)} ({before[referrers_tag(old.digest)]}, "
            f"{human(len(_raw(registry, repo, referrers_tag(old.digest))))}): referrers index of {old.digest}",
            f"Would delete {name}@{ref_old.digest} ({human(ref_old.size + sum(len(b) for _, b in ref_old.blobs))}):"
            f" referrer of {old.digest}",
        ]
    )
    dry = json.loads(report.read_text())
    kept = {d["reference"].rsplit(":", 1)[1]: d["reason"] for d in dry["kept"]}
    assert kept == {
        "0.9.0": r"matches keep-tags ^0\.9\.",
        "1.0.0": "shares its digest with the kept tag latest",
        "2.0.0": "among the 2 latest by semver",
        "3.0.0": "among the 2 latest by semver",
        "latest": "not selected by include-tags",
        "arm-1.2.0": "not selected by include-tags",
        "multi": "not selected by include-tags",
        "1.0.5": "the kept index multi lists its manifest",
    }
    assert "nothing was deleted" in proc.stderr

    proc = prune(*rules, "--summary-json", str(tmp_path / "run.json"), name, cache=cache)
    after = tag_digests(registry, repo)
    gone = {"1.1.0", "1.2.0", cosign_signature_tag(old.digest), referrers_tag(old.digest)}
    assert after == {t: d for t, d in before.items() if t not in gone}
    assert after[cosign_signature_tag(img["3.0.0"].digest)] == str(sig_new.digest)  # a kept image keeps its own
    assert not has_manifest(registry, repo, str(amd.digest)) and not has_manifest(registry, repo, str(ref_old.digest))
    assert has_manifest(registry, repo, str(arm.digest))
    assert all(has_manifest(registry, repo, str(child.digest)) for child in kept_idx.children)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["manifests_deleted"] == 6 and run["failed"] == [] and run["dry_run"] is False
    # nothing left to do: a second run deletes nothing
    again = prune(*rules, "--summary-json", str(tmp_path / "again.json"), name, cache=cache)
    assert json.loads((tmp_path / "again.json").read_text())["deleted"] == [], again.stdout


def _raw(reg: RegistryServer, repo: str, ref: str) -> bytes:
    from tests.harness.images import fetch_manifest

    return fetch_manifest(reg.url, repo, ref)[0]


def test_prune_by_age_from_a_policy_file_with_a_namespace(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    ns = unique_repo
    a = {t: build_image(f"{ns}/a/{t}", created=ago(days)) for t, days in (("old", 40), ("mid", 20), ("new", 1))}
    recent_note = build_image(f"{ns}/b/x", created=ago(400), annotations={"org.opencontainers.image.created": ago(2)})
    stale = build_image(f"{ns}/b/y", created=ago(400))
    with registry.client() as c:
        for tag, image in a.items():
            push_image(c, f"{ns}/a", tag, image)
        push_image(c, f"{ns}/b", "x", recent_note)
        push_image(c, f"{ns}/b", "y", stale)
    policy = tmp_path / "policy.yml"
    policy.write_text(
        f"{registry.host}:\n"
        "  tls-verify: false\n"
        "  older-than: 30d\n"
        "  images:\n"
        f"    {ns}/a: {{keep-latest: 1, keep-latest-by: created, older-than: 10d}}\n"
        f"  catalog: {{prefix: {ns}/}}\n"
    )
    report = tmp_path / "r.json"
    ferry("prune", "--policy", str(policy), "--summary-json", str(report), cache=cache)
    assert set(tag_digests(registry, f"{ns}/a")) == {"new"}
    assert set(tag_digests(registry, f"{ns}/b")) == {"x"}
    data = json.loads(report.read_text())
    assert sorted(data["repositories"]) == [f"{registry.host}/{ns}/a", f"{registry.host}/{ns}/b"]
    by_tag = {d["reference"].rsplit("/", 1)[1]: d for d in data["deleted"] + data["kept"]}
    assert by_tag["a:new"]["reason"] == "among the 1 latest by created"
    assert by_tag["a:mid"]["reason"] == "beyond the 1 latest by created, older than 10d"
    assert by_tag["a:old"]["created_from"] == "config"
    assert by_tag["b:x"]["reason"] == "not older than 30d" and by_tag["b:x"]["created_from"] == "annotation"
    assert by_tag["b:y"]["reason"] == "older than 30d" and by_tag["b:y"]["created_from"] == "config"


def test_prune_refuses_bad_rules_and_inputs_in_one_line(tmp_path: Path, cache: Path) -> None:
    policy = tmp_path / "p.yml"
    policy.write_text("127.0.0.1:1:\n  images:\n    team/app: {keep-latset: 3}\n")
    cases = [
        (("127.0.0.1:1/team/app",), "Error: prune: no retention rule: give keep-latest, older-than or both"),
        (("--keep-latest", "2", "127.0.0.1:1/team/app:v1"), "Error: prune takes a repository, not an image"),
        (("--older-than", "3 days", "127.0.0.1:1/team/app"), "Error: invalid age '3 days'"),
        (("--policy", str(policy)), f"Error: policy file {policy}: 127.0.0.1:1/team/app: unknown key(s) keep-latset"),
    ]
    for args, expected in cases:
        proc = prune(*args, cache=cache, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith(expected) and len(proc.stderr.splitlines()) == 1, (
            proc.stderr
        )


def test_prune_on_a_registry_that_refuses_deletes_says_so_in_one_line(
    registry_factory: RegistryFactory, unique_repo: str, cache: Path
) -> None:
    reg = registry_factory(extra_config={"storage": {"delete": {"enabled": False}}})
    with reg.client() as c:
        for v in ("1.0.0", "2.0.0"):
            push_image(c, unique_repo, v, build_image(f"{unique_repo}/{v}"))
    before = tag_digests(reg, unique_repo)
    proc = prune("--keep-latest", "1", f"{reg.host}/{unique_repo}", cache=cache, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "does not allow deletes" in lines[0], proc.stderr
    assert "storage.delete.enabled" in lines[0] and "Traceback" not in proc.stderr
    assert tag_digests(reg, unique_repo) == before
    assert not list((cache / "prune").glob("*.jsonl"))  # nothing left to resume


def test_a_refused_deletion_fails_its_repository_only(
    registry_factory: RegistryFactory, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    reg = registry_factory(auth="token")
    assert reg.token_server is not None
    auth = (reg.username or "", reg.password or "")
    for repo in ("open", "locked"):
        for v in ("1.0.0", "2.0.0", "3.0.0"):
            push_image(
                reg.url, f"{unique_repo}/{repo}", v, build_image(f"{unique_repo}/{repo}/{v}"), auth=RegistryAuth(*auth)
            )
    # the token server grants everything but DELETE on .../locked
    reg.token_server.authorizer = lambda user, typ, name, actions: [
        a for a in actions if not (a in ("delete", "*") and name.endswith("/locked"))
    ]

    def tags(repo: str) -> set[str]:
        with reg.client(auth=RegistryAuth(*auth)) as c:
            return set(c.get(f"/v2/{unique_repo}/{repo}/tags/list").json()["tags"])

    policy = tmp_path / "p.yml"
    policy.write_text(f"{reg.host}:\n  tls-verify: false\n  keep-latest: 1\n  catalog: {{prefix: {unique_repo}/}}\n")
    report = tmp_path / "r.json"
    proc = ferry("prune", "--policy", str(policy), "--creds", f"{auth[0]}:{auth[1]}", "--summary-json", str(report),
                 cache=cache, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert tags("open") == {"3.0.0"}
    assert tags("locked") == {"1.0.0", "2.0.0", "3.0.0"}
    data = json.loads(report.read_text())
    assert sorted(f["reference"].rsplit(":", 1)[1] for f in data["failed"]) == ["1.0.0", "2.0.0"]
    assert all("locked" in f["reference"] for f in data["failed"])
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")] == [
        f"Error: deleting {f['reference']}: {f['error']}" for f in data["failed"]
    ]


def test_prune_killed_half_way_finishes_on_a_rerun_and_deletes_nothing_twice(
    registry_factory: RegistryFactory, redis_server: RedisServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    reg = registry_factory()
    queue = redis_server.url_for(9)
    tags = [f"1.{i}.0" for i in range(24)]
    with reg.client() as c:
        for t in tags:
            push_image(c, unique_repo, t, build_image(f"{unique_repo}/{t}", layers=[64]))
    # a shared request budget (through --queue) slows the run down enough to kill it mid-way
    ferry("limit", reg.host, "--rps", "25", "--queue", queue, cache=cache)
    try:
        env = {k: v for k, v in os.environ.items() if k != "FERRY_QUEUE"}
        env["FERRY_CACHE_DIR"] = str(cache)
        argv = [FERRY, "prune", "--tls-verify=false", "--keep-latest", "4", "--parallel", "2", "--queue", queue]
        proc = subprocess.Popen([*argv, f"{reg.host}/{unique_repo}"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        journal_dir = cache / "prune"
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            journals = list(journal_dir.glob("*.jsonl"))
            if journals:
                done = sum(1 for ln in journals[0].read_text().splitlines() if '"done"' in ln)
                if done >= 3:
                    break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"prune ended before it could be killed: {proc.stderr.read() if proc.stderr else ''}"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the tag list only: the registry may still be finishing the DELETE the kill cut off (its manifest
        # gone, its tag link not yet), so a HEAD of a listed tag can answer 404 for a moment
        with reg.client() as c:
            left = c.get(f"/v2/{unique_repo}/tags/list").json()["tags"]
        assert 4 < len(left) < 24, "killed before or after the deletions"

        report = tmp_path / "rerun.json"
        ferry("prune", "--tls-verify=false", "--keep-latest", "4", "--summary-json", str(report),
              f"{reg.host}/{unique_repo}", cache=cache)  # fmt: skip
    finally:
        ferry("limit", reg.host, "--clear", "--queue", queue, cache=cache)
    assert set(tag_digests(reg, unique_repo)) == {"1.23.0", "1.22.0", "1.21.0", "1.20.0"}
    data: dict[str, Any] = json.loads(report.read_text())
    assert data["resumed"] > 0 and data["failed"] == []
    assert not list((cache / "prune").glob("*.jsonl"))
    accepted = Counter(e.path for e in reg.access_log() if e.method == "DELETE" and e.status == 202)
    assert len(accepted) == 20 and set(accepted.values()) == {1}


def test_ages_and_creation_times_are_read_like_the_tools_that_write_them() -> None:
    from worker.engine.prune import _parse_time, parse_age
    from worker.registry import InvalidInput

    assert [parse_age(a) for a in ("30d", "2w", "12h", "1h30m", "90s", "45")] == [
        30 * 86400, 14 * 86400, 12 * 3600, 5400, 90, 45,
    ]  # fmt: skip
    for bad in ("", "3 days", "10y", "d"):
        with pytest.raises(InvalidInput):
            parse_age(bad)
    # Go's RFC 3339 with nanoseconds, an offset, and the zero time cosign writes (unknown)
    assert _parse_time("2024-05-01T10:00:00.123456789Z") == dt.datetime(2024, 5, 1, 10, 0, 0, 123456, dt.UTC)
    assert _parse_time("2024-05-01T12:00:00+02:00") == dt.datetime(2024, 5, 1, 10, 0, 0, tzinfo=dt.UTC)
    assert _parse_time("0001-01-01T00:00:00Z") is None and _parse_time("yesterday") is None
