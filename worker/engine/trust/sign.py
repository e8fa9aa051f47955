"""Signing copied images with a sigstore private key, as ``skopeo copy --sign-by-sigstore-private-key`` does.

Each manifest an image wrote (an index and each of its images, or the one image) gets a signature whose
payload names the manifest digest and the identity (``--sign-identity``, default the destination
reference), stored as a sigstore attachment next to it. Signing is idempotent: a manifest that already
has a valid signature by this key for this identity is not signed again, so a retried finalizer or a
re-run adds nothing.

The key and the passphrase are read where the signing runs: the CLI's files for the embedded executor,
the worker's own files on workers (the job carries only the paths, never key bytes or the passphrase).
"""

from __future__ import annotations

import base64
import getpass
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from worker.registry import CopyFailed, Digest, InvalidInput, InvalidReference, Reference, RegistryClient

from ..transports import ImageDestination
from ..transports.registry import RegistryDestination
from .attachments import SIGNATURE_ANNOTATION, SIGNATURE_MEDIA_TYPE, Attachment, append_signature, read_signatures
from .keys import PrivateKey, verify_signature
from .payload import InvalidPayload, make_payload, parse_payload

#: how often a signature is appended again when a concurrent writer replaced the signature manifest
APPEND_ATTEMPTS = 5
#: a worker's passphrase when the job names no passphrase file (set in the worker's environment)
PASSPHRASE_ENV = "FERRY_SIGN_PASSPHRASE"


@dataclass(frozen=True)
class SigningConfig:
    """What a job says about signing: paths and an identity, nothing secret."""

    key_path: str
    passphrase_file: str | None = None
    identity: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SigningConfig:
        return cls(str(obj["key_path"]), obj.get("passphrase_file"), obj.get("identity"))

    def validate(self) -> None:
        if self.identity is not None:
            try:
                ref = Reference.parse(self.identity, default_tag=False)
            except InvalidReference as exc:
                raise InvalidInput(f"--sign-identity: {exc}") from None
            if ref.tag is None and ref.digest is None:
                raise InvalidInput(f"--sign-identity {self.identity!r} must name a tag or a digest")


def _passphrase(config: SigningConfig, *, interactive: bool) -> bytes:
    if config.passphrase_file:
        try:
            with open(config.passphrase_file, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise InvalidInput(f"cannot read the passphrase file {config.passphrase_file}: {exc.strerror}") from None
        # skopeo reads the first line
        return text.split(b"\n", 1)[0].rstrip(b"\r")
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env.encode()
    if interactive and sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for key {config.key_path}: ").encode()
    raise InvalidInput(
        f"no passphrase for the signing key {config.key_path}: give --sign-passphrase-file or set {PASSPHRASE_ENV}"
    )


class Signer:
    def __init__(self, config: SigningConfig, *, interactive: bool = False) -> None:
        config.validate()
        self.config = config
        try:
            with open(config.key_path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidInput(f"cannot read the signing key {config.key_path}: {exc.strerror}") from None
        self._key = PrivateKey.load(data, _passphrase(config, interactive=interactive))

    def identity_for(self, destination: Reference) -> str:
        return self.config.identity or str(destination)

    def _has_own_signature(self, client: RegistryClient, repo: str, digest: Digest, identity: str) -> bool:
        sigs, _ = read_signatures(client, repo, digest)
        public = [self._key.public_key()]
        for sig in sigs:
            raw = sig.signature
            if raw is None or not verify_signature(public, sig.payload, raw):
                continue
            try:
                claims = parse_payload(sig.payload)
            except InvalidPayload:
                continue
            if claims.manifest_digest == digest and claims.docker_reference == identity:
                return True
        return False

    def sign(self, client: RegistryClient, destination: Reference, digest: Digest) -> bool:
        """Sign manifest ``digest`` in the destination repository; False when it already has our signature.

        Appending is read-modify-write of the ``.sig`` manifest: two workers signing the same manifest (two
        tags of one image) could each write a version without the other's signature. So the signature is
        read back, and appended again if another writer replaced it.
        """
        identity = self.identity_for(destination)
        repo = destination.repository
        added = False
        for _ in range(APPEND_ATTEMPTS):
            if self._has_own_signature(client, repo, digest, identity):
                return added
            payload = make_payload(digest, identity)
            signature = base64.b64encode(self._key.sign(payload)).decode()
            attachment = Attachment(SIGNATURE_MEDIA_TYPE, payload, {SIGNATURE_ANNOTATION: signature})
            append_signature(client, repo, digest, attachment)
            added = True
        raise CopyFailed(f"signing {destination.name}@{digest}: the signature manifest kept changing under us")


def sign_written(signer: Signer, dest: ImageDestination, digests: Sequence[str]) -> int:
    """Sign each manifest of an image written at ``dest``; returns how many signatures were added."""
    if not isinstance(dest, RegistryDestination):
        raise InvalidInput(f"{dest.description}: signing needs a docker:// destination")
    return sum(1 for d in digests if signer.sign(dest.client, dest.reference, Digest.parse(d)))
