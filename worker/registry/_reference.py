"""Image references, parsed and normalised the way docker and skopeo do it."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ._errors import InvalidDigest, InvalidReference
from ._types import Digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_NAME = 255


def _looks_like_domain(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost" or part.lower() != part


@dataclass(frozen=True)
class Reference:
    """A registry image reference: ``registry/repository[:tag][@digest]``.

    ``registry`` is the name users write (``docker.io``), ``api_host`` the host
    actually contacted (``registry-1.docker.io``).
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: bool = True) -> Reference:
        """Parse ``text`` like docker: ``alpine`` is ``docker.io/library/alpine:latest``."""
        original = text
        if not text:
            raise InvalidReference("invalid reference: empty image name")
        if "://" in text:
            raise InvalidReference(f"invalid reference {original!r}: unexpected transport prefix")
        digest: Digest | None = None
        if "@" in text:
            text, _, dig = text.partition("@")
            try:
                digest = Digest.parse(dig)
            except InvalidDigest as exc:
                raise InvalidReference(f"invalid reference {original!r}: {exc}") from None
        tag: str | None = None
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            text, tag = text[:colon], text[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReference(
                    f"invalid reference {original!r}: tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
                )
        if not text:
            raise InvalidReference(f"invalid reference {original!r}: empty repository name")
        first, sep, rest = text.partition("/")
        if sep and _looks_like_domain(first):
            registry, path = first, rest
            if not _DOMAIN.fullmatch(registry):
                raise InvalidReference(f"invalid reference {original!r}: invalid registry host {registry!r}")
        else:
            registry, path = DOCKER_HUB, text
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in path:
                path = "library/" + path
        if path.lower() != path:
            raise InvalidReference(f"invalid reference {original!r}: repository name must be lowercase")
        for comp in path.split("/"):
            if not _COMPONENT.fullmatch(comp):
                raise InvalidReference(f"invalid reference {original!r}: invalid repository path component {comp!r}")
        if len(registry) + 1 + len(path) > MAX_NAME:
            raise InvalidReference(f"invalid reference {original!r}: name longer than {MAX_NAME} characters")
        if tag is None and digest is None and default_tag:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What goes in ``/v2/<name>/manifests/<identifier>``: the digest if any, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or "latest"

    def with_tag(self, tag: str | None) -> Reference:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: Digest | None) -> Reference:
        return replace(self, digest=digest)

    def with_repository(self, repository: str) -> Reference:
        return replace(self, repository=repository)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + str(self.digest)
        return out
