"""``ferry verify`` and ``sync --verify`` (issue #13) against real registries.

A sync is verified complete; then the destination is damaged the ways a migration goes wrong, each
caught and named in the JSON report with exit 1: a missing tag, a tag on a different digest, a blob
removed from the destination registry's storage directory, and a child manifest of an index deleted.
A converted copy (``--format v2s2``) is accepted as a valid counterpart, with and without the digest memo.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import build_image, build_multiarch, cosign_signature_tag, push_cosign_signature, push_index
from tests.harness.servers import RegistryServer
from tests.test_sync import INSECURE, blob_data, ferry, images, push_all, tag_digests

RegistryFactory = Callable[..., RegistryServer]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    d = tmp_path / "ferry-cache"
    d.mkdir()
    return d


def verify(*args: str, cache: Path, report: Path, check: bool) -> dict[str, Any]:
    ferry("verify", *args, "--summary-json", str(report), cache=cache, check=check)
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def delete_manifest(reg: RegistryServer, repo: str, digest: str) -> None:
    with reg.client() as c:
        assert c.delete(f"/v2/{repo}/manifests/{digest}").status_code == 202


def test_verify_catches_missing_tag_wrong_digest_missing_blob_and_child_manifest(
    registry: RegistryServer, registry_factory: RegistryFactory, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    dest_reg = registry_factory()  # its storage directory is damaged below
    repo = f"{unique_repo}/app"
    app = images(repo, ["v1", "v2", "v3"])
    push_all(registry, repo, app)
    idx = build_multiarch(f"{repo}/multi", platforms=("linux/amd64", "linux/arm64"), layers=[300])
    push_index(registry.url, repo, "multi", idx)
    sig = push_cosign_signature(registry.url, repo, app["v1"])
    args = ("--src", "docker", "--dest", "docker", "--all", *INSECURE, f"{registry.host}/{repo}", f"{dest_reg.host}/m")
    proc = ferry("sync", *args, "--verify", cache=cache)
    assert "Verify complete: 5 tag(s) checked, 5 complete (0 converted)" in proc.stderr

    report = tmp_path / "verify.json"
    ok = verify(*args, cache=cache, report=report, check=True)
    assert ok["complete"] is True and ok["tags_checked"] == 5 and ok["tags_complete"] == 5
    assert ok["missing_tags"] == ok["differing_digests"] == ok["missing_blobs"] == ok["missing_manifests"] == []

    # damage the destination, one problem per kind
    dst = f"{dest_reg.host}/m/app"
    delete_manifest(dest_reg, "m/app", str(app["v2"].digest))  # v2's only tag goes with it
    wrong = build_image(f"{repo}/wrong", layers=[100])
    push_all(dest_reg, "m/app", {"v3": wrong})
    lost_layer = app["v1"].layers[0].digest
    shutil.rmtree(blob_data(dest_reg, str(lost_layer)).parent)
    arm = idx.child("linux/arm64")
    delete_manifest(dest_reg, "m/app", str(arm.digest))

    bad = verify(*args, cache=cache, report=report, check=False)
    assert bad["complete"] is False
    assert bad["missing_tags"] == [
        {"source": f"docker://{registry.host}/{repo}:v2", "destination": f"docker://{dst}:v2"}
    ]
    assert bad["differing_digests"] == [
        {
            "source": f"docker://{registry.host}/{repo}:v3",
            "destination": f"docker://{dst}:v3",
            "source_digest": str(app["v3"].digest),
            "expected_digest": str(app["v3"].digest),
            "destination_digest": str(wrong.digest),
        }
    ]
    assert bad["missing_blobs"] == [
        {"destination": f"docker://{dst}:v1", "manifest": str(app["v1"].digest), "digest": str(lost_layer)}
    ]
    assert bad["missing_manifests"] == [
        {"destination": f"docker://{dst}:multi", "manifest": str(idx.digest), "digest": str(arm.digest)}
    ]
    # the signature of v1 is still there and complete: the only one of the five
    assert bad["tags_complete"] == 1
    assert tag_digests(dest_reg, "m/app")[cosign_signature_tag(app["v1"].digest)] == str(sig.digest)

    # a re-sync repairs what it can see (missing and different tags); the blob and the child stay lost
    # for sync's HEAD-only check, and verify still says so
    proc = ferry("sync", *args, "--verify", cache=cache, check=False)
    assert proc.returncode == 1
    assert "Missing blob" in proc.stdout and "Missing child manifest" in proc.stdout


def test_verify_accepts_a_converted_copy_and_refuses_other_digests(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    repo = f"{unique_repo}/app"
    push_all(registry, repo, images(repo, ["v1", "v2"]))
    src, dst = f"{registry.host}/{repo}", f"{registry2.host}/{unique_repo}-dst"
    base = ("--src", "docker", "--dest", "docker", *INSECURE)
    ferry("sync", *base, "--format", "v2s2", src, dst, cache=cache)
    converted = tag_digests(registry2, f"{unique_repo}-dst/app")
    report = tmp_path / "v.json"

    # with the digest memo of that sync: two HEADs decide
    with_memo = verify(*base, "--format", "v2s2", src, dst, cache=cache, report=report, check=True)
    assert {c["decided_by"] for c in with_memo["converted"]} == {"digest memo of an earlier sync"}
    assert {c["destination_digest"] for c in with_memo["converted"]} == set(converted.values())

    # without it (another machine): the source is read and planned as sync would
    fresh = tmp_path / "fresh-cache"
    fresh.mkdir()
    planned = verify(*base, "--format", "v2s2", src, dst, cache=fresh, report=report, check=True)
    assert len(planned["converted"]) == 2
    assert {c["decided_by"] for c in planned["converted"]} == {"the digest a sync with these options writes"}

    # without --format the OCI digests are expected, and the v2s2 copies are not them
    strict = verify(*base, src, dst, cache=fresh, report=report, check=False)
    assert len(strict["differing_digests"]) == 2 and strict["converted"] == []


def test_verify_rejects_bad_input_in_one_line(registry: RegistryServer, tmp_path: Path, cache: Path) -> None:
    proc = ferry("verify", "--src", "docker", "--dest", "oci", "--src-tls-verify=false",
                 f"{registry.host}/nothing/here", str(tmp_path / "none"), cache=cache, check=False)  # fmt: skip
    assert proc.stderr.strip().splitlines() == [
        f"Error: no OCI layout at {tmp_path / 'none'}: index.json does not exist"
    ]
    assert not (tmp_path / "none").exists()


def test_verify_quiet_still_prints_errors(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache: Path
) -> None:
    """``-q`` keeps only the summary line of the findings, never an error (a source that cannot be read)."""
    repo = f"{unique_repo}/app"
    app = images(repo, ["v1"])
    push_all(registry, repo, app)
    args = ("--src", "docker", "--dest", "docker", *INSECURE, "--retry-times=0", f"{registry.host}/{repo}:v1",
            f"{registry2.host}/q")  # fmt: skip
    ferry("sync", *args, cache=cache)
    data = blob_data(registry, str(app["v1"].digest))
    saved = data.with_name("data.saved")
    shutil.move(data, saved)
    try:
        proc = ferry("verify", "-q", *args, cache=cache, check=False)
    finally:
        shutil.move(saved, data)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"{registry2.host}/q" in errors[0], proc.stderr
    assert proc.stdout == ""


def test_verify_an_oci_layout_destination_finds_a_removed_blob_file(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    repo = f"{unique_repo}/app"
    app = images(repo, ["v1", "v2"])
    push_all(registry, repo, app)
    layout = tmp_path / "layout"
    args = ("--src", "docker", "--dest", "oci", "--src-tls-verify=false", f"{registry.host}/{repo}", str(layout))
    ferry("sync", *args, cache=cache)
    report = tmp_path / "v.json"
    assert verify(*args, cache=cache, report=report, check=True)["tags_complete"] == 2

    lost = app["v2"].layers[0].digest
    (layout / "blobs" / "sha256" / lost.hex).unlink()
    bad = verify(*args, cache=cache, report=report, check=False)
    assert bad["missing_blobs"] == [
        {"destination": f"oci:{layout}:app:v2", "manifest": str(app["v2"].digest), "digest": str(lost)}
    ]
    assert bad["complete"] is False and bad["tags_complete"] == 1


def test_verify_reads_a_sync_yaml_file_and_its_naming(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    repo = f"{unique_repo}/tool"
    push_all(registry, repo, images(repo, ["1.0", "1.1", "2.0"]))
    spec = tmp_path / "sync.yml"
    spec.write_text(f"{registry.host}:\n  tls-verify: false\n  images-by-tag-regex:\n    {repo}: ^1\\.\n")
    dst = f"{registry2.host}/{unique_repo}-y"
    args = ("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", str(spec), dst)
    ferry("sync", *args, "--append-suffix", "-m", cache=cache)
    assert set(tag_digests(registry2, f"{unique_repo}-y/tool")) == {"1.0-m", "1.1-m"}
    report = tmp_path / "v.json"
    ok = verify(*args, "--append-suffix", "-m", cache=cache, report=report, check=True)
    assert ok["tags_checked"] == 2 and ok["tags_complete"] == 2
    # without the suffix the names differ: every tag the file selects is missing
    bad = verify(*args, cache=cache, report=report, check=False)
    assert sorted(m["destination"] for m in bad["missing_tags"]) == [
        f"docker://{dst}/tool:1.0",
        f"docker://{dst}/tool:1.1",
    ]
