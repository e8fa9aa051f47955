"""Image references: parsed and normalised like docker/skopeo; every invalid input names what is wrong."""

from __future__ import annotations

import pytest

from worker.registry import DOCKER_HUB, Digest, InvalidDigest, InvalidReference, Reference

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("library/alpine", "docker.io", "library/alpine", "latest", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("registry-1.docker.io/foo/bar:t", "docker.io", "foo/bar", "t", None),
        ("foo/bar", "docker.io", "foo/bar", "latest", None),
        ("localhost/foo", "localhost", "foo", "latest", None),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None),
        ("127.0.0.1:5000/x/y/z", "127.0.0.1:5000", "x/y/z", "latest", None),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        ("[::1]/x:v1", "[::1]", "x", "v1", None),
        ("quay.io/a-b/c_d.e__f:T_ag.1-2", "quay.io", "a-b/c_d.e__f", "T_ag.1-2", None),
        (f"quay.io/a/b:t@{SHA256}", "quay.io", "a/b", "t", SHA256),
        (f"quay.io/a/b@{SHA256}", "quay.io", "a/b", None, SHA256),
        (f"alpine@{SHA512}", "docker.io", "library/alpine", None, SHA512),
        (f"localhost:5000/a:t@{SHA512}", "localhost:5000", "a", "t", SHA512),
        ("Registry.Example.COM/ns/app", "Registry.Example.COM", "ns/app", "latest", None),
        # docker's own quirk: a lone host:port without a path is a Docker Hub image with a tag
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
    ],
)
def test_parse_valid(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)


def test_docker_hub_names_and_api_host() -> None:
    ref = Reference.parse("alpine")
    assert str(ref) == "docker.io/library/alpine:latest"
    assert ref.registry == DOCKER_HUB
    assert ref.api_host == "registry-1.docker.io"
    assert ref.name == "docker.io/library/alpine"
    assert ref.identifier == "latest"
    other = Reference.parse("localhost:5000/a/b:t")
    assert other.api_host == "localhost:5000"
    assert str(other) == "localhost:5000/a/b:t"


def test_tag_and_digest_kept_digest_wins() -> None:
    ref = Reference.parse(f"localhost:5000/a/b:t@{SHA256}")
    assert ref.tag == "t"
    assert str(ref.digest) == SHA256
    assert ref.identifier == SHA256  # the digest is what gets fetched
    assert str(ref) == f"localhost:5000/a/b:t@{SHA256}"
    assert Reference.parse(str(ref)) == ref


def test_sha512_digest() -> None:
    ref = Reference.parse(f"localhost:5000/x@{SHA512}")
    assert ref.digest is not None
    assert ref.digest.algorithm == "sha512"
    assert ref.digest.hex == "b" * 128
    assert ref.tag is None
    assert ref.identifier == SHA512


def test_no_default_tag() -> None:
    assert Reference.parse("localhost:5000/x", default_tag=False).tag is None


def test_with_helpers() -> None:
    ref = Reference.parse(f"localhost:5000/x:t@{SHA256}")
    assert ref.with_tag("u") == Reference("localhost:5000", "x", "u", None)
    assert ref.with_repository("y").repository == "y"
    assert ref.with_digest(None).identifier == "t"


def test_maximum_lengths_accepted() -> None:
    tag = "t" * 128
    assert Reference.parse(f"x:{tag}").tag == tag
    # registry + "/" + path == 255 characters exactly
    host = "h.io"
    path = "p" * (255 - len(host) - 1)
    assert Reference.parse(f"{host}/{path}").repository == path


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (":tag", "empty repository"),
        (f"@{SHA256}", "empty repository"),
        ("ALPINE", "lowercase"),
        ("library/Alpine", "lowercase"),
        ("quay.io/ns/App:v1", "lowercase"),
        ("alpine:-bad", "tag '-bad'"),
        ("alpine:.bad", "tag '.bad'"),
        ("alpine:bad tag", "tag 'bad tag'"),
        ("alpine:bad!", "tag 'bad!'"),
        ("alpine:tägé", "tag 'tägé'"),  # non-ASCII letters are not in the tag grammar
        ("alpine:v1\n", "tag"),  # a trailing newline is not silently accepted
        ("alpine\n", "component"),
        ("alpine:" + "t" * 129, "tag"),
        ("alpine:", "tag ''"),
        ("a//b", "component ''"),
        ("a/b/", "component ''"),
        ("a/-b", "component '-b'"),
        ("a/b-", "component 'b-'"),
        ("a/b..c", "component 'b..c'"),
        ("h.io/" + "p" * 251, "longer than 255"),
        ("a" * 300, "longer than 255"),
        ("bad_host.io/x", "registry host 'bad_host.io'"),
        ("-bad.io/x", "registry host '-bad.io'"),
        ("[zz]:5000/x", "registry host"),
        ("docker://alpine", "transport"),
        ("alpine@sha256:abc", "malformed sha256 digest"),
        ("alpine@" + "sha256:" + "A" * 64, "malformed sha256 digest"),
        ("alpine@md5:" + "a" * 32, "unsupported digest algorithm 'md5'"),
        ("alpine@sha512:" + "b" * 64, "malformed sha512 digest"),
        ("alpine@" + SHA256 + "\n", "digest"),
        ("alpine@latest", "digest"),
    ],
)
def test_parse_invalid_names_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    message = str(info.value)
    assert message.startswith("invalid reference")
    assert fragment in message


def test_invalid_reference_is_invalid_input() -> None:
    from worker.registry import InvalidInput

    with pytest.raises(InvalidInput):
        Reference.parse("UPPER")


@pytest.mark.parametrize(
    "text",
    ["", "sha256", "sha256:", "sha256:" + "a" * 63, "sha256:" + "g" * 64, "sha256:" + "a" * 64 + "\n", "SHA256:ab"],
)
def test_digest_parse_invalid(text: str) -> None:
    with pytest.raises(InvalidDigest, match="digest"):
        Digest.parse(text)


def test_digest_of_and_roundtrip() -> None:
    d = Digest.of(b"hello")
    assert str(d) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert Digest.parse(str(d)) == d
    d512 = Digest.of(b"hello", "sha512")
    assert d512.algorithm == "sha512" and len(d512.hex) == 128
    assert Digest.parse(str(d512)) == d512
