"""The sigstore "simple signing" payload: what a cosign/skopeo signature signs.

::

    {"critical": {"identity": {"docker-reference": "registry/repo:tag"},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "cosign container image signature"},
     "optional": {"creator": "...", "timestamp": 1700000000}}

Parsed as strictly as containers/image parses it: exact field sets in ``critical``, a known type.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from worker.registry import Digest, InvalidDigest

SIGNATURE_TYPE = "cosign container image signature"
CREATOR = "Ferry 0.1.0"


class InvalidPayload(ValueError):
    """The payload is not a well-formed simple-signing document."""


@dataclass(frozen=True)
class SignedClaims:
    manifest_digest: Digest
    docker_reference: str


def make_payload(manifest_digest: Digest, docker_reference: str) -> bytes:
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": str(manifest_digest)},
            "type": SIGNATURE_TYPE,
        },
        "optional": {"creator": CREATOR, "timestamp": int(time.time())},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _exact(obj: Any, fields: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidPayload(f"{where} is not a JSON object")
    if set(obj) != fields:
        raise InvalidPayload(f"{where} has fields {sorted(obj)}, expected {sorted(fields)}")
    return obj


def parse_payload(raw: bytes) -> SignedClaims:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InvalidPayload("payload is not JSON") from None
    top = _exact(doc, {"critical", "optional"}, "payload")
    if top["optional"] is not None and not isinstance(top["optional"], dict):
        raise InvalidPayload("optional is not a JSON object")
    critical = _exact(top["critical"], {"type", "image", "identity"}, "critical")
    if critical["type"] != SIGNATURE_TYPE:
        raise InvalidPayload(f"unrecognized signature type {critical['type']!r}")
    image = _exact(critical["image"], {"docker-manifest-digest"}, "critical.image")
    identity = _exact(critical["identity"], {"docker-reference"}, "critical.identity")
    digest_text, reference = image["docker-manifest-digest"], identity["docker-reference"]
    if not isinstance(digest_text, str) or not isinstance(reference, str):
        raise InvalidPayload("docker-manifest-digest and docker-reference must be strings")
    try:
        digest = Digest.parse(digest_text)
    except InvalidDigest:
        raise InvalidPayload(f"invalid docker-manifest-digest {digest_text!r}") from None
    return SignedClaims(digest, reference)
