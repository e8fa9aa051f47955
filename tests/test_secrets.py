"""Secrets stay secret: a queue URL's password never reaches an error line, and registry clients are shared only by
sides whose settings (credentials, TLS, retries) are equal in value."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.harness.images import build_image, push_image
from tests.harness.servers import RedisServer, RegistryServer, start_redis
from worker.engine.transports import ClientPool, SideConfig
from worker.redis_url import masked, reason
from worker.registry import Credentials, Reference, RetryPolicy

FERRY = str(Path(sys.executable).with_name("ferry"))
PASSWORD = "s3cret-" + secrets.token_hex(6)


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis-pw"), password=PASSWORD)
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ferry(*args: str, queue: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FERRY_QUEUE": queue, "REGISTRY_AUTH_FILE": str(tmp_path / "none.json")}
    return subprocess.run([FERRY, *args], capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def test_masked() -> None:
    assert masked("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert masked("rediss://user:pw@h:6379/0") == "rediss://user:***@h:6379/0"
    assert masked("redis://h:6379/0") == "redis://h:6379/0"
    assert masked("unix:///run/redis.sock?db=0&password=pw") == "unix:///run/redis.sock?db=0&password=***"
    assert "pw@" not in masked("redis://:pw@h:notaport/0")


CASES = [(verb, "wrong-password") for verb in ("job-list", "job-status", "limit", "copy")] + [
    (verb, case) for verb in ("job-list", "copy") for case in ("no-password", "refused", "unknown-host")
]


@pytest.mark.parametrize(("verb", "case"), CASES)
def test_queue_errors_never_show_the_password(
    locked_redis: RedisServer,
    registry: RegistryServer,
    unique_repo: str,
    tmp_path: Path,
    verb: str,
    case: str,
) -> None:
    host = f"{locked_redis.host}:{locked_redis.port}"
    queue, why = {
        "wrong-password": (f"redis://:{PASSWORD}x@{host}/0", "authentication failed"),
        "no-password": (f"redis://{host}/0", "authentication failed"),
        "refused": (f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0", "connection refused"),
        "unknown-host": (f"redis://:{PASSWORD}@nosuchhost.invalid:6379/0", "unknown host"),
    }[case]
    if verb == "copy":
        push_image(registry.url, unique_repo, "v1", build_image("secrets", layers=[300], fmt="oci"))
        argv = ["copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry.host}/{unique_repo}:v2"]  # fmt: skip
    else:
        argv = {"job-list": ["job", "list"], "job-status": ["job", "status", "j1"], "limit": ["limit"]}[verb]
    out = ferry(*argv, queue=queue, tmp_path=tmp_path)
    assert out.returncode == 1, out
    assert PASSWORD not in out.stderr + out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"Error: cannot reach the queue at {masked(queue)}: {why}"), lines[0]


def test_right_password_reaches_the_queue(locked_redis: RedisServer, tmp_path: Path) -> None:
    out = ferry("job", "list", queue=locked_redis.url, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_reason_of_real_redis_failures(locked_redis: RedisServer) -> None:
    host = f"{locked_redis.host}:{locked_redis.port}"
    for url, why in [
        (f"redis://:nope@{host}/0", "authentication failed"),
        (f"redis://127.0.0.1:{free_port()}/0", "connection refused"),
    ]:
        with pytest.raises(redis.RedisError) as info:
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        assert reason(info.value, url).startswith(why)
    # a socket timeout and an unknown kind of error, as redis-py raises them; the password never shows
    assert reason(redis.exceptions.TimeoutError("Timeout reading from socket")) == "timed out"
    url = f"redis://:{PASSWORD}@{host}/0"
    odd = redis.exceptions.ResponseError(f"ERR something about {url}")
    assert PASSWORD not in reason(odd, url) and reason(odd, url).startswith("ResponseError: ERR something about")


# --------------------------------------------------------------------------------------------------------------------
# registry clients are keyed by value


REF = Reference.parse("reg.test:5000/app:1")


def test_client_pool_keys_by_value(tmp_path: Path) -> None:
    pool = ClientPool()
    try:
        alice = SideConfig(credentials=Credentials("alice", "pw-a"))
        bob = SideConfig(credentials=Credentials("bob", "pw-b"))
        assert pool.client(REF, alice) is not pool.client(REF, bob)
        # another SideConfig object with equal settings shares the client (one token cache, one connection pool)
        assert pool.client(REF, SideConfig(credentials=Credentials("alice", "pw-a"))) is pool.client(REF, alice)
        # any setting that differs gets its own client
        insecure = SideConfig(credentials=Credentials("alice", "pw-a"), tls_verify=False)
        assert pool.client(REF, insecure) is not pool.client(REF, alice)
        certs = SideConfig(credentials=Credentials("alice", "pw-a"), cert_dir=str(tmp_path))
        assert pool.client(REF, certs) is not pool.client(REF, alice)
        patient = SideConfig(credentials=Credentials("alice", "pw-a"), retry=RetryPolicy(times=9))
        assert pool.client(REF, patient) is not pool.client(REF, alice)
        assert pool.client(REF, alice).auth._credentials == Credentials("alice", "pw-a")
        assert pool.client(REF, bob).auth._credentials == Credentials("bob", "pw-b")
    finally:
        pool.close()


def test_client_pool_many_sides_never_share() -> None:
    """The old key, ``id(side) ^ hash(creds)``, could let two different sides meet on one client; values cannot."""
    pool = ClientPool()
    try:
        clients = {}
        for i in range(200):
            side = SideConfig(credentials=Credentials(f"user{i}", f"pw{i}"))
            clients[i] = pool.client(REF, side)
        assert len({id(c) for c in clients.values()}) == 200
        assert all(c.auth._credentials == Credentials(f"user{i}", f"pw{i}") for i, c in clients.items())
    finally:
        pool.close()


def test_queue_lost_mid_command_is_one_masked_line(registry: RegistryServer, unique_repo: str, tmp_path: Path) -> None:
    """Redis goes away under ``job wait``: one line naming the masked queue and why, not an internal error."""
    server = start_redis(tmp_path / "redis", password=PASSWORD)
    try:
        push_image(registry.url, unique_repo, "v1", build_image("secrets-lost", layers=[300], fmt="oci"))
        # no worker consumes the queue: the job stays running
        submitted = ferry("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                          f"docker://{registry.host}/{unique_repo}:v1", f"docker://{registry.host}/{unique_repo}:v2",
                          queue=server.url, tmp_path=tmp_path)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip()
        env = {**os.environ, "FERRY_QUEUE": server.url}
        waiting = subprocess.Popen(
            [FERRY, "job", "wait", job], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            # once it is connected (it keeps its connection between polls), take Redis away
            watcher = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 30
            while len(watcher.client_list()) < 2:
                assert time.monotonic() < deadline and waiting.poll() is None, "job wait never reached the queue"
                time.sleep(0.1)
            watcher.close()
            server.stop()
            _out, err = waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 1
        assert PASSWORD not in err
        # no worker consumes this queue, so job wait may first warn about that (once per queue); the loss of
        # Redis itself is one Error line
        lines = [ln for ln in err.splitlines() if not ln.startswith("Warning: no worker consumes ")]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"Error: cannot reach the queue at {masked(server.url)}: "), lines[0]
        assert "internal error" not in err
    finally:
        server.stop()
