"""Promotion: trust policy (containers-policy.json), sigstore verification and signing.

``Admission`` is what copy and sync consult while resolving an image, before anything is planned or
written: it reads the image's sigstore signatures from its source and applies the policy. ``Signer``
signs what an image wrote, once it is written. Keyless signing and verification (Fulcio, Rekor) need
the network and are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.registry import Digest

from ..plan import ResolvedImage
from ..transports import ImageName, ImageSource
from ..transports.registry import RegistrySource
from .attachments import (
    SIGNATURE_ANNOTATION,
    SIGNATURE_MEDIA_TYPE,
    Attachment,
    append_signature,
    attachment_tag,
    read_signatures,
)
from .keys import KeyPair, PrivateKey, generate_key_pair, load_public_keys, verify_signature
from .payload import SignedClaims, make_payload, parse_payload
from .policy import TrustPolicy, default_policy_path
from .sign import PASSPHRASE_ENV, Signer, SigningConfig, sign_written


def checked_digests(resolved: ResolvedImage) -> list[Digest]:
    """The manifests whose signatures count, as skopeo checks them: every single image copied
    (each chosen instance of an index), or the index itself when only the index is copied."""
    if resolved.children:
        return list(resolved.children)
    return [resolved.top.digest]


@dataclass(frozen=True)
class Admission:
    policy: TrustPolicy
    #: refuse images no signature was verified for, whatever the policy says (``--require-signed``)
    require_signed: bool = False

    def check(self, name: ImageName, src: ImageSource, resolved: ResolvedImage) -> None:
        """Raise ``PolicyRejected`` unless the policy admits the image as it was read."""

        def signatures(digest: Digest) -> tuple[list[Attachment], int]:
            if not isinstance(src, RegistrySource):
                return [], 0  # only registries carry sigstore attachments
            return read_signatures(src.client, src.repository, digest)

        self.policy.check(name, checked_digests(resolved), signatures, require_signed=self.require_signed)


__all__ = [
    "PASSPHRASE_ENV",
    "SIGNATURE_ANNOTATION",
    "SIGNATURE_MEDIA_TYPE",
    "Admission",
    "Attachment",
    "KeyPair",
    "PrivateKey",
    "SignedClaims",
    "Signer",
    "SigningConfig",
    "TrustPolicy",
    "append_signature",
    "attachment_tag",
    "checked_digests",
    "default_policy_path",
    "generate_key_pair",
    "load_public_keys",
    "make_payload",
    "parse_payload",
    "read_signatures",
    "sign_written",
    "verify_signature",
]
