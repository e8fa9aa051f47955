"""``ferry sync`` (issue #5) against real registries, checked at the registries and against skopeo 1.9.

* A skopeo sync YAML file runs unchanged and leaves the same tags and digests at the destination as
  ``skopeo sync`` of the same file (explicit tags, all tags, tag regex, a multi-arch index with and without
  ``--all``); ``--scoped`` and plain naming of ``--dest dir`` trees and ``--src dir`` sources match skopeo's.
* Ferry's extensions: ``images-by-semver``, ``exclude-tags``, ``keep-latest``, per-entry ``platforms``,
  ``--append-suffix``, ``--platform``, ``--src oci``, ``--dest oci``.
* Signatures (cosign ``.sig`` tags) and OCI referrers (via the tag-schema fallback) travel along with identical
  digests unless ``--remove-signatures``.
* ``--dry-run`` writes nothing; ``--delete`` removes only tags the source no longer has, in synced repositories,
  and keeps (and reports) a stale tag whose manifest is still needed.
* A re-sync of an unchanged set costs HEAD requests only (counted in both registries' access logs), a failed
  image does not stop the others with ``--keep-going``, a rerun after a failure copies only what is missing,
  and the same sync through two real Celery workers gives the same destination as the embedded one.

Every CLI run gets a private ``FERRY_CACHE_DIR`` (the digest memo of the fast path lives there).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import redis

from tests.harness.images import (
    Format,
    Image,
    build_image,
    build_multiarch,
    cosign_signature_tag,
    fetch_manifest,
    push_artifact_referrer,
    push_cosign_signature,
    push_image,
    push_index,
    referrers_tag,
)
from tests.harness.peer import skopeo
from tests.harness.servers import AccessLogEntry, RedisServer, RegistryServer
from tests.harness.workers import WorkerProcess, start_worker
from worker.registry import MediaType

FERRY = str(Path(sys.executable).with_name("ferry"))
INSECURE = ("--src-tls-verify=false", "--dest-tls-verify=false")
ACCEPT = ", ".join(
    (MediaType.OCI_INDEX, MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST_LIST, MediaType.DOCKER_MANIFEST)
)
SIGNATURE_TAG = re.compile(r"sha256-[0-9a-f]{64}(\.(sig|att|sbom))?")
WRITES = ("PUT", "POST", "PATCH", "DELETE")
#: the Redis database of the distributed sync test's queue (flushed before use)
QUEUE_DB = 5

State = dict[str, dict[str, str]]  # repository -> tag -> manifest digest
RegistryFactory = Callable[..., RegistryServer]


# --------------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    d = tmp_path / "ferry-cache"
    d.mkdir()
    return d


def ferry(
    *args: str, cache: Path, check: bool | None = True, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run ``ferry ARGS`` with a private cache; ``check=True`` wants exit 0, ``False`` non-zero, ``None`` either."""
    full_env = {k: v for k, v in os.environ.items() if k != "FERRY_QUEUE"}
    full_env.update({"FERRY_CACHE_DIR": str(cache), **(env or {})})
    proc = subprocess.run(
        [FERRY, *args], capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL
    )
    if check is True:
        assert proc.returncode == 0, f"ferry {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    elif check is False:
        assert proc.returncode != 0, f"ferry {' '.join(args)} should have failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def sync(
    *args: str, cache: Path, check: bool | None = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return ferry("sync", *args, cache=cache, check=check, env=env)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tag_digests(reg: RegistryServer, repo: str) -> dict[str, str]:
    """Every tag of ``repo`` and the digest its manifest HEAD reports (empty if the repository is unknown)."""
    out: dict[str, str] = {}
    with reg.client() as c:
        resp = c.get(f"/v2/{repo}/tags/list")
        if resp.status_code == 404:
            return out
        resp.raise_for_status()
        for tag in resp.json().get("tags") or []:
            head = c.head(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
            head.raise_for_status()
            out[tag] = head.headers["docker-content-digest"]
    return out


def registry_state(reg: RegistryServer, prefix: str) -> State:
    """``{repository (without prefix): {tag: digest}}`` of every repository under ``prefix`` with tags."""
    repos: list[str] = []
    with reg.client() as c:
        url: str | None = "/v2/_catalog?n=1000"
        while url:
            resp = c.get(url)
            resp.raise_for_status()
            repos += resp.json().get("repositories") or []
            link = re.match(r"<([^>]+)>", resp.headers.get("link", ""))
            url = link.group(1) if link else None
    out: State = {}
    for repo in repos:
        if repo.startswith(prefix):
            tags = tag_digests(reg, repo)
            if tags:
                out[repo[len(prefix) :]] = tags
    return out


def without_signatures(state: State) -> State:
    return {repo: {t: d for t, d in tags.items() if not SIGNATURE_TAG.fullmatch(t)} for repo, tags in state.items()}


def has_manifest(reg: RegistryServer, repo: str, ref: str) -> bool:
    with reg.client() as c:
        return c.head(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}).status_code == 200


def index_platforms(reg: RegistryServer, repo: str, ref: str) -> list[str]:
    raw, _ = fetch_manifest(reg.url, repo, ref)
    return [f"{m['platform']['os']}/{m['platform']['architecture']}" for m in json.loads(raw)["manifests"]]


def images(seed: str, tags: list[str], fmt: Format = "oci") -> dict[str, Image]:
    """One small image per tag (distinct digests)."""
    return {t: build_image(f"{seed}/{t}", layers=[200 + i], fmt=fmt) for i, t in enumerate(tags)}


def push_all(reg: RegistryServer, repo: str, imgs: dict[str, Image]) -> None:
    with reg.client() as c:
        for tag, img in imgs.items():
            push_image(c, repo, tag, img)


def untag(reg: RegistryServer, repo: str, tag: str) -> None:
    """Remove a tag at the source the way an operator's cleanup would (distribution 2.8 cannot DELETE a tag)."""
    path = reg.storage_dir / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag
    assert path.is_dir(), path
    shutil.rmtree(path)


def blob_data(reg: RegistryServer, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return reg.storage_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def writes(reg: RegistryServer, since: int, under: str = "") -> list[tuple[str, str]]:
    """PUT/POST/PATCH/DELETE requests since ``since`` (to repositories under ``under``, if given)."""
    return [(m, p) for m, p in reg.requests(since) if m in WRITES and p.startswith(f"/v2/{under}")]


def copied_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("Copied ")]


def image_dirs(root: Path) -> dict[str, str]:
    """Relative path of every ``dir:`` image under ``root`` -> sha256 of its manifest.json."""
    out = {}
    for manifest in root.rglob("manifest.json"):
        out[str(manifest.parent.relative_to(root))] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1. a skopeo sync YAML file, unchanged: same destination as skopeo sync


def test_skopeo_yaml_gives_same_tags_and_digests_as_skopeo(
    registry: RegistryServer, registry_factory: RegistryFactory, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    src, ns = registry, unique_repo
    app = images(f"{ns}/app", ["v1", "v2", "v3"])
    push_all(src, f"{ns}/app", app)
    tools = images(f"{ns}/tools", ["a", "b"], fmt="v2s2")
    push_all(src, f"{ns}/tools", tools)
    lib = images(f"{ns}/lib", ["1.0.0", "1.1.0", "2.0.0", "dev"])
    push_all(src, f"{ns}/lib", lib)
    multi = build_multiarch(f"{ns}/multi", layers=[256])
    push_index(src.url, f"{ns}/multi", "1.0", multi)
    # cosign signatures: skopeo copies a .sig tag only when the tag selection includes it (all tags of
    # `tools`); Ferry brings the signature of every image it copies
    sig_app = push_cosign_signature(src.url, f"{ns}/app", app["v1"])
    push_cosign_signature(src.url, f"{ns}/tools", tools["a"])

    spec = write_yaml(
        tmp_path / "sync.yml",
        f"""\
{src.host}:
  tls-verify: false
  images:
    {ns}/app:
      - v1
      - v2
    {ns}/tools: []
    {ns}/multi: []
    {ns}/lib: [1.1.0]
  images-by-tag-regex:
    {ns}/lib: ^1\\.
""",
    )
    reg_a, reg_b = registry_factory(), registry_factory()
    for flags, dest in (((), "mirror"), (("--all",), "mirror-all")):
        skopeo("sync", "--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", *flags, str(spec),
               f"{reg_a.host}/{dest}")  # fmt: skip
        proc = sync("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", *flags, str(spec),
                    f"{reg_b.host}/{dest}", cache=cache)  # fmt: skip
        # lib:1.1.0 is named twice (a listed tag that the regex matches too): copied once
        copied = [ln.split(" (")[0] for ln in copied_lines(proc)]
        assert len(copied) == len(set(copied)) == 9, proc.stdout

    theirs, ours = registry_state(reg_a, ""), registry_state(reg_b, "")
    # what skopeo made: the selection, as expected (so that the comparison below compares something)
    assert set(theirs) == {f"{d}/{r}" for d in ("mirror", "mirror-all") for r in ("app", "tools", "lib", "multi")}
    assert set(without_signatures(theirs)["mirror/app"]) == {"v1", "v2"}
    assert set(without_signatures(theirs)["mirror/lib"]) == {"1.0.0", "1.1.0"}
    assert theirs["mirror/multi"]["1.0"] == str(multi.child("linux/amd64").digest)
    assert theirs["mirror-all/multi"]["1.0"] == str(multi.digest)

    assert without_signatures(ours) == without_signatures(theirs)
    # everything skopeo wrote, Ferry wrote too (the .sig of tools:a: skopeo took it with "all tags")
    assert set(ours) == set(theirs)
    assert all(theirs[repo].items() <= ours[repo].items() for repo in theirs)
    assert cosign_signature_tag(tools["a"].digest) in theirs["mirror/tools"]
    # and Ferry's only additions are the signatures of the images it copied, with the source's digests
    extra = {repo: {t: dg for t, dg in tags.items() if t not in theirs[repo]} for repo, tags in ours.items()}
    assert {repo: tags for repo, tags in extra.items() if tags} == {
        f"{d}/app": {cosign_signature_tag(app["v1"].digest): str(sig_app.digest)} for d in ("mirror", "mirror-all")
    }

    # and skopeo reads Ferry's copies back byte for byte
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{reg_b.host}/mirror-all/multi:1.0").stdout
    assert hashlib.sha256(raw.encode()).hexdigest() == multi.digest.hex


def test_src_dir_tree_to_registry_matches_skopeo(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    ns = unique_repo
    app = images(f"{ns}/app", ["v1", "v2"], fmt="v2s2")
    push_all(registry, f"{ns}/app", app)
    tool = images(f"{ns}/tool", ["1"])
    push_all(registry, f"{ns}/tool", tool)
    # a tree of dir: images as skopeo writes them (skopeo's own documented layout: <dir>/<name>:<tag>)
    tree = tmp_path / "usb"
    for ref, where in ((f"{ns}/app:v1", "app:v1"), (f"{ns}/app:v2", "app:v2"), (f"{ns}/tool:1", "team/tool:1")):
        (tree / where).parent.mkdir(parents=True, exist_ok=True)
        skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{ref}", f"dir:{tree / where}")

    for flags, expected in (
        ((), {"app": {"v1", "v2"}, "tool": {"1"}}),
        (("--scoped",), {"app": {"v1", "v2"}, "team/tool": {"1"}}),
    ):
        naming = "scoped" if flags else "plain"
        theirs, ours = f"{ns}-skopeo-{naming}", f"{ns}-ferry-{naming}"
        skopeo("sync", "--src", "dir", "--dest", "docker", "--dest-tls-verify=false", *flags, str(tree),
               f"{registry2.host}/{theirs}")  # fmt: skip
        sync("--src", "dir", "--dest", "docker", "--dest-tls-verify=false", *flags, str(tree),
             f"{registry2.host}/{ours}", cache=cache)  # fmt: skip
        skopeo_state = registry_state(registry2, f"{theirs}/")
        assert {repo: set(tags) for repo, tags in skopeo_state.items()} == expected
        assert registry_state(registry2, f"{ours}/") == skopeo_state
    assert skopeo_state["app"] == {t: str(img.digest) for t, img in app.items()}


def test_dest_dir_layout_matches_skopeo_scoped_and_plain(
    registry: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    ns = unique_repo
    app = images(f"{ns}/app", ["v1", "v2"], fmt="v2s2")
    push_all(registry, f"{ns}/app", app)
    # --scoped names include the source registry host with its port: fine as a path, not as a repository
    for flags, prefix in (((), ""), (("--scoped",), f"{registry.host}/{ns}/")):
        theirs, ours = tmp_path / f"skopeo{len(flags)}", tmp_path / f"ferry{len(flags)}"
        skopeo("sync", "--src", "docker", "--dest", "dir", "--src-tls-verify=false", *flags,
               f"{registry.host}/{ns}/app", str(theirs))  # fmt: skip
        sync("--src", "docker", "--dest", "dir", "--src-tls-verify=false", *flags, f"{registry.host}/{ns}/app",
             str(ours), cache=cache)  # fmt: skip
        assert image_dirs(theirs) == {f"{prefix}app:{t}": img.digest.hex for t, img in app.items()}
        assert image_dirs(ours) == image_dirs(theirs)
        for d in image_dirs(ours):
            assert sorted(p.name for p in (ours / d).iterdir()) == sorted(p.name for p in (theirs / d).iterdir())


# --------------------------------------------------------------------------------------------------------------------
# 2. selection and naming: Ferry's YAML extensions, --append-suffix, --all, --platform, oci layouts


def test_yaml_semver_regex_exclude_keep_latest_and_platforms(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    ns = unique_repo
    tags = ["0.9.0", "1.0.0", "1.2.0", "1.5.0-rc.1", "2.0.0", "latest"]
    by_semver = images(f"{ns}/semver", tags)
    push_all(registry, f"{ns}/semver", by_semver)
    by_regex = images(f"{ns}/regex", tags)
    push_all(registry, f"{ns}/regex", by_regex)
    keep = images(f"{ns}/keep", tags)
    push_all(registry2, f"{ns}/keep", keep)
    multi = build_multiarch(f"{ns}/multi", layers=[256])
    push_index(registry2.url, f"{ns}/multi", "1.0.0", multi)
    spec = write_yaml(
        tmp_path / "sync.yml",
        f"""\
{registry.host}:
  tls-verify: false
  images-by-semver:
    {ns}/semver: ">=1.0.0 <2"
  images-by-tag-regex:
    {ns}/regex: '^\\d+\\.\\d+\\.\\d+'
  exclude-tags: ['^0\\.', '-rc']
{registry2.host}:
  tls-verify: false
  images:
    {ns}/keep: []
    {ns}/multi: [1.0.0]
  images-by-semver:
    {ns}/keep: ["0.x", "=7"]
  exclude-tags: ['-rc']
  keep-latest: 2
  keep-latest-by: semver
  platforms: [linux/arm64]
""",
    )
    sync("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", str(spec), f"{registry2.host}/{ns}-dst",
         cache=cache)  # fmt: skip
    state = registry_state(registry2, f"{ns}-dst/")
    multi_digest = state.get("multi", {}).get("1.0.0", "")
    assert state == {
        # 1.5.0-rc.1 is in range but a pre-release: only a constraint naming a pre-release selects one
        "semver": {t: str(by_semver[t].digest) for t in ("1.0.0", "1.2.0")},
        # the regex also matches 0.9.0 and 1.5.0-rc.1, which exclude-tags drops
        "regex": {t: str(by_regex[t].digest) for t in ("1.0.0", "1.2.0", "2.0.0")},
        # the 2 highest versions once -rc is excluded ("latest" is no version), and 0.9.0 from a list of
        # constraints (as skopeo's manual writes them)
        "keep": {t: str(keep[t].digest) for t in ("2.0.0", "1.2.0", "0.9.0")},
        "multi": {"1.0.0": multi_digest},
    }
    assert multi_digest != str(multi.digest)  # the index was rewritten to list just linux/arm64
    assert index_platforms(registry2, f"{ns}-dst/multi", "1.0.0") == ["linux/arm64"]
    assert has_manifest(registry2, f"{ns}-dst/multi", str(multi.child("linux/arm64").digest))
    assert not has_manifest(registry2, f"{ns}-dst/multi", str(multi.child("linux/amd64").digest))


def test_all_platform_and_host_platform(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache: Path
) -> None:
    ns = unique_repo
    multi = build_multiarch(f"{ns}/multi", layers=[256])
    push_index(registry.url, f"{ns}/multi", "1.0", multi)
    sig = push_cosign_signature(registry.url, f"{ns}/multi", multi)  # signs the index's digest
    src = f"{registry.host}/{ns}/multi"
    runs = {"all": ["--all"], "arm": ["--platform", "linux/arm64"], "all-arm": ["--all", "--platform=linux/arm64"],
            "sys": []}  # fmt: skip
    for name, flags in runs.items():
        sync("--src", "docker", "--dest", "docker", *INSECURE, *flags, src, f"{registry2.host}/{ns}-{name}",
             cache=cache)  # fmt: skip

    # --all: the index as it is, every child, and the index's signature
    sig_tag = cosign_signature_tag(multi.digest)
    assert tag_digests(registry2, f"{ns}-all/multi") == {"1.0": str(multi.digest), sig_tag: str(sig.digest)}
    for child in multi.children:
        assert has_manifest(registry2, f"{ns}-all/multi", str(child.digest))
    # --platform: an index of just that platform (a new digest, which the signature does not sign)
    for name in ("arm", "all-arm"):
        arm = tag_digests(registry2, f"{ns}-{name}/multi")
        assert set(arm) == {"1.0"} and arm["1.0"] != str(multi.digest), name
        assert index_platforms(registry2, f"{ns}-{name}/multi", "1.0") == ["linux/arm64"]
        assert has_manifest(registry2, f"{ns}-{name}/multi", str(multi.child("linux/arm64").digest))
        assert not has_manifest(registry2, f"{ns}-{name}/multi", str(multi.child("linux/amd64").digest))
    # without --all: the image for this machine (linux/amd64), like skopeo
    assert tag_digests(registry2, f"{ns}-sys/multi") == {"1.0": str(multi.child("linux/amd64").digest)}


def test_append_suffix_names_destination_tags_and_delete_understands_it(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache: Path
) -> None:
    ns = unique_repo
    app = images(f"{ns}/app", ["v1", "v2"])
    push_all(registry, f"{ns}/app", app)
    args = ("--src", "docker", "--dest", "docker", *INSECURE, "--append-suffix=-mirror")
    src, dst = f"{registry.host}/{ns}/app", f"{registry2.host}/{ns}-dst"
    sync(*args, src, dst, cache=cache)
    expected = {f"{t}-mirror": str(img.digest) for t, img in app.items()}
    assert tag_digests(registry2, f"{ns}-dst/app") == expected
    # the source's tags are compared with the destination's under their destination names: nothing is stale
    proc = sync(*args, "--delete", src, dst, cache=cache)
    assert "0 tag(s) deleted" in proc.stderr
    assert tag_digests(registry2, f"{ns}-dst/app") == expected
    untag(registry, f"{ns}/app", "v1")
    sync(*args, "--delete", src, dst, cache=cache)
    assert tag_digests(registry2, f"{ns}-dst/app") == {"v2-mirror": str(app["v2"].digest)}


def test_oci_layout_as_destination_and_source(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    ns = unique_repo
    app = images(f"{ns}/app", ["v1", "v2"])
    push_all(registry, f"{ns}/app", app)

    # --dest oci: one layout, each image under the ref name <repository>:<tag>
    layout = tmp_path / "layout"
    sync("--src", "docker", "--dest", "oci", "--src-tls-verify=false", f"{registry.host}/{ns}/app", str(layout),
         cache=cache)  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert refs == {f"app:{t}": str(img.digest) for t, img in app.items()}
    raw = skopeo("inspect", "--raw", f"oci:{layout}:app:v2").stdout
    assert hashlib.sha256(raw.encode()).hexdigest() == app["v2"].digest.hex

    # --src oci: a layout written by skopeo, into a registry
    theirs = tmp_path / "skopeo-layout"
    for t in app:
        skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{ns}/app:{t}", f"oci:{theirs}:app:{t}")
    sync("--src", "oci", "--dest", "docker", "--dest-tls-verify=false", str(theirs), f"{registry2.host}/{ns}-dst",
         cache=cache)  # fmt: skip
    assert registry_state(registry2, f"{ns}-dst/") == {"app": {t: str(img.digest) for t, img in app.items()}}


# --------------------------------------------------------------------------------------------------------------------
# 3. signatures and referrers


def test_signatures_and_referrers_travel_with_their_image(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache: Path
) -> None:
    ns = unique_repo
    repo = f"{ns}/app"
    app = images(repo, ["v1", "v2"])
    push_all(registry, repo, app)
    sig = push_cosign_signature(registry.url, repo, app["v1"])
    art = push_artifact_referrer(registry.url, repo, app["v1"])
    source = tag_digests(registry, repo)
    assert set(source) == {"v1", "v2", cosign_signature_tag(app["v1"].digest), referrers_tag(app["v1"].digest)}

    sync("--src", "docker", "--dest", "docker", *INSECURE, f"{registry.host}/{repo}", f"{registry2.host}/{ns}-dst",
         cache=cache)  # fmt: skip
    assert tag_digests(registry2, f"{ns}-dst/app") == source
    assert source[cosign_signature_tag(app["v1"].digest)] == str(sig.digest)
    # the referrer itself (listed by the fallback index), byte for byte
    raw, _ = fetch_manifest(registry2.url, f"{ns}-dst/app", str(art.digest))
    assert raw == art.manifest

    sync("--src", "docker", "--dest", "docker", *INSECURE, "--remove-signatures", f"{registry.host}/{repo}",
         f"{registry2.host}/{ns}-nosig", cache=cache)  # fmt: skip
    assert tag_digests(registry2, f"{ns}-nosig/app") == {t: str(img.digest) for t, img in app.items()}
    assert not has_manifest(registry2, f"{ns}-nosig/app", str(art.digest))


# --------------------------------------------------------------------------------------------------------------------
# 4. --dry-run, 5. --delete


def test_dry_run_writes_nothing_and_says_what_it_would_do(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache: Path
) -> None:
    ns = unique_repo
    app = images(f"{ns}/app", ["v1", "v2", "v3"])
    push_all(registry, f"{ns}/app", {t: app[t] for t in ("v1", "v2")})
    args = ("--src", "docker", "--dest", "docker", *INSECURE)
    src, dst = f"{registry.host}/{ns}/app", f"{registry2.host}/{ns}-dst"
    sync(*args, src, dst, cache=cache)
    before = tag_digests(registry2, f"{ns}-dst/app")
    push_all(registry, f"{ns}/app", {"v3": app["v3"]})
    untag(registry, f"{ns}/app", "v1")

    mark = registry2.log_mark()
    proc = sync(*args, "--dry-run", src, dst, cache=cache)
    assert writes(registry2, mark, under=f"{ns}-dst/") == []
    size = sum(ly.size for ly in app["v3"].layers) + len(app["v3"].config)  # what would be transferred
    lines = proc.stdout.splitlines()
    assert f"Would copy docker://{src}:v3 -> docker://{dst}/app:v3 ({size} B)" in lines
    assert f"Would skip docker://{src}:v2 -> docker://{dst}/app:v2: up to date" in lines
    assert not any("delete" in ln.lower() for ln in lines)
    assert "nothing was written" in proc.stderr

    mark = registry2.log_mark()
    proc = sync(*args, "--dry-run", "--delete", src, dst, cache=cache)
    assert writes(registry2, mark, under=f"{ns}-dst/") == []
    assert f"Would delete {dst}/app:v1 ({app['v1'].digest})" in proc.stdout.splitlines()
    assert tag_digests(registry2, f"{ns}-dst/app") == before


def test_delete_removes_only_what_the_source_no_longer_has(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, tmp_path: Path, cache: Path
) -> None:
    ns = unique_repo
    repo = f"{ns}/app"
    app = images(repo, ["v1", "v2", "v3"])
    push_all(registry, repo, app)
    with registry.client() as c:
        push_image(c, repo, "v1-alias", app["v1"])  # same manifest, second tag
        push_image(c, repo, "v2-alias", app["v2"])
    multi = build_multiarch(f"{ns}/multi", platforms=["linux/amd64", "linux/arm64"], layers=[128])
    push_index(registry.url, repo, "1.0", multi)
    push_image(registry.url, repo, "1.0-arm64", multi.child("linux/arm64"))  # a tag on a child of the index
    args = ("--src", "docker", "--dest", "docker", *INSECURE, "--all")
    src, dst = f"{registry.host}/{repo}", f"{registry2.host}/{ns}-dst"
    sync(*args, src, dst, cache=cache)
    # a repository this sync does not manage, next to the managed one
    other = images(f"{ns}/other", ["x"])
    push_all(registry2, f"{ns}-dst/other", other)
    first = tag_digests(registry2, f"{ns}-dst/app")
    assert set(first) == {"v1", "v1-alias", "v2", "v2-alias", "v3", "1.0", "1.0-arm64"}

    for tag in ("v1", "v1-alias", "v2-alias", "1.0-arm64", "v3"):
        untag(registry, repo, tag)
    push_image(registry.url, repo, "v3-final", app["v3"])  # v3 renamed upstream: a new tag, the same manifest
    expected_kept = [
        (f"{dst}/app:1.0-arm64", "the index 1.0 lists its manifest"),
        (f"{dst}/app:v2-alias", "shares its digest with v2"),
        (f"{dst}/app:v3", "shares its digest with v3-final"),  # which this sync is about to write
    ]
    proc = sync(*args, "--delete", "--dry-run", src, dst, cache=cache)
    would = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith(("Would delete", "Would keep")))
    assert would == [
        f"Would delete {dst}/app:v1 ({app['v1'].digest})",
        f"Would delete {dst}/app:v1-alias ({app['v1'].digest})",
        *(f"Would keep {d}: {why}" for d, why in expected_kept),
    ]

    summary = tmp_path / "summary.json"
    proc = sync(*args, "--delete", "--summary-json", str(summary), src, dst, cache=cache)
    after = tag_digests(registry2, f"{ns}-dst/app")
    # v1 and v1-alias (one manifest) are gone. v2-alias shares its manifest with v2, v3 with v3-final, and
    # 1.0-arm64's manifest is part of 1.0: deleting them (a registry deletes manifests, not tags) would take
    # tags the source still has, so they stay
    assert after == {**{t: first[t] for t in ("v2", "v2-alias", "v3", "1.0", "1.0-arm64")}, "v3-final": first["v3"]}
    assert has_manifest(registry2, f"{ns}-dst/app", str(multi.child("linux/arm64").digest))
    assert tag_digests(registry2, f"{ns}-dst/other") == {"x": str(other["x"].digest)}
    report = json.loads(summary.read_text())
    assert sorted(report["deleted"]) == [f"{dst}/app:v1", f"{dst}/app:v1-alias"]
    kept = sorted((k["destination"], k["reason"]) for k in report["kept"])
    assert kept == expected_kept
    assert "2 tag(s) deleted" in proc.stderr
    assert f"Kept {dst}/app:v2-alias: shares its digest with v2" in proc.stderr.splitlines()


# --------------------------------------------------------------------------------------------------------------------
# 6. the fast path: an unchanged set costs HEADs only


def test_resync_of_an_unchanged_set_is_heads_only(
    registry_factory: RegistryFactory, tmp_path: Path, cache: Path
) -> None:
    src, dst = registry_factory(), registry_factory()
    app = images("resync/app", ["v1", "v2"])
    push_all(src, "team/app", app)
    push_cosign_signature(src.url, "team/app", app["v1"])
    push_artifact_referrer(src.url, "team/app", app["v1"])
    multi = build_multiarch("resync/multi", layers=[128])
    push_index(src.url, "team/multi", "1.0", multi)
    spec = write_yaml(
        tmp_path / "sync.yml",
        f"{src.host}:\n  tls-verify: false\n  images:\n    team/app: []\n    team/multi: []\n",
    )
    runs = [
        ("--all", f"{dst.host}/mirror"),
        # digests change at the destination (OCI -> Docker): the digest memo recognizes the converted copies
        ("--format=v2s2", f"{dst.host}/converted"),
    ]
    for flag, dest in runs:
        sync("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", flag, str(spec), dest, cache=cache)
    first = registry_state(dst, "")
    assert first["converted/app"]["v1"] != str(app["v1"].digest)
    assert set(first["mirror/app"]) == {"v1", "v2", cosign_signature_tag(app["v1"].digest),
                                        referrers_tag(app["v1"].digest)}  # fmt: skip

    src_mark, dst_mark = src.log_mark(), dst.log_mark()
    for flag, dest in runs:
        proc = sync("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", flag, str(spec), dest,
                    cache=cache)  # fmt: skip
        assert " 0 copied," in proc.stderr and " 0 failed" in proc.stderr, proc.stderr
        assert copied_lines(proc) == []
    src_log, dst_log = src.access_log(src_mark), dst.access_log(dst_mark)

    def manifest_or_blob(e: AccessLogEntry) -> bool:
        return bool(re.fullmatch(r"/v2/.+/(manifests|blobs)/.+", e.path))

    # the source: HEADs of the manifests; tag lists and the referrers API (404 on distribution 2.8) are fine
    assert [e for e in src_log if e.method != "HEAD" and manifest_or_blob(e)] == []
    assert {e.method for e in src_log} <= {"HEAD", "GET"}
    # the destination: HEADs only, apart from the API version check
    assert [e for e in dst_log if e.method != "HEAD" and e.path != "/v2/"] == []
    # one HEAD per image on each side: mirror has v1, v2, the signature, the referrers index and 1.0;
    # converted has v1, v2 and 1.0
    assert sum(1 for e in dst_log if e.method == "HEAD" and "/manifests/" in e.path) == 8
    assert sum(1 for e in src_log if e.method == "HEAD" and "/manifests/" in e.path) == 8
    assert registry_state(dst, "") == first

    # a lost cache: the converted copies are read once more (nothing is written), then remembered again
    shutil.rmtree(cache)
    cache.mkdir()
    converted = ("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", runs[1][0], str(spec), runs[1][1])
    dst_mark = dst.log_mark()
    sync(*converted, cache=cache)
    assert writes(dst, dst_mark) == []
    src_mark = src.log_mark()
    sync(*converted, cache=cache)
    assert src.count("GET", r"/v2/.+/manifests/.+", since=src_mark) == 0


# --------------------------------------------------------------------------------------------------------------------
# 7. --keep-going, 8. resume


def _broken_source(
    registry_factory: RegistryFactory,
) -> tuple[RegistryServer, RegistryServer, dict[str, Image], Path, bytes]:
    """A source with team/app:a, :b, :c where b's layer is gone from the registry's storage."""
    src, dst = registry_factory(), registry_factory()
    app = images("keep-going/app", ["a", "b", "c"])
    push_all(src, "team/app", app)
    data = blob_data(src, str(app["b"].layers[0].digest))
    saved = data.read_bytes()
    data.unlink()
    return src, dst, app, data, saved


def test_keep_going_copies_the_others_and_reports_the_failure(
    registry_factory: RegistryFactory, tmp_path: Path, cache: Path
) -> None:
    src, dst, app, _data, _saved = _broken_source(registry_factory)
    args = ("--src", "docker", "--dest", "docker", *INSECURE)
    source = f"{src.host}/team/app"

    summary = tmp_path / "summary.json"
    proc = sync(*args, "--keep-going", "--summary-json", str(summary), source, f"{dst.host}/mirror", cache=cache,
                check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert tag_digests(dst, "mirror/app") == {t: str(app[t].digest) for t in ("a", "c")}
    report = json.loads(summary.read_text())
    assert [(f["source"], f["destination"]) for f in report["failures"]] == [
        (f"docker://{source}:b", f"docker://{dst.host}/mirror/app:b")
    ]
    assert str(app["b"].layers[0].digest) in report["failures"][0]["error"]
    assert report["images_copied"] == 2 and report["images_failed"] == 1
    assert f"Error: docker://{source}:b -> docker://{dst.host}/mirror/app:b" in proc.stderr

    # without --keep-going the sync stops at the failure, non-zero, and b is not written
    proc = sync(*args, source, f"{dst.host}/stop", cache=cache, check=False)
    assert proc.returncode == 1, proc.stderr
    assert str(app["b"].layers[0].digest) in proc.stderr
    assert "b" not in tag_digests(dst, "stop/app")


def test_rerun_after_a_failure_copies_only_what_is_missing(
    registry_factory: RegistryFactory, tmp_path: Path, cache: Path
) -> None:
    src, dst, app, data, saved = _broken_source(registry_factory)
    args = ("--src", "docker", "--dest", "docker", *INSECURE)
    source, dest = f"{src.host}/team/app", f"{dst.host}/mirror"
    sync(*args, "--keep-going", source, dest, cache=cache, check=False)
    assert set(tag_digests(dst, "mirror/app")) == {"a", "c"}

    data.write_bytes(saved)  # the source is repaired
    with dst.client() as c:
        missing = {
            str(d) for d, _size, _blob in app["b"].blobs() if c.head(f"/v2/mirror/app/blobs/{d}").status_code != 200
        }
    assert str(app["b"].layers[0].digest) in missing
    mark = dst.log_mark()
    proc = sync(*args, source, dest, cache=cache)
    log = dst.access_log(mark)
    written = {q["digest"][0] for e in log if e.method == "PUT" and "/blobs/uploads/" in e.path
               for q in [parse_qs(e.query)]}  # fmt: skip
    # mounts that brought a blob (201); a 201 to a mount from mirror/app itself says it was there already
    mounted = {
        q["mount"][0]
        for e in log
        if e.method == "POST" and "mount=" in e.query and e.status == 201
        for q in [parse_qs(e.query)]
        if q["from"][0] != "mirror/app"
    }
    assert written | mounted == missing
    # what was there already was found so, never uploaded again
    present = {
        q["mount"][0]
        for e in log
        if e.method == "POST" and "mount=" in e.query and e.status == 201
        for q in [parse_qs(e.query)]
        if q["from"][0] == "mirror/app"
    }
    assert not present & written
    assert [e.path for e in log if e.method == "PUT" and "/manifests/" in e.path] == ["/v2/mirror/app/manifests/b"]
    assert "2 up to date" in proc.stderr
    assert tag_digests(dst, "mirror/app") == {t: str(img.digest) for t, img in app.items()}


# --------------------------------------------------------------------------------------------------------------------
# 9. the same sync on two Celery workers


@pytest.fixture
def queue_workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    url = redis_server.url_for(QUEUE_DB)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    procs: list[WorkerProcess] = []
    try:
        for n in (1, 2):
            procs.append(start_worker(url, f"w{n}@%h", tmp_path / "workers", concurrency=2, wait=False))
        for w in procs:
            w.wait_ready()
        yield url
    finally:
        for w in procs:
            w.kill()


def test_sync_on_celery_workers_gives_the_same_destination(
    registry: RegistryServer, registry2: RegistryServer, tls_registry: RegistryServer, unique_repo: str,
    tmp_path: Path, cache: Path, queue_workers: str,
) -> None:  # fmt: skip
    ns = unique_repo
    app = images(f"{ns}/app", ["v1", "v2", "v3"])
    push_all(registry, f"{ns}/app", app)
    push_cosign_signature(registry.url, f"{ns}/app", app["v1"])
    multi = build_multiarch(f"{ns}/multi", layers=[128])
    push_index(registry.url, f"{ns}/multi", "1.0", multi)
    push_all(tls_registry, f"{ns}/secure", images(f"{ns}/secure", ["1"]))
    # two source registries reached differently: plain HTTP, and HTTPS verified with the test CA; the workers
    # must apply each entry's settings to its registry
    spec = write_yaml(
        tmp_path / "sync.yml",
        f"""\
{registry.host}:
  tls-verify: false
  images:
    {ns}/app: []
    {ns}/multi: []
{tls_registry.host}:
  cert-dir: {tls_registry.cert_dir}
  images:
    {ns}/secure: []
""",
    )
    common = ("--src", "yaml", "--dest", "docker", "--dest-tls-verify=false", "--all", str(spec))
    sync(*common, f"{registry2.host}/{ns}-embedded", cache=cache)
    proc = sync(*common, f"{registry2.host}/{ns}-queued", "--queue", queue_workers, "--wait", cache=cache)
    embedded = registry_state(registry2, f"{ns}-embedded/")
    assert set(embedded) == {"app", "multi", "secure"} and len(embedded["app"]) == 4  # v1-v3, the signature
    assert registry_state(registry2, f"{ns}-queued/") == embedded, proc.stderr


def test_sync_on_celery_workers_deletes_after_the_job(
    registry: RegistryServer, registry2: RegistryServer, unique_repo: str, cache: Path, queue_workers: str
) -> None:
    """``--delete`` with ``--queue --wait`` runs once the job has succeeded, exactly as on the embedded executor."""
    ns = unique_repo
    repo = f"{ns}/app"
    app = images(repo, ["v1", "v2"])
    push_all(registry, repo, app)
    args = ("--src", "docker", "--dest", "docker", *INSECURE, "--remove-signatures")
    src, dst = f"{registry.host}/{repo}", f"{registry2.host}/{ns}-dst"
    sync(*args, src, dst, "--queue", queue_workers, "--wait", cache=cache)
    assert set(tag_digests(registry2, f"{ns}-dst/app")) == {"v1", "v2"}

    untag(registry, repo, "v1")
    proc = sync(*args, "--delete", src, dst, "--queue", queue_workers, "--wait", cache=cache)
    assert "1 tag(s) deleted" in proc.stderr, proc.stderr
    assert set(tag_digests(registry2, f"{ns}-dst/app")) == {"v2"}
