"""Shared fixtures: real registries (anonymous, htpasswd, token, TLS), Redis, unique repository names.

Session-scoped servers are shared by all tests: use :func:`unique_repo` names so tests don't see each other's
images. A test that needs a pristine registry (e.g. to count requests with no one else's noise) uses
``registry_factory``.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.faulty import FaultyServer, start_faulty
from tests.harness.servers import RedisServer, RegistryServer, start_redis, start_registry, stop_all

RegistryFactory = Callable[..., RegistryServer]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Fixture finalizers already stop everything; this catches servers started outside fixtures.
    stop_all()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Anonymous plain-HTTP registry."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A second anonymous plain-HTTP registry (e.g. a copy destination)."""
    reg = start_registry(tmp_path_factory.mktemp("registry2"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Plain-HTTP registry with htpasswd basic auth: ``.username`` / ``.password``."""
    reg = start_registry(tmp_path_factory.mktemp("auth-registry"), auth="htpasswd")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Plain-HTTP registry with Bearer token auth; ``.token_server`` counts issued tokens (``.reset()`` it)."""
    reg = start_registry(tmp_path_factory.mktemp("token-registry"), auth="token")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Anonymous HTTPS registry with a test CA: ``.ca_cert``, ``.cert_dir`` (certs.d/<host>/ca.crt)."""
    reg = start_registry(tmp_path_factory.mktemp("tls-registry"), tls=True)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A shared ``redis-server``; ``.url`` is ``redis://127.0.0.1:PORT/0``."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Start fresh registries for this test only: ``registry_factory(auth=..., tls=..., ...)`` (start_registry
    keyword arguments). They are stopped when the test ends."""
    started: list[RegistryServer] = []

    def factory(**kwargs: Any) -> RegistryServer:
        reg = start_registry(tmp_path / f"registry-{len(started)}", **kwargs)
        started.append(reg)
        return reg

    yield factory
    for reg in started:
        reg.stop()


@pytest.fixture
def faulty(registry: RegistryServer) -> Iterator[FaultyServer]:
    """A lying server in front of the shared ``registry`` (``tests/harness/faulty.py``): add faults to it,
    e.g. ``serve(...)`` for documents distribution would refuse to store."""
    server = start_faulty(registry.url)
    yield server
    server.stop()


_ALNUM = string.ascii_lowercase + string.digits


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A fresh repository name, ``test/<test-name>-<random6>``, valid for distribution's name grammar."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48].strip("-") or "repo"
    suffix = "".join(secrets.choice(_ALNUM) for _ in range(6))
    return f"test/{name}-{suffix}"
