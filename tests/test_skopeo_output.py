"""What scripts grep: skopeo's progress lines when stdout is not a terminal, sync's logrus lines, exit codes.

Each command runs with ferry and with skopeo 1.9 against the same registry; skopeo copies blobs in parallel,
so the order of ``Copying blob`` lines within one image is compared as a set, everything else in order.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.harness.images import build_image, build_multiarch, push_image, push_index
from tests.harness.peer import peer_env
from tests.harness.servers import RedisServer, RegistryServer
from tests.harness.workers import start_worker
from tests.test_skopeo_flags import FERRY_BIN, both, ferry

#: every line containers/image prints while copying (ferry adds its own lines besides these)
SKOPEO_LINE = re.compile(
    r"^(Getting image (source|list) signatures|Copying (blob|config|image) sha256:\S+( \(\d+/\d+\))?"
    r"|Copying \d+ of \d+ images in list|Writing manifest( list)? to image destination|Storing (list )?signatures"
    r"|Skipping: image already present at destination)$"
)


def skopeo_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if SKOPEO_LINE.match(line)]


def comparable(lines: list[str]) -> list[object]:
    """Runs of ``Copying blob`` lines become sets (parallel copies print them in any order)."""
    out: list[object] = []
    for line in lines:
        if line.startswith("Copying blob ") and out and isinstance(out[-1], set):
            out[-1].add(line)
        elif line.startswith("Copying blob "):
            out.append({line})
        else:
            out.append(line)
    return out


def logrus_msgs(stderr: str) -> list[str]:
    """logrus lines without their timestamp; not skopeo's tag discovery ("Tag presence check", "Getting tags")."""
    return [
        re.sub(r'^time="[^"]*" ', "", line)
        for line in stderr.splitlines()
        if line.startswith("time=") and "Tag presence check" not in line and "Getting tags" not in line
    ]


@pytest.fixture(scope="module")
def images(registry: RegistryServer) -> dict[str, str]:
    base = f"test/out-{secrets.token_hex(3)}"
    push_image(registry.url, f"{base}/single", "v1", build_image("out-single", layers=[600, 300, 200], fmt="v2s2"))
    idx = build_multiarch("out-index", platforms=["linux/amd64", "linux/arm64"], layers=[300], fmt="oci")
    push_index(registry.url, f"{base}/index", "v1", idx)
    return {"single": f"{registry.host}/{base}/single:v1", "index": f"{registry.host}/{base}/index:v1", "base": base}


@pytest.mark.parametrize("kind", ["single", "index"])
def test_copy_prints_skopeos_lines(registry: RegistryServer, images: dict[str, str], kind: str) -> None:
    repo = f"{images['base']}/copied-{kind}"
    f, s = both(
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"docker://{images[kind]}",
        f"docker://{registry.host}/{repo}-{{tool}}:v1",
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert skopeo_lines(s.stdout), s.stdout
    assert comparable(skopeo_lines(f.stdout)) == comparable(skopeo_lines(s.stdout))
    # Ferry's own summary is still there (stderr), and its per-image line (stdout)
    assert "image(s):" in f.stderr
    assert any(line.startswith("Copied ") for line in f.stdout.splitlines())


def test_copy_quiet_prints_nothing(images: dict[str, str], tmp_path: Path) -> None:
    f, s = both("copy", "-q", "--src-tls-verify=false", f"docker://{images['single']}", f"dir:{tmp_path}/{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0)
    assert f.stdout == s.stdout == ""


def test_sync_lines(registry: RegistryServer, images: dict[str, str]) -> None:
    src = images["single"].rsplit(":", 1)[0]
    flags = ["--src", "docker", "--dest", "docker", "--src-tls-verify=false", "--dest-tls-verify=false"]
    dest = f"{registry.host}/{images['base']}/synced-{{tool}}"
    f, s = both("sync", "--dry-run", *flags, src, dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    want = [m.replace("synced-skopeo", "synced-ferry") for m in logrus_msgs(s.stderr)]
    assert want and logrus_msgs(f.stderr) == want
    assert any("Would have synced 1 images from 1 sources" in m for m in want)

    f, s = both("sync", *flags, src, dest)
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    want = [m.replace("synced-skopeo", "synced-ferry") for m in logrus_msgs(s.stderr)]
    assert want and logrus_msgs(f.stderr) == want
    assert comparable(skopeo_lines(f.stdout)) == comparable(skopeo_lines(s.stdout))

    # again: up to date (containers/image's line for an image already at the destination)
    f = ferry("sync", *flags, src, dest.replace("{tool}", "ferry"))
    assert f.returncode == 0, f.stderr
    assert skopeo_lines(f.stdout) == ["Skipping: image already present at destination"]
    assert any("Synced 1 images from 1 sources" in m for m in logrus_msgs(f.stderr))


def test_missing_image_exits_2_like_current_skopeo(
    registry: RegistryServer, images: dict[str, str], tmp_path: Path
) -> None:
    """skopeo ≥ 1.10 (cmd/skopeo/main.go, isNotFoundImageError) exits 2 for "manifest unknown"; 1.9 exits 1."""
    missing = f"docker://{registry.host}/test/no-such-{secrets.token_hex(3)}:v1"
    for args in (["inspect", "--tls-verify=false", missing], ["copy", "--src-tls-verify=false", missing, "dir:/x"]):
        run = ferry(*args)
        assert run.returncode == 2, run
        assert "manifest unknown" in run.stderr.lower()
    _f, s = both("copy", "--src-tls-verify=false", missing, f"dir:{tmp_path}/{{tool}}")
    assert s.returncode == 1 and "manifest unknown" in s.stderr  # the 1.9 reference, for the record
    # an OCI layout without the named image: also "not found" (oci/layout ImageNotFoundError)
    assert ferry("copy", f"oci:{tmp_path}/nolayout:x", f"dir:{tmp_path}/o").returncode == 1  # no layout at all
    single = f"docker://{images['single']}"
    assert ferry("copy", "--src-tls-verify=false", single, f"oci:{tmp_path}/lay:a").returncode == 0
    run = ferry("copy", f"oci:{tmp_path}/lay:b", f"dir:{tmp_path}/o2")
    assert run.returncode == 2, run.stderr
    # other errors stay 1
    assert ferry("inspect", "--tls-verify=false", "docker://127.0.0.1:1/x:y").returncode == 1


def test_gzipped_layer_lines_name_the_source_digest(registry: RegistryServer, tmp_path: Path) -> None:
    """A plain layer gzipped on the way to a registry: ``Copying blob`` names the digest read (containers/image)."""
    from tests.test_skopeo_flags import skopeo
    from tests.test_skopeo_rest import plain_layer_image

    repo = f"test/out-gz-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v1", build_image("out-gz", layers=[400, 200], fmt="v2s2"))
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo}:v1", f"dir:{tmp_path}/img")
    plain_digest, _plain = plain_layer_image(tmp_path / "img", tmp_path / "plain")
    f, s = both(
        "copy", "--dest-tls-verify=false", f"dir:{tmp_path}/plain", f"docker://{registry.host}/{repo}-{{tool}}:v1"
    )
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)
    assert f"Copying blob {plain_digest}" in skopeo_lines(s.stdout)
    assert comparable(skopeo_lines(f.stdout)) == comparable(skopeo_lines(s.stdout))


def test_sync_streams_each_images_logrus_line_before_its_block(registry: RegistryServer) -> None:
    """skopeo logs ``Copying image ref I/N`` as it starts each image: with stderr and stdout in one stream, each
    image's line comes right before its block, not all of them at the end."""
    base = f"test/out-stream-{secrets.token_hex(3)}"
    for tag in ("a", "b", "c"):
        push_image(registry.url, f"{base}/app", tag, build_image(f"out-stream-{tag}", layers=[200]))
    flags = ["--src", "docker", "--dest", "docker", "--src-tls-verify=false", "--dest-tls-verify=false"]
    argv = [FERRY_BIN, "sync", *flags, f"{registry.host}/{base}/app", f"{registry.host}/{base}/copy"]
    run = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, env=peer_env())
    assert run.returncode == 0, run.stdout
    lines = run.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if 'msg="Copying image ref ' in line]
    assert len(starts) == 3, run.stdout
    assert [re.search(r"ref (\d/\d)", lines[i]).group(1) for i in starts] == ["1/3", "2/3", "3/3"]  # type: ignore[union-attr]
    for i in starts:
        assert lines[i + 1] == "Getting image source signatures", run.stdout
    assert sum('msg="Synced 3 images from 1 sources"' in line for line in lines) == 1
    # as skopeo: the same from/to pairs and counters, the same closing line
    f, s = both("sync", *flags, f"{registry.host}/{base}/app", f"{registry.host}/{base}/{{tool}}")
    assert (f.returncode, s.returncode) == (0, 0), (f.stderr, s.stderr)

    def shape(stderr: str) -> tuple[list[str], list[str]]:
        """The messages in order, and the sorted from/to pairs (Ferry logs images as they end: any order)."""
        msgs = [m.replace("/skopeo/", "/ferry/") for m in logrus_msgs(stderr)]
        return [re.sub(r" from=.*", "", m) for m in msgs], sorted(re.sub(r".* from=", "", m) for m in msgs)

    assert shape(f.stderr) == shape(s.stderr)


@pytest.fixture(scope="module")
def lines_queue(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = redis_server.url_for(12)
    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    home = tmp_path_factory.mktemp("lines-worker")
    worker = start_worker(url, "lines@%h", home, concurrency=2)
    try:
        yield url
    finally:
        worker.stop(grace=5)


def test_queued_copy_and_sync_print_the_embedded_lines(
    registry: RegistryServer, images: dict[str, str], lines_queue: str
) -> None:
    """``--queue --wait``: the same skopeo lines as the embedded run (after the job id), as each image ends."""
    insecure = ["--src-tls-verify=false", "--dest-tls-verify=false"]
    src = f"docker://{images['index']}"
    runs = {
        mode: ferry("copy", "--all", *insecure, *extra, src, f"docker://{registry.host}/{images['base']}/q-{mode}:v1")
        for mode, extra in (("embedded", []), ("queued", ["--queue", lines_queue, "--wait"]))
    }
    for mode, run in runs.items():
        assert run.returncode == 0, (mode, run.stderr)
    assert skopeo_lines(runs["embedded"].stdout)
    assert comparable(skopeo_lines(runs["queued"].stdout)) == comparable(skopeo_lines(runs["embedded"].stdout))

    flags = ["--src", "docker", "--dest", "docker", *insecure]
    repo = images["single"].rsplit(":", 1)[0]
    for again in (False, True):  # the second time: up to date
        runs = {
            mode: ferry("sync", *flags, *extra, repo, f"{registry.host}/{images['base']}/qs-{mode}")
            for mode, extra in (("embedded", []), ("queued", ["--queue", lines_queue, "--wait"]))
        }
        for mode, run in runs.items():
            assert run.returncode == 0, (mode, again, run.stderr)
        want = [m.replace("qs-embedded", "qs-queued") for m in logrus_msgs(runs["embedded"].stderr)]
        assert want and logrus_msgs(runs["queued"].stderr) == want, again
        assert skopeo_lines(runs["queued"].stdout) == skopeo_lines(runs["embedded"].stdout), again
