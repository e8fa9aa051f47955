"""Faults a real registry cannot be made to produce, from the lying server in tests/harness/faulty.py in front of a
real registry: a flaky plain-HTTP probe, endless or looping pagination, trickling bodies."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.faulty import Fault, FaultyServer, answer, endless_pages, reset
from tests.harness.images import build_image, push_image
from tests.harness.servers import RegistryServer
from worker.registry import ClientOptions, RegistryClient, RegistryError, RetryPolicy, ServerError, TLSError
from worker.registry import _client as client_module

FERRY = str(Path(sys.executable).with_name("ferry"))
FAST_RETRY = RetryPolicy(times=3, delay=0.0)
IMG = build_image("faults", layers=[900], fmt="oci")


@pytest.fixture(autouse=True)
def forget_schemes() -> Iterator[None]:
    """Each test probes afresh (the learnt schemes are per process)."""
    client_module._SCHEMES.clear()
    yield
    client_module._SCHEMES.clear()


def insecure_client(server: FaultyServer, **options: Any) -> RegistryClient:
    options.setdefault("retry", FAST_RETRY)
    return RegistryClient(server.host, options=ClientOptions(tls_verify=False, **options))


def ferry(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FERRY, *args], capture_output=True, text=True, timeout=timeout)


def probes(server: FaultyServer) -> int:
    return server.log.count(("GET", "/v2/"))


# --------------------------------------------------------------------------------------------------------------------
# the plain-HTTP probe of --tls-verify=false


@pytest.mark.parametrize("fault", [answer(503), answer(429, "TOOMANYREQUESTS"), reset()], ids=["503", "429", "reset"])
def test_flaky_plain_http_probe_is_retried(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, fault: Any
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"^/v2/$", fault, method="GET", times=2))
    client = insecure_client(faulty)
    assert client.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert client.base_url == f"http://{faulty.host}"
    assert probes(faulty) == 3  # two faults, then the answer


def test_lasting_503_on_probe_is_temporary_not_tls(faulty: FaultyServer, unique_repo: str) -> None:
    faulty.add(Fault(r"^/v2/$", answer(503), method="GET", times=None))
    with pytest.raises(ServerError, match=r"over plain HTTP.*HTTP 503") as info:
        insecure_client(faulty, retry=RetryPolicy(times=1, delay=0.0)).get_manifest(unique_repo, "v1")
    assert not isinstance(info.value, TLSError)
    assert probes(faulty) == 2


def test_not_a_registry_keeps_the_tls_error(faulty: FaultyServer, unique_repo: str) -> None:
    """A plain-HTTP answer that is neither a registry's nor temporary (a 400) is not a registry: the TLS error."""
    faulty.add(Fault(r"^/v2/$", answer(400, "BAD"), method="GET", times=None))
    with pytest.raises(TLSError):
        insecure_client(faulty).get_manifest(unique_repo, "v1")
    assert probes(faulty) == 1  # a 400 is not retried


def test_scheme_learnt_once_per_host(faulty: FaultyServer, registry: RegistryServer, unique_repo: str) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    for _ in range(3):
        with insecure_client(faulty) as client:
            assert client.get_manifest(unique_repo, "v1").digest == IMG.digest
    assert probes(faulty) == 1


def test_cli_copy_survives_a_flaky_probe(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, tmp_path: Path
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"^/v2/$", answer(503), method="GET", times=1))
    out = ferry("copy", "--src-tls-verify=false", "--retry-delay=0s", f"docker://{faulty.host}/{unique_repo}:v1",
                f"oci:{tmp_path / 'layout'}:v1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert probes(faulty) == 2


# --------------------------------------------------------------------------------------------------------------------
# pagination that never ends


@pytest.mark.parametrize("repeat", [False, True], ids=["endless", "repeated"])
def test_tag_pagination_is_bounded(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str, repeat: bool
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"/tags/list", endless_pages(repeat=repeat), times=None))
    client = insecure_client(faulty, max_pages=20)
    expected = "links back to a page it already sent" if repeat else "more than 20 pages"
    with pytest.raises(RegistryError, match=expected):
        client.list_tags(unique_repo)
    pages = sum(1 for _method, path in faulty.log if "/tags/list" in path)
    assert pages == (1 if repeat else 20)


@pytest.mark.parametrize("repeat", [False, True], ids=["endless", "repeated"])
def test_catalog_pagination_is_bounded(faulty: FaultyServer, repeat: bool) -> None:
    faulty.add(Fault(r"/_catalog", endless_pages(repeat=repeat), times=None))
    client = insecure_client(faulty, max_pages=20)
    with pytest.raises(RegistryError, match="already sent" if repeat else "more than 20 pages"):
        client.catalog(page_size=1)


def test_cli_list_tags_refuses_a_looping_registry(
    faulty: FaultyServer, registry: RegistryServer, unique_repo: str
) -> None:
    push_image(registry.url, unique_repo, "v1", IMG)
    faulty.add(Fault(r"/tags/list", endless_pages(repeat=True), times=None))
    out = ferry("list-tags", "--tls-verify=false", f"docker://{faulty.host}/{unique_repo}")
    assert out.returncode == 1
    assert out.stderr.startswith("Error: ") and "already sent" in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1
