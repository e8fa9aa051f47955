"""Run the reference implementation, ``/usr/bin/skopeo`` (1.9), in an isolated setup.

Every call gets, from a per-process temp dir:

- ``--policy`` with ``{"default": [{"type": "insecureAcceptAnything"}]}`` (``copy``/``sync`` refuse to run without
  a policy; skopeo accepts the global flag for every subcommand);
- ``--registries.d`` pointing at an empty dir (no signature-storage lookaside config from the host);
- ``CONTAINERS_REGISTRIES_CONF`` set to an empty registries.conf (skopeo 1.9 has no ``--registries-conf`` flag),
  so no mirrors, aliases or blocked registries from the host apply;
- ``REGISTRY_AUTH_FILE`` set to a private auth.json, so ``skopeo login`` never touches the user's credentials.

Plain-HTTP loopback registries still need ``--tls-verify=false`` (or ``--src-tls-verify=false`` /
``--dest-tls-verify=false``) on the command line; TLS test registries take ``--cert-dir REG.cert_dir``.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SKOPEO_BIN", "SkopeoError", "peer_env", "skopeo"]

SKOPEO_BIN = "/usr/bin/skopeo"


class SkopeoError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@functools.cache
def _home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="ferry-skopeo-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    (home / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    (home / "registries.conf").write_text("")
    (home / "registries.d").mkdir()
    (home / "auth.json").write_text("{}")
    return home


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment :func:`skopeo` runs with."""
    home = _home()
    env = dict(os.environ)
    env["CONTAINERS_REGISTRIES_CONF"] = str(home / "registries.conf")
    env["REGISTRY_AUTH_FILE"] = str(home / "auth.json")
    env.pop("DOCKER_CONFIG", None)
    env.update(extra or {})
    return env


def skopeo(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo --policy P --registries.d D ARGS...`` and return the completed process (text mode).

    ``check=True`` raises :class:`SkopeoError` (a ``CalledProcessError`` whose message includes stdout/stderr).
    """
    home = _home()
    argv = [SKOPEO_BIN, "--policy", str(home / "policy.json"), "--registries.d", str(home / "registries.d"), *args]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(env),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise SkopeoError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc
