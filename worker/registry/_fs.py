"""Writing local files and directories so that a crash never leaves a half-written one under its final name.

- :func:`atomic_file` / :func:`atomic_write`: a temp file beside the target (or in ``tmp_dir``, on the same
  file system), written, flushed, fsynced, given its mode, then renamed onto the target in one step. On any
  failure the temp file is removed and the target is untouched.
- :func:`swap_in_dir`: put a fully written directory in place of another in one rename (see its docstring
  for exactly what is guaranteed).

Every transport and the auth-file writer use these: the sequence is written once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

#: where a directory being replaced is moved aside by the two-rename fallback of :func:`swap_in_dir`
ASIDE_PREFIX = ".ferry-old-"


@contextlib.contextmanager
def atomic_file(
    final: str | os.PathLike[str], *, tmp_dir: str | None = None, mode: int | None = 0o644
) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears complete when the block ends, or not at all.

    ``mode`` (default 0644; ``None``: keep mkstemp's 0600) is set before the rename, so the file never has the
    final name with the wrong permissions.
    """
    final = os.fspath(final)
    directory = tmp_dir or os.path.dirname(os.path.abspath(final))
    fd, tmp = tempfile.mkstemp(prefix=f".ferry-{os.path.basename(final)}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(
    final: str | os.PathLike[str], chunks: Iterable[bytes], *, tmp_dir: str | None = None, mode: int | None = 0o644
) -> int:
    """Write ``chunks`` to ``final`` with :func:`atomic_file` (nothing lands if iterating them fails); the size."""
    size = 0
    with atomic_file(final, tmp_dir=tmp_dir, mode=mode) as f:
        for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
    return size


def umask() -> int:
    """The process's umask (read by setting it and back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable; best effort where a file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: the caller falls back
    raise OSError(err, os.strerror(err), a, None, b)


def swap_in_dir(new: str, target: str) -> None:
    """Put the complete directory ``new`` at ``target`` (a sibling: same file system), replacing what was there.

    What is guaranteed, should the process die at any point:

    - ``target`` absent: one ``rename(new, target)``; ``target`` is either absent or the whole new directory.
    - ``target`` present, where Linux can exchange two names (ext4, xfs, btrfs, tmpfs...): one
      ``renameat2(RENAME_EXCHANGE)``; ``target`` is at every moment either the whole old or the whole new
      directory. The old one, now at ``new``'s name, is then removed.
    - otherwise, two renames: ``target`` -> ``.ferry-old-NAME-*`` beside it, then ``new`` -> ``target``. Between
      the two, ``target`` is briefly absent while the old directory is intact under the aside name.

    The parent directory is fsynced after the swap; leftovers of a crash (``new``, an aside) are hidden names
    beside ``target`` that the next commit to ``target`` removes.
    """
    parent = os.path.dirname(os.path.abspath(target))
    fsync_dir(new)
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)
    else:
        aside = tempfile.mkdtemp(prefix=f"{ASIDE_PREFIX}{os.path.basename(target)}-", dir=parent)
        os.rmdir(aside)  # only the unique name is wanted
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(aside, target)  # put the old one back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(parent)


__all__ = ["ASIDE_PREFIX", "atomic_file", "atomic_write", "fsync_dir", "swap_in_dir", "umask"]
