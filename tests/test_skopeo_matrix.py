"""Everyday skopeo invocations, side by side: each command of the matrix runs with skopeo 1.9 and with ferry
against the same real registries (anonymous and htpasswd), and the exit codes, the shape of stdout and what
lands at the destination (files, digests) must match, or differ only as docs/cli.md says.

``{tool}`` in an argument becomes ``ferry``/``skopeo``, so each tool writes its own destination.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.images import build_image, build_multiarch, push_image, push_index
from tests.harness.servers import RegistryServer
from tests.test_skopeo_flags import both, skopeo, tree, write_auth
from tests.test_skopeo_output import comparable

I = "--tls-verify=false"  # noqa: E741
SI, DI = "--src-tls-verify=false", "--dest-tls-verify=false"


@dataclass(frozen=True)
class Env:
    reg: str
    auth: str
    repo: str
    tmp: Path
    authfile: str
    user: str
    password: str
    digest: str


@pytest.fixture(scope="module")
def env(registry: RegistryServer, auth_registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Env:
    repo = f"test/matrix-{secrets.token_hex(3)}"
    push_image(registry.url, repo, "v2s2", build_image("matrix-a", layers=[500, 300], fmt="v2s2", labels={"a": "1"}))
    push_image(registry.url, repo, "oci", build_image("matrix-b", layers=[400], fmt="oci"))
    push_index(registry.url, repo, "index", build_multiarch("matrix-c", platforms=["linux/amd64", "linux/arm64"]))
    assert auth_registry.username and auth_registry.password
    user, password = auth_registry.username, auth_registry.password
    push_image(auth_registry.url, repo, "v1", build_image("matrix-d", layers=[200]), auth=(user, password))
    tmp = tmp_path_factory.mktemp("matrix")
    authfile = write_auth(tmp / "auth.json", auth_registry.host, user, password)
    # local sources both tools read
    skopeo("copy", SI, f"docker://{registry.host}/{repo}:v2s2", f"dir:{tmp}/src-dir")
    skopeo("copy", SI, f"docker://{registry.host}/{repo}:oci", f"oci:{tmp}/src-oci:app")
    skopeo("copy", SI, f"docker://{registry.host}/{repo}:v2s2", f"docker-archive:{tmp}/src.tar:app:1")
    skopeo("copy", SI, f"docker://{registry.host}/{repo}:oci", f"oci-archive:{tmp}/src-oci.tar")
    raw = skopeo("inspect", "--raw", I, f"docker://{registry.host}/{repo}:index").stdout
    (tmp / "index.json").write_text(raw)
    (tmp / "sync.yaml").write_text(f"{registry.host}:\n  tls-verify: false\n  images:\n    {repo}: [v2s2, oci]\n")
    digest = json.loads(skopeo("inspect", I, f"docker://{registry.host}/{repo}:v2s2").stdout)["Digest"]
    return Env(registry.host, auth_registry.host, repo, tmp, authfile, user, password, digest)


def fill(args: list[str], e: Env, case: str) -> list[str]:
    sub = {
        "{reg}": e.reg, "{auth}": e.auth, "{repo}": e.repo, "{tmp}": str(e.tmp), "{authfile}": e.authfile,
        "{case}": case, "{creds}": f"{e.user}:{e.password}", "{user}": e.user, "{password}": e.password,
        "{digest}": e.digest,
    }  # fmt: skip
    out = []
    for a in args:
        for k, v in sub.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def shape(stdout: str) -> Any:
    """What a script sees of stdout: parsed JSON where it is JSON (without ``LayersData``, which skopeo 1.9 lacks),
    else the lines skopeo prints (Ferry's own ``Copied``/``Skipped``/``Would`` lines are extra; blob lines of one
    image in any order: both copy blobs in parallel)."""
    try:
        obj = json.loads(stdout)
    except ValueError:
        return comparable([ln for ln in stdout.splitlines() if not ln.startswith(("Copied ", "Skipped ", "Would "))])
    if isinstance(obj, dict):
        obj.pop("LayersData", None)
    return obj


def image_blocks(stdout: str) -> list[str]:
    """Each image's block of skopeo lines (blob lines sorted), the blocks sorted."""
    blocks: list[list[str]] = []
    for line in shape(stdout) if stdout.strip() else []:
        if line == "Getting image source signatures" or line == "Skipping: image already present at destination":
            blocks.append([])
        if not blocks:
            blocks.append([])
        blocks[-1].append(repr(sorted(line)) if isinstance(line, set) else line)
    return sorted(repr(b) for b in blocks)


def dest_state(e: Env, tool: str, where: str) -> Any:
    """What a command left at ``where`` (a ``{tool}`` path or registry name): files and their hashes, or digests."""
    target = fill([where.replace("{tool}", tool)], e, "")[0]
    if target.startswith("docker://"):
        run = skopeo("inspect", "--raw", I, target, check=False)
        return hashlib.sha256(run.stdout.encode()).hexdigest() if run.returncode == 0 else None
    path = Path(target.split(":", 1)[1].split(":", 1)[0] if ":" in target else target)
    if path.is_dir():
        return tree(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


#: (id, arguments, destination to compare or "", what to compare on stdout: "exact", "shape", "none")
MATRIX: list[tuple[str, list[str], str, str]] = [
    ("inspect", ["inspect", I, "docker://{reg}/{repo}:v2s2"], "", "exact"),
    ("inspect-no-tags", ["inspect", I, "-n", "docker://{reg}/{repo}:oci"], "", "exact"),
    ("inspect-raw", ["inspect", I, "--raw", "docker://{reg}/{repo}:index"], "", "exact"),
    ("inspect-config", ["inspect", I, "--config", "docker://{reg}/{repo}:v2s2"], "", "exact"),
    ("inspect-config-raw", ["inspect", I, "--config", "--raw", "docker://{reg}/{repo}:oci"], "", "exact"),
    ("inspect-index", ["inspect", I, "--override-arch", "arm64", "docker://{reg}/{repo}:index"], "", "exact"),
    ("inspect-format", ["inspect", I, "-f", "{{.Digest}} {{.Architecture}} {{len .Layers}} {{.Labels.a}}",
                        "docker://{reg}/{repo}:v2s2"], "", "exact"),
    ("inspect-format-range", ["inspect", I, "--format", "{{range .LayersData}}{{.Digest}} {{.Size}}\n{{end}}",
                              "docker://{reg}/{repo}:v2s2"], "", "exact"),
    ("inspect-dir", ["inspect", "dir:{tmp}/src-dir"], "", "exact"),
    ("inspect-index-global-override", ["--override-arch", "arm64", "inspect", I, "docker://{reg}/{repo}:index"], "",
     "exact"),
    ("copy-global-flag-after-verb", ["copy", "--override-arch", "arm64", SI, "docker://{reg}/{repo}:index",
                                     "dir:{tmp}/{case}-{tool}"], "dir:{tmp}/{case}-{tool}", "shape"),
    ("inspect-index-host", ["inspect", I, "--override-arch", "amd64", "docker://{reg}/{repo}:index"], "", "exact"),
    ("inspect-index-raw-child", ["inspect", I, "--raw", "--override-arch", "arm64", "docker://{reg}/{repo}:index"],
     "", "exact"),
    ("copy-index-system-dir", ["--override-arch", "arm64", "copy", SI, "docker://{reg}/{repo}:index",
                               "dir:{tmp}/{case}-{tool}"], "dir:{tmp}/{case}-{tool}", "shape"),
    ("copy-digestfile-reg", ["copy", SI, DI, "--digestfile", "{tmp}/{case}-{tool}.txt", "docker://{reg}/{repo}:index",
                             "docker://{reg}/{repo}-{case}-{tool}:v1"], "{tmp}/{case}-{tool}.txt", "shape"),
    ("copy-by-digest", ["copy", SI, "docker://{reg}/{repo}@{digest}", "dir:{tmp}/{case}-{tool}"],
     "dir:{tmp}/{case}-{tool}", "shape"),
    ("manifest-digest-index", ["manifest-digest", "{tmp}/index.json"], "", "exact"),
    ("inspect-dir-config", ["inspect", "--config", "dir:{tmp}/src-dir"], "", "exact"),
    ("inspect-index-config", ["inspect", I, "--config", "--override-arch", "arm64", "docker://{reg}/{repo}:index"], "",
     "exact"),
    ("inspect-archive-raw", ["inspect", "--raw", "docker-archive:{tmp}/src.tar"], "", "exact"),
    ("inspect-oci-archive", ["inspect", "oci-archive:{tmp}/src-oci.tar"], "", "exact"),
    ("copy-all-dir", ["copy", SI, "--all", "docker://{reg}/{repo}:index", "dir:{tmp}/{case}-{tool}"],
     "dir:{tmp}/{case}-{tool}", "shape"),
    ("copy-multi-arch-index-only", ["copy", SI, DI, "--multi-arch", "index-only", "docker://{reg}/{repo}:index",
                                    "oci:{tmp}/{case}-{tool}"], "oci:{tmp}/{case}-{tool}", "shape"),
    ("copy-preserve-digests", ["copy", SI, "--preserve-digests", "docker://{reg}/{repo}:v2s2",
                               "oci:{tmp}/{case}-{tool}"], "oci:{tmp}/{case}-{tool}", "shape"),
    ("copy-remove-signatures-all", ["copy", SI, DI, "--all", "--remove-signatures", "docker://{reg}/{repo}:index",
                                    "docker://{reg}/{repo}-{case}-{tool}:v1"], "docker://{reg}/{repo}-{case}-{tool}:v1",
     "shape"),
    ("copy-remove-signatures", ["copy", SI, DI, "--remove-signatures", "docker://{reg}/{repo}:v2s2",
                                "docker://{reg}/{repo}-{case}-{tool}:v1"], "docker://{reg}/{repo}-{case}-{tool}:v1",
     "shape"),
    ("inspect-oci", ["inspect", "oci:{tmp}/src-oci:app"], "", "exact"),
    ("inspect-archive", ["inspect", "docker-archive:{tmp}/src.tar"], "", "exact"),
    ("inspect-authfile", ["inspect", I, "--authfile", "{authfile}", "docker://{auth}/{repo}:v1"], "", "exact"),
    ("inspect-creds", ["inspect", I, "--creds", "{creds}", "docker://{auth}/{repo}:v1"], "", "exact"),
    ("list-tags", ["list-tags", I, "docker://{reg}/{repo}"], "", "exact"),
    ("list-tags-archive", ["list-tags", "docker-archive:{tmp}/src.tar"], "", "exact"),
    ("copy-reg-dir", ["copy", SI, "docker://{reg}/{repo}:v2s2", "dir:{tmp}/{case}-{tool}"], "dir:{tmp}/{case}-{tool}",
     "shape"),
    ("copy-reg-oci", ["copy", SI, "docker://{reg}/{repo}:oci", "oci:{tmp}/{case}-{tool}:x"], "oci:{tmp}/{case}-{tool}",
     "shape"),
    ("copy-reg-oci-all", ["copy", SI, "--all", "docker://{reg}/{repo}:index", "oci:{tmp}/{case}-{tool}"],
     "oci:{tmp}/{case}-{tool}", "shape"),
    ("copy-reg-archive", ["copy", SI, "docker://{reg}/{repo}:v2s2", "docker-archive:{tmp}/{case}-{tool}.tar:a:b"],
     "docker-archive:{tmp}/{case}-{tool}.tar", "shape"),
    ("copy-reg-oci-archive", ["copy", SI, "docker://{reg}/{repo}:oci", "oci-archive:{tmp}/{case}-{tool}.tar"],
     "oci-archive:{tmp}/{case}-{tool}.tar", "shape"),
    ("copy-dir-oci", ["copy", "dir:{tmp}/src-dir", "oci:{tmp}/{case}-{tool}:y"], "oci:{tmp}/{case}-{tool}", "shape"),
    ("copy-oci-dir", ["copy", "oci:{tmp}/src-oci:app", "dir:{tmp}/{case}-{tool}"], "dir:{tmp}/{case}-{tool}", "shape"),
    ("copy-archive-dir", ["copy", "docker-archive:{tmp}/src.tar", "dir:{tmp}/{case}-{tool}"], "dir:{tmp}/{case}-{tool}",
     "shape"),
    ("copy-reg-reg", ["copy", SI, DI, "docker://{reg}/{repo}:v2s2", "docker://{reg}/{repo}-{case}-{tool}:v1"],
     "docker://{reg}/{repo}-{case}-{tool}:v1", "shape"),
    ("copy-reg-reg-all", ["copy", SI, DI, "--all", "docker://{reg}/{repo}:index", "docker://{reg}/{repo}-{case}-{tool}:v1"],
     "docker://{reg}/{repo}-{case}-{tool}:v1", "shape"),
    ("copy-oci-reg", ["copy", DI, "oci:{tmp}/src-oci:app", "docker://{reg}/{repo}-{case}-{tool}:v1"],
     "docker://{reg}/{repo}-{case}-{tool}:v1", "shape"),
    ("copy-format-oci", ["copy", SI, "--format", "oci", "docker://{reg}/{repo}:v2s2", "dir:{tmp}/{case}-{tool}"],
     "dir:{tmp}/{case}-{tool}", "shape"),
    ("copy-authfile", ["copy", "--authfile", "{authfile}", SI, "docker://{auth}/{repo}:v1", "dir:{tmp}/{case}-{tool}"],
     "dir:{tmp}/{case}-{tool}", "shape"),
    ("copy-quiet", ["copy", "-q", SI, "docker://{reg}/{repo}:oci", "dir:{tmp}/{case}-{tool}"],
     "dir:{tmp}/{case}-{tool}", "exact"),
    ("copy-digestfile", ["copy", SI, "--digestfile", "{tmp}/{case}-{tool}.txt", "docker://{reg}/{repo}:v2s2",
                         "oci:{tmp}/{case}-{tool}-out:z"], "{tmp}/{case}-{tool}.txt", "shape"),
    ("sync-dry-run", ["sync", "--dry-run", "--src", "docker", "--dest", "dir", SI, "{reg}/{repo}",
                      "{tmp}/{case}-{tool}"], "{tmp}/{case}-{tool}", "shape"),
    ("sync-dir", ["sync", "--src", "docker", "--dest", "dir", SI, "{reg}/{repo}:v2s2", "{tmp}/{case}-{tool}"],
     "{tmp}/{case}-{tool}", "shape"),
    ("sync-scoped", ["sync", "--scoped", "--src", "docker", "--dest", "dir", SI, "{reg}/{repo}:oci",
                     "{tmp}/{case}-{tool}"], "{tmp}/{case}-{tool}", "shape"),
    ("sync-yaml", ["sync", "--src", "yaml", "--dest", "dir", "{tmp}/sync.yaml", "{tmp}/{case}-{tool}"],
     "{tmp}/{case}-{tool}", "shape"),
    ("sync-dir-all", ["sync", "--all", "--src", "docker", "--dest", "dir", SI, "{reg}/{repo}:index",
                          "{tmp}/{case}-{tool}"], "{tmp}/{case}-{tool}", "shape"),
    ("manifest-digest", ["manifest-digest", "{tmp}/src-dir/manifest.json"], "", "exact"),
    ("login", ["login", I, "--authfile", "{tmp}/{case}-{tool}.json", "-u", "{user}", "-p", "{password}", "{auth}"],
     "{tmp}/{case}-{tool}.json", "exact"),
    ("login-stdin", ["login", I, "--authfile", "{tmp}/{case}-{tool}.json", "-u", "{user}", "--password-stdin",
                     "{auth}"], "{tmp}/{case}-{tool}.json", "exact"),
    ("login-get-login", ["login", "--authfile", "{authfile}", "--get-login", "{auth}"], "", "exact"),
    ("logout", ["logout", "--authfile", "{tmp}/{case}-{tool}.json", "{auth}"], "{tmp}/{case}-{tool}.json", "exact"),
    ("logout-all", ["logout", "--authfile", "{tmp}/{case}-{tool}.json", "--all"], "{tmp}/{case}-{tool}.json", "exact"),
    ("delete", ["delete", I, "docker://{reg}/{repo}-del-{tool}:v1"], "docker://{reg}/{repo}-del-{tool}:v1", "exact"),
    # errors: the exit code and one line on stderr
    ("err-missing-tag", ["inspect", I, "docker://{reg}/{repo}:nope"], "", "exact"),
    ("err-missing-repo", ["copy", SI, "docker://{reg}/{repo}-none:v1", "dir:{tmp}/{case}-{tool}"], "", "exact"),
    ("err-bad-transport", ["inspect", "nope:x"], "", "exact"),
    ("err-no-transport", ["copy", "{reg}/{repo}:v2s2", "dir:{tmp}/{case}-{tool}"], "", "exact"),
    ("err-bad-creds", ["inspect", I, "--creds", "wrong:creds", "docker://{auth}/{repo}:v1"], "", "exact"),
    ("err-login-bad-creds", ["login", I, "--authfile", "{tmp}/{case}-{tool}.json", "-u", "x", "-p", "y", "{auth}"],
     "{tmp}/{case}-{tool}.json", "exact"),
    ("err-logout-not-logged-in", ["logout", "--authfile", "{authfile}", "{reg}"], "", "exact"),
    ("err-no-creds", ["inspect", I, "docker://{auth}/{repo}:v1"], "", "exact"),
    ("err-missing-dir", ["inspect", "dir:{tmp}/none"], "", "exact"),
    ("err-list-tags-tag", ["list-tags", I, "docker://{reg}/{repo}:v2s2"], "", "exact"),
    ("err-delete-missing", ["delete", I, "docker://{reg}/{repo}:nope"], "", "exact"),
    ("err-list-tags-missing", ["list-tags", I, "docker://{reg}/{repo}-none"], "", "exact"),
    ("err-copy-bad-dest-transport", ["copy", SI, "docker://{reg}/{repo}:oci", "nope:{tmp}/x"], "", "exact"),
    ("err-copy-dest-bad-creds", ["copy", SI, DI, "--dest-creds", "x:y", "docker://{reg}/{repo}:oci",
                                 "docker://{auth}/{repo}-{case}:v1"], "", "exact"),
    ("err-tls", ["inspect", "docker://{reg}/{repo}:oci"], "", "exact"),
    ("err-oci-missing-ref", ["inspect", "oci:{tmp}/src-oci:nope"], "", "exact"),
    ("err-manifest-digest-missing", ["manifest-digest", "{tmp}/none.json"], "", "exact"),
    ("err-extra-arg", ["inspect", I, "docker://{reg}/{repo}:v2s2", "extra"], "", "exact"),
    ("err-missing-arg", ["copy", "docker://{reg}/{repo}:v2s2"], "", "exact"),
]  # fmt: skip

#: deliberate differences (docs/cli.md): the case and the exit codes (ferry, skopeo 1.9)
EXIT_DIFFERENCES = {
    # skopeo >= 1.10 exits 2 for "manifest unknown"; 1.9 exits 1
    "err-missing-tag": (2, 1),
    "err-missing-repo": (2, 1),
    "err-oci-missing-ref": (2, 1),
    # skopeo 1.9's copy prints its usage and exits 0 on a missing argument; current skopeo exits 1
    "err-missing-arg": (1, 0),
    # .LayersData: skopeo >= 1.10 (1.9 lacks it)
    "inspect-format-range": (0, 1),
}


#: v2s2 -> OCI: Ferry keeps the config blob, skopeo re-serialises it as an OCI config (docs/cli.md, --format): the
#: config (and so the manifest and its digest) differ; the layers are the same files
CONFIG_KEPT = {"copy-dir-oci", "copy-format-oci", "copy-digestfile"}


def prepare(e: Env, case: str) -> dict[str, str] | None:
    """What a case needs first (for each tool: a tag to delete, a login to remove); the environment to run in."""
    if case == "delete":
        for tool in ("ferry", "skopeo"):
            skopeo("copy", SI, DI, f"docker://{e.reg}/{e.repo}:oci", f"docker://{e.reg}/{e.repo}-del-{tool}:v1")
    if case.startswith("logout"):
        for tool in ("ferry", "skopeo"):
            path = e.tmp / f"{case}-{tool}.json"
            write_auth(path, e.auth, e.user, e.password)
            data = json.loads(path.read_text())
            data["auths"]["other.example"] = {"auth": "eDp5"}
            path.write_text(json.dumps(data))
    return None


def run_both(e: Env, case: str, args: list[str]) -> tuple[Any, Any]:
    argv = fill(args, e, case)
    if case == "login-stdin":
        import subprocess

        from tests.harness.peer import peer_env
        from tests.test_skopeo_flags import FERRY_BIN

        out = []
        for tool, binary in (("ferry", [FERRY_BIN]), ("skopeo", ["/usr/bin/skopeo"])):
            out.append(subprocess.run([*binary, *(a.replace("{tool}", tool) for a in argv)], input=e.password + "\n",
                                      capture_output=True, text=True, timeout=60, env=peer_env()))  # fmt: skip
        return out[0], out[1]
    return both(*argv)


@pytest.mark.parametrize(("case", "args", "where", "compare"), MATRIX, ids=[m[0] for m in MATRIX])
def test_matrix(env: Env, case: str, args: list[str], where: str, compare: str) -> None:
    prepare(env, case)
    f, s = run_both(env, case, args)
    want = EXIT_DIFFERENCES.get(case, (s.returncode, s.returncode))
    assert (f.returncode, s.returncode) == want, (f.stderr, s.stderr)
    if f.returncode != s.returncode:
        return  # a documented difference: nothing more to compare
    if f.returncode != 0:
        errors = [ln for ln in f.stderr.splitlines() if ln.startswith("Error: ")]
        assert len(errors) == 1 and "Traceback" not in f.stderr, f.stderr
        # Ferry fails before writing anything (skopeo may have printed progress lines by then)
        assert f.stdout == "", f.stdout
        return
    if case in CONFIG_KEPT:
        config = re.compile(r"^Copying config \S+", re.M)
        assert shape(config.sub("Copying config X", f.stdout)) == shape(config.sub("Copying config X", s.stdout))
        mine, theirs = dest_state(env, "ferry", where), dest_state(env, "skopeo", where)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            assert len(set(mine.values()) & set(theirs.values())) >= 2  # both layers, byte for byte
        return
    if case.startswith("sync"):
        # sync copies several images at once: each image's block is the same, in any order
        assert image_blocks(f.stdout) == image_blocks(s.stdout)
    elif compare in ("exact", "shape"):
        assert shape(f.stdout) == shape(s.stdout)
    if where:
        assert dest_state(env, "ferry", where) == dest_state(env, "skopeo", where)
