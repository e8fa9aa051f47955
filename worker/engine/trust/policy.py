"""Trust policy as containers-policy.json(5) defines it, evaluated before anything is written.

A policy maps an image to a list of requirements: the most specific scope of the image's transport wins
(``transports.docker`` keys: ``registry/repo:tag`` or ``@digest``, then ``registry/repo``, each parent
namespace, ``registry``, ``*.domain`` wildcards, then ``""``), else ``default``. Every requirement of that
list must accept the image.

Requirements: ``insecureAcceptAnything``, ``reject``, ``sigstoreSigned`` with public keys (``keyPath``,
``keyPaths``, ``keyData``, ``keyDatas``) and a ``signedIdentity``. Refused with a clear reason when an image
reaches them: ``signedBy`` (GPG simple signing: no maintained Python OpenPGP library verifies it soundly
here) and keyless ``sigstoreSigned`` (``fulcio``, ``rekorPublicKey*``, ``pki``: they need Fulcio/Rekor).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.registry import Digest, FerryError, InvalidInput, InvalidReference, PolicyRejected, Reference

from ..transports import ImageName
from .attachments import SIGNATURE_MEDIA_TYPE, Attachment
from .keys import PublicKey, load_public_keys, verify_signature
from .payload import InvalidPayload, parse_payload

#: where the policy is looked up without --policy (containers-policy.json(5))
SYSTEM_POLICY = "/etc/containers/policy.json"

#: ``digest -> (signatures, number of other attachments)`` for the image being checked
SignatureSource = Callable[[Digest], tuple[list[Attachment], int]]


def user_policy_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".config", "containers", "policy.json")


def default_policy_path() -> str:
    """``$HOME/.config/containers/policy.json`` if it exists, else ``/etc/containers/policy.json``."""
    user = user_policy_path()
    return user if os.path.exists(user) else SYSTEM_POLICY


# -- signed identity -----------------------------------------------------------------------------------------------


def _parse_ref(text: str) -> Reference | None:
    try:
        return Reference.parse(text, default_tag=False)
    except InvalidReference:
        return None


def _name_only(ref: Reference) -> bool:
    return ref.tag is None and ref.digest is None


def _repo_digest_or_exact(intended: Reference, signed: Reference) -> bool:
    if _name_only(signed):
        return False
    if intended.tag is not None:
        return str(signed) == str(intended)
    if intended.digest is not None:
        return signed.name == intended.name
    return False


@dataclass(frozen=True)
class SignedIdentity:
    """How the identity a signature claims must relate to the image's own reference."""

    kind: str = "matchRepoDigestOrExact"
    reference: str = ""  # exactReference: dockerReference; exactRepository: dockerRepository
    prefix: str = ""
    signed_prefix: str = ""

    @classmethod
    def from_json(cls, obj: Any) -> SignedIdentity:
        if obj is None:
            return cls()
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise InvalidInput("policy: signedIdentity must be an object with a type")
        kind = obj["type"]
        if kind in ("matchExact", "matchRepoDigestOrExact", "matchRepository"):
            _fields(obj, {"type"}, f"signedIdentity {kind}")
            return cls(kind)
        if kind == "exactReference":
            _fields(obj, {"type", "dockerReference"}, "signedIdentity exactReference")
            ref = _parse_ref(str(obj["dockerReference"]))
            if ref is None or _name_only(ref):
                raise InvalidInput(f"policy: exactReference {obj['dockerReference']!r} is not a tagged/digested name")
            return cls(kind, reference=str(obj["dockerReference"]))
        if kind == "exactRepository":
            _fields(obj, {"type", "dockerRepository"}, "signedIdentity exactRepository")
            if _parse_ref(str(obj["dockerRepository"])) is None:
                raise InvalidInput(f"policy: invalid exactRepository {obj['dockerRepository']!r}")
            return cls(kind, reference=str(obj["dockerRepository"]))
        if kind == "remapIdentity":
            _fields(obj, {"type", "prefix", "signedPrefix"}, "signedIdentity remapIdentity")
            return cls(kind, prefix=str(obj["prefix"]), signed_prefix=str(obj["signedPrefix"]))
        raise InvalidInput(f"policy: unknown signedIdentity type {kind!r}")

    def matches(self, image: Reference | None, signed_text: str) -> bool:
        signed = _parse_ref(signed_text)
        if signed is None:
            return False
        if self.kind in ("exactReference", "exactRepository"):
            wanted = _parse_ref(self.reference)
            if wanted is None:
                return False
            if self.kind == "exactRepository":
                return signed.name == wanted.name
            return not _name_only(signed) and str(signed) == str(wanted)
        if image is None:
            return False
        if self.kind == "matchExact":
            return not _name_only(image) and not _name_only(signed) and str(signed) == str(image)
        if self.kind == "matchRepository":
            return signed.name == image.name
        if self.kind == "remapIdentity":
            image = self._remap(image)
            if image is None:
                return False
        return _repo_digest_or_exact(image, signed)

    def _remap(self, ref: Reference) -> Reference | None:
        name = ref.name
        if not (name == self.prefix or (name.startswith(self.prefix) and name[len(self.prefix) :][:1] == "/")):
            return ref
        return _parse_ref(str(ref).replace(self.prefix, self.signed_prefix, 1))

    def describe(self) -> str:
        return f"{self.kind} {self.reference}".strip()


# -- requirements ----------------------------------------------------------------------------------------------------


def _fields(obj: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise InvalidInput(f"policy: unknown field(s) {', '.join(sorted(unknown))} in {what}")


@dataclass(frozen=True)
class Verdict:
    #: a signature was verified for every manifest (sigstoreSigned accepted the image)
    verified: bool = False


class Requirement(ABC):
    """One policy requirement; each type in containers-policy.json(5) is a subclass."""

    type = ""

    @abstractmethod
    def check(self, image: ImageName, digests: Sequence[Digest], signatures: SignatureSource) -> Verdict:
        """Accept the image (a Verdict) or raise PolicyRejected saying why."""


class InsecureAcceptAnything(Requirement):
    type = "insecureAcceptAnything"

    def check(self, image: ImageName, digests: Sequence[Digest], signatures: SignatureSource) -> Verdict:
        return Verdict()


class Reject(Requirement):
    type = "reject"

    def check(self, image: ImageName, digests: Sequence[Digest], signatures: SignatureSource) -> Verdict:
        raise PolicyRejected("requirement reject: the policy rejects every image in this scope")


class Unsupported(Requirement):
    """A requirement Ferry cannot evaluate soundly: refused whenever an image reaches it."""

    def __init__(self, kind: str, why: str) -> None:
        self.kind = kind
        self.why = why

    def check(self, image: ImageName, digests: Sequence[Digest], signatures: SignatureSource) -> Verdict:
        raise PolicyRejected(f"requirement {self.kind}: {self.why}")


class SigstoreSigned(Requirement):
    type = "sigstoreSigned"

    def __init__(self, keys: list[PublicKey], identity: SignedIdentity) -> None:
        self.keys = keys
        self.identity = identity

    def check(self, image: ImageName, digests: Sequence[Digest], signatures: SignatureSource) -> Verdict:
        for digest in digests:
            self._check_one(image, digest, signatures)
        return Verdict(verified=True)

    def _check_one(self, image: ImageName, digest: Digest, signatures: SignatureSource) -> None:
        sigs, others = signatures(digest)
        reasons: list[str] = []
        for sig in sigs:
            reason = self._reason(image, digest, sig)
            if reason is None:
                return
            reasons.append(reason)
        what = f"requirement sigstoreSigned: manifest {digest}"
        if not reasons:
            extra = f" ({others} non-signature attachment(s))" if others else ""
            raise PolicyRejected(f"{what}: a signature was required, but no signature exists{extra}")
        unique = list(dict.fromkeys(reasons))
        raise PolicyRejected(f"{what}: no signature was accepted: {'; '.join(unique)}")

    def _reason(self, image: ImageName, digest: Digest, sig: Attachment) -> str | None:
        """Why this signature does not vouch for the image, or None when it does."""
        if sig.media_type != SIGNATURE_MEDIA_TYPE:
            return f"attachment of type {sig.media_type} is not a signature"
        raw_sig = sig.signature
        if raw_sig is None:
            return "missing or malformed dev.cosignproject.cosign/signature annotation"
        if not verify_signature(self.keys, sig.payload, raw_sig):
            return "cryptographic signature verification failed (not signed by a trusted key)"
        try:
            claims = parse_payload(sig.payload)
        except InvalidPayload as exc:
            return f"invalid signature payload: {exc}"
        if claims.manifest_digest != digest:
            return f"signature for digest {claims.manifest_digest} does not match {digest}"
        if not self.identity.matches(image.reference, claims.docker_reference):
            return f"signature for identity {claims.docker_reference!r} is not accepted ({self.identity.describe()})"
        return None


def _key_datas(obj: dict[str, Any], what: str) -> list[tuple[bytes, str]]:
    sources = [k for k in ("keyPath", "keyPaths", "keyData", "keyDatas") if k in obj]
    if len(sources) > 1:
        raise InvalidInput(f"policy: {what}: more than one of keyPath, keyPaths, keyData, keyDatas")
    out: list[tuple[bytes, str]] = []

    def read(path: Any) -> None:
        if not isinstance(path, str) or not path:
            raise InvalidInput(f"policy: {what}: key paths must be non-empty strings")
        try:
            with open(path, "rb") as f:
                out.append((f.read(), path))
        except OSError as exc:
            raise InvalidInput(f"policy: {what}: cannot read key {path}: {exc.strerror}") from None

    def decode(text: Any) -> None:
        try:
            out.append((base64.b64decode(str(text), validate=True), "keyData"))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"policy: {what}: keyData is not base64") from None

    if "keyPath" in obj:
        read(obj["keyPath"])
    for p in obj.get("keyPaths") or []:
        read(p)
    if "keyData" in obj:
        decode(obj["keyData"])
    for d in obj.get("keyDatas") or []:
        decode(d)
    return out


def parse_requirement(obj: Any) -> Requirement:
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise InvalidInput("policy: every requirement must be an object with a type")
    kind = obj["type"]
    if kind == "insecureAcceptAnything":
        _fields(obj, {"type"}, kind)
        return InsecureAcceptAnything()
    if kind == "reject":
        _fields(obj, {"type"}, kind)
        return Reject()
    if kind == "signedBy":
        return Unsupported(
            kind, "GPG simple signing is not supported by Ferry (use sigstoreSigned, or verify with skopeo)"
        )
    if kind == "sigstoreSigned":
        keyless = [k for k in ("fulcio", "pki") if k in obj] + [k for k in obj if k.startswith("rekorPublicKey")]
        _fields(
            obj,
            {"type", "keyPath", "keyPaths", "keyData", "keyDatas", "signedIdentity", "fulcio", "pki"}
            | {k for k in obj if k.startswith("rekorPublicKey")},
            kind,
        )
        identity = SignedIdentity.from_json(obj.get("signedIdentity"))
        if keyless:
            return Unsupported(
                kind, f"{', '.join(keyless)} (keyless / Rekor verification) needs the network and is not supported"
            )
        datas = _key_datas(obj, kind)
        if not datas:
            raise InvalidInput("policy: sigstoreSigned needs keyPath, keyPaths, keyData or keyDatas")
        keys: list[PublicKey] = []
        for data, what in datas:
            keys += load_public_keys(data, f"policy: sigstoreSigned key {what}")
        return SigstoreSigned(keys, identity)
    raise InvalidInput(f"policy: unknown requirement type {kind!r}")


# -- scopes ----------------------------------------------------------------------------------------------------------


def _docker_scopes(ref: Reference) -> list[str]:
    """Identity first, then the namespaces containers/image tries (docker/policyconfiguration)."""
    out: list[str] = []
    if ref.digest is not None:
        out.append(f"{ref.name}@{ref.digest}")
    elif ref.tag is not None:
        out.append(f"{ref.name}:{ref.tag}")
    name = ref.name
    while True:
        out.append(name)
        if "/" not in name:
            break
        name = name.rsplit("/", 1)[0]
    host = name.split(":", 1)[0]
    while "." in host:
        host = host.split(".", 1)[1]
        out.append("*." + host)
    return out


def _path_scopes(path: str) -> list[str]:
    resolved = os.path.realpath(path)
    out = [resolved]
    while True:
        parent = os.path.dirname(resolved)
        if parent in ("/", resolved):
            break
        out.append(parent)
        resolved = parent
    return out


def image_scopes(name: ImageName) -> list[str]:
    if name.reference is not None:
        return _docker_scopes(name.reference)
    if name.transport in ("oci", "oci-archive"):
        return _path_scopes(name.details.split(":", 1)[0])
    if name.transport == "dir":
        return _path_scopes(name.details)
    return []


# -- the policy ------------------------------------------------------------------------------------------------------


@dataclass
class TrustPolicy:
    default: list[Requirement]
    transports: dict[str, dict[str, list[Requirement]]] = field(default_factory=dict)
    #: where it came from, for messages
    origin: str = ""

    @classmethod
    def from_json(cls, obj: Any, origin: str = "") -> TrustPolicy:
        if not isinstance(obj, dict):
            raise InvalidInput(f"policy {origin}: not a JSON object")
        _fields(obj, {"default", "transports"}, "the policy")
        if not isinstance(obj.get("default"), list) or not obj["default"]:
            raise InvalidInput(f"policy {origin}: 'default' must be a non-empty list of requirements")
        default = [parse_requirement(r) for r in obj["default"]]
        transports: dict[str, dict[str, list[Requirement]]] = {}
        for transport, scopes in (obj.get("transports") or {}).items():
            if not isinstance(scopes, dict):
                raise InvalidInput(f"policy {origin}: transports.{transport} must be an object")
            transports[transport] = {}
            for scope, reqs in scopes.items():
                if not isinstance(reqs, list) or not reqs:
                    raise InvalidInput(f"policy {origin}: transports.{transport}[{scope!r}] must be a non-empty list")
                transports[transport][scope] = [parse_requirement(r) for r in reqs]
        return cls(default, transports, origin)

    @classmethod
    def load(cls, path: str) -> TrustPolicy:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise InvalidInput(
                f"no trust policy at {path} (give --policy FILE, or --insecure-policy to run without one)"
            ) from None
        except OSError as exc:
            raise InvalidInput(f"cannot read the trust policy {path}: {exc.strerror}") from None
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise InvalidInput(f"policy {path}: invalid JSON: {exc}") from None
        return cls.from_json(obj, path)

    @classmethod
    def accept_anything(cls) -> TrustPolicy:
        return cls([InsecureAcceptAnything()], origin="--insecure-policy")

    def requirements_for(self, name: ImageName) -> tuple[str, list[Requirement]]:
        scopes = self.transports.get(name.transport)
        if scopes:
            for scope in image_scopes(name):
                if scope in scopes:
                    return f"transports.{name.transport}[{scope!r}]", scopes[scope]
            if "" in scopes:
                return f"transports.{name.transport}['']", scopes[""]
        return "default", self.default

    def accepts_anything(self) -> bool:
        """True when every scope is insecureAcceptAnything: no image needs a look."""
        every = [self.default, *(r for s in self.transports.values() for r in s.values())]
        return all(isinstance(req, InsecureAcceptAnything) for reqs in every for req in reqs)

    def check(
        self,
        name: ImageName,
        digests: Sequence[Digest],
        signatures: SignatureSource,
        *,
        require_signed: bool = False,
    ) -> None:
        """Raise ``PolicyRejected`` (one line: the image, the requirement and why) unless the image may be copied.

        ``digests`` are the manifests whose signatures count: each must be vouched for.
        """
        scope, reqs = self.requirements_for(name)
        verified = False
        try:
            for req in reqs:
                verified = req.check(name, digests, signatures).verified or verified
        except PolicyRejected as exc:
            raise PolicyRejected(f"{name} rejected by the trust policy ({scope}): {exc}") from None
        except FerryError as exc:
            raise PolicyRejected(f"{name}: cannot read its signatures: {exc}") from None
        if require_signed and not verified:
            raise PolicyRejected(
                f"{name} rejected: --require-signed, but the trust policy ({scope}) verified no signature for it"
            )


__all__ = [
    "SYSTEM_POLICY",
    "InsecureAcceptAnything",
    "Reject",
    "Requirement",
    "SignedIdentity",
    "SigstoreSigned",
    "TrustPolicy",
    "default_policy_path",
    "image_scopes",
]
