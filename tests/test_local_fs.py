"""The shared local-file helpers (worker/registry/_fs.py) and the atomic ``dir:`` commit built on them; the one tar
writer and compression detector of the archive transports (worker/engine/transports/_archive.py).

A crash is simulated by making one step of the sequence fail (os.rename, the exchange, the writer's iterator):
the target must be the whole old or the whole new thing, never a mix, and no temp file may be left."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.engine.transports._archive import TarWriter, decompress, detect_compression
from worker.engine.transports.dir import DirDestination, DirSource
from worker.registry import Descriptor, Digest, IntegrityError, MediaType
from worker.registry import _fs as fs


def listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------------
# atomic_write / atomic_file


def test_atomic_write_replaces_whole_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    assert fs.atomic_write(target, [b"new ", b"bytes"]) == 9
    assert target.read_bytes() == b"new bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    fs.atomic_write(target, [b"secret"], mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temp file left


def test_atomic_write_failing_midway_leaves_the_target(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"half of it"
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        fs.atomic_write(target, chunks())
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    with pytest.raises(RuntimeError, match="block failed"), fs.atomic_file(tmp_path / "never") as f:
        f.write(b"x")
        raise RuntimeError("block failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_file_temp_in_another_dir(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with fs.atomic_file(tmp_path / "f", tmp_dir=str(spool)) as f:
        f.write(b"x")
        assert [p.name.startswith(".ferry-f-") for p in spool.iterdir()] == [True]
        assert not (tmp_path / "f").exists()
    assert (tmp_path / "f").read_bytes() == b"x"
    assert list(spool.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# swap_in_dir


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


OLD = {"a": b"old a", "b": b"old b"}
NEW = {"a": b"new a", "c": b"new c"}


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_swap_in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    target = make_dir(tmp_path / "t", OLD)
    fs.swap_in_dir(str(make_dir(tmp_path / ".new", NEW)), str(target))
    assert listing(target) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # the old one is gone, nothing aside
    fs.swap_in_dir(str(make_dir(tmp_path / ".new2", OLD)), str(tmp_path / "fresh"))
    assert listing(tmp_path / "fresh") == OLD


def test_swap_exchange_really_exchanges(tmp_path: Path) -> None:
    a, b = make_dir(tmp_path / "a", OLD), make_dir(tmp_path / "b", NEW)
    if not fs._exchange(str(a), str(b)):
        pytest.skip("this file system cannot exchange names")
    assert listing(a) == NEW and listing(b) == OLD


def test_swap_second_rename_fails_old_target_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-rename fallback: the rename of the new directory in fails: the old one is put back, whole."""
    monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    real = os.rename
    calls: list[str] = []

    def rename(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("crash between the two renames")
        real(src, dst)

    monkeypatch.setattr(fs.os, "rename", rename)
    target = make_dir(tmp_path / "t", OLD)
    new = make_dir(tmp_path / ".new", NEW)
    with pytest.raises(OSError, match="crash between"):
        fs.swap_in_dir(str(new), str(target))
    assert listing(target) == OLD
    assert listing(new) == NEW  # the caller's staging, for it to remove
    assert len(calls) == 3  # aside, the failed rename in, the way back


def test_swap_failing_exchange_leaves_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(a: str, b: str) -> bool:
        raise OSError("crash in the exchange")

    monkeypatch.setattr(fs, "_exchange", broken)
    target = make_dir(tmp_path / "t", OLD)
    with pytest.raises(OSError, match="crash in the exchange"):
        fs.swap_in_dir(str(make_dir(tmp_path / ".new", NEW)), str(target))
    assert listing(target) == OLD


# --------------------------------------------------------------------------------------------------------------------
# dir: commit


def commit_image(path: Path, label: str) -> DirDestination:
    """A tiny dir: image (one blob, a manifest naming it) written through DirDestination, not yet committed."""
    blob = f"blob of {label}".encode()
    desc = Descriptor(MediaType.OCI_LAYER, Digest.of(blob), len(blob))
    config = {"mediaType": MediaType.OCI_CONFIG, "digest": str(desc.digest), "size": desc.size}
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST, "layers": [], "config": config}
    ).encode()
    dst = DirDestination(str(path))
    dst.put_blob(desc, [blob])
    dst.put_manifest(manifest, MediaType.OCI_MANIFEST)
    return dst


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_dir_commit_crash_leaves_the_previous_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    d = tmp_path / "d"
    with commit_image(d, "old") as dst:
        dst.commit()
    before = listing(d)
    assert set(before) == {"version", "manifest.json", Digest.of(b"blob of old").hex}

    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    real = os.rename
    failed: list[bool] = []

    def rename(src: str, dst_path: str) -> None:
        if os.path.basename(dst_path) == "d" and not failed:  # the new image going in
            failed.append(True)
            raise OSError("crash mid-commit")
        real(src, dst_path)

    def exchange_crash(a: str, b: str) -> bool:
        raise OSError("crash mid-commit")

    monkeypatch.setattr(fs.os, "rename", rename)
    if exchange:
        monkeypatch.setattr(fs, "_exchange", exchange_crash)
    with commit_image(d, "new") as dst, pytest.raises(OSError, match="crash mid-commit"):
        dst.commit()
    assert listing(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # staging removed on close, nothing aside
    assert DirSource(str(d)).get_manifest()[0] == before["manifest.json"]

    monkeypatch.undo()
    with commit_image(d, "new") as dst:
        dst.commit()
    assert set(listing(d)) == {"version", "manifest.json", Digest.of(b"blob of new").hex}


def test_dir_commit_keeps_a_symlink_and_the_directory_mode(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o750)
    os.chmod(real, 0o750)
    link = tmp_path / "link"
    link.symlink_to(real)
    with commit_image(link, "x") as dst:
        dst.commit()
    assert link.is_symlink() and "manifest.json" in listing(real)
    assert stat.S_IMODE(real.stat().st_mode) == 0o750


def test_dir_commit_in_place_on_a_mount_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount point cannot be renamed over: the image is staged inside it and its entries replaced."""
    d = tmp_path / "mnt"
    with commit_image(d, "old") as dst:
        dst.commit()
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.abspath(p) == str(d))
    dst = commit_image(d, "new")
    with dst:
        assert [p.name.startswith(".ferry-staging-") for p in d.iterdir() if p.is_dir()] == [True]
        dst.commit()
    assert set(listing(d)) == {"version", "manifest.json", Digest.of(b"blob of new").hex}
    assert [p for p in d.iterdir() if p.is_dir()] == []


# --------------------------------------------------------------------------------------------------------------------
# the one tar writer and the one compression detector (docker-archive and oci-archive share them)


def test_tar_writer_members_as_tarfile_reads_them(tmp_path: Path) -> None:
    long_name = "d/" + "x" * 120  # does not fit USTAR: a PAX header, as Go writes
    path = tmp_path / "t.tar"
    with open(path, "wb") as f:
        w = TarWriter(f, owner="root")
        w.add_dir("d", mode=0o750, mtime=1_700_000_000)
        w.add_file("d/f", 5, [b"he", b"llo"], mode=0o640, mtime=1_700_000_001)
        w.add_bytes(long_name, b"long")
        w.add_symlink("link", "d/f")
        w.close()
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == ["d", "d/f", long_name, "link"]
        assert members["d"].isdir() and members["d"].mode == 0o750 and members["d"].mtime == 1_700_000_000
        f = members["d/f"]
        assert (f.size, f.mode, f.mtime, f.uid, f.uname, f.gname) == (5, 0o640, 1_700_000_001, 0, "root", "root")
        assert tar.extractfile(f).read() == b"hello"  # type: ignore[union-attr]
        assert tar.extractfile(members[long_name]).read() == b"long"  # type: ignore[union-attr]
        assert members["link"].issym() and members["link"].linkname == "d/f"
    # two zero blocks end it, no padding to a 10 KiB record (Go's archive/tar does not pad)
    assert path.read_bytes().endswith(b"\0" * 1024) and path.stat().st_size % 10240 != 0


def test_tar_writer_refuses_a_file_that_changed(tmp_path: Path) -> None:
    with open(tmp_path / "t.tar", "wb") as f, pytest.raises(IntegrityError, match="changed while writing"):
        TarWriter(f).add_file("f", 10, [b"short"])


PLAIN = bytes(range(256)) * 300


@pytest.mark.parametrize(
    ("kind", "packed"),
    [
        ("gzip", gzip.compress(PLAIN[:1000], mtime=0) + gzip.compress(PLAIN[1000:], mtime=0)),  # two members
        ("bzip2", bz2.compress(PLAIN)),
        ("xz", lzma.compress(PLAIN)),
    ],
)
def test_detect_and_decompress(kind: str, packed: bytes) -> None:
    assert detect_compression(packed[:6]) == kind
    pieces = [packed[i : i + 777] for i in range(0, len(packed), 777)]
    assert b"".join(decompress(iter(pieces), kind, "layer")) == PLAIN
    with pytest.raises(IntegrityError, match=f"layer: invalid {kind} data"):
        b"".join(decompress(iter([packed[:20], b"\xff" * 64]), kind, "layer"))


def test_detect_compression_others() -> None:
    assert detect_compression(b"\x28\xb5\x2f\xfd\x00\x00") == "zstd"
    assert detect_compression(PLAIN[:6]) is None
    assert detect_compression(b"") is None
    with pytest.raises(IntegrityError, match="invalid zstd data"):
        list(decompress(iter([b"\x28\xb5\x2f\xfd"]), "zstd", "layer"))


def test_zstd_decompresses_every_frame_and_refuses_a_cut_one() -> None:
    import zstandard

    packed = zstandard.ZstdCompressor().compress(PLAIN[:1000]) + zstandard.ZstdCompressor().compress(PLAIN[1000:])
    pieces = [packed[i : i + 777] for i in range(0, len(packed), 777)]
    assert b"".join(decompress(iter(pieces), "zstd", "layer")) == PLAIN
    with pytest.raises(IntegrityError, match="ends before the end of its frame"):
        b"".join(decompress(iter([packed[:-5]]), "zstd", "layer"))
