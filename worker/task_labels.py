"""What Flower shows of a Ferry task: a one-line label with the job, the image and the blob.

Celery sends a task's ``argsrepr`` with every message and task event; Flower's task list shows it in its
``args`` column. Ferry's task class fills it with a readable label (``job=… image=… blob=… (size) digest=…``)
instead of the tuple of raw arguments, for the first send and for every retry (a retry keeps the label
of the task it repeats). Labels hold names and digests only, never credentials (tasks carry none).
"""

from __future__ import annotations

from typing import Any

from celery import Task


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007 - the unit the loop stops at is the one to print
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _image(name: str) -> str:
    # Flower's column is narrow: the transport prefix of a registry name says nothing there
    return name.removeprefix("docker://")


def blob_label(job_id: str, destination: str, digest: str, size: int) -> str:
    # Flower cuts the column at about 45 characters: the short id and size first, the full digest (for the
    # search box) last
    short = digest.split(":", 1)[-1][:12]
    return f"job={job_id} image={_image(destination)} blob={short} ({_size(int(size))}) digest={digest}"


def image_label(job_id: str, destination: str, image_id: str) -> str:
    return f"job={job_id} image={_image(destination)} manifests ({image_id})"


def label(task_name: str, args: tuple[Any, ...] | list[Any] | None) -> str | None:
    """The label of a task sent with these positional arguments, or ``None`` (Celery's default repr)."""
    args = list(args or ())
    if task_name == "ferry.copy_blob" and len(args) >= 7:
        job_id, _image, _step, _source, destination, digest, size = args[:7]
        return blob_label(str(job_id), str(destination), str(digest), int(size))
    if task_name == "ferry.finalize_image" and len(args) >= 2:
        return f"job={args[0]} image={args[1]}"
    return None


class FerryTask(Task):  # type: ignore[misc]
    """Celery's Task, sending a readable ``argsrepr`` (see the module docstring)."""

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if options.get("argsrepr") is None:
            current = self.request
            if current.id and current.task == self.name and list(current.args or ()) == list(args or ()):
                # a retry of the running task: keep the label it was sent with (the producer's has the image)
                options["argsrepr"] = getattr(current, "argsrepr", None)
            if options.get("argsrepr") is None:
                options["argsrepr"] = label(self.name, args)
        return super().apply_async(args, kwargs, **options)


__all__ = ["FerryTask", "blob_label", "image_label", "label"]
