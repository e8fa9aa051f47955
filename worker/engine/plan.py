"""Copy plans: what to move, in which order, depending on what.

Two halves:

* ``resolve_image`` reads the source (and HEADs the destination) over the
  network and returns a ``ResolvedImage``: the manifests involved, as bytes.
* ``plan_copy`` is pure: resolved images and options in, a ``Plan`` out. A plan
  is a graph of steps: ``BlobStep`` (transfer, or mount/skip once another step
  put the blob in the same destination registry), ``ManifestStep`` (a child
  manifest by digest, an index, or the tag) each with the ids it depends on.
  Unit tests check plan shapes without a network.

Executors (in-process threads, Celery workers) run the same plan.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

from worker.registry import Descriptor, Digest, FerryError, InvalidInput, MediaType, NotFound, Platform

from .compression import CompressionOptions, Desired, LayerChange
from .manifest import INDEX_TYPES, ParsedManifest, convert_manifest, parse_manifest, pick_platform
from .transports import ImageDestination, ImageName, ImageSource

MultiArch = Literal["system", "all", "index-only"]
Format = Literal["oci", "v2s2"] | None

OCI_TYPES = frozenset({MediaType.OCI_MANIFEST.value, MediaType.OCI_INDEX.value})
V2S2_TYPES = frozenset({MediaType.DOCKER_MANIFEST.value, MediaType.DOCKER_MANIFEST_LIST.value})


@dataclass(frozen=True)
class CopyOptions:
    multi_arch: MultiArch = "system"
    platforms: tuple[Platform, ...] = ()
    #: the platform ``system`` picks from an index
    system_platform: Platform = field(default_factory=lambda: Platform("linux", "amd64"))
    format: Format = None
    preserve_digests: bool = False
    remove_signatures: bool = False
    additional_tags: tuple[str, ...] = ()
    #: --dest-compress-format/-level, --dest-force-compress-format, --dest-compress/--dest-decompress
    compression: CompressionOptions = field(default_factory=CompressionOptions)


@dataclass(frozen=True)
class DestinationInfo:
    """What the planner must know of a destination: which manifest types it takes."""

    supported_types: frozenset[str] | None = None
    supports_index: bool = True
    #: registry host (docker://) or path: blobs are shared within one store
    store: str = ""
    #: repository inside the store (docker://); mounts go between repositories
    repository: str = ""
    is_registry: bool = False

    @classmethod
    def of(cls, name: ImageName, dest: ImageDestination) -> DestinationInfo:
        if name.reference is not None:
            return cls(
                dest.supported_manifest_types,
                dest.supports_index,
                store=f"docker://{name.reference.registry}",
                repository=name.reference.repository,
                is_registry=True,
            )
        path = name.details.split(":", 1)[0] if name.transport in ("oci", "oci-archive") else name.details
        return cls(dest.supported_manifest_types, dest.supports_index, store=f"{name.transport}:{path}")


@dataclass(frozen=True)
class SourceManifest:
    raw: bytes
    media_type: str

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def parsed(self) -> ParsedManifest:
        return parse_manifest(self.raw, self.media_type)


@dataclass
class ResolvedImage:
    """One source image (or index) read from the source, ready for planning."""

    source: str
    destination: str
    top: SourceManifest
    children: dict[Digest, SourceManifest] = field(default_factory=dict)
    dest_info: DestinationInfo = field(default_factory=DestinationInfo)
    #: digest the destination holds at the tag now (HEAD), if any
    dest_digest: Digest | None = None
    #: extra manifests to copy after the image (signatures, referrers): (manifest, tag or None)
    extras: list[tuple[SourceManifest, str | None]] = field(default_factory=list)
    #: options for this image when they differ from the plan's (sync: platforms per registry entry)
    options: CopyOptions | None = None
    #: layers (de/re)compressed on the way: destination digest -> what is read and what is done to it
    recompress: dict[str, LayerChange] = field(default_factory=dict)
    #: of those, the ones made while planning from a local source: destination digest -> staging file
    staged: dict[str, str] = field(default_factory=dict)
    #: a signature, attestation or referrer that goes along with an image (sync): never signed itself
    attachment: bool = False

    @cached_property
    def source_name(self) -> ImageName:
        """``source`` parsed (once per image: every step of the image carries this value)."""
        return ImageName.parse(self.source)

    @cached_property
    def destination_name(self) -> ImageName:
        return ImageName.parse(self.destination)


#: a blob step as a ``ferry.copy_blob`` task message carries it: id, source, destination, digest, size, media
#: type, mount_from. Identifiers only: names and a digest, never bytes, clients or credentials.
BlobMessage = tuple[str, str, str, str, int, str, str | None]
#: a layer (de/re)compressed on the way, as the task's ``recompress`` keyword carries it: source digest, source
#: size, source media type, transform
RecompressMessage = list[Any]


@dataclass(frozen=True)
class BlobStep:
    """Make one blob exist at one destination. Names and digests are parsed values, parsed once (at planning,
    or where a step comes in from outside: ``from_json``, ``from_message``), never re-parsed by the step runners.

    ``media_type`` stays a string: layers and artifacts carry types of their own, beyond the ``MediaType`` enum
    (whose members compare equal to the strings).
    """

    id: str
    source: ImageName
    destination: ImageName
    digest: Digest
    size: int
    media_type: str
    #: a repository in the same registry to mount from once ``deps`` are done
    mount_from: str | None = None
    deps: tuple[str, ...] = ()
    kind: str = "blob"
    #: set when the blob is (de/re)compressed on the way: the layer read from the source (digest, size, type)
    source_digest: Digest | None = None
    source_size: int = 0
    source_media_type: str = ""
    #: what the copy does to that layer: ``gzip:LEVEL``, ``zstd:LEVEL`` or ``plain`` (decompress); empty
    #: with ``source_digest`` set means ``gzip:6`` (steps planned before this field existed)
    recompress: str = ""
    #: a staging file holding the transformed layer (made while planning from a local source): sent instead
    #: of transforming again; empty (or gone) means transform on the fly
    staged: str = ""

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)

    @property
    def recompress_op(self) -> str:
        """The transform the copy applies (empty: the blob is copied byte for byte)."""
        if self.source_digest is None:
            return ""
        return self.recompress or "gzip:6"

    @property
    def source_descriptor(self) -> Descriptor:
        """What is read from the source: the blob itself, or the layer (de/re)compressed on the way."""
        if self.source_digest is None:
            return self.descriptor
        return Descriptor(self.source_media_type, self.source_digest, self.source_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": str(self.source),
            "destination": str(self.destination),
            "digest": str(self.digest),
            "size": self.size,
            "media_type": self.media_type,
            "mount_from": self.mount_from,
            "deps": list(self.deps),
            "kind": self.kind,
            "source_digest": str(self.source_digest) if self.source_digest is not None else "",
            "source_size": self.source_size,
            "source_media_type": self.source_media_type,
            "recompress": self.recompress,
            "staged": self.staged,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BlobStep:
        return cls(
            str(d["id"]),
            ImageName.parse(d["source"]),
            ImageName.parse(d["destination"]),
            Digest.parse(d["digest"]),
            int(d["size"]),
            str(d["media_type"]),
            mount_from=d.get("mount_from"),
            deps=tuple(d.get("deps") or ()),
            source_digest=Digest.parse(d["source_digest"]) if d.get("source_digest") else None,
            source_size=int(d.get("source_size") or 0),
            source_media_type=str(d.get("source_media_type") or ""),
            recompress=str(d.get("recompress") or ""),
            staged=str(d.get("staged") or ""),
        )

    def to_message(self) -> BlobMessage:
        """The step as a blob task carries it (a (de/re)compressed layer adds :meth:`recompress_message`)."""
        return (
            self.id, str(self.source), str(self.destination), str(self.digest), self.size, self.media_type,
            self.mount_from,
        )  # fmt: skip

    def recompress_message(self) -> RecompressMessage | None:
        """What a worker must do to the layer it reads (``None``: copy byte for byte)."""
        if self.source_digest is None:
            return None
        return [str(self.source_digest), self.source_size, self.source_media_type, self.recompress_op]

    @classmethod
    def from_message(
        cls,
        step_id: str,
        source: str,
        destination: str,
        digest: str,
        size: int,
        media_type: str,
        mount_from: str | None = None,
        recompress: RecompressMessage | None = None,
    ) -> BlobStep:
        """Parse a task's step once, when the task starts (``InvalidInput`` when a name or digest is malformed)."""
        src_digest, src_size, src_type, op = recompress or ("", 0, "", "")
        return cls(
            step_id,
            ImageName.parse(source),
            ImageName.parse(destination),
            Digest.parse(digest),
            int(size),
            media_type,
            mount_from=mount_from,
            source_digest=Digest.parse(str(src_digest)) if src_digest else None,
            source_size=int(src_size),
            source_media_type=str(src_type),
            recompress=str(op),
        )


@dataclass(frozen=True)
class ManifestStep:
    """Push one manifest (a child by digest, the top manifest at the destination's reference, or a tag).

    ``media_type`` stays a string: artifact manifests carry their own ``mediaType``.
    """

    id: str
    destination: ImageName
    raw: bytes
    media_type: str
    #: a tag, or ``None``: by digest, or for the top manifest the destination's own reference
    tag: str | None
    deps: tuple[str, ...] = ()
    kind: str = "manifest"
    #: the image's top manifest, written at the destination's reference
    top: bool = False

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "destination": str(self.destination),
            "raw": self.raw.decode(),
            "media_type": self.media_type,
            "tag": self.tag,
            "deps": list(self.deps),
            "kind": self.kind,
            "top": self.top,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ManifestStep:
        return cls(
            str(d["id"]),
            ImageName.parse(d["destination"]),
            str(d["raw"]).encode(),
            str(d["media_type"]),
            d.get("tag"),
            tuple(d.get("deps") or ()),
            top=bool(d.get("top")),
        )


Step = BlobStep | ManifestStep


@dataclass
class ImagePlan:
    id: str
    source: str
    destination: str
    source_digest: str
    #: digest of the top manifest written at the destination
    dest_digest: str
    steps: list[str] = field(default_factory=list)
    up_to_date: bool = False
    size: int = 0
    #: digests of the image's manifests at the destination (its images, then the index): what signing signs
    manifests: list[str] = field(default_factory=list)
    attachment: bool = False

    def has_work(self, *, sign: bool = False) -> bool:
        """Steps to run, or (``sign``) manifests to sign: an image already up to date is still signed."""
        return bool(self.steps) or (sign and not self.attachment and bool(self.manifests))


@dataclass
class Plan:
    images: list[ImagePlan] = field(default_factory=list)
    steps: dict[str, Step] = field(default_factory=dict)

    def step_images(self) -> dict[str, list[str]]:
        """Which images each step belongs to (a shared blob belongs to several)."""
        out: dict[str, list[str]] = {}
        for img in self.images:
            for sid in img.steps:
                out.setdefault(sid, []).append(img.id)
        return out

    @property
    def blob_steps(self) -> list[BlobStep]:
        return [s for s in self.steps.values() if isinstance(s, BlobStep)]

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON (the Celery executor stores it with the job): names and digests as text."""
        return {"images": [asdict(i) for i in self.images], "steps": [s.to_json() for s in self.steps.values()]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Plan:
        """Parse a stored plan once: every step's names and digests become typed values here."""
        plan = cls(images=[ImagePlan(**i) for i in obj["images"]])
        for d in obj["steps"]:
            step = ManifestStep.from_json(d) if d["kind"] == "manifest" else BlobStep.from_json(d)
            plan.steps[step.id] = step
        return plan


# -- resolving (network) -----------------------------------------------------------------------------------------


def _fetch(src: ImageSource, ref: str | Digest | None) -> SourceManifest:
    """Read a manifest and check its shape now, so a malformed one fails its own image while resolving."""
    raw, media_type = src.get_manifest(ref)
    manifest = SourceManifest(raw, media_type)
    manifest.parsed()
    return manifest


def _fetch_all(src: ImageSource, digests: list[Digest], parallel: bool) -> list[SourceManifest]:
    if not parallel:
        return [_fetch(src, d) for d in digests]
    with ThreadPoolExecutor(max_workers=min(8, len(digests)), thread_name_prefix="ferry-children") as pool:
        return list(pool.map(lambda d: _fetch(src, d), digests))


def resolve_image(
    source_name: ImageName,
    src: ImageSource,
    destination_name: ImageName,
    dest: ImageDestination,
    options: CopyOptions,
    *,
    head_destination: bool = True,
) -> ResolvedImage:
    """Read what ``plan_copy`` needs: the source manifest(s) and the destination's current digest."""
    top = _fetch(src, None)
    if source_name.transport == "docker-archive":
        top = _label_uncompressed(top)
    resolved = ResolvedImage(
        str(source_name), str(destination_name), top, dest_info=DestinationInfo.of(destination_name, dest)
    )
    if top.media_type in INDEX_TYPES:
        index = top.parsed()
        if options.multi_arch == "system" and not options.platforms:
            child = pick_platform(index.manifests, options.system_platform)
            resolved.top = _fetch(src, child.digest)
        elif options.multi_arch != "index-only":
            wanted = [d.digest for d in _selected(index.manifests, options.platforms)]
            # a registry's child manifests are read at once (one round trip, not one per platform); a local
            # transport (a tar, a layout) reads them one after another
            parallel = source_name.reference is not None and len(wanted) > 1
            for digest, child_manifest in zip(wanted, _fetch_all(src, wanted, parallel), strict=True):
                resolved.children[digest] = child_manifest
    desired = options.compression.desired(destination_name.transport)
    if source_name.reference is not None and not options.compression.explicit:
        desired = "preserve"  # registry to registry stays byte for byte unless a compression flag asks otherwise
    if desired != "preserve" and options.multi_arch != "index-only":
        by_digest = destination_name.reference is not None and destination_name.reference.digest is not None
        options = _recompress_layers(
            src, dest, resolved, options, desired, by_digest=by_digest, local=source_name.reference is None
        )
    resolved.options = options
    if head_destination:
        try:
            head = dest.head_manifest(None)
        except NotFound:
            head = None
        resolved.dest_digest = head.digest if head is not None else None
    return resolved


#: layers of one image measured at once while planning a (de/re)compression
_MEASURE_THREADS = 4


def _recompress_layers(
    src: ImageSource,
    dest: ImageDestination,
    resolved: ResolvedImage,
    options: CopyOptions,
    desired: Desired,
    *,
    by_digest: bool = False,
    local: bool = False,
) -> CopyOptions:
    """(De/re)compress layers as containers/image does: learn each new layer's digest, rewrite the manifests.

    A Docker v2s2 image that gets zstd layers is converted to OCI here (v2s2 has no zstd type; containers/image
    converts it too); an index listing it keeps its own type and lists it as OCI, as containers/image does.
    Returns the image's options (unchanged).
    """
    from .compression import OCI_ZSTD, image_layers, measure, plan_layer, rewrite_layers, stage, transform

    opts = options.compression
    images: list[tuple[Digest | None, SourceManifest]]
    if resolved.top.media_type in INDEX_TYPES:
        images = [(d, m) for d, m in resolved.children.items() if m.media_type not in INDEX_TYPES]
    else:
        images = [(None, resolved.top)]
    measured: dict[tuple[str, str], Descriptor] = {}
    for key, manifest in images:
        changes: list[LayerChange] = []
        for layer in image_layers(manifest.raw):
            change = plan_layer(layer, desired, opts)
            if change is None:
                continue
            if kind_is_compressed(layer) and desired == "compress" and not opts.force and _holds(dest, layer):
                continue  # reused as it is, as containers/image does without ForceCompressionFormat
            changes.append(change)
        if not changes:
            continue
        if options.preserve_digests or by_digest:
            if not opts.explicit:
                continue  # containers/image changes no layer when told to preserve digests or writing by digest
            why = "--preserve-digests was given" if options.preserve_digests else "the destination names a digest"
            raise InvalidInput(
                f"copying {resolved.source} with the compression asked for changes layer digests, but {why}"
            )
        todo = {(str(c.source.digest), c.op): c for c in changes if (str(c.source.digest), c.op) not in measured}

        def measure_one(change: LayerChange) -> tuple[Digest, int, str]:
            with src.open_blob(change.source) as chunks:
                made = transform(chunks, change.op, f"blob {change.source.digest}")
                if local:  # keep what this pass made: the copy sends it rather than compress again
                    return stage(made)
                return (*measure(made), "")

        # the layers of one image are measured side by side (the compressors release the GIL)
        with ThreadPoolExecutor(max_workers=min(_MEASURE_THREADS, max(1, len(todo)))) as pool:
            results = dict(zip(todo, pool.map(measure_one, todo.values()), strict=True))
        for mkey, (digest, size, path) in results.items():
            measured[mkey] = Descriptor(todo[mkey].media_type, digest, size)
            if path:
                resolved.staged[str(digest)] = path
        replaced: dict[Digest, Descriptor] = {}
        for change in changes:
            if change.source.digest in replaced:
                continue
            new = measured[(str(change.source.digest), change.op)]
            if new.media_type != change.media_type:
                new = Descriptor(change.media_type, new.digest, new.size)
            replaced[change.source.digest] = new
            resolved.recompress[str(new.digest)] = change
        raw, media_type = rewrite_layers(manifest.raw, replaced), manifest.media_type
        if any(d.media_type == OCI_ZSTD for d in replaced.values()):
            if options.format == "v2s2":
                raise InvalidInput(
                    "--dest-compress-format zstd: a Docker v2s2 manifest cannot name zstd layers (use --format oci)"
                )
            if media_type == MediaType.DOCKER_MANIFEST.value:
                raw, media_type = convert_manifest(raw, media_type, "oci"), MediaType.OCI_MANIFEST.value
        new_manifest = SourceManifest(raw, media_type)
        if key is None:
            resolved.top = new_manifest
        else:
            resolved.children[key] = new_manifest
    return options


def kind_is_compressed(layer: Descriptor) -> bool:
    from .compression import kind_of

    known = kind_of(layer.media_type)
    return known is not None and known[1] != "plain"


def _holds(dest: ImageDestination, layer: Descriptor) -> bool:
    """The destination already has this blob (a failed check counts as no: the layer is recompressed)."""
    try:
        return bool(dest.blob_exists(layer))
    except FerryError:
        return False


def _label_uncompressed(m: SourceManifest) -> SourceManifest:
    """docker-archive layers are plain tars (their digest is the diff ID): say so in the manifest we copy."""
    obj = json.loads(m.raw)
    plain = {
        MediaType.DOCKER_LAYER.value: "application/vnd.docker.image.rootfs.diff.tar",
        MediaType.OCI_LAYER_GZIP.value: MediaType.OCI_LAYER.value,
    }
    obj["layers"] = [
        {**layer, "mediaType": plain.get(layer.get("mediaType"), layer.get("mediaType"))}
        for layer in obj.get("layers") or []
    ]
    return SourceManifest(json.dumps(obj, separators=(",", ":")).encode(), m.media_type)


def _selected(manifests: Sequence[Descriptor], platforms: Sequence[Platform]) -> list[Descriptor]:
    if not platforms:
        return list(manifests)
    out: list[Descriptor] = []
    for want in platforms:
        found = [d for d in manifests if d.platform is not None and d.platform.matches(want)]
        if not found:
            available = ", ".join(str(d.platform) for d in manifests if d.platform) or "none"
            raise InvalidInput(f"no image for platform {want} in the index (available: {available})")
        out.extend(d for d in found if d not in out)
    return out


# -- planning (pure) -----------------------------------------------------------------------------------------------


def _target_format(media_type: str, options: CopyOptions, info: DestinationInfo) -> str | None:
    """``"oci"``/``"v2s2"`` when the manifest must be converted, else ``None``."""
    want = options.format
    if want is None and info.supported_types is not None and media_type not in info.supported_types:
        if options.preserve_digests:
            # containers/image, when it may not modify the manifest: no conversion, the manifest goes as it is
            # ("hoping for the best": an OCI layout stores a Docker manifest; skopeo does the same)
            return None
        want = "oci" if media_type in V2S2_TYPES else "v2s2"
    if want == "oci" and media_type in V2S2_TYPES:
        return "oci"
    if want == "v2s2" and media_type in OCI_TYPES:
        return "v2s2"
    return None


class _Builder:
    def __init__(self) -> None:
        self.plan = Plan()
        #: (store, digest) -> id of the step that first puts it there
        self.first: dict[tuple[str, str], BlobStep] = {}
        #: (where, digest) -> step id, for a blob already planned for that place: a registry repository (every
        #: tag of it shares one blob store, so one step serves them all), else the exact destination
        self.per_dest: dict[tuple[str, str], str] = {}
        self.manifests: dict[tuple[str, str, str | None], str] = {}
        self.counter = 0

    def _id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def blob(self, r: ResolvedImage, desc: Descriptor) -> str:
        where = f"{r.dest_info.store}/{r.dest_info.repository}" if r.dest_info.is_registry else r.destination
        key_dest = (where, str(desc.digest))
        if key_dest in self.per_dest:
            return self.per_dest[key_dest]
        store_key = (r.dest_info.store, str(desc.digest))
        first = self.first.get(store_key)
        change = r.recompress.get(str(desc.digest))
        gzip_from: dict[str, Any] = (
            {
                "source_digest": change.source.digest,
                "source_size": change.source.size,
                "source_media_type": change.source.media_type,
                "recompress": change.op,
                "staged": r.staged.get(str(desc.digest), ""),
            }
            if change is not None
            else {}
        )
        if first is None:
            step = BlobStep(
                self._id("b"), r.source_name, r.destination_name, desc.digest, desc.size, desc.media_type, **gzip_from
            )
            self.first[store_key] = step
        else:
            mount_from = None
            if r.dest_info.is_registry:
                first_repo = first.destination.reference
                if first_repo is not None and first_repo.repository != r.dest_info.repository:
                    mount_from = first_repo.repository
            step = BlobStep(
                self._id("b"),
                r.source_name,
                r.destination_name,
                desc.digest,
                desc.size,
                desc.media_type,
                mount_from=mount_from,
                deps=(first.id,),
                **gzip_from,
            )
        self.plan.steps[step.id] = step
        self.per_dest[key_dest] = step.id
        return step.id

    def manifest(
        self, r: ResolvedImage, raw: bytes, media_type: str, tag: str | None, deps: Iterable[str], *, top: bool = False
    ) -> str:
        key = (r.destination, str(Digest.of(raw)), tag if not top else f"top:{tag}")
        if key in self.manifests:
            return self.manifests[key]
        step = ManifestStep(
            self._id("m"), r.destination_name, raw, media_type, tag, tuple(dict.fromkeys(deps)), top=top
        )
        self.plan.steps[step.id] = step
        self.manifests[key] = step.id
        return step.id


def _dest_tag(destination: str) -> str | None:
    """The tag a destination name writes (``None``: the transport's own default or a digest reference)."""
    name = ImageName.parse(destination)
    if name.reference is not None:
        return name.reference.tag if name.reference.digest is None else None
    return None


def plan_copy(images: Sequence[ResolvedImage], options: CopyOptions) -> Plan:
    """Turn resolved images into one plan; each (destination store, digest) is transferred once."""
    b = _Builder()
    for n, r in enumerate(images):
        _plan_one(b, r, r.options or options, f"i{n + 1}")
    return b.plan


class Planner:
    """``plan_copy`` one image at a time (a pipelined sync plans each image as soon as it is resolved).

    Dedupe spans every image added so far, as in one ``plan_copy`` call. ``add`` returns the new image plan
    and the steps it added (a step an earlier image already planned is listed in the image, not returned).
    """

    def __init__(self, options: CopyOptions) -> None:
        self.options = options
        self._b = _Builder()

    def add(self, r: ResolvedImage) -> tuple[ImagePlan, dict[str, Step]]:
        counter = self._b.counter
        _plan_one(self._b, r, r.options or self.options, f"i{len(self._b.plan.images) + 1}")
        new: dict[str, Step] = {}
        for sid in reversed(self._b.plan.steps):  # step ids count up: the new ones are at the end
            if int(sid[1:]) <= counter:
                break
            new[sid] = self._b.plan.steps[sid]
        return self._b.plan.images[-1], dict(reversed(new.items()))

    def up_to_date(self, source: str, destination: str, source_digest: str, dest_digest: str) -> ImagePlan:
        """An image found unchanged without resolving it (sync's HEAD check): it gets an id and no steps."""
        image = ImagePlan(f"i{len(self._b.plan.images) + 1}", source, destination, source_digest, dest_digest)
        image.up_to_date = True
        self._b.plan.images.append(image)
        return image


def _plan_one(b: _Builder, r: ResolvedImage, options: CopyOptions, image_id: str) -> None:
    top = r.top
    top_type = top.media_type
    info = r.dest_info
    img = ImagePlan(image_id, r.source, r.destination, str(top.digest), str(top.digest), attachment=r.attachment)
    b.plan.images.append(img)
    steps: list[str] = []

    def add(sid: str) -> str:
        if sid not in steps:
            steps.append(sid)
        return sid

    if top_type in INDEX_TYPES and options.multi_arch != "index-only":
        if not info.supports_index:
            raise InvalidInput(
                f"{r.destination} holds a single image: copy one platform (without --all) or use another destination"
            )
        index = top.parsed()
        target = _target_format(top_type, options, info)
        child_ids: list[str] = []
        converted: dict[str, Descriptor] = {}
        for d in index.manifests:
            child = r.children.get(d.digest)
            if child is None:
                continue
            raw, mt = child.raw, child.media_type
            ctarget = _target_format(mt, options, info) or (target if mt not in INDEX_TYPES else None)
            if ctarget is not None:
                _refuse_conversion(options, r)
                raw = convert_manifest(raw, mt, ctarget)
                mt = MediaType.OCI_MANIFEST.value if ctarget == "oci" else MediaType.DOCKER_MANIFEST.value
                converted[str(d.digest)] = Descriptor(mt, Digest.of(raw), len(raw))
            elif child.digest != d.digest:  # its layers were (de/re)compressed
                converted[str(d.digest)] = Descriptor(mt, Digest.of(raw), len(raw))
            blob_ids = [add(b.blob(r, blob)) for blob in parse_manifest(raw, mt).blobs]
            img.size += sum(x.size for x in parse_manifest(raw, mt).blobs)
            child_ids.append(add(b.manifest(r, raw, mt, None, blob_ids)))
            img.manifests.append(str(Digest.of(raw)))
        raw, mt = top.raw, top_type
        selected_all = len(r.children) == len(index.manifests)
        if not selected_all:
            _refuse_rewrite(options, r, "a platform subset")
            raw = _subset_index(raw, set(r.children))
        if target is not None or converted:
            _refuse_conversion(options, r)
            fmt = target or _format_of(mt)
            raw = convert_manifest(raw, mt, fmt, converted)
            mt = _convert_type(mt, fmt)
        img.dest_digest = str(Digest.of(raw))
        img.manifests.append(img.dest_digest)
        top_step = b.manifest(r, raw, mt, _dest_tag(r.destination), child_ids, top=True)
    else:
        raw, mt = top.raw, top_type
        target = _target_format(mt, options, info)
        if target is not None:
            _refuse_conversion(options, r)
            raw = convert_manifest(raw, mt, target)
            mt = _convert_type(mt, target)
        parsed = parse_manifest(raw, mt)
        blob_ids = [add(b.blob(r, blob)) for blob in parsed.blobs] if options.multi_arch != "index-only" else []
        img.size = sum(x.size for x in parsed.blobs)
        img.dest_digest = str(Digest.of(raw))
        img.manifests.append(img.dest_digest)
        top_step = b.manifest(r, raw, mt, _dest_tag(r.destination), blob_ids, top=True)
    if r.dest_digest is not None and str(r.dest_digest) == img.dest_digest and not r.extras:
        # The destination already has exactly this image: nothing to do but the additional tags.
        _drop_unshared(b, [*steps, top_step], img)
        steps.clear()
        for extra_tag in options.additional_tags:
            add(b.manifest(r, raw, mt, extra_tag, []))
        img.up_to_date = not steps
        img.steps = steps
        return
    add(top_step)
    for extra_tag in options.additional_tags:
        add(b.manifest(r, raw, mt, extra_tag, [top_step]))
    for extra, extra_ref in r.extras:
        e_parsed = extra.parsed()
        deps = [add(b.blob(r, blob)) for blob in e_parsed.blobs]
        add(b.manifest(r, extra.raw, extra.media_type, extra_ref, [*deps, top_step]))
    img.steps = steps


def _shared(b: _Builder, sid: str, img: ImagePlan) -> bool:
    return any(sid in other.steps for other in b.plan.images if other is not img)


def _drop_unshared(b: _Builder, sids: list[str], img: ImagePlan) -> None:
    """Remove steps planned for an up-to-date image unless another image needs them."""
    for sid in sids:
        if sid in b.plan.steps and not _shared(b, sid, img):
            step = b.plan.steps.pop(sid)
            if isinstance(step, BlobStep):
                for key, first in list(b.first.items()):
                    if first.id == sid:
                        del b.first[key]
                for key, val in list(b.per_dest.items()):
                    if val == sid:
                        del b.per_dest[key]
            else:
                for mkey, mval in list(b.manifests.items()):
                    if mval == sid:
                        del b.manifests[mkey]


def _format_of(media_type: str) -> str:
    return "oci" if media_type in OCI_TYPES else "v2s2"


def _convert_type(media_type: str, target: str) -> str:
    if media_type in INDEX_TYPES:
        return MediaType.OCI_INDEX.value if target == "oci" else MediaType.DOCKER_MANIFEST_LIST.value
    return MediaType.OCI_MANIFEST.value if target == "oci" else MediaType.DOCKER_MANIFEST.value


def _refuse_conversion(options: CopyOptions, r: ResolvedImage) -> None:
    _refuse_rewrite(options, r, "a manifest format conversion")


def _refuse_rewrite(options: CopyOptions, r: ResolvedImage, why: str) -> None:
    if options.preserve_digests:
        raise InvalidInput(f"copying {r.source} needs {why}, which changes digests, but --preserve-digests was given")


def _subset_index(raw: bytes, keep: set[Digest]) -> bytes:
    obj = json.loads(raw)
    obj["manifests"] = [m for m in obj.get("manifests") or [] if Digest.parse(m["digest"]) in keep]
    return json.dumps(obj, separators=(",", ":")).encode()
