"""The pure copy planner (issue #3): plan shapes from resolved images, no network.

Images come from the seeded builders in tests/harness/images.py. ``ResolvedImage`` objects are built
directly (or through ``resolve_image`` over an in-memory source), then ``plan_copy`` must produce:
one blob step per (destination, digest), a single transfer per destination registry with mounts for
other repositories depending on it, manifests after their blobs, an index after its children, the tag
last, nothing for an up-to-date image, a rewritten index for a platform subset, converted manifests
for ``--format``, and clear refusals under ``--preserve-digests``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from tests.harness.images import Image, Index, build_image, build_index, build_multiarch, make_layer
from worker.engine.manifest import convert_manifest, parse_manifest
from worker.engine.plan import (
    BlobStep,
    CopyOptions,
    DestinationInfo,
    ManifestStep,
    Plan,
    ResolvedImage,
    SourceManifest,
    plan_copy,
    resolve_image,
)
from worker.engine.transports import ImageDestination, ImageName, ImageSource
from worker.engine.transports.base import StoredManifest
from worker.engine.transports.dir import DirDestination
from worker.engine.transports.docker_archive import DockerArchiveDestination
from worker.engine.transports.oci_layout import OCILayoutDestination
from worker.registry import Descriptor, Digest, InvalidInput, MediaType, NotFound, Platform

REG = "registry.test:5000"
OCI = MediaType.OCI_MANIFEST.value
OCI_INDEX = MediaType.OCI_INDEX.value
V2S2 = MediaType.DOCKER_MANIFEST.value
V2S2_LIST = MediaType.DOCKER_MANIFEST_LIST.value


# --------------------------------------------------------------------------------------------------------------------
# helpers


def registry_info(destination: str) -> DestinationInfo:
    name = ImageName.parse(destination)
    assert name.reference is not None
    return DestinationInfo(
        None, True, store=f"docker://{name.reference.registry}", repository=name.reference.repository, is_registry=True
    )


def resolved(
    top: Image | Index,
    destination: str = f"docker://{REG}/app:1",
    *,
    source: str = "docker://src.test/app:1",
    platforms: tuple[str, ...] | None = None,
    dest_digest: Digest | None = None,
    info: DestinationInfo | None = None,
) -> ResolvedImage:
    """A ResolvedImage as ``resolve_image`` would return it (``--all``, or a platform subset of an index)."""
    r = ResolvedImage(
        source,
        destination,
        SourceManifest(top.manifest, top.media_type),
        dest_info=info or registry_info(destination),
        dest_digest=dest_digest,
    )
    if isinstance(top, Index):
        for child in top.children:
            if platforms is None or str(child.platform) in platforms:
                r.children[child.digest] = SourceManifest(child.manifest, child.media_type)
    return r


def blob_digests(img: Image) -> set[Digest]:
    return {d for d, _size, _blob in img.blobs()}


def manifest_steps(plan: Plan) -> list[ManifestStep]:
    return [s for s in plan.steps.values() if isinstance(s, ManifestStep)]


def top_step(plan: Plan, destination: str | None = None) -> ManifestStep:
    tops = [s for s in manifest_steps(plan) if s.top and (destination is None or str(s.destination) == destination)]
    assert len(tops) == 1, tops
    return tops[0]


def check_topological(plan: Plan) -> None:
    """Every dependency exists in the plan and comes from an earlier step (the graph has no cycle)."""
    seen: set[str] = set()
    for sid, step in plan.steps.items():
        for dep in step.deps:
            assert dep in plan.steps, f"{sid} depends on missing {dep}"
            assert dep in seen, f"{sid} depends on later step {dep}"
        seen.add(sid)


def all_deps(plan: Plan, sid: str) -> set[str]:
    """Transitive dependencies of a step."""
    out: set[str] = set()
    stack = list(plan.steps[sid].deps)
    while stack:
        cur = stack.pop()
        if cur not in out:
            out.add(cur)
            stack.extend(plan.steps[cur].deps)
    return out


class MemorySource(ImageSource):
    """Manifests of a built image or index, by digest; no blobs (``resolve_image`` reads manifests only)."""

    def __init__(self, top: Image | Index) -> None:
        self.top = top
        self.manifests = {top.digest: (top.manifest, top.media_type)}
        for child in top.children if isinstance(top, Index) else ():
            self.manifests[child.digest] = (child.manifest, child.media_type)
        self.fetched: list[str | Digest | None] = []

    def _read_manifest(self, ref: str | Digest | None) -> StoredManifest:
        self.fetched.append(ref)
        if ref is None:
            return StoredManifest(self.top.manifest, self.top.media_type)
        if isinstance(ref, Digest) and ref in self.manifests:
            return StoredManifest(*self.manifests[ref])
        raise NotFound(f"manifest {ref}")

    def _open_blob(self, desc: Descriptor) -> AbstractContextManager[Iterator[bytes]]:
        raise AssertionError("the planner never reads blobs")


class MemoryDestination(ImageDestination):
    def __init__(self, current: Descriptor | None = None) -> None:
        self.current = current

    def blob_exists(self, desc: Descriptor) -> bool:
        raise AssertionError("not used")

    def put_blob(self, desc: Descriptor, chunks: Any) -> None:
        raise AssertionError("not used")

    def head_manifest(self, ref: str | None = None) -> Descriptor | None:
        return self.current

    def put_manifest(self, raw: bytes, media_type: str, ref: str | Digest | None = None) -> None:
        raise AssertionError("not used")


# --------------------------------------------------------------------------------------------------------------------
# single images


def test_single_image_one_blob_step_per_unique_digest() -> None:
    shared = make_layer("plan/dup", 300)
    # the same layer twice in one image is transferred once
    img = build_image("plan/single", layers=[shared, 200, shared], fmt="v2s2")
    plan = plan_copy([resolved(img)], CopyOptions())

    blobs = plan.blob_steps
    assert sorted(b.digest for b in blobs) == sorted(blob_digests(img))
    assert len(blobs) == 3  # config + two distinct layers
    assert all(not b.deps and b.mount_from is None for b in blobs)
    by_digest = {b.digest: b for b in blobs}
    assert by_digest[shared.digest].size == shared.size
    assert by_digest[img.config_digest].media_type == MediaType.DOCKER_CONFIG

    top = top_step(plan)
    assert top.raw == img.manifest and top.media_type == V2S2
    assert top.tag == "1"
    assert set(top.deps) == {b.id for b in blobs}
    check_topological(plan)

    (image,) = plan.images
    assert image.source_digest == image.dest_digest == str(img.digest)
    assert not image.up_to_date
    assert image.steps[-1] == top.id  # the tag is last
    assert set(image.steps) == set(plan.steps)
    assert image.size == sum(size for _d, size, _b in img.blobs())


def test_destination_by_digest_has_no_tag() -> None:
    img = build_image("plan/bydigest")
    dest = f"docker://{REG}/app@{img.digest}"
    plan = plan_copy([resolved(img, dest)], CopyOptions())
    top = top_step(plan)
    assert top.tag is None and top.top


def test_shared_layer_two_repos_same_registry_one_transfer_one_mount() -> None:
    shared = make_layer("plan/shared", 512)
    a = build_image("plan/a", layers=[shared, 100])
    b = build_image("plan/b", layers=[shared, 200])
    ra = resolved(a, f"docker://{REG}/team/a:1", source="docker://src.test/a:1")
    rb = resolved(b, f"docker://{REG}/team/b:1", source="docker://src.test/b:1")
    plan = plan_copy([ra, rb], CopyOptions())
    check_topological(plan)

    steps = [s for s in plan.blob_steps if s.digest == shared.digest]
    assert len(steps) == 2
    transfer = next(s for s in steps if str(s.destination).endswith("/team/a:1"))
    mount = next(s for s in steps if str(s.destination).endswith("/team/b:1"))
    assert transfer.deps == () and transfer.mount_from is None
    assert mount.deps == (transfer.id,)
    assert mount.mount_from == "team/a"
    # every other blob is planned once, with no dependency
    others = [s for s in plan.blob_steps if s.digest != shared.digest]
    assert len(others) == 4 and all(not s.deps for s in others)
    assert len({(s.destination, s.digest) for s in plan.blob_steps}) == len(plan.blob_steps)

    img_a, img_b = plan.images
    assert transfer.id in img_a.steps and mount.id in img_b.steps
    assert transfer.id not in img_b.steps
    # b's manifest waits for its mount, which waits for a's transfer
    assert transfer.id in all_deps(plan, top_step(plan, rb.destination).id)
    assert plan.step_images()[mount.id] == ["i2"]


def test_tags_of_one_repository_share_one_step_per_blob() -> None:
    shared = make_layer("plan/repo-shared", 512)
    a = build_image("plan/repo-a", layers=[shared])
    bs = [build_image(f"plan/repo-b{n}", layers=[shared, 64 + n]) for n in range(3)]
    rs = [resolved(a, f"docker://{REG}/team/a:1", source="docker://src.test/a:1")]
    rs += [resolved(b, f"docker://{REG}/team/b:{n}", source=f"docker://src.test/b:{n}") for n, b in enumerate(bs)]
    plan = plan_copy(rs, CopyOptions())
    check_topological(plan)
    steps = [s for s in plan.blob_steps if s.digest == shared.digest]
    # a's transfer and one mount into team/b, which every tag of team/b waits for (no mount per tag)
    assert len(steps) == 2
    transfer, mount = steps
    assert transfer.mount_from is None and mount.mount_from == "team/a" and mount.deps == (transfer.id,)
    assert plan.step_images()[mount.id] == ["i2", "i3", "i4"]
    for r in rs[1:]:
        assert mount.id in all_deps(plan, top_step(plan, r.destination).id)
    # the same through the JSON a queued job stores: the step is still one, listed by each image
    back = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back.step_images()[mount.id] == ["i2", "i3", "i4"]


def test_other_local_destinations_keep_a_step_each() -> None:
    img = build_image("plan/dirs", layers=[128])
    rs = [resolved(img, f"dir:/tmp/x{n}", info=DestinationInfo(store=f"dir:/tmp/x{n}")) for n in (1, 2)]
    plan = plan_copy(rs, CopyOptions())
    # two directories are two stores: each gets its own blobs
    assert len(plan.blob_steps) == 4


def test_shared_layer_other_registries_are_independent_transfers() -> None:
    shared = make_layer("plan/shared2", 512)
    a = build_image("plan/a2", layers=[shared])
    b = build_image("plan/b2", layers=[shared])
    plan = plan_copy(
        [resolved(a, "docker://one.test/x:1"), resolved(b, "docker://two.test/x:1")],
        CopyOptions(),
    )
    steps = [s for s in plan.blob_steps if s.digest == shared.digest]
    assert len(steps) == 2
    assert all(not s.deps and s.mount_from is None for s in steps)


def test_same_image_two_tags_same_repo_shares_steps() -> None:
    img = build_image("plan/twotags", layers=[100])
    plan = plan_copy(
        [resolved(img, f"docker://{REG}/app:1"), resolved(img, f"docker://{REG}/app:1")],
        CopyOptions(),
    )
    # the same destination twice: no duplicate steps at all
    assert len(plan.blob_steps) == 2
    assert len(manifest_steps(plan)) == 1
    assert plan.images[0].steps == plan.images[1].steps


def test_up_to_date_image_has_no_steps() -> None:
    img = build_image("plan/uptodate", layers=[100, 100])
    plan = plan_copy([resolved(img, dest_digest=img.digest)], CopyOptions())
    (image,) = plan.images
    assert image.up_to_date
    assert image.steps == []
    assert plan.steps == {}
    assert image.dest_digest == str(img.digest)


def test_outdated_destination_is_copied() -> None:
    img = build_image("plan/outdated")
    old = build_image("plan/outdated-old")
    plan = plan_copy([resolved(img, dest_digest=old.digest)], CopyOptions())
    assert not plan.images[0].up_to_date
    assert len(plan.blob_steps) == 2
    assert top_step(plan).raw == img.manifest


def test_up_to_date_image_does_not_drop_blobs_another_image_needs() -> None:
    shared = make_layer("plan/keep", 256)
    a = build_image("plan/keep-a", layers=[shared])
    b = build_image("plan/keep-b", layers=[shared, 64])
    for order in ((0, 1), (1, 0)):
        rs = [
            resolved(a, f"docker://{REG}/keep/a:1", dest_digest=a.digest),  # already there
            resolved(b, f"docker://{REG}/keep/b:1"),
        ]
        plan = plan_copy([rs[i] for i in order], CopyOptions())
        check_topological(plan)
        up = next(i for i in plan.images if i.destination.endswith("/keep/a:1"))
        todo = next(i for i in plan.images if i.destination.endswith("/keep/b:1"))
        assert up.up_to_date and up.steps == []
        assert {s.digest for s in plan.blob_steps} == blob_digests(b)
        # the shared layer reaches b exactly once and does not wait on a step that was dropped
        shared_steps = [s for s in plan.blob_steps if s.digest == shared.digest]
        assert len(shared_steps) == 1 and str(shared_steps[0].destination).endswith("/keep/b:1")
        assert all(sid in plan.steps for sid in todo.steps)


def test_additional_tags_follow_the_top_manifest() -> None:
    img = build_image("plan/tags")
    plan = plan_copy([resolved(img)], CopyOptions(additional_tags=("extra", "latest")))
    top = top_step(plan)
    extra = [s for s in manifest_steps(plan) if not s.top]
    assert sorted(s.tag or "" for s in extra) == ["extra", "latest"]
    for s in extra:
        assert s.deps == (top.id,)
        assert s.raw == top.raw and s.media_type == top.media_type
    image = plan.images[0]
    assert image.steps.index(top.id) < min(image.steps.index(s.id) for s in extra)


def test_additional_tags_are_written_even_when_image_is_up_to_date() -> None:
    img = build_image("plan/tags-uptodate")
    plan = plan_copy([resolved(img, dest_digest=img.digest)], CopyOptions(additional_tags=("extra",)))
    tags = [s for s in manifest_steps(plan) if s.tag == "extra"]
    assert len(tags) == 1
    assert tags[0].raw == img.manifest
    # nothing else is needed: the blobs and the tag are already there
    assert plan.blob_steps == []
    assert all(sid in plan.steps for sid in plan.images[0].steps)
    check_topological(plan)


# --------------------------------------------------------------------------------------------------------------------
# indexes


def test_index_all_children_then_index_then_tag() -> None:
    idx = build_multiarch("plan/multi", layers=[300, 200])
    plan = plan_copy([resolved(idx)], CopyOptions(multi_arch="all"))
    check_topological(plan)

    children = {s.digest: s for s in manifest_steps(plan) if not s.top}
    assert set(children) == {c.digest for c in idx.children}
    blobs_by_digest = {s.digest: s for s in plan.blob_steps}
    for child in idx.children:
        step = children[child.digest]
        assert step.tag is None  # pushed by digest
        assert step.raw == child.manifest
        assert {plan.steps[d].digest for d in step.deps} == blob_digests(child)  # type: ignore[union-attr]
        assert all(isinstance(plan.steps[d], BlobStep) for d in step.deps)
    assert set(blobs_by_digest) == set().union(*(blob_digests(c) for c in idx.children))

    top = top_step(plan)
    assert top.raw == idx.manifest  # all children: the index is copied as is
    assert top.media_type == OCI_INDEX
    assert set(top.deps) == {s.id for s in children.values()}
    image = plan.images[0]
    assert image.steps[-1] == top.id
    assert image.dest_digest == image.source_digest == str(idx.digest)


def test_index_child_shared_layer_is_one_step() -> None:
    base = make_layer("plan/multi-base", 400)
    idx = build_multiarch("plan/multi-shared", layers=[base, 100])
    plan = plan_copy([resolved(idx)], CopyOptions(multi_arch="all"))
    steps = [s for s in plan.blob_steps if s.digest == base.digest]
    assert len(steps) == 1
    users = [s for s in manifest_steps(plan) if steps[0].id in s.deps]
    assert len(users) == 3


def test_index_only_copies_just_the_index() -> None:
    idx = build_multiarch("plan/index-only")
    plan = plan_copy([resolved(idx, platforms=())], CopyOptions(multi_arch="index-only"))
    assert plan.blob_steps == []
    (top,) = manifest_steps(plan)
    assert top.raw == idx.manifest and top.deps == ()


def test_platform_subset_rewrites_the_index() -> None:
    idx = build_multiarch("plan/subset", platforms=("linux/amd64", "linux/arm64", "linux/arm/v7"))
    want = ("linux/arm64", "linux/arm/v7")
    plan = plan_copy(
        [resolved(idx, platforms=want)],
        CopyOptions(platforms=tuple(Platform.parse(p) for p in want)),
    )
    check_topological(plan)
    top = top_step(plan)
    assert top.raw != idx.manifest
    new = json.loads(top.raw)
    assert [m["platform"]["architecture"] for m in new["manifests"]] == ["arm64", "arm"]
    kept = [idx.child(p) for p in want]
    assert [m["digest"] for m in new["manifests"]] == [str(c.digest) for c in kept]
    assert new["mediaType"] == OCI_INDEX and top.media_type == OCI_INDEX
    image = plan.images[0]
    assert image.dest_digest == str(Digest.of(top.raw)) != image.source_digest
    amd64 = idx.child("linux/amd64")
    assert not blob_digests(amd64) & {s.digest for s in plan.blob_steps}
    assert {s.digest for s in manifest_steps(plan) if not s.top} == {c.digest for c in kept}


def test_resolve_image_platform_selection_without_network() -> None:
    idx = build_multiarch("plan/resolve", platforms=("linux/amd64", "linux/arm64", "linux/arm/v7"))
    dest = ImageName.parse(f"docker://{REG}/app:1")
    src_name = ImageName.parse("docker://src.test/app:1")

    # system: the one matching image, as a plain image copy
    src = MemorySource(idx)
    r = resolve_image(
        src_name, src, dest, MemoryDestination(), CopyOptions(system_platform=Platform.parse("linux/arm64"))
    )
    assert r.top.raw == idx.child("linux/arm64").manifest and r.children == {}
    assert r.dest_digest is None

    # --all: every child
    r = resolve_image(src_name, MemorySource(idx), dest, MemoryDestination(), CopyOptions(multi_arch="all"))
    assert r.top.raw == idx.manifest and set(r.children) == {c.digest for c in idx.children}

    # --platform: only those children
    opts = CopyOptions(platforms=(Platform.parse("linux/arm/v7"),))
    r = resolve_image(src_name, MemorySource(idx), dest, MemoryDestination(), opts)
    assert set(r.children) == {idx.child("linux/arm/v7").digest}

    # a platform the index lacks: a clear error naming what is available
    with pytest.raises(InvalidInput, match=r"s390x.*available: linux/amd64"):
        resolve_image(
            src_name,
            MemorySource(idx),
            dest,
            MemoryDestination(),
            CopyOptions(platforms=(Platform.parse("linux/s390x"),)),
        )

    # the destination's current digest makes the image up to date
    current = Descriptor(OCI_INDEX, idx.digest, idx.size)
    r = resolve_image(src_name, MemorySource(idx), dest, MemoryDestination(current), CopyOptions(multi_arch="all"))
    assert r.dest_digest == idx.digest
    plan = plan_copy([r], CopyOptions(multi_arch="all"))
    assert plan.images[0].up_to_date and plan.steps == {}


def test_index_into_single_image_destination_is_refused() -> None:
    idx = build_multiarch("plan/dir-index")
    info = DestinationInfo.of(
        ImageName.parse("docker-archive:/tmp/nowhere.tar"), DockerArchiveDestination("/tmp/nowhere.tar")
    )
    with pytest.raises(InvalidInput, match="single image"):
        plan_copy([resolved(idx, "docker-archive:/tmp/nowhere.tar", info=info)], CopyOptions(multi_arch="all"))


# --------------------------------------------------------------------------------------------------------------------
# format conversion


@pytest.mark.parametrize(("src_fmt", "target"), [("v2s2", "oci"), ("oci", "v2s2")])
def test_format_conversion_single_image(src_fmt: str, target: str) -> None:
    img = build_image(f"plan/convert-{src_fmt}", layers=[300, 200], fmt=src_fmt)  # type: ignore[arg-type]
    plan = plan_copy([resolved(img)], CopyOptions(format=target))  # type: ignore[arg-type]
    top = top_step(plan)
    want_type = OCI if target == "oci" else V2S2
    assert top.media_type == want_type
    parsed = parse_manifest(top.raw, top.media_type)
    assert parsed.obj["mediaType"] == want_type
    assert parsed.config is not None
    assert parsed.config.media_type == (MediaType.OCI_CONFIG if target == "oci" else MediaType.DOCKER_CONFIG)
    assert {layer.media_type for layer in parsed.layers} == {
        MediaType.OCI_LAYER_GZIP if target == "oci" else MediaType.DOCKER_LAYER
    }
    # blobs keep their bytes, so their digests
    assert [str(d.digest) for d in parsed.blobs] == [str(img.config_digest), *(str(ly.digest) for ly in img.layers)]
    assert {s.digest for s in plan.blob_steps} == blob_digests(img)
    image = plan.images[0]
    assert image.dest_digest == str(Digest.of(top.raw)) != str(img.digest)
    # round trip back gives the same structure as the source
    back = convert_manifest(top.raw, top.media_type, src_fmt)
    assert json.loads(back) == json.loads(img.manifest)


def test_same_format_is_not_converted() -> None:
    img = build_image("plan/noconvert", fmt="v2s2")
    plan = plan_copy([resolved(img)], CopyOptions(format="v2s2"))
    assert top_step(plan).raw == img.manifest


@pytest.mark.parametrize(("src_fmt", "target"), [("v2s2", "oci"), ("oci", "v2s2")])
def test_format_conversion_index(src_fmt: str, target: str) -> None:
    idx = build_multiarch(f"plan/convert-index-{src_fmt}", platforms=("linux/amd64", "linux/arm64"), fmt=src_fmt)  # type: ignore[arg-type]
    plan = plan_copy([resolved(idx)], CopyOptions(multi_arch="all", format=target))  # type: ignore[arg-type]
    check_topological(plan)
    top = top_step(plan)
    assert top.media_type == (OCI_INDEX if target == "oci" else V2S2_LIST)
    children = {s.id: s for s in manifest_steps(plan) if not s.top}
    assert len(children) == 2
    for s in children.values():
        assert s.media_type == (OCI if target == "oci" else V2S2)
    new = json.loads(top.raw)
    assert new["mediaType"] == top.media_type
    # the index points at the converted children (digest, size, type), platforms kept
    entries = {m["digest"]: m for m in new["manifests"]}
    assert set(entries) == {str(s.digest) for s in children.values()}
    for s in children.values():
        assert entries[str(s.digest)]["size"] == len(s.raw)
        assert entries[str(s.digest)]["mediaType"] == s.media_type
    assert sorted(m["platform"]["architecture"] for m in new["manifests"]) == ["amd64", "arm64"]
    assert set(top.deps) == set(children)


def test_destination_types_force_conversion() -> None:
    # oci: layouts take OCI manifests only; a v2s2 image is converted without --format
    img = build_image("plan/oci-layout", fmt="v2s2")
    dest = "oci:/tmp/plan-layout:app"
    info = DestinationInfo.of(ImageName.parse(dest), OCILayoutDestination("/tmp/plan-layout", "app"))
    assert info.store == "oci:/tmp/plan-layout" and not info.is_registry
    plan = plan_copy([resolved(img, dest, info=info)], CopyOptions())
    assert top_step(plan).media_type == OCI
    assert top_step(plan).tag is None  # the layout's own ref name


def test_dir_destination_takes_any_format() -> None:
    img = build_image("plan/dir", fmt="v2s2")
    dest = "dir:/tmp/plan-dir"
    info = DestinationInfo.of(ImageName.parse(dest), DirDestination("/tmp/plan-dir"))
    plan = plan_copy([resolved(img, dest, info=info)], CopyOptions())
    assert top_step(plan).raw == img.manifest


# --------------------------------------------------------------------------------------------------------------------
# --preserve-digests


def test_preserve_digests_allows_an_unchanged_copy() -> None:
    idx = build_multiarch("plan/preserve-ok")
    plan = plan_copy([resolved(idx)], CopyOptions(multi_arch="all", preserve_digests=True))
    assert top_step(plan).raw == idx.manifest


def test_preserve_digests_refuses_conversion() -> None:
    img = build_image("plan/preserve-convert", fmt="v2s2")
    with pytest.raises(InvalidInput, match=r"format conversion.*--preserve-digests"):
        plan_copy([resolved(img)], CopyOptions(format="oci", preserve_digests=True))
    idx = build_multiarch("plan/preserve-convert-idx", fmt="v2s2")
    with pytest.raises(InvalidInput, match=r"format conversion.*--preserve-digests"):
        plan_copy([resolved(idx)], CopyOptions(multi_arch="all", format="oci", preserve_digests=True))


def test_preserve_digests_keeps_a_manifest_the_destination_would_convert() -> None:
    """As containers/image when it may not modify the manifest: a Docker manifest goes into an OCI layout as it is
    (skopeo does the same; tests/test_skopeo_matrix.py compares the layouts)."""
    img = build_image("plan/preserve-forced", fmt="v2s2")
    dest = "oci:/tmp/plan-layout2:app"
    info = DestinationInfo.of(ImageName.parse(dest), OCILayoutDestination("/tmp/plan-layout2", "app"))
    plan = plan_copy([resolved(img, dest, info=info)], CopyOptions(preserve_digests=True))
    assert top_step(plan).raw == img.manifest
    # without --preserve-digests the layout gets an OCI manifest
    plan = plan_copy([resolved(img, dest, info=info)], CopyOptions())
    assert top_step(plan).raw != img.manifest


def test_preserve_digests_refuses_platform_subset() -> None:
    idx = build_multiarch("plan/preserve-subset")
    opts = CopyOptions(platforms=(Platform.parse("linux/arm64"),), preserve_digests=True)
    with pytest.raises(InvalidInput, match=r"platform subset.*--preserve-digests"):
        plan_copy([resolved(idx, platforms=("linux/arm64",))], opts)


# --------------------------------------------------------------------------------------------------------------------
# serialisation


def test_plan_json_round_trip() -> None:
    shared = make_layer("plan/json-shared", 128)
    a = build_image("plan/json-a", layers=[shared])
    idx = build_index(
        [
            build_image("plan/json-b1", layers=[shared], platform="linux/amd64"),
            build_image("plan/json-b2", layers=[64], platform="linux/arm64"),
        ]
    )
    plan = plan_copy(
        [resolved(a, f"docker://{REG}/json/a:1"), resolved(idx, f"docker://{REG}/json/b:1")],
        CopyOptions(multi_arch="all", additional_tags=("x",)),
    )
    data = plan.to_json()
    text = json.dumps(data)  # must be plain JSON
    back = Plan.from_json(json.loads(text))
    assert back.images == plan.images
    assert back.steps == plan.steps
    assert list(back.steps) == list(plan.steps)
    assert back.to_json() == data
    mounts = [s for s in back.blob_steps if s.mount_from]
    assert len(mounts) == 1 and mounts[0].mount_from == "json/a" and mounts[0].deps
    assert all(isinstance(s.deps, tuple) for s in back.steps.values())
    # parsed once, here: the steps carry names and digests as values, not text to parse again
    for s in back.steps.values():
        assert isinstance(s.destination, ImageName) and isinstance(s.digest, Digest)
        if isinstance(s, BlobStep):
            assert isinstance(s.source, ImageName) and s.source_digest is None


def test_blob_step_wire_forms_carry_text_only_and_parse_back() -> None:
    """The task message is identifiers only (names, digest, size, type); the stored plan keeps a gzipped
    layer's source blob; both parse back to the same typed step, and a malformed name or digest is refused."""
    plain = Descriptor(MediaType.OCI_LAYER.value, Digest.of(b"plain"), 5)
    step = BlobStep(
        "b7",
        ImageName.parse("oci:/tmp/layout:app"),
        ImageName.parse(f"docker://{REG}/app:1"),
        Digest.of(b"gzip"),
        4,
        MediaType.OCI_LAYER_GZIP.value,
        mount_from="other/app",
        source_digest=plain.digest,
        source_size=plain.size,
        source_media_type=plain.media_type,
    )
    message = step.to_message()
    assert all(isinstance(v, str | int | None) for v in message)
    assert json.loads(json.dumps(message)) == list(message)
    back = BlobStep.from_message(*message)
    assert (back.source, back.destination, back.digest, back.mount_from) == (
        step.source, step.destination, step.digest, "other/app"
    )  # fmt: skip
    assert back.source_descriptor == back.descriptor  # a message never carries a gzip-on-the-way source
    stored = BlobStep.from_json(json.loads(json.dumps(step.to_json())))
    assert stored == step and stored.source_descriptor == plain
    with pytest.raises(InvalidInput):
        BlobStep.from_message("b1", "docker://a.test/x:1", "nowhere", str(step.digest), 4, "x")
    with pytest.raises(InvalidInput):
        BlobStep.from_message("b1", "docker://a.test/x:1", "docker://b.test/x:1", "sha256:short", 4, "x")
