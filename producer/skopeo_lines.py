"""skopeo's progress lines, for scripts that grep them when stdout is not a terminal.

containers/image prints, per image, ``Getting image source signatures``, ``Copying blob sha256:…`` for
each layer, ``Copying config sha256:…``, ``Writing manifest to image destination`` and ``Storing
signatures``; for a list, a header and footer around one such block per instance. Ferry copies blobs of
many images at once, so each image's block is printed whole, in skopeo's order, when the image is done.

``sync`` adds skopeo's logrus lines on stderr (``Copying image ref 1/3``, ``Synced 3 images from 1
sources``; with ``--dry-run`` ``Would have copied image ref …``), in logrus's text format.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import threading
from typing import Any, TextIO

from worker.engine.executor import ImageOutcome
from worker.engine.manifest import INDEX_TYPES
from worker.engine.plan import BlobStep, ImagePlan, ManifestStep, Plan, Step
from worker.engine.steps import BlobResult

_BARE = re.compile(r"^[A-Za-z0-9\-._/@^+]+$")


def logrus_line(level: str, msg: str, **fields: str) -> str:
    """One line as logrus's TextFormatter writes it without a terminal (fields sorted, quoted when needed)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = [f'time="{now}"', f"level={level}", f"msg={_quote(msg)}"]
    parts += [f"{k}={_quote(v)}" for k, v in sorted(fields.items())]
    return " ".join(parts)


def _quote(value: str) -> str:
    return value if value and _BARE.match(value) else json.dumps(value)


def image_block(raw: bytes, read_as: dict[str, str] | None = None, *, signatures: bool = True) -> list[str]:
    """The lines skopeo prints while copying one image manifest.

    ``read_as``: a layer gzipped on the way is named by the digest read from the source, as containers/image does.
    ``signatures``: false with ``--remove-signatures`` (skopeo 1.9 then gets none: no "Getting …" line).
    """
    obj = json.loads(raw)
    read_as = read_as or {}
    lines = ["Getting image source signatures"] if signatures else []
    lines += [f"Copying blob {read_as.get(layer['digest'], layer['digest'])}" for layer in obj.get("layers") or []]
    if isinstance(obj.get("config"), dict):
        lines.append(f"Copying config {obj['config']['digest']}")
    lines += ["Writing manifest to image destination", "Storing signatures"]
    return lines


def list_block(
    index_raw: bytes, children: dict[str, bytes], read_as: dict[str, str] | None = None, *, signatures: bool = True
) -> list[str]:
    """A list: skopeo 1.9's header, each copied instance in index order, then the list itself."""
    entries = [m["digest"] for m in json.loads(index_raw).get("manifests") or []]
    copied = [d for d in entries if d in children]
    lines = ["Getting image list signatures"] if signatures else []
    lines.append(f"Copying {len(copied)} of {len(entries)} images in list")
    for n, digest in enumerate(copied, 1):
        lines.append(f"Copying image {digest} ({n}/{len(copied)})")
        lines += image_block(children[digest], read_as, signatures=signatures)
    lines += ["Writing manifest list to image destination", "Storing list signatures"]
    return lines


class SkopeoLines:
    """Progress events in, skopeo's lines out (one block per finished image)."""

    def __init__(self, plan: Plan, out: TextIO | None = None, *, signatures: bool = True) -> None:
        self.plan = plan
        self.out = out or sys.stdout
        #: false with --remove-signatures: no "Getting … signatures" lines, as skopeo 1.9
        self.signatures = signatures
        self._lock = threading.Lock()
        self._images = {img.id: img for img in plan.images}

    def start(self, plan: Plan) -> None:
        pass

    def on_bytes(self, digest: str, n: int) -> None:
        pass

    def image_planned(self, image: ImagePlan, steps: dict[str, Step]) -> None:
        """An image planned while the run goes on (a pipelined sync): its block needs its steps."""
        with self._lock:
            self._images[image.id] = image
            self.plan.steps.update(steps)

    def step_started(self, step: Step) -> None:
        pass

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        pass

    def stop(self) -> None:
        pass

    def lines_for(self, image_id: str) -> list[str]:
        img = self._images.get(image_id)
        if img is None:
            return []
        steps = [self.plan.steps.get(sid) for sid in img.steps]
        manifests = [s for s in steps if isinstance(s, ManifestStep)]
        read_as = {str(s.digest): str(s.source_digest) for s in steps if isinstance(s, BlobStep) and s.source_digest}
        top = next((s for s in manifests if s.top), None)
        if top is None:
            # nothing was written: the destination already had this image (containers/image's own words)
            return ["Skipping: image already present at destination"]
        if top.media_type in INDEX_TYPES:
            children = {str(s.digest): s.raw for s in manifests if not s.top and s.tag is None}
            return list_block(top.raw, children, read_as, signatures=self.signatures)
        return image_block(top.raw, read_as, signatures=self.signatures)

    def image_finished(self, outcome: ImageOutcome) -> None:
        if not outcome.status.ok:
            return
        with self._lock:
            for line in self.lines_for(outcome.id):
                print(line, file=self.out)
            self.out.flush()


class Tee:
    """Hand every progress event to several reporters (Ferry's own and skopeo's lines)."""

    def __init__(self, *targets: Any) -> None:
        self.targets = targets

    def start(self, plan: Plan) -> None:
        for t in self.targets:
            t.start(plan)

    def on_bytes(self, digest: str, n: int) -> None:
        for t in self.targets:
            t.on_bytes(digest, n)

    def image_planned(self, image: ImagePlan, steps: dict[str, Step]) -> None:
        for t in self.targets:
            planned = getattr(t, "image_planned", None)
            if planned is not None:
                planned(image, steps)

    def step_started(self, step: Step) -> None:
        for t in self.targets:
            t.step_started(step)

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        for t in self.targets:
            t.step_finished(step, result, error)

    def image_finished(self, outcome: ImageOutcome) -> None:
        for t in self.targets:
            t.image_finished(outcome)

    def stop(self) -> None:
        for t in self.targets:
            t.stop()


def wanted(quiet: bool, out: TextIO | None = None) -> bool:
    """skopeo's lines go out when not quiet and stdout is not a terminal."""
    stream = out or sys.stdout
    try:
        return not quiet and not stream.isatty()
    except ValueError:  # closed stream
        return False


def _repository(name: str) -> str:
    """``docker://host/repo:tag`` → ``docker://host/repo``; local names by their path."""
    if name.startswith("docker://"):
        rest = name[len("docker://") :].split("@", 1)[0]
        head, _, last = rest.rpartition("/")
        return f"docker://{head}/{last.split(':', 1)[0]}" if head else f"docker://{last.split(':', 1)[0]}"
    return name.rsplit("/", 1)[0]


def sync_log(pairs: list[tuple[str, str]], *, dry_run: bool) -> list[str]:
    """skopeo sync's logrus lines: one per image ref (counted per source repository), then the total."""
    lines = [logrus_line("warning", "Running in dry-run mode")] if dry_run else []
    per_repo: dict[str, list[tuple[str, str]]] = {}
    for src, dst in pairs:
        per_repo.setdefault(_repository(src), []).append((src, dst))
    verb = "Would have copied" if dry_run else "Copying"
    for refs in per_repo.values():
        for n, (src, dst) in enumerate(refs, 1):
            lines.append(logrus_line("info", f"{verb} image ref {n}/{len(refs)}", **{"from": src, "to": dst}))
    total = "Would have synced" if dry_run else "Synced"
    lines.append(logrus_line("info", f"{total} {len(pairs)} images from {len(per_repo)} sources"))
    return lines


class SyncLog:
    """sync's logrus lines, streamed: ``Copying image ref I/N`` as each image ends (skopeo logs it as it starts
    that image's copy; Ferry copies many at once), ``Synced N images from M sources`` at the end.

    I counts the images of the same source repository ended so far; N the images of that repository known
    to the run then (all of them once its checks are done: they are quick next to copies).
    """

    def __init__(self, enabled: bool, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.out = out or sys.stderr
        self._lock = threading.Lock()
        self._known: dict[str, int] = {}
        self._ended: dict[str, int] = {}
        self._skip: set[str] = set()
        self._seen: set[str] = set()

    def _plan_image(self, image: ImagePlan) -> None:
        if image.attachment:
            self._skip.add(image.id)  # a signature or referrer that goes along: skopeo names no such image
        elif image.id not in self._seen:
            self._seen.add(image.id)
            repo = _repository(image.source)
            self._known[repo] = self._known.get(repo, 0) + 1

    def start(self, plan: Plan) -> None:
        with self._lock:
            for image in plan.images:
                self._plan_image(image)

    def expect(self, sources: list[str]) -> None:
        """Images that are not in the plan but will be reported (already up to date)."""
        with self._lock:
            for source in sources:
                repo = _repository(source)
                self._known[repo] = self._known.get(repo, 0) + 1

    def on_bytes(self, digest: str, n: int) -> None:
        pass

    def image_planned(self, image: ImagePlan, steps: dict[str, Step]) -> None:
        with self._lock:
            self._plan_image(image)

    def step_started(self, step: Step) -> None:
        pass

    def step_finished(self, step: Step, result: BlobResult | None, error: BaseException | None) -> None:
        pass

    def image_finished(self, outcome: ImageOutcome) -> None:
        if not self.enabled or not outcome.status.ok or outcome.id in self._skip:
            return
        with self._lock:
            repo = _repository(outcome.source)
            n = self._ended[repo] = self._ended.get(repo, 0) + 1
            total = max(self._known.get(repo, 0), n)
            fields = {"from": outcome.source, "to": outcome.destination}
            print(logrus_line("info", f"Copying image ref {n}/{total}", **fields), file=self.out, flush=True)

    def stop(self) -> None:
        pass

    def finish(self) -> None:
        """The closing line: the images logged and their source repositories."""
        if self.enabled:
            total = sum(self._ended.values())
            line = logrus_line("info", f"Synced {total} images from {len(self._ended)} sources")
            print(line, file=self.out, flush=True)
